// Command demo runs a vgo server and a vgo client in one process and walks
// through their life in about twelve seconds: the client connects and
// heartbeats flow; the server dies and the client retries with growing
// delays; the server comes back on the same address and the client
// reconnects; a peer that says hello and then goes silent is dropped by the
// server as stale. Last, a server with sessions and a client that resumes
// them exchange a stream of numbered messages through a proxy that cuts
// their connection again and again, and every message arrives once and in
// order.
//
// It exits with status 0 when every step happened, and with status 1, naming
// the step, as soon as one did not happen within its time limit.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/vgonet/vgo"
	"github.com/vgonet/vgo/vgotest"
)

const (
	pingInterval     = 300 * time.Millisecond
	pongTimeout      = time.Second
	heartbeatTimeout = time.Second
	backoffBase      = 200 * time.Millisecond
	backoffMax       = 2 * time.Second

	// heartbeatsShown is how many pongs the heartbeat steps wait for.
	heartbeatsShown = 5
	// failedDials is how many dials must fail before the server comes back,
	// enough for the delays to be seen growing up to backoffMax.
	failedDials = 6

	// The session step sends streamMessages numbered messages at
	// streamRate a second, for long enough that each of the streamCuts
	// cuts falls in the middle of the stream, and cuts the connection each
	// time another share of the echoes has come back.
	streamMessages = 4000
	streamRate     = 2000
	streamCuts     = 3
	// streamLatency is the proxy's delay in each direction.
	streamLatency = 20 * time.Millisecond

	// Each step gets far longer than it needs, so that a slow or loaded
	// machine does not fail the demo; the overall limit ends it even if a
	// step's cleanup hangs.
	stepTimeout    = 10 * time.Second
	overallTimeout = 90 * time.Second
)

func main() {
	log := logrus.New()
	log.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: "15:04:05.000"})

	watchdog := time.AfterFunc(overallTimeout, func() {
		log.WithField("limit", overallTimeout).Error("demo failed: it did not finish in time")
		os.Exit(1)
	})
	err := run(log)
	watchdog.Stop()
	if err != nil {
		log.WithField("err", err).Error("demo failed")
		os.Exit(1)
	}
	log.Info("demo finished: every step happened")
}

// run executes the steps in order, each within stepTimeout, and closes the
// client and the server whatever happens.
func run(log *logrus.Logger) error {
	d := newDemo(log)
	defer d.cleanup()

	steps := []struct {
		title string
		fn    func(context.Context) error
	}{
		{"the server starts on 127.0.0.1:0 and the client connects", d.connect},
		{"heartbeats: the client pings every 300ms, the server answers", d.heartbeats},
		{"the server is stopped", d.killServer},
		{"the client retries with growing delays", d.backoff},
		{"the server comes back on the same address", d.restartServer},
		{"the client reconnects", d.reconnect},
		{"a silent peer: hello, then nothing; the server drops it as stale", d.silentPeer},
		{"the client and the server close", d.shutdown},
		{"sessions: a stream of numbered messages through a proxy that cuts the connection 3 times", d.sessions},
	}
	for i, s := range steps {
		log.Info(fmt.Sprintf("=== step %d/%d: %s", i+1, len(steps), s.title))
		ctx, cancel := context.WithTimeout(context.Background(), stepTimeout)
		err := s.fn(ctx)
		cancel()
		if err != nil {
			return fmt.Errorf("step %d (%s): %w", i+1, s.title, err)
		}
	}
	return nil
}

// retry is one call of the client's reconnect callback.
type retry struct {
	attempt int
	delay   time.Duration
}

// connClosed is one call of the server's close callback.
type connClosed struct {
	remote string
	err    error
}

// server is one life of the vgo server: a server cannot serve again once it
// has been closed, so coming back means a new one on the old address.
type server struct {
	srv    *vgo.Server
	served chan error // receives what Serve returned
}

// demo holds the client, the current server, and the events their callbacks
// report. Callbacks never block: an event nobody waits for is dropped, and
// each step drains the events left over from the steps before it.
type demo struct {
	log    *logrus.Logger
	addr   string // the server's address, reused when it comes back
	server *server
	client *vgo.Client

	disconnects chan error
	retries     chan retry
	pongs       chan time.Duration
	pings       chan struct{}
	echoes      chan string
	closes      chan connClosed
}

func newDemo(log *logrus.Logger) *demo {
	const buffered = 64
	return &demo{
		log:         log,
		disconnects: make(chan error, buffered),
		retries:     make(chan retry, buffered),
		pongs:       make(chan time.Duration, buffered),
		pings:       make(chan struct{}, buffered),
		echoes:      make(chan string, buffered),
		closes:      make(chan connClosed, buffered),
	}
}

func (d *demo) side(name string) *logrus.Entry {
	return d.log.WithField("side", name)
}

// startServer serves on l with a new server, and returns once the server
// accepts connections.
func (d *demo) startServer(ctx context.Context, l net.Listener) error {
	log := d.side("server")
	srv, err := vgo.NewServer(
		vgo.WithLogger(log),
		vgo.WithHeartbeatTimeout(heartbeatTimeout),
		vgo.WithHandler(func(c *vgo.Conn, msg []byte) {
			// A failed send closes the connection; the step waiting for
			// the echo then fails with a clear message.
			_ = c.Send(context.Background(), msg)
		}),
		vgo.WithOnPing(func(c *vgo.Conn) {
			log.WithFields(logrus.Fields{"conn": c.ID(), "remote": c.RemoteAddr().String()}).Info("received ping")
			notify(d.pings, struct{}{})
		}),
		vgo.WithOnConnClose(func(c *vgo.Conn, err error) {
			notify(d.closes, connClosed{remote: c.RemoteAddr().String(), err: err})
		}),
	)
	if err != nil {
		l.Close()
		return err
	}
	s := &server{srv: srv, served: make(chan error, 1)}
	fl := &firstAccept{Listener: l, accepting: make(chan struct{})}
	go func() { s.served <- srv.Serve(fl) }()
	d.server = s
	// Serve logs that it is listening before it first accepts; waiting for
	// that keeps the log of the next step after it.
	_, err = await(ctx, fl.accepting, "the server's first accept")
	return err
}

// firstAccept is a listener that closes accepting when Accept is first
// called.
type firstAccept struct {
	net.Listener
	once      sync.Once
	accepting chan struct{}
}

func (l *firstAccept) Accept() (net.Conn, error) {
	l.once.Do(func() { close(l.accepting) })
	return l.Listener.Accept()
}

// stopServer stops the current server, gracefully or not, and checks that
// Serve returned ErrServerClosed.
func (d *demo) stopServer(ctx context.Context, graceful bool) error {
	s := d.server
	d.server = nil
	if graceful {
		if err := s.srv.Shutdown(ctx); err != nil {
			s.srv.Close()
			return fmt.Errorf("shutdown: %w", err)
		}
	} else {
		s.srv.Close()
	}
	err, werr := await(ctx, s.served, "the end of Serve")
	if werr != nil {
		return werr
	}
	if !errors.Is(err, vgo.ErrServerClosed) {
		return fmt.Errorf("serve returned %v, want vgo.ErrServerClosed", err)
	}
	return nil
}

func (d *demo) cleanup() {
	if d.client != nil {
		d.client.Close()
	}
	if d.server != nil {
		d.server.srv.Close()
	}
}

func (d *demo) connect(ctx context.Context) error {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	d.addr = l.Addr().String()
	if err := d.startServer(ctx, l); err != nil {
		return err
	}

	log := d.side("client")
	c, err := vgo.NewClient(d.addr,
		vgo.WithLogger(log),
		vgo.WithPingInterval(pingInterval),
		vgo.WithPongTimeout(pongTimeout),
		vgo.WithBackoff(vgo.Backoff{BaseDelay: backoffBase, Jitter: 0.2, MaxDelay: backoffMax}),
		vgo.WithOnPong(func(rtt time.Duration) {
			log.WithField("rtt", rtt).Info("pong")
			notify(d.pongs, rtt)
		}),
		vgo.WithOnMessage(func(msg []byte) { notify(d.echoes, string(msg)) }),
		vgo.WithOnDisconnect(func(err error) { notify(d.disconnects, err) }),
		vgo.WithOnReconnect(func(attempt int, delay time.Duration) {
			notify(d.retries, retry{attempt: attempt, delay: delay})
		}),
	)
	if err != nil {
		return err
	}
	d.client = c
	c.Start()
	if err := c.WaitConnected(ctx); err != nil {
		return fmt.Errorf("the client did not connect: %w", err)
	}
	return d.echo(ctx, "hello")
}

// echo sends msg and waits for the server to send it back.
func (d *demo) echo(ctx context.Context, msg string) error {
	drain(d.echoes)
	if err := d.client.Send(ctx, []byte(msg)); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	got, err := await(ctx, d.echoes, "the echo of "+msg)
	if err != nil {
		return err
	}
	if got != msg {
		return fmt.Errorf("echo is %q, want %q", got, msg)
	}
	d.side("client").WithField("data", got).Info("echo received")
	return nil
}

func (d *demo) heartbeats(ctx context.Context) error {
	drain(d.pings)
	drain(d.pongs)
	for range heartbeatsShown {
		if _, err := await(ctx, d.pongs, "a pong"); err != nil {
			return err
		}
	}
	_, err := await(ctx, d.pings, "a ping at the server")
	return err
}

func (d *demo) killServer(ctx context.Context) error {
	drain(d.disconnects)
	drain(d.retries)
	if err := d.stopServer(ctx, false); err != nil {
		return err
	}
	d.side("server").Info("server closed")
	_, err := await(ctx, d.disconnects, "the client's disconnect")
	return err
}

func (d *demo) backoff(ctx context.Context) error {
	var delays []time.Duration
	for {
		r, err := await(ctx, d.retries, "a dial attempt")
		if err != nil {
			return err
		}
		delays = append(delays, r.delay.Round(time.Millisecond))
		if r.attempt > failedDials {
			break
		}
	}
	d.side("client").WithFields(logrus.Fields{"failed": failedDials, "delays": delays}).
		Info("each wait is 1.6x the one before, up to 2s, give or take 20% jitter")
	return nil
}

func (d *demo) restartServer(ctx context.Context) error {
	l, err := listenAgain(ctx, d.addr)
	if err != nil {
		return err
	}
	return d.startServer(ctx, l)
}

// listenAgain listens on addr, retrying while the port is still held by the
// server that just closed.
func listenAgain(ctx context.Context, addr string) (net.Listener, error) {
	for {
		l, err := net.Listen("tcp", addr)
		if err == nil {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("listen on %s again: %w", addr, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (d *demo) reconnect(ctx context.Context) error {
	if err := d.client.WaitConnected(ctx); err != nil {
		return fmt.Errorf("the client did not reconnect: %w", err)
	}
	// The first pong proves the new connection healthy, which resets the
	// client's backoff.
	drain(d.pongs)
	for range heartbeatsShown {
		if _, err := await(ctx, d.pongs, "a pong on the new connection"); err != nil {
			return err
		}
	}
	return d.echo(ctx, "hello again")
}

func (d *demo) silentPeer(ctx context.Context) error {
	drain(d.closes)
	var dialer net.Dialer
	nc, err := dialer.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	if deadline, ok := ctx.Deadline(); ok {
		if err := nc.SetDeadline(deadline); err != nil {
			return err
		}
	}
	local := nc.LocalAddr().String()
	log := d.side("peer").WithField("local", local)

	// A frame is a type byte, a big-endian uint32 payload length and the
	// payload; a hello (type 0x01) carries "VGO" and the version, 1.
	hello := []byte{0x01, 0x00, 0x00, 0x00, 0x04, 'V', 'G', 'O', 0x01}
	if _, err := nc.Write(hello); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	log.WithField("frame", fmt.Sprintf("% x", hello)).Info("sent a hello; now silent")
	// The server's hello may carry fields after the version, such as the
	// ping intervals it accepts: read the whole frame its header announces.
	header := make([]byte, 5)
	if _, err := io.ReadFull(nc, header); err != nil {
		return fmt.Errorf("read the server's hello: %w", err)
	}
	payload := make([]byte, binary.BigEndian.Uint32(header[1:]))
	if _, err := io.ReadFull(nc, payload); err != nil {
		return fmt.Errorf("read the server's hello: %w", err)
	}
	reply := append(header, payload...)
	if header[0] != 0x01 || !bytes.HasPrefix(payload, hello[5:]) {
		return fmt.Errorf("the server answered % x, want a hello starting % x", reply, hello)
	}
	log.WithField("frame", fmt.Sprintf("% x", reply)).Info("the server answered with its hello")

	silent := time.Now()
	if n, err := nc.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		return fmt.Errorf("the silent peer read %d bytes and %v, want EOF", n, err)
	}
	log.WithField("after", time.Since(silent).Round(10*time.Millisecond)).Info("the server closed the connection: read EOF")

	for {
		cc, err := await(ctx, d.closes, "the server's close callback for the silent peer")
		if err != nil {
			return err
		}
		if cc.remote != local {
			continue
		}
		if !errors.Is(cc.err, vgo.ErrHeartbeatTimeout) {
			return fmt.Errorf("the server closed the silent peer with %v, want vgo.ErrHeartbeatTimeout", cc.err)
		}
		break
	}
	d.side("server").WithField("remote", local).Info("the close callback reported vgo.ErrHeartbeatTimeout")
	if s := d.client.State(); s != vgo.StateConnected {
		return fmt.Errorf("the client is %v, want connected: a stale peer must not affect others", s)
	}
	d.side("client").Info("the client is still connected")
	return nil
}

func (d *demo) shutdown(ctx context.Context) error {
	drain(d.closes)
	d.client.Close()
	// Closing the client returns once its goroutines have exited, before the
	// server has read the close frame; wait for that, so the server's log
	// shows the client's reason rather than its own shutdown.
	if _, err := await(ctx, d.closes, "the server's close callback for the client"); err != nil {
		return err
	}
	return d.stopServer(ctx, true)
}

// sessions runs a server with sessions and a client that resumes them,
// connected through a proxy. The client sends streamMessages numbered
// messages, the server echoes each one, and the proxy cuts the connection
// with a RST streamCuts times while they flow. Every echo must come back
// once and in order.
func (d *demo) sessions(ctx context.Context) error {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	resumes := make(chan struct{}, streamCuts)
	closes := make(chan error, 1)
	srv, err := vgo.NewServer(
		vgo.WithLogger(d.side("server")),
		vgo.WithHeartbeatTimeout(heartbeatTimeout),
		vgo.WithSessions(vgo.Sessions{}),
		vgo.WithHandler(func(c *vgo.Conn, msg []byte) {
			// With sessions Send fails only once the session has
			// ended; the stream then stops short and the step fails.
			_ = c.Send(context.Background(), msg)
		}),
		vgo.WithOnConnResume(func(*vgo.Conn) { notify(resumes, struct{}{}) }),
		vgo.WithOnConnClose(func(_ *vgo.Conn, err error) { notify(closes, err) }),
	)
	if err != nil {
		l.Close()
		return err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	defer srv.Close()

	proxy, err := vgotest.NewProxy(l.Addr().String())
	if err != nil {
		return err
	}
	defer proxy.Close()
	// The latency keeps messages and echoes in flight, so that each cut
	// drops some of them, which the session then sends again.
	proxy.SetLatency(vgotest.ClientToServer, streamLatency)
	proxy.SetLatency(vgotest.ServerToClient, streamLatency)
	d.side("proxy").WithFields(logrus.Fields{
		"listen": proxy.Addr(), "server": l.Addr().String(), "latency": streamLatency,
	}).Info("the proxy forwards the client's connections to the server")

	st := newStream(streamMessages, streamMessages/(streamCuts+1))
	c, err := vgo.NewClient(proxy.Addr(),
		vgo.WithLogger(d.side("client")),
		vgo.WithPingInterval(pingInterval),
		vgo.WithPongTimeout(pongTimeout),
		vgo.WithBackoff(vgo.Backoff{BaseDelay: backoffBase, Jitter: 0.2, MaxDelay: backoffMax}),
		vgo.WithResume(0),
		vgo.WithOnMessage(st.echo),
	)
	if err != nil {
		return err
	}
	defer c.Close()
	c.Start()
	if err := c.WaitConnected(ctx); err != nil {
		return fmt.Errorf("the client did not connect: %w", err)
	}

	sctx, stopSending := context.WithCancel(ctx)
	defer stopSending()
	sending := make(chan error, 1)
	go func() { sending <- st.send(sctx, c) }()

	for cut := 1; cut <= streamCuts; cut++ {
		echoed, err := await(ctx, st.marks, fmt.Sprintf("echo %d", cut*st.every))
		if err != nil {
			return err
		}
		d.side("proxy").WithFields(logrus.Fields{"cut": cut, "echoed": echoed, "sent": st.sentCount()}).
			Info("cutting the connection with a RST")
		proxy.Cut()
		if _, err := await(ctx, resumes, "the resume after cut "+fmt.Sprint(cut)); err != nil {
			return err
		}
	}
	err, werr := await(ctx, sending, "the end of the stream")
	if werr != nil {
		return werr
	}
	if err != nil {
		return fmt.Errorf("send: %w", err)
	}
	if _, err := await(ctx, st.done, "the last echo"); err != nil {
		return fmt.Errorf("%w (%s)", err, st.summary())
	}

	// Once the client is closed no echo can arrive: the counts are final.
	c.Close()
	// A heartbeat lost on a loaded machine may add a resume of its own.
	resumed := c.Stats().Resumes
	if resumed < streamCuts {
		return fmt.Errorf("the client resumed its session %d times, want at least %d", resumed, streamCuts)
	}
	d.side("client").WithField("resumes", resumed).Info(st.summary())
	if !st.ok() {
		return fmt.Errorf("messages were lost, duplicated or reordered: %s", st.summary())
	}
	d.side("client").Info("every message arrived once and in order")

	// As in the step before, the server is shut down once it has read the
	// client's close frame, which ends the session.
	if _, err := await(ctx, closes, "the server's close callback for the session"); err != nil {
		return err
	}
	if err := srv.Shutdown(ctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	err, werr = await(ctx, served, "the end of Serve")
	if werr != nil {
		return werr
	}
	if !errors.Is(err, vgo.ErrServerClosed) {
		return fmt.Errorf("serve returned %v, want vgo.ErrServerClosed", err)
	}
	return nil
}

// stream is the session step's numbered messages and the count of their
// echoes. Message i, from 1 to n, is i as a big-endian uint64. The echoes
// are counted on the client's reader, hence the lock.
type stream struct {
	n     int
	every int           // a cut is due after every this many echoes
	marks chan int      // receives the count of echoes at each cut due
	done  chan struct{} // closed once every number has been echoed
	mu    sync.Mutex
	sent  int
	seen  []bool // seen[i] says message i has been echoed
	// echoed counts the distinct numbers echoed, duplicates the echoes of
	// a number already echoed, reordered those of a new number below the
	// highest echoed before it, and foreign the echoes that carry no
	// number from 1 to n.
	echoed, duplicates, reordered, foreign int
	highest                                uint64
}

func newStream(n, every int) *stream {
	return &stream{
		n:     n,
		every: every,
		marks: make(chan int, n/every),
		done:  make(chan struct{}),
		seen:  make([]bool, n+1),
	}
}

// send sends the messages at streamRate a second: message i is due i-1
// rate periods after the first, so a Send that waited is caught up on.
func (st *stream) send(ctx context.Context, c *vgo.Client) error {
	start := time.Now()
	msg := make([]byte, 8)
	for i := 1; i <= st.n; i++ {
		if wait := time.Until(start.Add(time.Duration(i-1) * time.Second / streamRate)); wait > 0 {
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		binary.BigEndian.PutUint64(msg, uint64(i))
		// With sessions Send keeps the message while the client is
		// disconnected, so it fails only when the step is over.
		if err := c.Send(ctx, msg); err != nil {
			return err
		}
		st.mu.Lock()
		st.sent++
		st.mu.Unlock()
	}
	return nil
}

func (st *stream) sentCount() int {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.sent
}

// echo counts one echo.
func (st *stream) echo(msg []byte) {
	st.mu.Lock()
	defer st.mu.Unlock()
	var i uint64
	if len(msg) == 8 {
		i = binary.BigEndian.Uint64(msg)
	}
	switch {
	case i < 1 || i > uint64(st.n):
		st.foreign++
		return
	case st.seen[i]:
		st.duplicates++
		return
	}
	st.seen[i] = true
	st.echoed++
	if i < st.highest {
		st.reordered++
	}
	st.highest = max(st.highest, i)
	switch {
	case st.echoed == st.n:
		close(st.done)
	case st.echoed%st.every == 0:
		notify(st.marks, st.echoed)
	}
}

// ok reports whether every message was echoed once and in order.
func (st *stream) ok() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.echoed == st.n && st.duplicates == 0 && st.reordered == 0 && st.foreign == 0
}

func (st *stream) summary() string {
	st.mu.Lock()
	defer st.mu.Unlock()
	s := fmt.Sprintf("sent %d echoed %d duplicates %d reordered %d lost %d",
		st.sent, st.echoed, st.duplicates, st.reordered, st.n-st.echoed)
	if st.foreign > 0 {
		s += fmt.Sprintf(" foreign %d", st.foreign)
	}
	return s
}

// notify delivers v if there is room, and drops it otherwise, so that a
// callback never blocks the connection it reports on.
func notify[T any](ch chan<- T, v T) {
	select {
	case ch <- v:
	default:
	}
}

// drain discards the events waiting in ch.
func drain[T any](ch <-chan T) {
	for {
		select {
		case <-ch:
		default:
			return
		}
	}
}

// await returns the next event on ch, or an error naming what did not happen
// when ctx ends first.
func await[T any](ctx context.Context, ch <-chan T, what string) (T, error) {
	select {
	case v := <-ch:
		return v, nil
	case <-ctx.Done():
		var zero T
		return zero, fmt.Errorf("%s did not happen: %w", what, ctx.Err())
	}
}
