package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vgonet/vgo"
)

// closeWorkers bounds how many clients are closed at once when the process
// stops; each Close waits up to the library's close frame timeout.
const closeWorkers = 256

// slowConnect is the connect time from which a TCP connect counts as slow.
// On loopback a connect takes well under a millisecond unless the server's
// SYN queue or accept queue was full and dropped the SYN: then the client
// sends it again after the initial retransmission timeout of one second.
const slowConnect = 900 * time.Millisecond

// runClients is a client process: it starts cfg.count vgo clients against
// cfg.addr, reports their state once a second and answers the parent's
// commands until quit, end of input or ctx.
func runClients(ctx context.Context, cfg config, log *logrus.Entry) error {
	f, err := newFleet(cfg, libLogger(cfg, log))
	if err != nil {
		return err
	}
	out := newOutput(os.Stdout)
	cmds := readCommands()
	defer cmds.stop()

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
		f.close()
	}()
	if err := out.send(msgReady, readyMsg{PID: os.Getpid()}); err != nil {
		return err
	}
	log.WithFields(logrus.Fields{
		"clients": cfg.count, "first": cfg.first, "server": cfg.addr,
		"sources": cfg.sources, "ramp": cfg.ramp,
	}).Info("starting clients")
	wg.Go(func() { f.start(ctx) })
	wg.Go(func() {
		upSent := false
		tick(ctx, time.Second, func() {
			_ = out.send(msgProgress, f.progress())
			if up := f.upNs.Load(); up != 0 && !upSent {
				upSent = true
				_ = out.send(msgUp, upMsg{Start: f.startNs.Load(), Up: up})
				log.WithField("took", time.Duration(up-f.startNs.Load()).Round(time.Millisecond)).
					Info("every client connected")
			}
		})
	})

	return serveCommands(ctx, log, cmds, out, nil, func(name, arg string) (bool, error) {
		switch name {
		case cmdRTT:
			return true, out.send(name, rttReply{Window: f.window.snapshot(true), Total: f.total.snapshot(false)})
		case cmdRecord:
			return true, out.send(name, recordReply{Epoch: f.record()})
		case cmdEvents:
			t0, err := strconv.ParseInt(arg, 10, 64)
			if err != nil {
				return true, out.send(msgError, fmt.Sprintf("events: bad t0 %q", arg))
			}
			return true, out.send(name, f.events(t0))
		}
		return false, nil
	})
}

// fleet is the clients of one process and what their callbacks observed.
// Counters are atomics because callbacks run on every client's goroutines;
// the timestamps recorded for the restart phase go under mu.
type fleet struct {
	clients []*vgo.Client
	states  []clientState
	// sem holds one token per client that has been started and has not
	// connected yet, which bounds the dials in flight while connecting.
	sem chan struct{}

	connected, ever, back atomic.Int64
	settled               atomic.Int64 // clients back since record that have had a pong since
	dials, dialErrors     atomic.Int64
	handshakeFails        atomic.Int64
	handshakeTimeouts     atomic.Int64
	connects, slowConnect atomic.Int64 // TCP connects timed, and those of slowConnect or more
	maxConnect            atomic.Int64 // the longest connect, ns
	recMaxConnect         atomic.Int64 // the longest connect since record, ns
	disconnects, pongs    atomic.Int64
	startNs, upNs         atomic.Int64 // Unix ns of the first Start and of the last first connect
	window, total         rttHist

	// recording is set by the record command, and from then on every
	// dial, reconnect callback, first connect and disconnect is noted.
	recording        atomic.Bool
	mu               sync.Mutex
	dialTimes        []int64 // Unix ns
	scheduledTimes   []int64 // Unix ns
	backTimes        []int64 // Unix ns
	causes           map[string]int
	recDialErrors    int64
	epoch            int64    // how many times record was called
	recBase          counters // the counters when record was called
	lastDialErr      string   // kept whether recording or not
	lastHandshakeErr string   // likewise
}

// counters are the fleet's running totals that the events command reports
// as differences since record.
type counters struct {
	retryHints        uint64
	handshakeTimeouts int64
	connects          int64
	slowConnects      int64
}

type clientState struct {
	connectedOnce atomic.Bool   // connected at least once
	back          atomic.Bool   // connected since record
	settled       atomic.Bool   // had a pong since it came back
	dialedAt      atomic.Int64  // Unix ns of a dial whose hello is still pending
	retryHints    atomic.Uint64 // the client's RetryHints at its last WithOnReconnect
}

// newFleet creates cfg.count clients; lib is the logger vgo gets.
func newFleet(cfg config, lib *logrus.Entry) (*fleet, error) {
	f := &fleet{
		clients: make([]*vgo.Client, cfg.count),
		states:  make([]clientState, cfg.count),
		causes:  make(map[string]int),
	}
	if cfg.ramp > 0 {
		f.sem = make(chan struct{}, cfg.ramp)
	}
	dialers := make([]*net.Dialer, cfg.sources)
	for i := range dialers {
		dialers[i] = &net.Dialer{LocalAddr: &net.TCPAddr{IP: sourceIP(i)}}
		if cfg.bindNoPort {
			dialers[i].Control = bindAddressNoPort
		}
	}
	backoff := cfg.backoff()
	for i := range f.clients {
		st := &f.states[i]
		d := dialers[(cfg.first+i)%cfg.sources]
		c, err := vgo.NewClient(cfg.addr,
			vgo.WithLogger(lib),
			vgo.WithPingInterval(cfg.interval),
			vgo.WithPongTimeout(cfg.timeout),
			vgo.WithBackoff(backoff),
			vgo.WithDialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
				return f.dial(ctx, st, d, network, addr)
			}),
			vgo.WithOnConnect(func(net.Addr) { f.onConnect(st) }),
			vgo.WithOnDisconnect(f.onDisconnect),
			vgo.WithOnReconnect(func(_ int, delay time.Duration) { f.onReconnect(f.clients[i], st, delay) }),
			vgo.WithOnPong(func(rtt time.Duration) { f.onPong(st, rtt) }),
		)
		if err != nil {
			return nil, err
		}
		f.clients[i] = c
	}
	return f, nil
}

// ipBindAddressNoPort is IP_BIND_ADDRESS_NO_PORT from linux/in.h, which
// the syscall package does not define.
const ipBindAddressNoPort = 24

// bindAddressNoPort makes bind() take only the source address and leaves
// the port to connect(). A bind() with port 0 must find a port that no
// socket on that address holds, TIME_WAIT ones included, and with
// thousands of connections per address that search costs more kernel time
// than everything else the clients do; connect() picks a port unique for
// the four-tuple instead, in constant time.
func bindAddressNoPort(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
	})
	if err != nil {
		return err
	}
	return serr
}

// sourceIP returns the i-th loopback source address, from 127.0.0.2 up.
func sourceIP(i int) net.IP { return net.IPv4(127, 0, 0, byte(2+i)) }

// start starts the clients, holding back while cfg.ramp of them are still
// waiting for their first connect.
func (f *fleet) start(ctx context.Context) {
	f.startNs.Store(time.Now().UnixNano())
	for _, c := range f.clients {
		if f.sem != nil {
			select {
			case f.sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
		}
		c.Start()
	}
}

// close closes every client, a bounded number at a time.
func (f *fleet) close() {
	next := make(chan *vgo.Client)
	var wg sync.WaitGroup
	for range min(closeWorkers, len(f.clients)) {
		wg.Go(func() {
			for c := range next {
				c.Close()
			}
		})
	}
	for _, c := range f.clients {
		next <- c
	}
	close(next)
	wg.Wait()
}

func (f *fleet) dial(ctx context.Context, st *clientState, d *net.Dialer, network, addr string) (net.Conn, error) {
	f.dials.Add(1)
	if f.recording.Load() {
		now := time.Now().UnixNano()
		f.mu.Lock()
		f.dialTimes = append(f.dialTimes, now)
		f.mu.Unlock()
	}
	start := time.Now()
	nc, err := d.DialContext(ctx, network, addr)
	now := time.Now()
	if !errors.Is(ctx.Err(), context.Canceled) {
		// A dial cut short by the client's Close says nothing about the
		// server; one that ran into the dial timeout does.
		f.timeConnect(now.Sub(start))
	}
	if err == nil {
		st.dialedAt.Store(now.UnixNano())
		if tc, ok := nc.(*net.TCPConn); ok {
			hc := &helloConn{TCPConn: tc, f: f}
			hc.pending.Store(true)
			nc = hc
		}
	} else {
		f.dialErrors.Add(1)
		f.mu.Lock()
		f.lastDialErr = classify(err)
		if f.recording.Load() {
			f.recDialErrors++
		}
		f.mu.Unlock()
	}
	return nc, err
}

// timeConnect counts a TCP connect that took d.
func (f *fleet) timeConnect(d time.Duration) {
	f.connects.Add(1)
	if d >= slowConnect {
		f.slowConnect.Add(1)
	}
	storeMax(&f.maxConnect, int64(d))
	storeMax(&f.recMaxConnect, int64(d))
}

// storeMax raises m to v if v is larger.
func storeMax(m *atomic.Int64, v int64) {
	for {
		old := m.Load()
		if v <= old || m.CompareAndSwap(old, v) {
			return
		}
	}
}

// helloConn is a client's TCP connection as the library sees it; it
// notes a hello cut short by the handshake timeout. Until the server's
// first bytes arrive the only deadlines on the connection are the
// handshake's, so a read or write that times out before then ends the
// hello for that reason. Embedding the *net.TCPConn keeps its other
// methods, SyscallConn and vectored writes among them, for the library.
type helloConn struct {
	*net.TCPConn
	f *fleet
	// pending says nothing has been read yet, and no write or read has
	// failed.
	pending atomic.Bool
}

func (c *helloConn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	if n > 0 {
		c.settle(false)
	} else if err != nil {
		c.settle(isTimeout(err))
	}
	return n, err
}

func (c *helloConn) Write(p []byte) (int, error) {
	n, err := c.TCPConn.Write(p)
	if err != nil {
		c.settle(isTimeout(err))
	}
	return n, err
}

// settle ends the hello's watch, counting a handshake timeout if timedOut.
func (c *helloConn) settle(timedOut bool) {
	if c.pending.Load() && c.pending.CompareAndSwap(true, false) && timedOut {
		c.f.handshakeTimeouts.Add(1)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func (f *fleet) onConnect(st *clientState) {
	now := time.Now().UnixNano()
	st.dialedAt.Store(0)
	f.connected.Add(1)
	if st.connectedOnce.CompareAndSwap(false, true) {
		if f.ever.Add(1) == int64(len(f.clients)) {
			f.upNs.Store(now)
		}
		if f.sem != nil {
			<-f.sem
		}
	}
	if f.recording.Load() && st.back.CompareAndSwap(false, true) {
		f.back.Add(1)
		f.mu.Lock()
		f.backTimes = append(f.backTimes, now)
		f.mu.Unlock()
	}
}

func (f *fleet) onDisconnect(err error) {
	f.connected.Add(-1)
	f.disconnects.Add(1)
	if f.recording.Load() {
		f.mu.Lock()
		f.causes[classify(err)]++
		f.mu.Unlock()
	}
}

// onReconnect notes when the next dial is due. It also catches attempts
// whose TCP connect succeeded but whose hello did not: vgo hands no error
// to this callback, so the client's RetryHints tells an attempt a busy
// server refused with a hint, which is not a failure, and the time the
// attempt took tells a server that never answered from one that hung up.
func (f *fleet) onReconnect(c *vgo.Client, st *clientState, delay time.Duration) {
	now := time.Now()
	hints := c.Stats().RetryHints
	hinted := st.retryHints.Swap(hints) != hints
	if dialed := st.dialedAt.Swap(0); dialed != 0 && !hinted {
		f.handshakeFails.Add(1)
		why := "connection closed during the hello"
		if took := now.Sub(time.Unix(0, dialed)); took >= vgo.DefaultHandshakeTimeout {
			why = fmt.Sprintf("no hello from the server within %v", took.Round(time.Second))
		}
		f.mu.Lock()
		f.lastHandshakeErr = why
		f.mu.Unlock()
	}
	if f.recording.Load() {
		at := now.Add(delay).UnixNano()
		f.mu.Lock()
		f.scheduledTimes = append(f.scheduledTimes, at)
		f.mu.Unlock()
	}
}

func (f *fleet) onPong(st *clientState, rtt time.Duration) {
	if st.back.Load() && st.settled.CompareAndSwap(false, true) {
		f.settled.Add(1)
	}
	f.pongs.Add(1)
	f.window.add(rtt)
	f.total.add(rtt)
}

func (f *fleet) progress() clientsProgress {
	// Under mu, record cannot reset the counters since record in between.
	f.mu.Lock()
	last, lastHandshake := f.lastDialErr, f.lastHandshakeErr
	epoch, back, settled := f.epoch, f.back.Load(), f.settled.Load()
	f.mu.Unlock()
	return clientsProgress{
		Epoch:       epoch,
		Connected:   f.connected.Load(),
		Ever:        f.ever.Load(),
		Back:        back,
		Dials:       f.dials.Load(),
		DialErrors:  f.dialErrors.Load(),
		Disconnects: f.disconnects.Load(),
		Pongs:       f.pongs.Load(),
		LastDialErr: last,

		HandshakeFails:    f.handshakeFails.Load(),
		HandshakeTimeouts: f.handshakeTimeouts.Load(),
		Settled:           settled,
		Connects:          f.connects.Load(),
		SlowConnects:      f.slowConnect.Load(),
		MaxConnect:        f.maxConnect.Load(),
		LastHandshakeErr:  lastHandshake,
	}
}

// record starts a fresh recording of dials, reconnect callbacks, first
// connects and disconnect causes, and returns its number.
func (f *fleet) record() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.epoch++
	for i := range f.states {
		f.states[i].back.Store(false)
		f.states[i].settled.Store(false)
	}
	f.back.Store(0)
	f.settled.Store(0)
	f.dialTimes, f.scheduledTimes, f.backTimes = nil, nil, nil
	f.causes = make(map[string]int)
	f.recDialErrors = 0
	f.recBase = f.counters()
	f.recMaxConnect.Store(0)
	f.recording.Store(true)
	return f.epoch
}

// counters returns the running totals that events reports since record.
func (f *fleet) counters() counters {
	var hints uint64
	for _, c := range f.clients {
		hints += c.Stats().RetryHints
	}
	return counters{
		retryHints:        hints,
		handshakeTimeouts: f.handshakeTimeouts.Load(),
		connects:          f.connects.Load(),
		slowConnects:      f.slowConnect.Load(),
	}
}

func (f *fleet) events(t0 int64) eventsReply {
	f.mu.Lock()
	defer f.mu.Unlock()
	rel := func(ts []int64) []int64 {
		out := make([]int64, len(ts))
		for i, t := range ts {
			out[i] = t - t0
		}
		return out
	}
	r := eventsReply{
		Dials:      rel(f.dialTimes),
		Scheduled:  rel(f.scheduledTimes),
		Back:       rel(f.backTimes),
		Missing:    len(f.clients) - len(f.backTimes),
		DialErrors: f.recDialErrors,
	}
	now := f.counters()
	r.RetryHints = now.retryHints - f.recBase.retryHints
	r.HandshakeTimeouts = now.handshakeTimeouts - f.recBase.handshakeTimeouts
	r.Connects = now.connects - f.recBase.connects
	r.SlowConnects = now.slowConnects - f.recBase.slowConnects
	r.MaxConnect = f.recMaxConnect.Load()
	for err, n := range f.causes {
		r.Causes = append(r.Causes, cause{Err: err, Count: n})
	}
	sort.Slice(r.Causes, func(i, j int) bool { return r.Causes[i].Count > r.Causes[j].Count })
	return r
}

// classify names an error without the addresses and ports that would make
// every connection's error unique.
func classify(err error) string {
	var ce *vgo.CloseError
	var errno syscall.Errno
	var ne net.Error
	switch {
	case err == nil:
		return "none"
	case errors.As(err, &ce):
		return fmt.Sprintf("close frame %v", ce.Code)
	case errors.Is(err, vgo.ErrHeartbeatTimeout):
		return "heartbeat timeout"
	case errors.Is(err, io.EOF):
		return "closed by peer"
	case errors.As(err, &errno):
		return errno.Error()
	case errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	}
	return err.Error()
}
