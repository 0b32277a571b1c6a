// Package procfs reads what the example tools measure of a process from
// Linux's /proc: its CPU time and fields of its status.
package procfs

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// ClockTick is the unit of utime and stime in /proc/<pid>/stat. USER_HZ is
// 100 on every Linux architecture Go supports; reading it would need cgo.
const ClockTick = 10 * time.Millisecond

// CPU returns the CPU time a process has used so far, user plus system
// (utime + stime), threads that have exited included, in clock ticks.
func CPU(pid int) (time.Duration, error) {
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
	return time.Duration(ticks) * ClockTick, nil
}

// StatusBytes returns a field of /proc/<pid>/status given in kB, such as
// VmRSS, in bytes.
func StatusBytes(pid int, field string) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		rest, ok := strings.CutPrefix(line, field+":")
		if !ok {
			continue
		}
		kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s of %d: %w", field, pid, err)
		}
		return kb << 10, nil
	}
	return 0, fmt.Errorf("no %s for %d", field, pid)
}

// Machine is the machine's CPU time from the first line of /proc/stat,
// summed over all its CPUs.
type Machine struct {
	Busy    time.Duration // user, nice, system, irq, softirq, steal
	Softirq time.Duration // part of Busy; loopback traffic is processed here
	Total   time.Duration // Busy plus idle and iowait
}

// MachineCPU reads the machine's CPU time so far.
func MachineCPU() (Machine, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return Machine{}, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return Machine{}, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var v [8]uint64 // user nice system idle iowait irq softirq steal
	for i := range v {
		if v[i], err = strconv.ParseUint(f[i+1], 10, 64); err != nil {
			return Machine{}, fmt.Errorf("/proc/stat: %w", err)
		}
	}
	tick := func(n uint64) time.Duration { return time.Duration(n) * ClockTick }
	busy := v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
	return Machine{Busy: tick(busy), Softirq: tick(v[6]), Total: tick(busy + v[3] + v[4])}, nil
}
