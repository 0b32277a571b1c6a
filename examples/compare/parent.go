package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

// The servers compared, by index: a run measures both, in this order on odd
// runs and the other way round on even ones.
var servers = [2]struct{ name, role string }{
	{"vgo", roleServerVGO},
	{"plain", roleServerPlain},
}

// Time limits on the children.
const (
	startTimeout   = 10 * time.Second // a server to listen
	connectTimeout = 2 * time.Minute  // the client to open every connection
	requestTimeout = 30 * time.Second // any other command
	exitGrace      = 10 * time.Second // a child to exit when told to
)

// caseSpec is one case of a scenario: the echo scenario with one
// connection count, or the idle scenario.
type caseSpec struct {
	scenario string
	conns    int
	title    string
	figures  []figure
}

// runResult holds one run of a case: the figures of each server.
type runResult struct {
	first  int          // index in servers of the one measured first
	values [2][]float64 // by server, in the order of the case's figures
}

// caseResult holds the runs of a case done so far.
type caseResult struct {
	spec caseSpec
	runs []runResult
}

// The figures of each scenario, in the order the measuring functions
// return them.
var (
	echoFigures = []figure{
		{"messages/s", 0},
		{"round trip p50 (µs)", 1},
		{"round trip p99 (µs)", 1},
		{"server CPU per message (µs)", 2},
		{"server CPU (% of a core)", 1},
		{"client CPU per message (µs)", 2},
	}
	idleFigures = []figure{
		{"server CPU per ping (µs)", 2},
		{"server CPU (% of a core)", 2},
		{"pongs/s", 0},
		{"pong round trip p50 (µs)", 1},
		{"pong round trip p99 (µs)", 1},
		{"server VmRSS per connection (KiB)", 2},
		{"server heap per connection (KiB)", 2},
		{"server stack per connection (KiB)", 2},
		{"server goroutines per connection", 2},
	}
)

func (c *config) cases() []caseSpec {
	var cs []caseSpec
	if c.echo() {
		for _, n := range c.conns {
			cs = append(cs, caseSpec{
				scenario: scenarioEcho,
				conns:    n,
				title: fmt.Sprintf("echo: %s, one %d-byte request in flight on each, %v window after %v of warm-up",
					plural(n, "connection"), c.size, c.duration, c.warmup),
				figures: echoFigures,
			})
		}
	}
	if c.idle() {
		cs = append(cs, caseSpec{
			scenario: scenarioIdle,
			conns:    c.idleConns,
			title: fmt.Sprintf("idle: %s, each pinging every %v, %v window",
				plural(c.idleConns, "connection"), c.interval, c.window),
			figures: idleFigures,
		})
	}
	return cs
}

// parent runs the cases and measures the children.
type parent struct {
	cfg config
	exe string
	log *logrus.Entry
}

func runParent(ctx context.Context, cfg config, log *logrus.Entry) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	p := &parent{cfg: cfg, exe: exe, log: log}
	head := summaryHead{
		machine: machine(),
		load:    loadAverage(),
		command: strings.TrimSpace("go run ./examples/compare " + cfg.args),
		runs:    cfg.runs,
	}
	log.WithFields(logrus.Fields{"machine": head.machine, "load": head.load}).Info("starting")
	var (
		results []*caseResult
		runErr  error
	)
cases:
	for _, cs := range cfg.cases() {
		res := &caseResult{spec: cs}
		results = append(results, res)
		for run := 1; run <= cfg.runs; run++ {
			order := [2]int{0, 1}
			if run%2 == 0 {
				order = [2]int{1, 0}
			}
			rr := runResult{first: order[0]}
			for _, k := range order {
				log := log.WithFields(logrus.Fields{
					"case": cs.scenario, "conns": cs.conns, "run": run, "server": servers[k].name, "load": loadAverage(),
				})
				log.Info("run starting")
				measure := p.echo
				if cs.scenario == scenarioIdle {
					measure = p.idle
				}
				v, err := measure(ctx, cs, k, log)
				if errors.Is(err, context.DeadlineExceeded) && errors.Is(ctx.Err(), context.DeadlineExceeded) {
					err = fmt.Errorf("-deadline %v passed: %w", cfg.deadline, err)
				}
				if err != nil {
					runErr = fmt.Errorf("%s, run %d, %s server: %w", cs.scenario, run, servers[k].name, err)
					break cases
				}
				rr.values[k] = v
			}
			res.runs = append(res.runs, rr)
		}
	}
	writeSummary(os.Stdout, head, results)
	return runErr
}

// pair is the two children of one measurement.
type pair struct {
	server, client *child
	addr           string
}

// start starts server k and a client.
func (p *parent) start(ctx context.Context, k int, log *logrus.Entry) (*pair, error) {
	srv, err := startChild(ctx, p.exe, servers[k].role, log)
	if err != nil {
		return nil, err
	}
	ready, err := srv.await(ctx, kindReady, startTimeout)
	if err != nil {
		srv.stop(exitGrace)
		return nil, err
	}
	cl, err := startChild(ctx, p.exe, roleClient, log)
	if err != nil {
		srv.stop(exitGrace)
		return nil, err
	}
	return &pair{server: srv, client: cl, addr: ready.Addr}, nil
}

// stop ends the server first, so that it closes the connections and the
// TIME_WAIT they leave is on its side, then the client.
func (pr *pair) stop() {
	pr.server.stop(exitGrace)
	pr.client.stop(exitGrace)
}

// window is what the parent reads around a measuring window.
type window struct {
	at                   time.Time
	server, client       cpuSample
	machine              machineBusy
	serverErr, clientErr error
}

func (pr *pair) read() window {
	w := window{at: time.Now()}
	w.server, w.serverErr = readCPU(pr.server.pid)
	w.client, w.clientErr = readCPU(pr.client.pid)
	w.machine, _ = readMachineBusy()
	return w
}

// measureWindow marks the start of the client's window, waits d, and ends
// it. It returns the client's report and the parent's readings.
func (pr *pair) measureWindow(ctx context.Context, d time.Duration) (*clientReport, window, window, error) {
	if _, err := pr.client.request(ctx, msg{Kind: kindMark}, requestTimeout); err != nil {
		return nil, window{}, window{}, err
	}
	w0 := pr.read()
	if err := sleep(ctx, d); err != nil {
		return nil, window{}, window{}, err
	}
	m, err := pr.client.request(ctx, msg{Kind: kindStop}, requestTimeout)
	if err != nil {
		return nil, window{}, window{}, err
	}
	w1 := pr.read()
	for _, err := range []error{w0.serverErr, w0.clientErr, w1.serverErr, w1.clientErr} {
		if err != nil {
			return nil, window{}, window{}, fmt.Errorf("read CPU: %w", err)
		}
	}
	rep := m.Report
	switch {
	case rep == nil:
		return nil, window{}, window{}, fmt.Errorf("client sent no report")
	case rep.Errors > 0:
		return nil, window{}, window{}, fmt.Errorf("%d connections failed, the first with: %s", rep.Errors, rep.FirstErr)
	case rep.Count == 0:
		return nil, window{}, window{}, fmt.Errorf("no round trip in the window")
	}
	return rep, w0, w1, nil
}

// echo measures server k in the echo scenario.
func (p *parent) echo(ctx context.Context, cs caseSpec, k int, log *logrus.Entry) ([]float64, error) {
	pr, err := p.start(ctx, k, log)
	if err != nil {
		return nil, err
	}
	defer pr.stop()
	connect := msg{Kind: kindConnect, Addr: pr.addr, Scenario: scenarioEcho, Conns: cs.conns, Size: p.cfg.size}
	if _, err := pr.client.request(ctx, connect, connectTimeout); err != nil {
		return nil, err
	}
	if err := sleep(ctx, p.cfg.warmup); err != nil {
		return nil, err
	}
	rep, w0, w1, err := pr.measureWindow(ctx, p.cfg.duration)
	if err != nil {
		return nil, err
	}
	elapsed := w1.at.Sub(w0.at)
	srvCPU, srvTicks := cpuBetween(w0.server, w1.server)
	clCPU, _ := cpuBetween(w0.client, w1.client)
	n := float64(rep.Count)
	v := []float64{
		n / rep.Window.Seconds(),
		micros(rep.P50),
		micros(rep.P99),
		micros(srvCPU) / n,
		100 * srvCPU.Seconds() / elapsed.Seconds(),
		micros(clCPU) / n,
	}
	log.WithFields(logrus.Fields{
		"messages": rep.Count, "window": rep.Window.Round(time.Millisecond),
		"server_cpu": srvCPU.Round(time.Microsecond), "server_cpu_ticks": srvTicks,
		"client_cpu": clCPU.Round(time.Microsecond), "machine_busy": percent(w0.machine.share(w1.machine)),
		"msgs_per_s": int(v[0]), "server_us_per_msg": fmt.Sprintf("%.2f", v[3]),
	}).Info("echo measured")
	return v, nil
}

// idle measures server k in the idle scenario.
func (p *parent) idle(ctx context.Context, cs caseSpec, k int, log *logrus.Entry) ([]float64, error) {
	pr, err := p.start(ctx, k, log)
	if err != nil {
		return nil, err
	}
	defer pr.stop()
	rss0, err := readRSS(pr.server.pid)
	if err != nil {
		return nil, err
	}
	m0, err := pr.server.request(ctx, msg{Kind: kindMem}, requestTimeout)
	if err != nil {
		return nil, err
	}
	connect := msg{Kind: kindConnect, Addr: pr.addr, Scenario: scenarioIdle, Conns: cs.conns, Interval: p.cfg.interval}
	if _, err := pr.client.request(ctx, connect, connectTimeout); err != nil {
		return nil, err
	}
	// By the end of one interval every connection has pinged once.
	if err := sleep(ctx, p.cfg.interval); err != nil {
		return nil, err
	}
	rep, w0, w1, err := pr.measureWindow(ctx, p.cfg.window)
	if err != nil {
		return nil, err
	}
	rss1, err := readRSS(pr.server.pid)
	if err != nil {
		return nil, err
	}
	m1, err := pr.server.request(ctx, msg{Kind: kindMem}, requestTimeout)
	if err != nil {
		return nil, err
	}
	before, after := m0.Mem, m1.Mem
	if before == nil || after == nil {
		return nil, fmt.Errorf("server sent no memory report")
	}
	if after.Conns != cs.conns {
		return nil, fmt.Errorf("server holds %d connections, want %d", after.Conns, cs.conns)
	}
	elapsed := w1.at.Sub(w0.at)
	srvCPU, srvTicks := cpuBetween(w0.server, w1.server)
	clCPU, _ := cpuBetween(w0.client, w1.client)
	pongs, conns := float64(rep.Count), float64(cs.conns)
	perConn := func(after, before uint64) float64 { return (float64(after) - float64(before)) / conns / 1024 }
	v := []float64{
		micros(srvCPU) / pongs,
		100 * srvCPU.Seconds() / elapsed.Seconds(),
		pongs / rep.Window.Seconds(),
		micros(rep.P50),
		micros(rep.P99),
		perConn(rss1, rss0),
		perConn(after.HeapAlloc, before.HeapAlloc),
		perConn(after.StackInuse, before.StackInuse),
		float64(after.Goroutines-before.Goroutines) / conns,
	}
	want := conns / p.cfg.interval.Seconds()
	fields := logrus.Fields{
		"pongs": rep.Count, "pongs_per_s": int(v[2]), "want_per_s": int(want),
		"server_cpu": srvCPU.Round(time.Microsecond), "server_cpu_ticks": srvTicks,
		"client_cpu": clCPU.Round(time.Microsecond), "machine_busy": percent(w0.machine.share(w1.machine)),
		"rss_before": rss0, "rss_after": rss1, "heap_before": before.HeapAlloc, "heap_after": after.HeapAlloc,
		"stack_before": before.StackInuse, "stack_after": after.StackInuse, "goroutines": after.Goroutines,
	}
	if v[2] < 0.95*want {
		log.WithFields(fields).Warn("fewer pongs than the connections should bring")
	} else {
		log.WithFields(fields).Info("idle measured")
	}
	return v, nil
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func percent(f float64) string { return fmt.Sprintf("%.1f%%", 100*f) }

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return group(fmt.Sprint(n)) + " " + noun + "s"
}

// sleep waits d, or less if ctx ends first.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
