package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"text/tabwriter"
	"time"
)

// Targets the project set for these figures.
const (
	targetMemPerConn  = 16 << 10 // bytes of server memory per idle connection
	targetCPU         = 10.0     // % of one core for heartbeats, 19,000 conns at 5s
	targetBackSlack   = 2 * time.Second
	targetWindowShare = 20.0 // % of the redials in any 1 s window
)

const (
	otherLoadWarn   = 5.0 // % of one core used outside the run that taints a window
	histogramBucket = 100 * time.Millisecond
	shareWindow     = time.Second
	histogramPerRow = 10 // buckets per row of the printed histogram
	// Round-trip buckets are 2^(1/32) wide, about 2.2%, up to 2^40 ns.
	rttBucketsPerOctave = 32
	rttBuckets          = 40 * rttBucketsPerOctave
)

// results is everything the parent measured; a phase that did not complete
// leaves its ok flag false and is printed as missing.
type results struct {
	environment string
	timeWait    int // TIME_WAIT sockets on the source addresses at the start
	started     time.Time
	failure     string

	connectOK         bool
	connected         int
	connectTime       time.Duration
	connectDials      int64
	connectDialErrors int64
	lastDialErrs      []string // the last failed dial's error in each client process
	lastHelloErrs     []string // the last failed hello in each client process
	connectHelloFails int64
	diag              diagnosis // taken when the connect phase fails

	memOK                 bool
	rssBase, rssConns     uint64
	rssGC, clientsRSS     uint64
	statsBase, statsConns serverStats
	statsGC               serverStats
	serverFDs             int

	baselineCPU *cpuUsage
	connectCPU  *cpuUsage

	idleOK           bool
	idleCPU          *cpuUsage
	idlePings        uint64
	idlePongs        int64
	idleStale        uint64
	idleServerCloses uint64
	idleDisconnects  int64
	idleConns        int
	rttIdle          rttSnapshot

	restart *restartResult
}

// diagnosis is the server's state when not every client could connect.
type diagnosis struct {
	ok      bool
	fds     int
	fdLimit string
	rss     uint64
	stats   serverStats
}

// restartResult is the restart phase; times are since the SIGKILL.
type restartResult struct {
	ok          bool
	exited      time.Duration
	listening   time.Duration
	dials       []int64 // each call of a client's dial function
	scheduled   []int64 // each WithOnReconnect, plus its delay
	back        []int64 // each client's first connect
	missing     int
	dialErrors  int64
	causes      map[string]int
	allBack     time.Duration
	serverStats serverStats
	cpu         *cpuUsage // from the kill until all are back
}

func (r *restartResult) add(ev eventsReply) {
	r.dials = append(r.dials, ev.Dials...)
	r.scheduled = append(r.scheduled, ev.Scheduled...)
	r.back = append(r.back, ev.Back...)
	r.missing += ev.Missing
	r.dialErrors += ev.DialErrors
	if r.causes == nil {
		r.causes = make(map[string]int)
	}
	for _, c := range ev.Causes {
		r.causes[c.Err] += c.Count
	}
}

func (r *restartResult) finish() {
	slices.Sort(r.dials)
	slices.Sort(r.scheduled)
	slices.Sort(r.back)
	if len(r.back) > 0 {
		r.allBack = time.Duration(r.back[len(r.back)-1])
	}
}

// rttHist counts round-trip times in logarithmic buckets, from many
// goroutines at once.
type rttHist struct {
	counts [rttBuckets]atomic.Uint64
	max    atomic.Int64
}

// rttSnapshot is a histogram in transit: bucket index to count.
type rttSnapshot struct {
	Counts map[int]uint64 `json:"counts"`
	Max    int64          `json:"max"`
}

func rttBucket(d time.Duration) int {
	if d <= 1 {
		return 0
	}
	return min(int(math.Log2(float64(d))*rttBucketsPerOctave), rttBuckets-1)
}

// rttValue is the middle of bucket b.
func rttValue(b int) time.Duration {
	return time.Duration(math.Exp2((float64(b) + 0.5) / rttBucketsPerOctave))
}

func (h *rttHist) add(d time.Duration) {
	h.counts[rttBucket(d)].Add(1)
	for {
		m := h.max.Load()
		if int64(d) <= m || h.max.CompareAndSwap(m, int64(d)) {
			return
		}
	}
}

// snapshot copies the histogram, and empties it if reset is set.
func (h *rttHist) snapshot(reset bool) rttSnapshot {
	s := rttSnapshot{Counts: make(map[int]uint64)}
	for i := range h.counts {
		var n uint64
		if reset {
			n = h.counts[i].Swap(0)
		} else {
			n = h.counts[i].Load()
		}
		if n > 0 {
			s.Counts[i] = n
		}
	}
	if reset {
		s.Max = h.max.Swap(0)
	} else {
		s.Max = h.max.Load()
	}
	return s
}

func mergeRTT(snaps ...rttSnapshot) rttSnapshot {
	m := rttSnapshot{Counts: make(map[int]uint64)}
	for _, s := range snaps {
		for b, n := range s.Counts {
			m.Counts[b] += n
		}
		m.Max = max(m.Max, s.Max)
	}
	return m
}

func (s rttSnapshot) count() uint64 {
	var n uint64
	for _, c := range s.Counts {
		n += c
	}
	return n
}

// quantile returns the value below which a fraction q of the samples lie.
func (s rttSnapshot) quantile(q float64) time.Duration {
	total := s.count()
	if total == 0 {
		return 0
	}
	buckets := make([]int, 0, len(s.Counts))
	for b := range s.Counts {
		buckets = append(buckets, b)
	}
	sort.Ints(buckets)
	rank := uint64(math.Ceil(q * float64(total)))
	var seen uint64
	for _, b := range buckets {
		seen += s.Counts[b]
		if seen >= rank {
			return rttValue(b)
		}
	}
	return rttValue(buckets[len(buckets)-1])
}

// busiestWindow returns the most events of sorted ts (nanoseconds) that
// fall in any window of width w, and where that window starts.
func busiestWindow(ts []int64, w time.Duration) (int, int64) {
	best, at := 0, int64(0)
	lo := 0
	for hi, t := range ts {
		for t-ts[lo] >= int64(w) {
			lo++
		}
		if n := hi - lo + 1; n > best {
			best, at = n, ts[lo]
		}
	}
	return best, at
}

func nonEmpty(ss []string) []string {
	return slices.DeleteFunc(slices.Clone(ss), func(s string) bool { return s == "" })
}

func pct(part, whole float64) float64 {
	if whole == 0 {
		return 0
	}
	return 100 * part / whole
}

func kib(b float64) string { return fmt.Sprintf("%.2f KiB", b/1024) }

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

func secs(d time.Duration) string { return fmt.Sprintf("%.3f s", d.Seconds()) }

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "FAIL"
}

// table prints aligned rows of label, value and source.
type table struct {
	tw *tabwriter.Writer
}

func (t table) section(title string) { fmt.Fprintf(t.tw, "\n%s\n", title) }

func (t table) row(label, value, source string) {
	fmt.Fprintf(t.tw, "  %s\t%s\t%s\n", label, value, source)
}

func printSummary(w io.Writer, cfg config, r *results) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	t := table{tw}
	fmt.Fprintf(tw, "\n==== vgo loadtest summary ====\n")
	printConfig(t, cfg, r)
	printConnect(t, cfg, r)
	printMemory(t, cfg, r)
	printIdle(t, cfg, r)
	printRestart(t, cfg, r)
	printTargets(t, cfg, r)
	if r.failure != "" {
		t.section("Run failed")
		t.row("error", r.failure, "")
	}
	tw.Flush()
	if rr := r.restart; rr != nil && len(rr.dials) > 0 {
		printHistogram(w, rr.dials)
	}
}

func printConfig(t table, cfg config, r *results) {
	t.section("Configuration\tvalue\tsource")
	t.row("connections (-n)", fmt.Sprint(cfg.n), "flag")
	t.row("client processes (-procs)", fmt.Sprintf("%d, %d to %d clients each", cfg.procs, cfg.n/cfg.procs, (cfg.n+cfg.procs-1)/cfg.procs), "flag")
	t.row("source addresses (-sources)", fmt.Sprintf("%d: %v to %v", cfg.sources, sourceIP(0), sourceIP(cfg.sources-1)), "flag")
	t.row("source port chosen by (-bind-no-port)", map[bool]string{true: "connect()", false: "bind()"}[cfg.bindNoPort], "flag")
	t.row("TIME_WAIT on source addresses at start", fmt.Sprint(r.timeWait), "/proc/net/tcp")
	t.row("server address (-addr)", cfg.addr, "flag")
	t.row("ping interval / pong timeout", fmt.Sprintf("%v / %v", cfg.interval, cfg.timeout), "flags -interval, -timeout")
	t.row("server heartbeat timeout", cfg.serverTimeout.String(), "flag -server-timeout")
	jitter := fmt.Sprintf("±%g%%", 100*cfg.jitter)
	if cfg.jitter == 0 {
		jitter = "none"
	}
	t.row("backoff", fmt.Sprintf("base %v, x%g, jitter %s, max %v", cfg.backoffBase, cfg.backoffMult, jitter, cfg.backoffMax),
		"flags -backoff-*, -jitter")
	ramp := fmt.Sprintf("%d dials in flight per process", cfg.ramp)
	if cfg.ramp == 0 {
		ramp = "all at once"
	}
	t.row("connect ramp (-ramp)", ramp, "flag")
	t.row("settle / idle window", fmt.Sprintf("%v / %v", cfg.settle, cfg.idle), "flags -settle, -idle")
	restart := "off"
	if cfg.restart {
		restart = fmt.Sprintf("on, downtime %v", cfg.downtime)
	}
	t.row("restart phase", restart, "flags -restart, -downtime")
	t.row("environment", r.environment, "parent process")
	t.row("started", r.started.Format(time.RFC3339), "parent process")
	if u := r.baselineCPU; u != nil {
		t.row("machine CPU busy before the clients", fmt.Sprintf("%.1f%% of one core over %s",
			pct(u.machine.busy.Seconds(), u.window.Seconds()), secs(u.window)), "/proc/stat")
	}
}

func printConnect(t table, cfg config, r *results) {
	t.section("Connect\t\t")
	t.row("clients connected", fmt.Sprintf("%d of %d", r.connected, cfg.n), "client processes, WithOnConnect")
	t.row("failed dials / failed hellos", fmt.Sprintf("%d / %d", r.connectDialErrors, r.connectHelloFails),
		"client processes, dial function / WithOnReconnect after a dial that succeeded")
	if errs := nonEmpty(r.lastDialErrs); len(errs) > 0 {
		t.row("last dial errors", strings.Join(errs, "; "), "client processes, dial function")
	}
	if errs := nonEmpty(r.lastHelloErrs); len(errs) > 0 {
		t.row("last failed hellos", strings.Join(errs, "; "), "client processes")
	}
	if d := r.diag; d.ok {
		t.row("server file descriptors", fmt.Sprintf("%d open, limit %s", d.fds, d.fdLimit), "server process, /proc/<pid>/fd, limits")
		t.row("server conns / failed accepts", fmt.Sprintf("%d / %d (last: %s)", d.stats.Conns, d.stats.AcceptErrors, d.stats.LastAcceptErr),
			"server process, vgo.Server.Len, listener")
		t.row("server VmRSS", mib(d.rss), "server process, /proc/<pid>/status")
	}
	if !r.connectOK {
		t.row("connect phase", "did not complete", "")
		return
	}
	t.row("time to connect all", secs(r.connectTime), "client processes: first Start to last first connect")
	t.row("rate", fmt.Sprintf("%.0f conns/s", float64(cfg.n)/r.connectTime.Seconds()), "")
	t.row("dials", fmt.Sprint(r.connectDials), "client processes, dial function")
	if u := r.connectCPU; u != nil {
		t.row("CPU window", secs(u.window), "parent clock, client processes' start to all connected")
		printUsage(t, u, true)
	}
}

func printMemory(t table, cfg config, r *results) {
	t.section("Server memory\t\t")
	if !r.memOK {
		t.row("memory", "not measured", "")
		return
	}
	n := float64(cfg.n)
	src := "server process, VmRSS of /proc/<pid>/status"
	rt := "server process, runtime.ReadMemStats"
	t.row("VmRSS before connections", mib(r.rssBase), src)
	t.row(fmt.Sprintf("VmRSS with %d idle conns", r.statsConns.Conns), mib(r.rssConns), src)
	t.row("VmRSS per connection", kib((float64(r.rssConns)-float64(r.rssBase))/n), "(with - before) / n")
	t.row("VmRSS after GC + FreeOSMemory", mib(r.rssGC), src)
	t.row("VmRSS per connection after GC", kib((float64(r.rssGC)-float64(r.rssBase))/n), "(after GC - before) / n")
	t.row("heap in use before / with conns / after GC",
		fmt.Sprintf("%s / %s / %s", mib(r.statsBase.HeapInuse), mib(r.statsConns.HeapInuse), mib(r.statsGC.HeapInuse)), rt)
	t.row("heap in use per connection (after GC)",
		kib((float64(r.statsGC.HeapInuse)-float64(r.statsBase.HeapInuse))/n), rt)
	t.row("goroutine stacks per connection (after GC)",
		kib((float64(r.statsGC.StackInuse)-float64(r.statsBase.StackInuse))/n), rt)
	t.row("goroutines with conns", fmt.Sprint(r.statsConns.Goroutines), rt)
	t.row("Go runtime Sys with conns", mib(r.statsConns.Sys), rt)
	t.row("open file descriptors", fmt.Sprint(r.serverFDs), "server process, /proc/<pid>/fd")
	if st := r.statsConns; st.AcceptErrors > 0 {
		t.row("failed accepts", fmt.Sprintf("%d, last: %s", st.AcceptErrors, st.LastAcceptErr), "server process, listener")
	}
	t.row("client processes' VmRSS, total", fmt.Sprintf("%s (%s per conn)", mib(r.clientsRSS), kib(float64(r.clientsRSS)/n)),
		"client processes, /proc/<pid>/status")
}

func printIdle(t table, cfg config, r *results) {
	t.section("Idle heartbeat upkeep\t\t")
	if !r.idleOK {
		t.row("idle window", "not measured", "")
		return
	}
	u := r.idleCPU
	win := u.window.Seconds()
	n := float64(cfg.n)
	t.row("window", secs(u.window), "parent clock")
	printUsage(t, u, true)
	t.row("server CPU per connection", fmt.Sprintf("%.2f µs/s", u.server.Seconds()*1e6/win/n), "server process")
	if r.idlePings > 0 {
		t.row("server CPU per ping answered", fmt.Sprintf("%.1f µs", u.server.Seconds()*1e6/float64(r.idlePings)), "server process")
	}
	t.row("client CPU per connection", fmt.Sprintf("%.2f µs/s", sum(u.clients).Seconds()*1e6/win/n), "client processes")
	t.row("pings answered / pongs received", fmt.Sprintf("%d / %d (%.0f/s; expected %.0f/s)",
		r.idlePings, r.idlePongs, float64(r.idlePings)/win, n/cfg.interval.Seconds()),
		"server WithOnPing / clients WithOnPong")
	t.row("disconnects in window", fmt.Sprintf("%d (server closes %d, stale %d); server conns %d",
		r.idleDisconnects, r.idleServerCloses, r.idleStale, r.idleConns), "clients WithOnDisconnect / server")

	s := r.rttIdle
	t.row("pong RTT p50 / p99 / max", fmt.Sprintf("%v / %v / %v (%d pongs)",
		roundRTT(s.quantile(0.50)), roundRTT(s.quantile(0.99)), roundRTT(time.Duration(s.Max)), s.count()),
		"client processes, WithOnPong, idle window")
}

// printUsage prints the CPU each process of the run used over a window, as
// a share of one core, and what the rest of the machine did meanwhile.
func printUsage(t table, u *cpuUsage, withServer bool) {
	win := u.window.Seconds()
	src := "utime+stime of /proc/<pid>/stat"
	if withServer {
		t.row("server CPU", fmt.Sprintf("%v = %.2f%% of one core", u.server, pct(u.server.Seconds(), win)), "server process, "+src)
	}
	cli := sum(u.clients)
	parts := make([]string, len(u.clients))
	for i, c := range u.clients {
		parts[i] = fmt.Sprintf("%.1f%%", pct(c.Seconds(), win))
	}
	t.row("client processes CPU, total", fmt.Sprintf("%v = %.2f%% of one core (%s)", cli, pct(cli.Seconds(), win), strings.Join(parts, ", ")),
		fmt.Sprintf("%d client processes, %s", len(u.clients), src))
	m := u.machine
	ours := u.server + cli + u.parent
	others := max(0, m.busy-m.softirq-ours)
	t.row("machine CPU busy", fmt.Sprintf("%.1f%% of one core of %.0f (softirq %.1f%%, parent %.1f%%, outside this run ~%.1f%%)",
		pct(m.busy.Seconds(), win), m.total.Seconds()/win, pct(m.softirq.Seconds(), win),
		pct(u.parent.Seconds(), win), pct(others.Seconds(), win)), "/proc/stat")
	if pct(others.Seconds(), win) > otherLoadWarn {
		t.row("WARNING", "other processes were busy in this window: its figures are not clean", "")
	}
}

func roundRTT(d time.Duration) time.Duration {
	switch {
	case d >= time.Millisecond:
		return d.Round(10 * time.Microsecond)
	case d >= time.Microsecond:
		return d.Round(100 * time.Nanosecond)
	}
	return d
}

func printRestart(t table, cfg config, r *results) {
	rr := r.restart
	if rr == nil {
		return
	}
	t.section("Restart (t = 0 at the server's SIGKILL)\t\t")
	t.row("old server reaped", secs(rr.exited), "parent clock")
	t.row("new server listening", secs(rr.listening), "parent clock")
	t.row("clients back", fmt.Sprintf("%d of %d", len(rr.back), cfg.n), "client processes, WithOnConnect")
	if len(rr.back) > 0 {
		t.row("first / median / last back", fmt.Sprintf("%s / %s / %s",
			secs(time.Duration(rr.back[0])), secs(time.Duration(rr.back[len(rr.back)/2])), secs(rr.allBack)),
			"client processes, WithOnConnect")
		t.row("all back after listening again", secs(rr.allBack-rr.listening), "")
	}
	t.row("redials (dial attempts)", fmt.Sprintf("%d, %d failed", len(rr.dials), rr.dialErrors),
		"client processes, dial function")
	t.row("WithOnReconnect calls", fmt.Sprint(len(rr.scheduled)), "client processes")
	if n := len(rr.dials); n > 0 {
		c, at := busiestWindow(rr.dials, shareWindow)
		t.row("busiest 1 s of redials", fmt.Sprintf("%d = %.1f%% of redials, from %s", c, pct(float64(c), float64(n)), secs(time.Duration(at))),
			"dial function timestamps")
	}
	if n := len(rr.scheduled); n > 0 {
		c, at := busiestWindow(rr.scheduled, shareWindow)
		t.row("busiest 1 s, WithOnReconnect schedule", fmt.Sprintf("%d = %.1f%%, from %s", c, pct(float64(c), float64(n)), secs(time.Duration(at))),
			"callback time + delay")
	}
	if n := len(rr.back); n > 0 {
		c, at := busiestWindow(rr.back, shareWindow)
		t.row("busiest 1 s of reconnects", fmt.Sprintf("%d = %.1f%% of clients, from %s", c, pct(float64(c), float64(n)), secs(time.Duration(at))),
			"WithOnConnect timestamps")
	}
	causes := make([]string, 0, len(rr.causes))
	for err, n := range rr.causes {
		causes = append(causes, fmt.Sprintf("%s: %d", err, n))
	}
	sort.Strings(causes)
	t.row("disconnect causes", strings.Join(causes, "; "), "client processes, WithOnDisconnect")
	if rr.ok {
		t.row("server conns after restart", fmt.Sprint(rr.serverStats.Conns), "server process")
	}
	if u := rr.cpu; u != nil {
		t.row("CPU window", secs(u.window), "parent clock, kill to all back")
		printUsage(t, u, true)
	}
}

func printTargets(t table, cfg config, r *results) {
	t.section("Targets\tmeasured\tverdict")
	if r.memOK {
		per := (float64(r.rssConns) - float64(r.rssBase)) / float64(cfg.n)
		t.row("server memory per idle conn <= 16 KiB", kib(per), verdict(per <= targetMemPerConn))
	}
	if r.idleOK {
		u := r.idleCPU
		srv := pct(u.server.Seconds(), u.window.Seconds())
		note := ""
		if cfg.n != 19000 || cfg.interval != 5*time.Second {
			note = fmt.Sprintf(" (target is for 19000 conns at 5s; run: %d at %v)", cfg.n, cfg.interval)
		}
		t.row("heartbeat upkeep < 10% of a core, server", fmt.Sprintf("%.2f%%%s", srv, note), verdict(srv < targetCPU))
		cli := pct(sum(u.clients).Seconds(), u.window.Seconds())
		t.row("same, client processes (for reference)", fmt.Sprintf("%.2f%%", cli), verdict(cli < targetCPU))
	}
	if rr := r.restart; rr != nil {
		back := len(rr.back) == cfg.n
		measured := fmt.Sprintf("%s after the kill, %d of %d", secs(rr.allBack), len(rr.back), cfg.n)
		limit := cfg.backoffMax + targetBackSlack
		t.row(fmt.Sprintf("all back within backoff max + 2 s (%v)", limit), measured, verdict(back && rr.allBack <= limit))
		// vgo caps a wait before it applies the jitter, so the longest
		// possible wait is MaxDelay * (1 + Jitter).
		if cfg.jitter > 0 {
			longest := time.Duration(float64(cfg.backoffMax)*(1+cfg.jitter)) + targetBackSlack
			t.row(fmt.Sprintf("  same with max = longest wait, max x (1+jitter) (%v)", longest), measured,
				verdict(back && rr.allBack <= longest))
		}
		if n := len(rr.dials); n > 0 {
			c, _ := busiestWindow(rr.dials, shareWindow)
			share := pct(float64(c), float64(n))
			t.row("no 1 s window > 20% of redials", fmt.Sprintf("%.1f%%", share), verdict(share <= targetWindowShare))
		}
	}
}

// printHistogram prints redials per 100 ms bucket, one second per row.
func printHistogram(w io.Writer, ts []int64) {
	last := max(ts[len(ts)-1], 0)
	buckets := make([]int, last/int64(histogramBucket)+1)
	before := 0
	for _, t := range ts {
		if t < 0 {
			before++
			continue
		}
		buckets[t/int64(histogramBucket)]++
	}
	fmt.Fprintf(w, "\nRedials per 100 ms since the SIGKILL (client processes, dial function)\n")
	if before > 0 {
		fmt.Fprintf(w, "  before the kill: %d\n", before)
	}
	fmt.Fprintf(w, "  %6s", "second")
	for i := range histogramPerRow {
		fmt.Fprintf(w, " %6s", fmt.Sprintf("+.%d", i))
	}
	fmt.Fprintf(w, " %7s\n", "total")
	for row := 0; row*histogramPerRow < len(buckets); row++ {
		fmt.Fprintf(w, "  %6d", row)
		total := 0
		for i := range histogramPerRow {
			b := row*histogramPerRow + i
			n := 0
			if b < len(buckets) {
				n = buckets[b]
			}
			total += n
			fmt.Fprintf(w, " %6d", n)
		}
		fmt.Fprintf(w, " %7d\n", total)
	}
}
