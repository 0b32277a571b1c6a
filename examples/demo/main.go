// Command demo runs a vgo server and a vgo client in one process and walks
// through their life in about ten seconds: the client connects and
// heartbeats flow; the server dies and the client retries with growing
// delays; the server comes back on the same address and the client
// reconnects; a peer that says hello and then goes silent is dropped by the
// server as stale.
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
