package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

const (
	// replyTimeout bounds each command to a child; the largest reply, the
	// restart events of several thousand clients, takes milliseconds.
	replyTimeout = 30 * time.Second
	// quitGrace is how long a child may take to close its connections
	// before it is killed.
	quitGrace = 20 * time.Second
	// baselineSettle lets a fresh server finish starting up before its
	// memory is taken as the baseline; the machine's load over it shows
	// whether something else is running.
	baselineSettle = time.Second
	// cpuSamplePeriod is how often the new server's CPU time is read in
	// the restart phase, for its busiest second.
	cpuSamplePeriod = 100 * time.Millisecond
	// busyWindow is the stretch over which the busiest CPU use is taken.
	busyWindow = time.Second
)

// orchestrator is the parent process: it owns the children, keeps the
// latest progress each of them reported, and collects the results.
type orchestrator struct {
	cfg  config
	log  *logrus.Entry
	exe  string
	addr string // the server's resolved address

	server  *child
	clients []*child

	mu            sync.Mutex
	srvProg       serverProgress
	cliProg       []clientsProgress
	ups           []*upMsg
	lastErrs      []string // each client process's last dial error
	lastHelloErrs []string // and its last failed hello
	// epochs holds each client process's latest recording number:
	// progress from before it counts no client as back.
	epochs []int64
	// stopping is set once the children are being stopped, when failing
	// dials are expected and not worth a warning.
	stopping bool

	// lastProgress is when the last progress line was logged: one a
	// second at most, across phases.
	lastProgress time.Time

	res results
}

func runParent(ctx context.Context, cfg config, log *logrus.Entry) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	o := &orchestrator{
		cfg:      cfg,
		log:      log,
		exe:      exe,
		cliProg:  make([]clientsProgress, cfg.procs),
		ups:      make([]*upMsg, cfg.procs),
		lastErrs: make([]string, cfg.procs),
		epochs:   make([]int64, cfg.procs),

		lastHelloErrs: make([]string, cfg.procs),
	}
	o.res.environment = environment()
	o.res.timeWait = timeWaitBySource(cfg.sources)
	o.res.started = time.Now()
	err = o.execute(ctx)
	if err != nil {
		o.res.failure = err.Error()
	}
	o.stopAll()
	printSummary(os.Stdout, cfg, &o.res)
	return err
}

func (o *orchestrator) execute(ctx context.Context) error {
	if err := o.startServer(ctx, o.cfg.addr); err != nil {
		return err
	}
	if err := o.baseline(ctx); err != nil {
		return err
	}
	if err := o.connect(ctx); err != nil {
		return err
	}
	if err := o.wait(ctx, "settle", o.cfg.settle); err != nil {
		return err
	}
	if err := o.idle(ctx); err != nil {
		return err
	}
	if err := o.memory(ctx); err != nil {
		return err
	}
	if o.cfg.restart {
		for run := 1; run <= o.cfg.repeat; run++ {
			if err := o.restart(ctx, run); err != nil {
				return err
			}
		}
	}
	return nil
}

// startServer starts a server process on addr and waits until it listens.
func (o *orchestrator) startServer(ctx context.Context, addr string) error {
	args := []string{
		"-role=" + roleServer,
		"-addr=" + addr,
		"-interval=" + o.cfg.interval.String(),
		"-server-timeout=" + o.cfg.serverTimeout.String(),
		"-drain=" + o.cfg.drain.String(),
		"-max-handshakes=" + strconv.Itoa(o.cfg.maxHandshakes),
		"-retry-after=" + o.cfg.retryAfter.String(),
		"-lib-log=" + o.cfg.libLog,
		"-deadline=" + o.childDeadline(ctx).String(),
	}
	c, err := startChild(ctx, o.exe, "server", args, o.log, o.onServerEvent)
	if err != nil {
		return fmt.Errorf("start server: %w", err)
	}
	o.server = c
	var ready readyMsg
	if err := c.await(ctx, msgReady, replyTimeout, &ready); err != nil {
		return err
	}
	o.addr = ready.Addr
	return nil
}

// childDeadline is how long a child may live: until the parent's own
// deadline, plus the time the parent needs to stop it.
func (o *orchestrator) childDeadline(ctx context.Context) time.Duration {
	d := o.cfg.deadline
	if dl, ok := ctx.Deadline(); ok {
		d = time.Until(dl)
	}
	return d.Round(time.Second) + 2*quitGrace
}

func (o *orchestrator) onServerEvent(env envelope) {
	var p serverProgress
	if env.Type != msgProgress || json.Unmarshal(env.Data, &p) != nil {
		return
	}
	o.mu.Lock()
	o.srvProg = p
	o.mu.Unlock()
}

func (o *orchestrator) onClientsEvent(i int) func(envelope) {
	return func(env envelope) {
		switch env.Type {
		case msgProgress:
			var p clientsProgress
			if json.Unmarshal(env.Data, &p) != nil {
				return
			}
			o.mu.Lock()
			o.cliProg[i] = p
			dialChanged := p.LastDialErr != "" && p.LastDialErr != o.lastErrs[i]
			helloChanged := p.LastHandshakeErr != "" && p.LastHandshakeErr != o.lastHelloErrs[i]
			o.lastErrs[i], o.lastHelloErrs[i] = p.LastDialErr, p.LastHandshakeErr
			stopping := o.stopping
			o.mu.Unlock()
			if stopping {
				return
			}
			child := fmt.Sprintf("clients-%d", i)
			if dialChanged {
				o.log.WithFields(logrus.Fields{"child": child, "err": p.LastDialErr}).Warn("dials failing")
			}
			if helloChanged {
				o.log.WithFields(logrus.Fields{"child": child, "err": p.LastHandshakeErr}).Warn("hellos failing")
			}
		case msgUp:
			var u upMsg
			if json.Unmarshal(env.Data, &u) != nil {
				return
			}
			o.mu.Lock()
			o.ups[i] = &u
			o.mu.Unlock()
		}
	}
}

// totals sums the client processes' latest progress.
func (o *orchestrator) totals() (clientsProgress, serverProgress, int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	var t clientsProgress
	for i, p := range o.cliProg {
		if p.Epoch == o.epochs[i] {
			t.Back += p.Back
			t.Settled += p.Settled
		}
		t.Connected += p.Connected
		t.Ever += p.Ever
		t.Dials += p.Dials
		t.DialErrors += p.DialErrors
		t.Disconnects += p.Disconnects
		t.Pongs += p.Pongs
		t.HandshakeFails += p.HandshakeFails
		t.HandshakeTimeouts += p.HandshakeTimeouts
		t.Connects += p.Connects
		t.SlowConnects += p.SlowConnects
		t.MaxConnect = max(t.MaxConnect, p.MaxConnect)
	}
	ups := 0
	for _, u := range o.ups {
		if u != nil {
			ups++
		}
	}
	return t, o.srvProg, ups
}

// progress logs the progress line.
func (o *orchestrator) progress(phase string, fields logrus.Fields) {
	t, s, _ := o.totals()
	f := logrus.Fields{
		"phase":        phase,
		"connected":    t.Connected,
		"of":           o.cfg.n,
		"server_conns": s.Conns,
		"dials":        t.Dials,
		"dial_errors":  t.DialErrors,
		"disconnects":  t.Disconnects,
		"pongs":        t.Pongs,
	}
	for k, v := range fields {
		f[k] = v
	}
	o.log.WithFields(f).Info("progress")
}

// wait sleeps for d, logging progress once a second.
func (o *orchestrator) wait(ctx context.Context, phase string, d time.Duration) error {
	end := time.Now().Add(d)
	return o.poll(ctx, phase, d+time.Second, func() (bool, logrus.Fields) {
		left := time.Until(end)
		return left <= 0, logrus.Fields{"left": left.Round(time.Second)}
	})
}

// poll calls done every 100 ms until it reports true, logging progress with
// its fields once a second. It fails after limit.
func (o *orchestrator) poll(ctx context.Context, phase string, limit time.Duration, done func() (bool, logrus.Fields)) error {
	start := time.Now()
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		ok, fields := done()
		if ok {
			return nil
		}
		if time.Since(o.lastProgress) >= time.Second {
			o.lastProgress = time.Now()
			o.progress(phase, fields)
		}
		if time.Since(start) > limit {
			return fmt.Errorf("%s: not done after %v", phase, limit)
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("%s: %w", phase, context.Cause(ctx))
		}
		if err := o.checkChildren(); err != nil {
			return fmt.Errorf("%s: %w", phase, err)
		}
	}
}

// checkChildren fails when a child process has died.
func (o *orchestrator) checkChildren() error {
	for _, c := range append([]*child{o.server}, o.clients...) {
		if c != nil && !c.isRunning() {
			return fmt.Errorf("%s exited: %v", c.name, c.waitErr)
		}
	}
	return nil
}

// baseline measures the server's memory before any client connects.
func (o *orchestrator) baseline(ctx context.Context) error {
	before, err := o.sampleCPU()
	if err != nil {
		return err
	}
	if err := sleep(ctx, baselineSettle); err != nil {
		return err
	}
	if after, err := o.sampleCPU(); err == nil {
		o.res.baselineCPU = after.since(before)
	}
	if err := o.server.request(ctx, cmdStats, replyTimeout, &o.res.statsBase); err != nil {
		return err
	}
	rss, err := readRSS(o.server.pid)
	if err != nil {
		return err
	}
	o.res.rssBase = rss
	o.log.WithFields(logrus.Fields{"addr": o.addr, "rss_kib": rss >> 10}).Info("server baseline taken")
	return nil
}

// connect starts the client processes and waits until every client has
// connected once.
func (o *orchestrator) connect(ctx context.Context) error {
	cfg := o.cfg
	before, err := o.sampleCPU()
	if err != nil {
		return err
	}
	first := 0
	for i := range cfg.procs {
		count := cfg.n / cfg.procs
		if i < cfg.n%cfg.procs {
			count++
		}
		args := []string{
			"-role=" + roleClients,
			"-proc=" + strconv.Itoa(i),
			"-count=" + strconv.Itoa(count),
			"-first=" + strconv.Itoa(first),
			"-addr=" + o.addr,
			"-sources=" + strconv.Itoa(cfg.sources),
			"-interval=" + cfg.interval.String(),
			"-timeout=" + cfg.timeout.String(),
			"-backoff-base=" + cfg.backoffBase.String(),
			"-backoff-max=" + cfg.backoffMax.String(),
			"-backoff-mult=" + strconv.FormatFloat(cfg.backoffMult, 'g', -1, 64),
			"-jitter=" + strconv.FormatFloat(cfg.jitter, 'g', -1, 64),
			"-ramp=" + strconv.Itoa(cfg.ramp),
			"-bind-no-port=" + strconv.FormatBool(cfg.bindNoPort),
			"-lib-log=" + cfg.libLog,
			"-deadline=" + o.childDeadline(ctx).String(),
		}
		c, err := startChild(ctx, o.exe, fmt.Sprintf("clients-%d", i), args, o.log, o.onClientsEvent(i))
		if err != nil {
			return fmt.Errorf("start client process %d: %w", i, err)
		}
		o.clients = append(o.clients, c)
		first += count
	}
	for _, c := range o.clients {
		if err := c.await(ctx, msgReady, replyTimeout, nil); err != nil {
			return err
		}
	}

	err = o.poll(ctx, "connect", cfg.connectTimeout, func() (bool, logrus.Fields) {
		t, _, ups := o.totals()
		return ups == cfg.procs, logrus.Fields{"ever": t.Ever}
	})
	if after, serr := o.sampleCPU(); serr == nil {
		o.res.connectCPU = after.since(before)
	}
	t, _, _ := o.totals()
	o.mu.Lock()
	o.res.lastDialErrs = slices.Compact(slices.Sorted(slices.Values(o.lastErrs)))
	o.res.lastHelloErrs = slices.Compact(slices.Sorted(slices.Values(o.lastHelloErrs)))
	o.mu.Unlock()
	o.res.connected = int(t.Ever)
	o.res.connectDials = t.Dials
	o.res.connectDialErrors = t.DialErrors
	o.res.connectHelloFails = t.HandshakeFails
	o.res.connectHelloTimeouts = t.HandshakeTimeouts
	o.res.connectConnects = t.Connects
	o.res.connectSlow = t.SlowConnects
	o.res.connectMaxConnect = time.Duration(t.MaxConnect)
	if err != nil {
		o.diagnose(ctx)
		return err
	}
	var start, up int64
	for i, u := range o.ups {
		if i == 0 || u.Start < start {
			start = u.Start
		}
		up = max(up, u.Up)
	}
	o.res.connectTime = time.Duration(up - start)
	o.res.connectOK = true
	o.log.WithFields(logrus.Fields{
		"connections": cfg.n,
		"took":        o.res.connectTime.Round(time.Millisecond),
		"per_second":  int(float64(cfg.n) / o.res.connectTime.Seconds()),
	}).Info("every client connected")
	return nil
}

// diagnose notes the server's side of a connect phase that failed: how
// many descriptors it holds against its limit and whether accepts failed.
func (o *orchestrator) diagnose(ctx context.Context) {
	d := &o.res.diag
	d.fds, _ = countFDs(o.server.pid)
	d.fdLimit = fdLimit(o.server.pid)
	d.rss, _ = readRSS(o.server.pid)
	if err := o.server.request(ctx, cmdStats, 5*time.Second, &d.stats); err != nil {
		o.log.WithField("err", err).Warn("no server stats for the diagnosis")
	}
	d.ok = true
}

// idle measures CPU and round-trip times over the idle window.
func (o *orchestrator) idle(ctx context.Context) error {
	if o.cfg.idle <= 0 {
		return nil
	}
	res := &o.res
	if o.cfg.profile != "" {
		if err := o.startProfiles(ctx); err != nil {
			return err
		}
	}
	// Opens a fresh round-trip window in every client process.
	for _, c := range o.clients {
		if err := c.request(ctx, cmdRTT, replyTimeout, nil); err != nil {
			return err
		}
	}
	var before serverStats
	if err := o.server.request(ctx, cmdStats, replyTimeout, &before); err != nil {
		return err
	}
	t0, _, _ := o.totals()
	cpu0, err := o.sampleCPU()
	if err != nil {
		return err
	}
	o.log.WithField("window", o.cfg.idle).Info("idle window started")

	if err := o.wait(ctx, "idle", o.cfg.idle); err != nil {
		return err
	}

	cpu1, err := o.sampleCPU()
	if err != nil {
		return err
	}
	res.idleCPU = cpu1.since(cpu0)
	var after serverStats
	if err := o.server.request(ctx, cmdStats, replyTimeout, &after); err != nil {
		return err
	}
	t1, _, _ := o.totals()
	res.idlePings = after.Pings - before.Pings
	res.idleStale = after.Stale - before.Stale
	res.idleServerCloses = after.Closed - before.Closed
	res.idlePongs = t1.Pongs - t0.Pongs
	res.idleDisconnects = t1.Disconnects - t0.Disconnects
	res.idleConns = after.Conns

	var snaps []rttSnapshot
	for _, c := range o.clients {
		var r rttReply
		if err := c.request(ctx, cmdRTT, replyTimeout, &r); err != nil {
			return err
		}
		snaps = append(snaps, r.Window)
	}
	res.rttIdle = mergeRTT(snaps...)
	if o.cfg.profile != "" {
		if err := o.stopProfiles(ctx); err != nil {
			return err
		}
	}
	res.idleOK = true
	o.log.WithFields(logrus.Fields{
		"server_cpu":  res.idleCPU.server,
		"clients_cpu": sum(res.idleCPU.clients),
		"window":      res.idleCPU.window.Round(time.Millisecond),
	}).Info("idle window ended")
	return nil
}

// cpuSample is the CPU time used so far by each process of the run and by
// the whole machine.
type cpuSample struct {
	at      time.Time
	server  time.Duration
	clients []time.Duration
	parent  time.Duration
	machine machineCPU
}

// cpuUsage is the CPU used between two samples.
type cpuUsage struct {
	window  time.Duration
	server  time.Duration
	clients []time.Duration
	parent  time.Duration
	machine machineCPU
}

func (o *orchestrator) sampleCPU() (cpuSample, error) {
	s := cpuSample{at: time.Now()}
	var err error
	if o.server != nil {
		if s.server, err = readCPU(o.server.pid); err != nil {
			return s, err
		}
	}
	s.clients = make([]time.Duration, len(o.clients))
	for i, c := range o.clients {
		if s.clients[i], err = readCPU(c.pid); err != nil {
			return s, err
		}
	}
	if s.parent, err = readCPU(os.Getpid()); err != nil {
		return s, err
	}
	s.machine, err = readMachineCPU()
	return s, err
}

// since returns the CPU used from a to s. A client process missing from a
// started in between, so all of its CPU counts.
func (s cpuSample) since(a cpuSample) *cpuUsage {
	u := &cpuUsage{
		window:  s.at.Sub(a.at),
		server:  s.server - a.server,
		clients: make([]time.Duration, len(s.clients)),
		parent:  s.parent - a.parent,
		machine: s.machine.sub(a.machine),
	}
	for i, c := range s.clients {
		u.clients[i] = c
		if i < len(a.clients) {
			u.clients[i] -= a.clients[i]
		}
	}
	return u
}

func (o *orchestrator) startProfiles(ctx context.Context) error {
	dir := o.cfg.profile
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, c := range append([]*child{o.server}, o.clients...) {
		path := filepath.Join(dir, c.name+".pprof")
		if err := c.request(ctx, cmdProfileStart+" "+path, replyTimeout, nil); err != nil {
			return err
		}
	}
	return nil
}

func (o *orchestrator) stopProfiles(ctx context.Context) error {
	for _, c := range append([]*child{o.server}, o.clients...) {
		if err := c.request(ctx, cmdProfileStop, replyTimeout, nil); err != nil {
			return err
		}
	}
	o.log.WithField("dir", o.cfg.profile).Info("CPU profiles written")
	return nil
}

// memory measures the server's memory with every connection open: as it
// is, then after a forced collection that returns free memory to the OS.
func (o *orchestrator) memory(ctx context.Context) error {
	res := &o.res
	var err error
	if res.rssConns, err = readRSS(o.server.pid); err != nil {
		return err
	}
	if err := o.server.request(ctx, cmdStats, replyTimeout, &res.statsConns); err != nil {
		return err
	}
	if res.serverFDs, err = countFDs(o.server.pid); err != nil {
		return err
	}
	for _, c := range o.clients {
		rss, err := readRSS(c.pid)
		if err != nil {
			return err
		}
		res.clientsRSS += rss
	}
	if o.cfg.profile != "" {
		path := filepath.Join(o.cfg.profile, "server.heap.pprof")
		if err := o.server.request(ctx, cmdHeapProfile+" "+path, replyTimeout, nil); err != nil {
			return err
		}
		o.log.WithField("file", path).Info("server heap profile written")
	}
	if err := o.server.request(ctx, cmdGC, replyTimeout, &res.statsGC); err != nil {
		return err
	}
	if res.rssGC, err = readRSS(o.server.pid); err != nil {
		return err
	}
	res.memOK = true
	o.log.WithFields(logrus.Fields{
		"rss_kib":          res.rssConns >> 10,
		"rss_after_gc_kib": res.rssGC >> 10,
		"conns":            res.statsConns.Conns,
	}).Info("server memory taken")
	return nil
}

// restart stops the server as -restart-mode says, starts a new one on the
// same address after the downtime, and records how the clients come back.
// run counts the restarts from 1. Before another run follows, it waits
// until every client has had a pong on its new connection, which makes the
// connection healthy in vgo's sense and restarts its backoff: otherwise
// the next run would continue the backoff of this one.
func (o *orchestrator) restart(ctx context.Context, run int) error {
	cfg := o.cfg
	for i, c := range o.clients {
		var r recordReply
		if err := c.request(ctx, cmdRecord, replyTimeout, &r); err != nil {
			return err
		}
		o.mu.Lock()
		o.epochs[i] = r.Epoch
		o.mu.Unlock()
	}
	rr := &restartResult{run: run}
	o.res.restarts = append(o.res.restarts, rr)
	listen0, lerr := readListenCounters()
	if lerr != nil {
		o.log.WithField("err", lerr).Warn("cannot read the listen counters")
	}
	before, err := o.sampleCPU()
	if err != nil {
		return err
	}
	// The new server process starts from zero CPU time.
	before.server = 0
	old := o.server
	log := o.log.WithFields(logrus.Fields{"run": run, "of": cfg.repeat, "downtime": cfg.downtime})
	t0 := time.Now()
	switch cfg.restartMode {
	case modeKill:
		log.Info("killing the server")
		old.kill()
	case modeShutdown:
		oldCPU, _ := readCPU(old.pid)
		log.WithField("drain", cfg.drainWindow()).Info("shutting the server down")
		var sr shutdownReply
		if err := old.request(ctx, cmdShutdown, shutdownLimit+replyTimeout, &sr); err != nil {
			old.kill()
			return fmt.Errorf("shut the server down: %w", err)
		}
		rr.shutdown = &sr
		rr.shutdownCPU = time.Duration(sr.CPU) - oldCPU
		rr.shutdownKilled = !old.waitExit(quitGrace)
	}
	rr.exited = time.Since(t0)
	if err := sleep(ctx, cfg.downtime); err != nil {
		return err
	}
	if err := o.startServer(ctx, o.addr); err != nil {
		return fmt.Errorf("restart server: %w", err)
	}
	rr.listening = time.Since(t0)
	sampler := startCPUSampler(o.server.pid, cpuSamplePeriod)
	log.WithField("after", rr.listening.Round(time.Millisecond)).Info("server listening again")

	err = o.poll(ctx, "restart", cfg.restartTimeout, func() (bool, logrus.Fields) {
		t, _, _ := o.totals()
		return t.Back == int64(cfg.n), logrus.Fields{
			"run":   run,
			"back":  t.Back,
			"since": time.Since(t0).Round(time.Second),
		}
	})
	if after, serr := o.sampleCPU(); serr == nil {
		rr.cpu = after.since(before)
	}
	if o.server.isRunning() {
		rr.serverCPU, _ = readCPU(o.server.pid)
		if hwm, herr := readHWM(o.server.pid); herr == nil {
			rr.serverHWM = hwm
			rr.serverRSS, _ = readRSS(o.server.pid)
			rr.memOK = true
		}
		if serr := o.server.request(ctx, cmdStats, replyTimeout, &rr.serverStats); serr == nil {
			rr.statsOK = true
		}
	}
	if lerr == nil {
		if listen1, err := readListenCounters(); err == nil {
			rr.listen = listen1.sub(listen0)
			rr.listenOK = true
		}
	}
	// Collect what happened even after a timeout: it shows who is missing.
	for _, c := range o.clients {
		var ev eventsReply
		if rerr := c.request(ctx, cmdEvents+" "+strconv.FormatInt(t0.UnixNano(), 10), replyTimeout, &ev); rerr != nil {
			sampler.finish()
			return errors.Join(err, rerr)
		}
		rr.add(ev)
	}
	rr.finish()
	// The busiest second needs a second of samples, which a quick return
	// may not have given yet.
	if left := busyWindow - time.Since(t0.Add(rr.listening)); err == nil && left > 0 {
		err = sleep(ctx, left)
	}
	rr.setBusiest(sampler.finish(), t0)
	if err != nil {
		return err
	}
	rr.ok = true
	log.WithFields(logrus.Fields{
		"all_back_after":  rr.allBack.Round(time.Millisecond),
		"after_listening": rr.backAfterListening().Round(time.Millisecond),
		"redials":         len(rr.dials),
		"retry_hints":     rr.retryHints,
		"throttled":       rr.serverStats.Throttled,
	}).Info("every client is back")
	if run == cfg.repeat {
		return nil
	}
	limit := 2*cfg.interval + cfg.timeout + 5*time.Second
	return o.poll(ctx, "healthy", limit, func() (bool, logrus.Fields) {
		t, _, _ := o.totals()
		return t.Settled == int64(cfg.n), logrus.Fields{"run": run, "with_pong": t.Settled}
	})
}

// stopAll stops the server first, then the clients, and kills any child
// that does not quit in time. The side that closes a TCP connection first
// keeps it in TIME_WAIT for a minute; on the server's side that costs
// nothing, while on the clients' side it would hold their source ports and
// make the next run's dials fail with "cannot assign requested address".
func (o *orchestrator) stopAll() {
	o.mu.Lock()
	o.stopping = true
	o.mu.Unlock()
	if o.server != nil {
		o.server.stop(quitGrace)
	}
	var wg sync.WaitGroup
	for _, c := range o.clients {
		wg.Go(func() { c.stop(quitGrace) })
	}
	wg.Wait()
	o.log.Info("every child process stopped")
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

func sum(ds []time.Duration) time.Duration {
	var s time.Duration
	for _, d := range ds {
		s += d
	}
	return s
}

// environment describes the machine and this process's open file limit,
// which its children inherit.
func environment() string {
	var rl syscall.Rlimit
	limit := "unknown"
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil {
		limit = fmt.Sprintf("%d (hard %d)", rl.Cur, rl.Max)
	}
	return fmt.Sprintf("RLIMIT_NOFILE %s, %d CPUs, GOMAXPROCS %d, %s",
		limit, runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version())
}
