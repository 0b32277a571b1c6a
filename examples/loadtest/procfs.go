package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vgonet/vgo/internal/procfs"
)

// readRSS returns a process's resident set size (VmRSS) in bytes.
func readRSS(pid int) (uint64, error) { return procfs.StatusBytes(pid, "VmRSS") }

// readHWM returns a process's peak resident set size so far (VmHWM) in
// bytes.
func readHWM(pid int) (uint64, error) { return procfs.StatusBytes(pid, "VmHWM") }

// readCPU returns the CPU time a process has used so far, user plus system.
func readCPU(pid int) (time.Duration, error) { return procfs.CPU(pid) }

// countFDs returns how many file descriptors a process has open.
func countFDs(pid int) (int, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(entries), err
}

// machineCPU is the machine's CPU time from the first line of /proc/stat,
// summed over all CPUs.
type machineCPU struct {
	busy    time.Duration // user, nice, system, irq, softirq, steal
	softirq time.Duration // part of busy; loopback traffic is processed here
	total   time.Duration // busy plus idle and iowait
}

func readMachineCPU() (machineCPU, error) {
	m, err := procfs.MachineCPU()
	return machineCPU{busy: m.Busy, softirq: m.Softirq, total: m.Total}, err
}

func (m machineCPU) sub(o machineCPU) machineCPU {
	return machineCPU{busy: m.busy - o.busy, softirq: m.softirq - o.softirq, total: m.total - o.total}
}

// timeWaitBySource counts the sockets in TIME_WAIT whose local address is
// one of the clients' source addresses. Left over from an earlier run, they
// hold source ports for a minute.
func timeWaitBySource(sources int) int {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return -1
	}
	want := make(map[string]bool, sources)
	for i := range sources {
		ip := sourceIP(i).To4()
		// /proc/net/tcp prints the address as a little-endian hex word.
		want[fmt.Sprintf("%02X%02X%02X%02X", ip[3], ip[2], ip[1], ip[0])] = true
	}
	n := 0
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != "06" { // 06 is TCP_TIME_WAIT
			continue
		}
		addr, _, _ := strings.Cut(f[1], ":")
		if want[addr] {
			n++
		}
	}
	return n
}

// fdLimit returns a process's soft limit on open files as /proc shows it.
func fdLimit(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return "unknown"
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Max open files"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				return f[0]
			}
		}
	}
	return "unknown"
}

// listenCounters are the machine's counts of connections its listening
// sockets dropped, from the TcpExt lines of /proc/net/netstat (for the
// network namespace, which here is the machine's): ListenOverflows counts
// SYNs and handshake ACKs dropped because an accept queue was full, and
// ListenDrops every drop at a listener, overflows included. On loopback a
// dropped SYN is sent again after a second.
type listenCounters struct {
	overflows, drops uint64
}

func readListenCounters() (listenCounters, error) {
	b, err := os.ReadFile("/proc/net/netstat")
	if err != nil {
		return listenCounters{}, err
	}
	// Each group is two lines: "TcpExt: Name ...", then "TcpExt: value ...".
	var names []string
	for line := range strings.Lines(string(b)) {
		rest, ok := strings.CutPrefix(line, "TcpExt:")
		if !ok {
			continue
		}
		if names == nil {
			names = strings.Fields(rest)
			continue
		}
		values := strings.Fields(rest)
		if len(values) != len(names) {
			return listenCounters{}, fmt.Errorf("/proc/net/netstat: %d TcpExt names, %d values", len(names), len(values))
		}
		var c listenCounters
		found := 0
		for i, name := range names {
			var dst *uint64
			switch name {
			case "ListenOverflows":
				dst = &c.overflows
			case "ListenDrops":
				dst = &c.drops
			default:
				continue
			}
			if *dst, err = strconv.ParseUint(values[i], 10, 64); err != nil {
				return listenCounters{}, fmt.Errorf("/proc/net/netstat: %s: %w", name, err)
			}
			found++
		}
		if found != 2 {
			return listenCounters{}, fmt.Errorf("/proc/net/netstat: no ListenOverflows or ListenDrops")
		}
		return c, nil
	}
	return listenCounters{}, fmt.Errorf("/proc/net/netstat: no TcpExt values")
}

func (c listenCounters) sub(o listenCounters) listenCounters {
	return listenCounters{overflows: c.overflows - o.overflows, drops: c.drops - o.drops}
}

// cpuPoint is a process's CPU time at one moment.
type cpuPoint struct {
	at  time.Time
	cpu time.Duration
}

// cpuSampler reads a process's CPU time at a fixed period, in its own
// goroutine, until stopped.
type cpuSampler struct {
	stop   chan struct{}
	wg     sync.WaitGroup
	points []cpuPoint // written by the sampler; read after it stopped
}

func startCPUSampler(pid int, period time.Duration) *cpuSampler {
	s := &cpuSampler{stop: make(chan struct{})}
	s.wg.Go(func() {
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			if cpu, err := readCPU(pid); err == nil {
				s.points = append(s.points, cpuPoint{time.Now(), cpu})
			}
			select {
			case <-t.C:
			case <-s.stop:
				return
			}
		}
	})
	return s
}

// finish stops the sampler and returns its samples.
func (s *cpuSampler) finish() []cpuPoint {
	close(s.stop)
	s.wg.Wait()
	return s.points
}

// busiestCPU returns the most CPU time the samples show used over any
// stretch of at least w between two of them, as a share of that stretch,
// and where the stretch starts. With less than w sampled it takes the whole
// span. It reports false for fewer than two samples.
func busiestCPU(points []cpuPoint, w time.Duration) (share float64, from time.Time, span time.Duration, ok bool) {
	if len(points) < 2 {
		return 0, time.Time{}, 0, false
	}
	first, last := points[0], points[len(points)-1]
	if last.at.Sub(first.at) < w {
		span = last.at.Sub(first.at)
		return (last.cpu - first.cpu).Seconds() / span.Seconds(), first.at, span, span > 0
	}
	j := 0
	for i, p := range points {
		for j < len(points) && points[j].at.Sub(p.at) < w {
			j++
		}
		if j == len(points) {
			break
		}
		d := points[j].at.Sub(p.at)
		if r := (points[j].cpu - p.cpu).Seconds() / d.Seconds(); !ok || r > share {
			share, from, span, ok = r, points[i].at, d, true
		}
	}
	return share, from, span, ok
}
