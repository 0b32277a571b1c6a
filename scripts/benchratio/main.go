// Command benchratio reads the output of several interleaved runs of vgo's
// benchmarks and prints, for each benchmark that has a vgo and a baseline
// variant, the median and the range of the per-run ratios vgo ÷ baseline
// of ns/op. A ratio below 1 means vgo took less time.
//
//	go run ./scripts/benchratio < bench.txt
package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
)

// line matches "BenchmarkOneWay/vgo/64B-2   123   456.7 ns/op ...".
var line = regexp.MustCompile(`^Benchmark(\S+?)/(vgo|baseline)(\S*?)(-\d+)?\s+\d+\s+([\d.]+) ns/op`)

func main() {
	// runs[name][variant] lists ns/op in the order the runs printed them.
	runs := map[string]map[string][]float64{}
	var names []string
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		name := m[1] + m[3]
		ns, err := strconv.ParseFloat(m[5], 64)
		if err != nil {
			continue
		}
		if runs[name] == nil {
			runs[name] = map[string][]float64{}
			names = append(names, name)
		}
		runs[name][m[2]] = append(runs[name][m[2]], ns)
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, name := range names {
		vgo, base := runs[name]["vgo"], runs[name]["baseline"]
		n := min(len(vgo), len(base))
		if n == 0 {
			continue
		}
		ratios := make([]float64, n)
		for i := range n {
			ratios[i] = vgo[i] / base[i]
		}
		slices.Sort(ratios)
		median := ratios[n/2]
		if n%2 == 0 {
			median = (ratios[n/2-1] + ratios[n/2]) / 2
		}
		fmt.Printf("%-24s vgo/baseline time %.2f (%.2f-%.2f, %d runs)\n", name, median, ratios[0], ratios[n-1], n)
	}
}
