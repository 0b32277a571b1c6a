// Command benchratio reads the output of several interleaved runs of vgo's
// benchmarks and prints, for each benchmark that has both variants, the
// median and the range of the per-run ratios of their ns/op. A ratio below
// 1 means the first variant took less time.
//
// A variant is the first element after the benchmark's name:
// "BenchmarkOneWay/sessions/64B" is variant "sessions" of "OneWay/64B".
// By default the variants are vgo and baseline; -variant and -base choose
// others. With -medians it also prints, for each variant, the median of
// its ns/op, MB/s, B/op, allocs/op and allocs/1000op over the runs.
//
//	go run ./scripts/benchratio < bench.txt
//	go run ./scripts/benchratio -variant sessions -base vgo -medians < bench.txt
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// line matches "BenchmarkOneWay/vgo/64B-2   123   456.7 ns/op ...": the
// name, the variant, the rest of the name, and the figures.
var line = regexp.MustCompile(`^Benchmark([^/\s]+)/([^/\s]+?)(/\S*?)?(-\d+)?\s+\d+\s+(.*)$`)

// figure matches one "value unit" pair of a benchmark line.
var figure = regexp.MustCompile(`([\d.]+) (\S+)`)

// units are the figures -medians prints, in order.
var units = []string{"ns/op", "MB/s", "B/op", "allocs/op", "allocs/1000op"}

func main() {
	variant := flag.String("variant", "vgo", "the variant whose time is divided")
	base := flag.String("base", "baseline", "the variant it is divided by")
	medians := flag.Bool("medians", false, "also print each variant's median figures")
	flag.Parse()

	// runs[name][variant][unit] lists the figures in the order the runs
	// printed them.
	runs := map[string]map[string]map[string][]float64{}
	var names []string
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil || (m[2] != *variant && m[2] != *base) {
			continue
		}
		name := m[1] + m[3]
		if runs[name] == nil {
			runs[name] = map[string]map[string][]float64{}
			names = append(names, name)
		}
		if runs[name][m[2]] == nil {
			runs[name][m[2]] = map[string][]float64{}
		}
		for _, f := range figure.FindAllStringSubmatch(m[5], -1) {
			v, err := strconv.ParseFloat(f[1], 64)
			if err == nil {
				runs[name][m[2]][f[2]] = append(runs[name][m[2]][f[2]], v)
			}
		}
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, name := range names {
		a, b := runs[name][*variant]["ns/op"], runs[name][*base]["ns/op"]
		n := min(len(a), len(b))
		if n == 0 {
			continue
		}
		ratios := make([]float64, n)
		for i := range n {
			ratios[i] = a[i] / b[i]
		}
		slices.Sort(ratios)
		fmt.Printf("%-24s %s/%s time %.2f (%.2f-%.2f, %d runs)\n", name, *variant, *base, median(ratios), ratios[0], ratios[n-1], n)
		if *medians {
			for _, v := range []string{*variant, *base} {
				var parts []string
				for _, u := range units {
					if xs := runs[name][v][u]; len(xs) > 0 {
						parts = append(parts, format(median(xs))+" "+u)
					}
				}
				fmt.Printf("    %-12s %s\n", v, strings.Join(parts, "  "))
			}
		}
	}
}

// median returns the median of xs, which it sorts.
func median(xs []float64) float64 {
	slices.Sort(xs)
	n := len(xs)
	if n%2 == 0 {
		return (xs[n/2-1] + xs[n/2]) / 2
	}
	return xs[n/2]
}

// format prints v with four significant digits, without an exponent.
func format(v float64) string {
	if v >= 1000 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'g', 4, 64)
}
