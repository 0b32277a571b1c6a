package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/vgonet/vgo/internal/procfs"
)

// cpuSample is a process's CPU time, user and system, at one moment, read
// two ways.
type cpuSample struct {
	sched time.Duration // sum of the threads' schedstat run time, in ns; -1 if unreadable
	ticks time.Duration // utime + stime, in clock ticks
}

// readCPU reads a process's CPU time so far.
func readCPU(pid int) (cpuSample, error) {
	ticks, err := procfs.CPU(pid)
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
func readRSS(pid int) (uint64, error) { return procfs.StatusBytes(pid, "VmRSS") }

// machineBusy is the machine's busy and total CPU time, summed over its
// CPUs, from the first line of /proc/stat.
type machineBusy struct{ busy, total time.Duration }

func readMachineBusy() (machineBusy, error) {
	m, err := procfs.MachineCPU()
	return machineBusy{busy: m.Busy, total: m.Total}, err
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
