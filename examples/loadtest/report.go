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
	targetMemPerConn = 16 << 10 // bytes of server memory per idle connection
	targetCPU        = 10.0     // % of one core for heartbeats, 19,000 conns at 5s
	// After a SIGKILL, every client is back within this long of the new
	// server listening.
	targetBackKill = 5 * time.Second
	// After a Shutdown, within the drain window plus this long.
	targetBackDrainSlack = time.Second
	// A lone client, over targetLoneRuns restarts or more: the median and
	// the longest return after the new server listens.
	targetLoneRuns   = 5
	targetLoneMedian = 1500 * time.Millisecond
	targetLoneMax    = 2500 * time.Millisecond
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
	// Handshake timeouts and TCP connect times over the connect phase.
	connectHelloTimeouts int64
	connectConnects      int64
	connectSlow          int64
	connectMaxConnect    time.Duration

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

	restarts []*restartResult // one per restart run, in order
}

// diagnosis is the server's state when not every client could connect.
type diagnosis struct {
	ok      bool
	fds     int
	fdLimit string
	rss     uint64
	stats   serverStats
}

// restartResult is one run of the restart phase; times are since the stop
// began: the SIGKILL, or the shutdown command.
type restartResult struct {
	run        int  // from 1
	ok         bool // every client came back
	exited     time.Duration
	listening  time.Duration
	dials      []int64 // each call of a client's dial function
	scheduled  []int64 // each WithOnReconnect, plus its delay
	back       []int64 // each client's first connect
	missing    int
	dialErrors int64
	causes     map[string]int
	allBack    time.Duration
	cpu        *cpuUsage // from the stop until all are back; server is the new one

	// Shutdown mode: the old server's report, the CPU its Shutdown took,
	// and whether it had to be killed after it.
	shutdown       *shutdownReply
	shutdownCPU    time.Duration
	shutdownKilled bool

	// The new server, when all were back (or at the time limit).
	statsOK              bool
	serverStats          serverStats
	memOK                bool
	serverHWM, serverRSS uint64
	serverCPU            time.Duration
	// Its busiest stretch of busyWindow: a share of one core, from when
	// (since the stop), over how long; busyOK if sampled.
	busyShare        float64
	busyFrom, busyOn time.Duration
	busyOK           bool

	// The client processes, since record.
	retryHints        uint64
	handshakeTimeouts int64
	connects          int64
	slowConnects      int64
	maxConnect        time.Duration

	// The machine's listen queue drops over the run.
	listen   listenCounters
	listenOK bool
}

func (r *restartResult) add(ev eventsReply) {
	r.dials = append(r.dials, ev.Dials...)
	r.scheduled = append(r.scheduled, ev.Scheduled...)
	r.back = append(r.back, ev.Back...)
	r.missing += ev.Missing
	r.dialErrors += ev.DialErrors
	r.retryHints += ev.RetryHints
	r.handshakeTimeouts += ev.HandshakeTimeouts
	r.connects += ev.Connects
	r.slowConnects += ev.SlowConnects
	r.maxConnect = max(r.maxConnect, time.Duration(ev.MaxConnect))
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

// backAfterListening is how long after the new server listened the last
// client came back.
func (r *restartResult) backAfterListening() time.Duration { return r.allBack - r.listening }

// setBusiest finds the new server's busiest second in its CPU samples; t0
// is when the stop began.
func (r *restartResult) setBusiest(points []cpuPoint, t0 time.Time) {
	share, from, span, ok := busiestCPU(points, busyWindow)
	if !ok {
		return
	}
	r.busyShare, r.busyFrom, r.busyOn, r.busyOK = share, from.Sub(t0), span, true
}

// returns lists the back-after-listening times of the runs in which every
// client came back, in the order of the runs.
func returns(runs []*restartResult) []time.Duration {
	var ds []time.Duration
	for _, r := range runs {
		if r.ok {
			ds = append(ds, r.backAfterListening())
		}
	}
	return ds
}

// median returns the middle of ds, or the mean of the two middle values.
func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(ds))
	if n := len(s); n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[len(s)/2]
}

// detailed picks the run whose every figure the summary prints: one that
// failed, or else the slowest.
func detailed(runs []*restartResult) *restartResult {
	var pick *restartResult
	for _, r := range runs {
		switch {
		case !r.ok:
			return r
		case pick == nil || r.backAfterListening() > pick.backAfterListening():
			pick = r
		}
	}
	return pick
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
	if rr := detailed(r.restarts); rr != nil && len(rr.dials) > 0 {
		printHistogram(w, cfg, rr)
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
	orDefault := func(set bool, v string) string {
		if !set {
			return "default"
		}
		return v
	}
	jitter := orDefault(cfg.jitter != 0, fmt.Sprintf("±%g%%", 100*cfg.jitter))
	if cfg.jitter < 0 {
		jitter = "none"
	}
	backoff := fmt.Sprintf("base %s, multiplier %s, jitter %s, max %s",
		orDefault(cfg.backoffBase != 0, cfg.backoffBase.String()),
		orDefault(cfg.backoffMult != 0, fmt.Sprint(cfg.backoffMult)),
		jitter,
		orDefault(cfg.backoffMax != 0, cfg.backoffMax.String()))
	t.row("client backoff", backoff, "flags -backoff-*, -jitter; default: vgo.Backoff's")
	ramp := fmt.Sprintf("%d dials in flight per process", cfg.ramp)
	if cfg.ramp == 0 {
		ramp = "all at once"
	}
	t.row("connect ramp (-ramp)", ramp, "flag")
	t.row("settle / idle window", fmt.Sprintf("%v / %v", cfg.settle, cfg.idle), "flags -settle, -idle")
	restart := "off"
	if cfg.restart {
		restart = fmt.Sprintf("%s, downtime %v, %d run(s), limit %v each", cfg.restartMode, cfg.downtime, cfg.repeat, cfg.restartTimeout)
	}
	t.row("restart phase", restart, "flags -restart, -restart-mode, -downtime, -repeat, -restart-timeout")
	drain := "none"
	if w := cfg.drainWindow(); w > 0 {
		drain = w.String()
		if cfg.drain == 0 {
			drain += " (vgo.DefaultDrainWindow)"
		}
	}
	t.row("server drain window", drain, "flag -drain; sent by Shutdown")
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
	t.row(fmt.Sprintf("TCP connects / taking >= %v / longest", slowConnect),
		fmt.Sprintf("%d / %d / %s", r.connectConnects, r.connectSlow, secs(r.connectMaxConnect)), "client processes, dial function")
	t.row("handshake timeouts", fmt.Sprint(r.connectHelloTimeouts), "client processes, a read or write timing out before the server's hello")
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
	if len(r.restarts) == 0 {
		return
	}
	if cfg.repeat > 1 {
		printRuns(t, cfg, r.restarts)
	}
	rr := detailed(r.restarts)
	title := "Restart (t = 0 at the server's SIGKILL"
	if cfg.restartMode == modeShutdown {
		title = "Restart (t = 0 when the server was asked to shut down"
	}
	if cfg.repeat > 1 {
		which := "the slowest"
		if !rr.ok {
			which = "incomplete"
		}
		title += fmt.Sprintf("; run %d of %d, %s", rr.run, cfg.repeat, which)
	}
	t.section(title + ")\t\t")
	if sr := rr.shutdown; sr != nil {
		took := fmt.Sprintf("%s with %d conns, %v CPU", secs(time.Duration(sr.Took)), sr.Conns, rr.shutdownCPU)
		if sr.Err != "" {
			took += ", failed: " + sr.Err
		}
		t.row("old server's Shutdown", took, "old server process, vgo.Server.Shutdown, /proc/<pid>/stat")
		exited := secs(rr.exited)
		if rr.shutdownKilled {
			exited += fmt.Sprintf(" (killed: still running %v after Shutdown)", quitGrace)
		}
		t.row("old server exited", exited, "parent clock")
	} else {
		t.row("old server reaped", secs(rr.exited), "parent clock")
	}
	t.row("new server listening", secs(rr.listening), "parent clock")
	t.row("clients back", fmt.Sprintf("%d of %d", len(rr.back), cfg.n), "client processes, WithOnConnect")
	if len(rr.back) > 0 {
		t.row("first / median / last back", fmt.Sprintf("%s / %s / %s",
			secs(time.Duration(rr.back[0])), secs(time.Duration(rr.back[len(rr.back)/2])), secs(rr.allBack)),
			"client processes, WithOnConnect")
		t.row("all back after listening again", secs(rr.backAfterListening()), "")
	}
	t.row("redials (dial attempts)", fmt.Sprintf("%d, %d failed", len(rr.dials), rr.dialErrors),
		"client processes, dial function")
	t.row("WithOnReconnect calls", fmt.Sprint(len(rr.scheduled)), "client processes")
	t.row("retry hints received", fmt.Sprint(rr.retryHints), "client processes, sum of vgo.ClientStats.RetryHints")
	if rr.statsOK {
		st := rr.serverStats
		t.row("new server: throttled / refused / accepted", fmt.Sprintf("%d / %d / %d", st.Throttled, st.Refused, st.Accepted),
			"new server process, vgo.ServerStats")
		if st.AcceptErrors > 0 {
			t.row("new server: failed accepts", fmt.Sprintf("%d, last: %s", st.AcceptErrors, st.LastAcceptErr), "new server process, listener")
		}
	}
	t.row("handshake timeouts", fmt.Sprint(rr.handshakeTimeouts),
		"client processes, a read or write timing out before the server's hello")
	t.row(fmt.Sprintf("TCP connects / taking >= %v / longest", slowConnect),
		fmt.Sprintf("%d / %d / %s", rr.connects, rr.slowConnects, secs(rr.maxConnect)), "client processes, dial function")
	if rr.listenOK {
		t.row("ListenOverflows / ListenDrops", fmt.Sprintf("+%d / +%d", rr.listen.overflows, rr.listen.drops),
			"/proc/net/netstat TcpExt, whole machine, over the run")
	}
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
	if rr.statsOK {
		t.row("server conns after restart", fmt.Sprint(rr.serverStats.Conns), "new server process")
	}
	if rr.memOK {
		t.row("new server peak VmRSS (VmHWM) / VmRSS at the end", fmt.Sprintf("%s / %s", mib(rr.serverHWM), mib(rr.serverRSS)),
			"new server process, /proc/<pid>/status")
	}
	if rr.busyOK {
		over := ""
		if rr.busyOn < busyWindow {
			over = fmt.Sprintf(" (over the %s sampled)", secs(rr.busyOn))
		}
		t.row("new server's busiest 1 s of CPU", fmt.Sprintf("%.1f%% of one core from %s%s", 100*rr.busyShare, secs(rr.busyFrom), over),
			fmt.Sprintf("new server process, /proc/<pid>/stat every %v", cpuSamplePeriod))
	}
	if u := rr.cpu; u != nil {
		t.row("CPU window", secs(u.window), "parent clock, stop to all back; server: the new one since its start")
		printUsage(t, u, true)
	}
}

// printRuns prints one line for each restart run, and the median and
// longest return after the new server listened.
func printRuns(t table, cfg config, runs []*restartResult) {
	t.section(fmt.Sprintf("Restart runs (-repeat %d; each: t = 0 when the stop began)\t\t", cfg.repeat))
	for _, rr := range runs {
		back := fmt.Sprintf("%d of %d back by the limit", len(rr.back), cfg.n)
		if rr.ok {
			back = fmt.Sprintf("all back after listening again %s (at %s)", secs(rr.backAfterListening()), secs(rr.allBack))
		}
		t.row(fmt.Sprintf("run %d", rr.run), fmt.Sprintf("listening %s, %s; %d redials, %d retry hints, %d throttled, %d handshake timeouts, %d slow connects",
			secs(rr.listening), back, len(rr.dials), rr.retryHints, rr.serverStats.Throttled, rr.handshakeTimeouts, rr.slowConnects),
			"parent clock, client and new server processes")
	}
	ds := returns(runs)
	if len(ds) == 0 {
		return
	}
	t.row("all back after listening again: median / max", fmt.Sprintf("%s / %s over %d runs", secs(median(ds)), secs(slices.Max(ds)), len(ds)), "")
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
	if len(r.restarts) > 0 {
		printRestartTargets(t, cfg, r.restarts)
	}
}

// printRestartTargets judges every run of the restart phase: a target
// holds only if it held in each run.
func printRestartTargets(t table, cfg config, runs []*restartResult) {
	ds := returns(runs)
	complete := len(ds) == len(runs) && len(runs) == cfg.repeat
	worst := time.Duration(0)
	if len(ds) > 0 {
		worst = slices.Max(ds)
	}
	measured := secs(worst)
	if cfg.repeat > 1 {
		measured = fmt.Sprintf("max %s over %d runs", secs(worst), len(ds))
	}
	if !complete {
		measured = fmt.Sprintf("%d of %d runs had every client back", len(ds), cfg.repeat)
	}
	label := fmt.Sprintf("all back within %v of the new server listening", targetBackKill)
	limit := targetBackKill
	if cfg.restartMode == modeShutdown {
		if w := cfg.drainWindow(); w > 0 {
			limit = w + targetBackDrainSlack
			label = fmt.Sprintf("all back within drain window + %v (%v) of the new server listening", targetBackDrainSlack, limit)
		} else {
			label += " (no drain window)"
		}
	}
	if cfg.backoffBase != 0 || cfg.backoffMax != 0 || cfg.backoffMult != 0 || cfg.jitter != 0 {
		measured += " (target is for the library's default backoff)"
	}
	t.row(label, measured, verdict(complete && worst <= limit))

	var timeouts, slow int64
	var longest time.Duration
	var listen listenCounters
	listenOK := true
	for _, rr := range runs {
		timeouts += rr.handshakeTimeouts
		slow += rr.slowConnects
		longest = max(longest, rr.maxConnect)
		listen.overflows += rr.listen.overflows
		listen.drops += rr.listen.drops
		listenOK = listenOK && rr.listenOK
	}
	t.row("no handshake timeouts (client processes)", fmt.Sprint(timeouts), verdict(timeouts == 0))
	t.row(fmt.Sprintf("no TCP connect taking >= %v (client processes)", slowConnect),
		fmt.Sprintf("%d, longest %s", slow, secs(longest)), verdict(slow == 0))
	if listenOK {
		t.row("no ListenOverflows / ListenDrops (machine)", fmt.Sprintf("+%d / +%d", listen.overflows, listen.drops),
			verdict(listen.overflows == 0 && listen.drops == 0))
	} else {
		t.row("no ListenOverflows / ListenDrops (machine)", "not measured", "")
	}
	if cfg.n == 1 && cfg.repeat >= targetLoneRuns {
		med := "no complete run"
		if len(ds) > 0 {
			med = secs(median(ds))
		}
		t.row(fmt.Sprintf("lone client: median back after listening <= %v", targetLoneMedian), med,
			verdict(complete && median(ds) <= targetLoneMedian))
		t.row(fmt.Sprintf("lone client: max back after listening <= %v", targetLoneMax), secs(worst),
			verdict(complete && worst <= targetLoneMax))
	}
}

// printHistogram prints a run's redials per 100 ms bucket, one second per
// row.
func printHistogram(w io.Writer, cfg config, rr *restartResult) {
	ts := rr.dials
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
	since, run := "the SIGKILL", ""
	if cfg.restartMode == modeShutdown {
		since = "the shutdown command"
	}
	if cfg.repeat > 1 {
		run = fmt.Sprintf(", run %d", rr.run)
	}
	fmt.Fprintf(w, "\nRedials per 100 ms since %s (client processes, dial function%s)\n", since, run)
	if before > 0 {
		fmt.Fprintf(w, "  before the stop: %d\n", before)
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
