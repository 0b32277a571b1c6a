package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
)

// figure is one measured quantity of a case.
type figure struct {
	name     string
	decimals int
}

// summaryHead says where and how the figures were taken.
type summaryHead struct {
	machine, load, command string
	runs                   int
}

// writeSummary prints, in Markdown, each case's figures run by run, then
// their medians and ranges for each server and for the ratio vgo ÷ plain.
// A case cut short by a failure shows the runs it completed.
func writeSummary(w io.Writer, head summaryHead, results []*caseResult) {
	fmt.Fprintf(w, "## vgo server against a plain goroutine-per-connection server\n\n")
	fmt.Fprintf(w, "Machine: %s; load average at the start: %s.\n\n", head.machine, head.load)
	fmt.Fprintf(w, "```sh\n%s\n```\n\n", head.command)
	fmt.Fprintf(w, "Every run measures both servers, each with a new server process and a new client process: "+
		"vgo first in odd runs, plain first in even ones. Medians over the runs, with the range (lowest–highest); "+
		"the ratio is vgo ÷ plain, taken run by run. CPU times include the kernel's time in the process's system calls.\n")
	for _, res := range results {
		fmt.Fprintf(w, "\n### %s\n\n", res.spec.title)
		if len(res.runs) == 0 {
			fmt.Fprintf(w, "No run completed.\n")
			continue
		}
		if len(res.runs) < head.runs {
			fmt.Fprintf(w, "Only %d of %d runs completed.\n\n", len(res.runs), head.runs)
		}
		writeRuns(w, res)
		fmt.Fprintln(w)
		writeMedians(w, res)
	}
}

// writeRuns prints one row per run and server.
func writeRuns(w io.Writer, res *caseResult) {
	fmt.Fprintf(w, "| run | server |")
	for _, f := range res.spec.figures {
		fmt.Fprintf(w, " %s |", f.name)
	}
	fmt.Fprintf(w, "\n|---|---|%s\n", strings.Repeat("---:|", len(res.spec.figures)))
	for i, run := range res.runs {
		for _, k := range []int{run.first, 1 - run.first} {
			fmt.Fprintf(w, "| %d | %s |", i+1, servers[k].name)
			for j, f := range res.spec.figures {
				fmt.Fprintf(w, " %s |", format(run.values[k][j], f.decimals))
			}
			fmt.Fprintln(w)
		}
	}
}

// writeMedians prints one row per figure.
func writeMedians(w io.Writer, res *caseResult) {
	fmt.Fprintf(w, "| figure | %s median (range) | %s median (range) | %s÷%s median (range) |\n",
		servers[0].name, servers[1].name, servers[0].name, servers[1].name)
	fmt.Fprintf(w, "|---|---:|---:|---:|\n")
	for j, f := range res.spec.figures {
		var a, b, ratio []float64
		for _, run := range res.runs {
			a = append(a, run.values[0][j])
			b = append(b, run.values[1][j])
			if run.values[1][j] != 0 {
				ratio = append(ratio, run.values[0][j]/run.values[1][j])
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s |\n", f.name, spread(a, f.decimals), spread(b, f.decimals), spread(ratio, 2))
	}
}

// spread formats the median of vs and their range.
func spread(vs []float64, decimals int) string {
	if len(vs) == 0 {
		return "–"
	}
	s := slices.Sorted(slices.Values(vs))
	return fmt.Sprintf("%s (%s–%s)", format(median(s), decimals), format(s[0], decimals), format(s[len(s)-1], decimals))
}

// median returns the median of sorted values.
func median(sorted []float64) float64 {
	n := len(sorted)
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

// format prints v with the given decimals and its thousands grouped.
func format(v float64, decimals int) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	s := strconv.FormatFloat(v, 'f', decimals, 64)
	sign := ""
	if s[0] == '-' {
		sign, s = "-", s[1:]
	}
	whole, frac, found := strings.Cut(s, ".")
	if found {
		frac = "." + frac
	}
	return sign + group(whole) + frac
}

// group puts a comma between each group of three digits of a whole number.
func group(digits string) string {
	if len(digits) <= 3 {
		return digits
	}
	var b strings.Builder
	head := len(digits) % 3
	if head > 0 {
		b.WriteString(digits[:head])
	}
	for i := head; i < len(digits); i += 3 {
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(digits[i : i+3])
	}
	return b.String()
}
