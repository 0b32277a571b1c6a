package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// clockTick is the unit of utime and stime in /proc/<pid>/stat. USER_HZ is
// 100 on every Linux architecture Go supports; reading it would need cgo.
const clockTick = 10 * time.Millisecond

// cpuSample is a process's CPU time, user and system, at one moment, read
// two ways.
type cpuSample struct {
	sched time.Duration // sum of the threads' schedstat run time, in ns; -1 if unreadable
	ticks time.Duration // utime + stime, in clock ticks
}

// readCPU reads a process's CPU time so far.
func readCPU(pid int) (cpuSample, error) {
	ticks, err := readTicks(pid)
	if err != nil {
		return cpuSample{}, err
	}
	sched, err := readSchedstat(pid)
	if err != nil {
		sched = -1
	}
	return cpuSample{sched: sched, ticks: ticks}, nil
}

// cpuBetween returns the CPU time a process used between two samples: from
// schedstat where both have it, else from the ticks. The schedstat sum
// leaves out threads that exited in between, which a Go program without
// locked goroutines does not have; the ticks, which count them, are
// returned too so that the two can be compared.
func cpuBetween(a, b cpuSample) (cpu, ticks time.Duration) {
	ticks = b.ticks - a.ticks
	if a.sched < 0 || b.sched < 0 {
		return ticks, ticks
	}
	return b.sched - a.sched, ticks
}

// readTicks returns utime + stime from /proc/<pid>/stat, which count the
// threads that have exited too.
func readTicks(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may contain spaces;
	// the fields after it start with the state, field 3.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	var ticks uint64
	for _, s := range f[11:13] { // utime (field 14) and stime (field 15)
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * clockTick, nil
}

// readSchedstat returns the time on CPU of a process's live threads, the
// first field of each /proc/<pid>/task/<tid>/schedstat, in nanoseconds.
func readSchedstat(pid int) (time.Duration, error) {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return 0, err
	}
	var sum time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, t.Name(), "schedstat"))
		if os.IsNotExist(err) {
			continue // the thread exited since the directory was read
		}
		if err != nil {
			return 0, err
		}
		first, _, _ := strings.Cut(string(b), " ")
		ns, err := strconv.ParseInt(first, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s/%s/schedstat: %w", dir, t.Name(), err)
		}
		sum += time.Duration(ns)
	}
	return sum, nil
}

// readRSS returns a process's resident set size (VmRSS) in bytes.
func readRSS(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		rest, ok := strings.CutPrefix(line, "VmRSS:")
		if !ok {
			continue
		}
		kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("VmRSS of %d: %w", pid, err)
		}
		return kb << 10, nil
	}
	return 0, fmt.Errorf("no VmRSS for %d", pid)
}

// machineBusy is the machine's busy and total CPU time, summed over its
// CPUs, from the first line of /proc/stat.
type machineBusy struct{ busy, total time.Duration }

func readMachineBusy() (machineBusy, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return machineBusy{}, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return machineBusy{}, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var v [8]uint64 // user nice system idle iowait irq softirq steal
	for i := range v {
		if v[i], err = strconv.ParseUint(f[i+1], 10, 64); err != nil {
			return machineBusy{}, fmt.Errorf("/proc/stat: %w", err)
		}
	}
	busy := v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
	return machineBusy{
		busy:  time.Duration(busy) * clockTick,
		total: time.Duration(busy+v[3]+v[4]) * clockTick,
	}, nil
}

// share returns the part of the machine's CPU time that was busy between m
// and a later reading, from 0 to 1.
func (m machineBusy) share(later machineBusy) float64 {
	total := later.total - m.total
	if total <= 0 {
		return 0
	}
	return float64(later.busy-m.busy) / float64(total)
}

// loadAverage returns the first three fields of /proc/loadavg.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// machine describes the machine the figures come from.
func machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if name, ok := strings.CutPrefix(line, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":"))
				break
			}
		}
	}
	kernel := "unknown"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("%d CPUs (%s), Linux %s, %s %s/%s", runtime.NumCPU(), model, kernel,
		runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
