package vgo

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// ---------------------------------------------------------------------------
// Raw client: speaks the wire format by hand, for what a Client never does
// (stay silent, send garbage, announce hostile lengths).

type rawConn struct {
	t  *testing.T
	nc net.Conn
	fr *frameReader
}

// dialRaw connects to addr and sends nothing. The connection is closed with
// the test.
func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, waitFor)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	return &rawConn{t: t, nc: nc, fr: newFrameReader(nc, DefaultMaxFrameSize)}
}

// dialHello connects to addr and completes the hello exchange.
func dialHello(t *testing.T, addr string) *rawConn {
	t.Helper()
	r := dialRaw(t, addr)
	r.write(rawHello(ProtocolVersion))
	ft, p := r.next()
	require.Equal(t, frameHello, ft, "server's first frame")
	h, err := parseHello(p, true)
	require.NoError(t, err)
	require.EqualValues(t, ProtocolVersion, h.version)
	return r
}

func (r *rawConn) write(b []byte) {
	r.t.Helper()
	require.NoError(r.t, r.nc.SetWriteDeadline(time.Now().Add(waitFor)))
	_, err := r.nc.Write(b)
	require.NoError(r.t, err)
}

func (r *rawConn) send(ft frameType, payload []byte) {
	r.t.Helper()
	r.write(appendFrame(nil, ft, payload))
}

// read reads one frame, waiting at most waitFor. The payload is a copy,
// never nil.
func (r *rawConn) read() (frameType, []byte, error) {
	if err := r.nc.SetReadDeadline(time.Now().Add(waitFor)); err != nil {
		return 0, nil, err
	}
	ft, p, err := r.fr.next()
	return ft, append([]byte{}, p...), err
}

// next reads one frame and fails the test if there is none.
func (r *rawConn) next() (frameType, []byte) {
	r.t.Helper()
	ft, p, err := r.read()
	require.NoError(r.t, err, "reading a frame")
	return ft, p
}

// expectClose reads a close frame with the given code.
func (r *rawConn) expectClose(code CloseCode) {
	r.t.Helper()
	ft, p := r.next()
	require.Equal(r.t, frameClose, ft, "expected a close frame")
	ce := parseClose(p)
	require.Equal(r.t, code, ce.Code, "close code (reason %q)", ce.Reason)
}

// expectGoodbye reads a goodbye frame announcing the given drain window.
func (r *rawConn) expectGoodbye(window time.Duration) {
	r.t.Helper()
	ft, p := r.next()
	require.Equal(r.t, frameGoodbye, ft, "expected a goodbye frame")
	got, ends := parseGoodbye(p)
	require.Equal(r.t, window, got, "drain window")
	require.False(r.t, ends, "a goodbye to a client without a session ends none")
}

// expectEOF checks that the server closed the stream cleanly, with no frame
// before the end.
func (r *rawConn) expectEOF() {
	r.t.Helper()
	ft, _, err := r.read()
	require.ErrorIs(r.t, err, io.EOF, "expected the server to close the stream, got %s frame", ft)
}

// expectDropped checks that the connection ends, after at most a close
// frame with the given code.
func (r *rawConn) expectDropped(code CloseCode) {
	r.t.Helper()
	ft, p, err := r.read()
	if err == nil {
		require.Equal(r.t, frameClose, ft, "expected a close frame or the end of the stream")
		require.Equal(r.t, code, parseClose(p).Code)
		r.expectEOF()
		return
	}
	require.ErrorIs(r.t, err, io.EOF)
}

func (r *rawConn) local() string { return r.nc.LocalAddr().String() }

// ---------------------------------------------------------------------------
// Server and client plumbing.

// serving tracks one Serve call.
type serving struct {
	done chan struct{}
	err  error
}

// wait returns what Serve returned, failing the test if it does not return.
func (s *serving) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-s.done:
		return s.err
	case <-time.After(waitFor):
		t.Fatalf("Serve did not return within %v", waitFor)
		return nil
	}
}

// serveOn runs a new server on l and closes it with the test. Unlike
// startServer it lets the test see what Serve returned.
func serveOn(t *testing.T, l net.Listener, opts ...ServerOption) (*Server, *serving) {
	t.Helper()
	s, err := NewServer(append([]ServerOption{WithLogger(quietLogger())}, opts...)...)
	require.NoError(t, err)
	sv := &serving{done: make(chan struct{})}
	go func() {
		sv.err = s.Serve(l)
		close(sv.done)
	}()
	t.Cleanup(func() {
		assert.NoError(t, s.Close())
		select {
		case <-sv.done:
		case <-time.After(waitFor):
			t.Error("Serve did not return after Close")
		}
	})
	return s, sv
}

// shutdown runs srv.Shutdown(ctx) and returns its result, failing the test
// instead of hanging if it does not return within waitFor.
func shutdown(t *testing.T, ctx context.Context, srv *Server) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	return recv(t, done)
}

// requireListenerClosed checks that l, a TCP listener, was closed, without
// blocking if it was not.
func requireListenerClosed(t *testing.T, l net.Listener) {
	t.Helper()
	// An open listener's Accept now fails at once with a timeout.
	_ = l.(*net.TCPListener).SetDeadline(time.Now())
	_, err := l.Accept()
	require.ErrorIs(t, err, net.ErrClosed, "Serve must close the listener it was given")
}

// connClosed is one WithOnConnClose event.
type connClosed struct {
	remote string
	err    error
}

// reportConnClose returns an option that reports closed connections on the
// returned channel.
func reportConnClose() (ServerOption, <-chan connClosed) {
	ch := make(chan connClosed, 64)
	return WithOnConnClose(func(c *Conn, err error) {
		ch <- connClosed{remote: c.RemoteAddr().String(), err: err}
	}), ch
}

// connCloseErr waits for the close of the connection whose client end is
// local and returns its cause.
func connCloseErr(t *testing.T, ch <-chan connClosed, local string) error {
	t.Helper()
	for {
		ev := recv(t, ch)
		if ev.remote == local {
			return ev.err
		}
	}
}

// echo is a handler that answers every data frame with "echo: " + msg.
func echo(c *Conn, msg []byte) {
	_ = c.Send(context.Background(), append([]byte("echo: "), msg...))
}

// watchedClient is a connected Client whose messages and disconnects the
// test can see.
type watchedClient struct {
	*Client
	msgs        chan string
	disconnects chan error
}

// connectClient starts a client, waits until it is connected and closes it
// with the test.
func connectClient(t *testing.T, addr string, opts ...ClientOption) *watchedClient {
	t.Helper()
	w := &watchedClient{msgs: make(chan string, 64), disconnects: make(chan error, 64)}
	base := []ClientOption{
		WithOnMessage(func(m []byte) { w.msgs <- string(m) }),
		WithOnDisconnect(func(err error) { w.disconnects <- err }),
	}
	w.Client = newTestClient(t, addr, append(base, opts...)...)
	require.NoError(t, w.WaitConnected(testContext(t)))
	return w
}

// roundTrip sends msg and waits for the echo handler's answer.
func (w *watchedClient) roundTrip(t *testing.T, msg string) {
	t.Helper()
	require.NoError(t, w.Send(testContext(t), []byte(msg)))
	require.Equal(t, "echo: "+msg, recv(t, w.msgs))
}

// requireStillConnected checks that the client never lost its connection.
func (w *watchedClient) requireStillConnected(t *testing.T) {
	t.Helper()
	select {
	case err := <-w.disconnects:
		t.Fatalf("client disconnected: %v", err)
	default:
	}
	require.Equal(t, StateConnected, w.State())
}

// closeErr returns err as a *CloseError, failing the test if it is not one.
func closeErr(t *testing.T, err error) *CloseError {
	t.Helper()
	var ce *CloseError
	require.ErrorAs(t, err, &ce)
	return ce
}

// ---------------------------------------------------------------------------
// Frames.

func TestServerAnswersPingWithPong(t *testing.T) {
	var pings atomic.Int32
	_, addr := startServer(t, WithOnPing(func(*Conn) { pings.Add(1) }))
	r := dialHello(t, addr)

	for _, payload := range [][]byte{[]byte("\x00\x01ping-42\xff"), {}} {
		r.send(framePing, payload)
		ft, p := r.next()
		require.Equal(t, framePong, ft)
		require.Equal(t, payload, p, "pong must echo the ping's payload")
	}
	require.EqualValues(t, 2, pings.Load())

	// A ping is a control frame with a small limit of its own.
	r.send(framePing, make([]byte, maxPingSize+1))
	r.expectClose(CloseProtocolError)
	r.expectEOF()
}

func TestServerHandlerRepliesToClient(t *testing.T) {
	handled := make(chan string, 64)
	_, addr := startServer(t, WithHandler(func(c *Conn, msg []byte) {
		handled <- string(msg)
		echo(c, msg)
	}))
	c := connectClient(t, addr)

	for _, msg := range []string{"hello", "world", ""} {
		c.roundTrip(t, msg)
		require.Equal(t, msg, recv(t, handled), "handler saw the data frame")
	}
	c.requireStillConnected(t)
}

func TestServerReportsClientClose(t *testing.T) {
	closeOpt, closed := reportConnClose()
	srv, addr := startServer(t, closeOpt)
	c := connectClient(t, addr)
	require.Eventually(t, func() bool { return srv.Len() == 1 }, waitFor, time.Millisecond)

	require.NoError(t, c.Close())
	require.Equal(t, CloseNormal, closeErr(t, recv(t, closed).err).Code)
	require.Eventually(t, func() bool { return srv.Len() == 0 }, waitFor, time.Millisecond)
}

// ---------------------------------------------------------------------------
// Misbehaving peers.

func TestServerClosesStaleConnection(t *testing.T) {
	const heartbeat = 150 * time.Millisecond
	closeOpt, closed := reportConnClose()
	srv, addr := startServer(t, WithHeartbeatTimeout(heartbeat), WithHandler(echo), closeOpt)

	// A client pinging every 20ms is never stale.
	var lastPong atomic.Int64
	c := connectClient(t, addr, WithOnPong(func(time.Duration) { lastPong.Store(time.Now().UnixNano()) }))
	connected := time.Now()

	start := time.Now()
	r := dialHello(t, addr)
	r.expectEOF()
	assert.GreaterOrEqual(t, time.Since(start), heartbeat, "closed before the heartbeat timeout")
	err := connCloseErr(t, closed, r.local())
	require.ErrorIs(t, err, ErrHeartbeatTimeout)

	// The pinging client outlives two heartbeat timeouts.
	require.Eventually(t, func() bool {
		return time.Unix(0, lastPong.Load()).Sub(connected) > 2*heartbeat
	}, waitFor, time.Millisecond)
	c.requireStillConnected(t)
	c.roundTrip(t, "alive")
	require.Equal(t, 1, srv.Len())
}

func TestServerDropsGarbageInsteadOfHello(t *testing.T) {
	srv, addr := startServer(t, WithHandler(echo))
	good := connectClient(t, addr)

	for name, garbage := range map[string][]byte{
		"HTTP request":      []byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
		"data before hello": appendFrame(nil, frameData, []byte("early")),
		"hello, bad magic":  appendFrame(nil, frameHello, []byte("XYZ\x01")),
		"hello, huge":       {byte(frameHello), 0xff, 0xff, 0xff, 0xff},
	} {
		t.Run(name, func(t *testing.T) {
			bad := dialRaw(t, addr)
			bad.write(garbage)
			bad.expectDropped(CloseProtocolError)

			good.roundTrip(t, "still here")
			good.requireStillConnected(t)
			require.Equal(t, 1, srv.Len())
		})
	}
}

func TestServerClosesUnknownFrameType(t *testing.T) {
	closeOpt, closed := reportConnClose()
	_, addr := startServer(t, closeOpt)
	r := dialHello(t, addr)

	r.send(frameType(0x7f), []byte("??"))
	r.expectClose(CloseProtocolError)
	r.expectEOF()
	require.ErrorIs(t, connCloseErr(t, closed, r.local()), ErrProtocol)
}

func TestServerRejectsOversizedLengthWithoutAllocating(t *testing.T) {
	closeOpt, closed := reportConnClose()
	_, addr := startServer(t, closeOpt) // default heartbeat: 15s, longer than waitFor
	r := dialHello(t, addr)

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	r.write([]byte{byte(frameData), 0xff, 0xff, 0xff, 0xff})
	r.expectClose(CloseProtocolError)
	r.expectEOF()
	err := connCloseErr(t, closed, r.local())
	runtime.ReadMemStats(&after)

	require.ErrorIs(t, err, ErrFrameTooLarge)
	require.ErrorIs(t, err, ErrProtocol)
	allocated := after.TotalAlloc - before.TotalAlloc
	require.Less(t, allocated, uint64(1<<20), "bytes allocated while rejecting a 4 GiB frame header")
}

func TestServerRejectsWrongVersion(t *testing.T) {
	srv, addr := startServer(t)
	r := dialRaw(t, addr)

	r.write(rawHello(99))
	r.expectClose(CloseBadVersion)
	r.expectEOF()
	require.Equal(t, 0, srv.Len())
}

// ---------------------------------------------------------------------------
// Connection limit.

func TestServerMaxConnections(t *testing.T) {
	srv, addr := startServer(t, WithMaxConnections(2), WithHandler(echo))
	first := connectClient(t, addr)
	second := connectClient(t, addr)

	// A raw dial past the limit is told why, then closed.
	third := dialRaw(t, addr)
	third.expectClose(CloseServerFull)
	third.expectEOF()

	// A Client past the limit fails its dial attempt with the close frame.
	var disconnects atomic.Int32
	refused := newTestClient(t, addr, WithMaxAttempts(1),
		WithOnDisconnect(func(error) { disconnects.Add(1) }))
	select {
	case <-refused.Done():
	case <-time.After(waitFor):
		t.Fatal("refused client did not give up")
	}
	err := refused.Err()
	require.ErrorIs(t, err, ErrGaveUp)
	require.Equal(t, CloseServerFull, closeErr(t, err).Code)
	require.Zero(t, disconnects.Load(), "a refused dial never was a connection")

	// The connections under the limit are untouched.
	first.roundTrip(t, "one")
	second.roundTrip(t, "two")
	first.requireStillConnected(t)
	second.requireStillConnected(t)
	require.Equal(t, 2, srv.Len())

	// Closing one frees its slot.
	require.NoError(t, first.Close())
	require.Eventually(t, func() bool { return srv.Len() == 1 }, waitFor, time.Millisecond)
	connectClient(t, addr).roundTrip(t, "three")
}

// ---------------------------------------------------------------------------
// Lifecycle.

func TestServerShutdownSendsGoingAway(t *testing.T) {
	for name, window := range map[string]time.Duration{
		"with drain window": 1500 * time.Millisecond,
		"no drain window":   -1,
	} {
		t.Run(name, func(t *testing.T) {
			l := listen(t)
			srv, sv := serveOn(t, l, WithHandler(echo), WithDrainWindow(window))
			addr := l.Addr().String()
			c := connectClient(t, addr)
			r := dialHello(t, addr)

			require.NoError(t, shutdown(t, testContext(t), srv))
			require.ErrorIs(t, sv.wait(t), ErrServerClosed)

			if window > 0 {
				r.expectGoodbye(window)
			}
			r.expectClose(CloseGoingAway)
			r.expectEOF()
			require.Equal(t, CloseGoingAway, closeErr(t, recv(t, c.disconnects)).Code)
			require.Equal(t, 0, srv.Len())
		})
	}
}

func TestServerShutdownDuringHandshake(t *testing.T) {
	// A connection that has not completed its hello may only be sent a
	// hello or a close frame: a goodbye there breaks the handshake
	// (PROTOCOL.md, "Handshake" and "Protocol errors").
	t.Run("raw peer", func(t *testing.T) {
		l := listen(t)
		srv, sv := serveOn(t, l)
		r := dialRaw(t, l.Addr().String()) // never sends its hello
		// Serve accepts in order, so once a later connection has
		// completed its hello the server has r, in its handshake.
		dialHello(t, l.Addr().String())

		require.NoError(t, shutdown(t, testContext(t), srv))
		require.ErrorIs(t, sv.wait(t), ErrServerClosed)
		r.expectDropped(CloseGoingAway)
	})

	t.Run("client", func(t *testing.T) {
		entered := make(chan struct{}, 1)
		release := make(chan struct{})
		var releaseOnce sync.Once
		unblock := func() { releaseOnce.Do(func() { close(release) }) }
		l := listen(t)
		// The authenticator holds the client in its handshake.
		srv, _ := serveOn(t, l, WithAuthenticator(func(*Conn, []byte) (any, error) {
			entered <- struct{}{}
			<-release
			return nil, nil
		}))
		t.Cleanup(unblock) // runs before the server's cleanup Close
		c := newTestClient(t, l.Addr().String(), WithMaxAttempts(1))
		recv(t, entered)

		shut := make(chan error, 1)
		go func() { shut <- srv.Shutdown(testContext(t)) }()
		select {
		case <-c.Done():
		case <-time.After(waitFor):
			t.Fatal("client did not give up")
		}
		unblock()
		require.NoError(t, recv(t, shut))
		require.Equal(t, CloseGoingAway, closeErr(t, c.Err()).Code, "client saw %v", c.Err())
	})
}

func TestServerShutdownWaitsForBlockedHandler(t *testing.T) {
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	l := listen(t)
	srv, sv := serveOn(t, l, WithDrainWindow(-1), WithHandler(func(c *Conn, msg []byte) {
		entered <- struct{}{}
		<-release
	}))
	t.Cleanup(unblock) // runs before the server's cleanup Close
	r := dialHello(t, l.Addr().String())
	r.send(frameData, []byte("block"))
	recv(t, entered)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, shutdown(t, ctx, srv), context.DeadlineExceeded)
	// Shutdown did what it could: the client was told and dropped.
	r.expectClose(CloseGoingAway)
	r.expectEOF()
	require.ErrorIs(t, sv.wait(t), ErrServerClosed)

	closed := make(chan error, 1)
	go func() { closed <- srv.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned %v while a handler was still running", err)
	case <-time.After(20 * time.Millisecond):
	}
	unblock()
	require.NoError(t, recv(t, closed))
}

// smallBufListener gives every accepted connection a small send buffer, so
// that a peer that stops reading stalls the server's writes quickly.
type smallBufListener struct{ net.Listener }

func (l smallBufListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err == nil {
		_ = nc.(*net.TCPConn).SetWriteBuffer(4 << 10)
	}
	return nc, err
}

// fillUntilStalled sends to c until its send queue is full because the peer
// does not read.
func fillUntilStalled(t *testing.T, c *Conn) {
	t.Helper()
	chunk := make([]byte, 16<<10)
	for range 1000 {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		err := c.Send(ctx, chunk)
		cancel()
		if err != nil {
			require.ErrorIs(t, err, context.DeadlineExceeded)
			return
		}
	}
	t.Fatal("the send queue never filled up")
}

func TestServerShutdownHonoursContextWithStalledPeers(t *testing.T) {
	const n = 8
	opened := make(chan *Conn, n)
	l := listen(t)
	srv, _ := serveOn(t, smallBufListener{l}, WithOnConnOpen(func(c *Conn) { opened <- c }))
	for range n {
		r := dialHello(t, l.Addr().String())
		require.NoError(t, r.nc.(*net.TCPConn).SetReadBuffer(4<<10))
	}
	for range n {
		fillUntilStalled(t, recv(t, opened)) // the raw clients never read
	}

	const grace = 100 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	start := time.Now()
	err := shutdown(t, ctx, srv)
	elapsed := time.Since(start)
	require.Less(t, elapsed, grace+time.Second,
		"Shutdown overran its context by %v with %d stalled peers", elapsed-grace, n)
	require.ErrorIs(t, err, context.DeadlineExceeded)
}

func TestServerCloseIsImmediateAndIdempotent(t *testing.T) {
	l := listen(t)
	srv, sv := serveOn(t, l, WithHandler(echo)) // default 5s/15s timeouts
	addr := l.Addr().String()
	c := connectClient(t, addr)
	shaking := dialRaw(t, addr) // never sends its hello
	// Serve accepts in order, so once open has its hello answered the
	// server has shaking too, rather than leaving it in the listener's
	// backlog to be reset.
	open := dialHello(t, addr)

	start := time.Now()
	require.NoError(t, srv.Close())
	// Nothing to wait for: no close frame, no timeout.
	require.Less(t, time.Since(start), time.Second, "Close took too long")
	require.ErrorIs(t, sv.wait(t), ErrServerClosed)

	open.expectEOF() // no close frame
	shaking.expectEOF()
	err := recv(t, c.disconnects)
	var ce *CloseError
	require.False(t, errors.As(err, &ce), "Close sends no close frame, client saw %v", err)
	require.Equal(t, 0, srv.Len())

	require.NoError(t, srv.Close())
	require.NoError(t, shutdown(t, testContext(t), srv))

	l2 := listen(t)
	require.ErrorIs(t, srv.Serve(l2), ErrServerClosed)
	requireListenerClosed(t, l2)
	require.ErrorIs(t, srv.ListenAndServe("127.0.0.1:0"), ErrServerClosed)
}

// ---------------------------------------------------------------------------
// Accept errors.

type temporaryError struct{ temporary bool }

func (e temporaryError) Error() string   { return "accept failed" }
func (e temporaryError) Temporary() bool { return e.temporary }
func (e temporaryError) Timeout() bool   { return false }

// failingListener fails the first failures calls to Accept with err, then
// delegates.
type failingListener struct {
	net.Listener
	err      error
	failures int32
	calls    atomic.Int32
}

func (l *failingListener) Accept() (net.Conn, error) {
	if l.calls.Add(1) <= l.failures {
		return nil, l.err
	}
	return l.Listener.Accept()
}

func TestServerRetriesTemporaryAcceptErrors(t *testing.T) {
	fl := &failingListener{Listener: listen(t), err: temporaryError{true}, failures: 3}
	_, sv := serveOn(t, fl, WithHandler(echo))

	connectClient(t, fl.Addr().String()).roundTrip(t, "through")
	require.GreaterOrEqual(t, fl.calls.Load(), int32(4))
	select {
	case <-sv.done:
		t.Fatalf("Serve returned %v", sv.err)
	default:
	}
}

func TestServerCloseStopsAcceptRetries(t *testing.T) {
	// Accept keeps failing, so Serve sits in its growing retry delay.
	fl := &failingListener{Listener: listen(t), err: temporaryError{true}, failures: 1 << 30}
	srv, sv := serveOn(t, fl)
	require.Eventually(t, func() bool { return fl.calls.Load() >= 5 }, waitFor, time.Millisecond)

	require.NoError(t, srv.Close())
	require.ErrorIs(t, sv.wait(t), ErrServerClosed)
}

func TestServerReturnsPermanentAcceptError(t *testing.T) {
	for name, acceptErr := range map[string]error{
		"plain":         errors.New("accept: broken"),
		"not temporary": temporaryError{false},
	} {
		t.Run(name, func(t *testing.T) {
			inner := listen(t)
			fl := &failingListener{Listener: inner, err: acceptErr, failures: 1}
			_, sv := serveOn(t, fl)

			require.ErrorIs(t, sv.wait(t), acceptErr)
			requireListenerClosed(t, inner)
		})
	}
}

// ---------------------------------------------------------------------------
// Registry.

func TestServerRegistry(t *testing.T) {
	const n = 3
	opened := make(chan *Conn, n)
	srv, addr := startServer(t, WithOnConnOpen(func(c *Conn) { opened <- c }))
	require.Equal(t, 0, srv.Len())

	raws := make(map[string]*rawConn)
	for range n {
		r := dialHello(t, addr)
		raws[r.local()] = r
	}
	require.Eventually(t, func() bool { return srv.Len() == n }, waitFor, time.Millisecond)

	// Conn.ID and RemoteAddr, as seen on open and by Range.
	ids := make(map[uint64]string)
	for range n {
		c := recv(t, opened)
		require.Contains(t, raws, c.RemoteAddr().String())
		require.NotZero(t, c.ID())
		require.NotContains(t, ids, c.ID(), "IDs must be unique")
		ids[c.ID()] = c.RemoteAddr().String()
	}
	visited := make(map[uint64]string)
	srv.Range(func(c *Conn) bool {
		visited[c.ID()] = c.RemoteAddr().String()
		return true
	})
	require.Equal(t, ids, visited)
	calls := 0
	srv.Range(func(*Conn) bool { calls++; return false })
	require.Equal(t, 1, calls, "Range stops when fn returns false")

	broadcast := func(want int) {
		t.Helper()
		msg := []byte("news")
		require.Equal(t, want, srv.Broadcast(testContext(t), msg))
		for _, r := range raws {
			ft, p := r.next()
			require.Equal(t, frameData, ft)
			require.Equal(t, msg, p)
		}
	}
	broadcast(n)

	for local, r := range raws {
		require.NoError(t, r.nc.Close())
		delete(raws, local)
		require.Eventually(t, func() bool { return srv.Len() == len(raws) }, waitFor, time.Millisecond)
		broadcast(len(raws))
	}
}

func TestServerBroadcastCountsOnlyDelivered(t *testing.T) {
	opened := make(chan *Conn, 2)
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	srv, addr := startServer(t,
		WithOnConnOpen(func(c *Conn) { opened <- c }),
		WithHandler(func(*Conn, []byte) {
			entered <- struct{}{}
			<-release
		}))
	t.Cleanup(func() { close(release) }) // before the server's Close

	// The first connection is closed by the server while its handler is
	// still running, so it is still registered when Broadcast runs.
	blocked := dialHello(t, addr)
	blockedConn := recv(t, opened)
	healthy := dialHello(t, addr)
	recv(t, opened)
	blocked.send(frameData, []byte("block"))
	recv(t, entered)
	require.NoError(t, blockedConn.Close())
	blocked.expectClose(CloseNormal)
	blocked.expectEOF()

	require.Equal(t, 1, srv.Broadcast(testContext(t), []byte("news")))
	ft, p := healthy.next()
	require.Equal(t, frameData, ft)
	require.Equal(t, "news", string(p))
}

// ---------------------------------------------------------------------------
// Conn.

func TestConnSendOverMaxFrameSize(t *testing.T) {
	const limit = 1024
	sendErrs := make(chan error, 2)
	_, addr := startServer(t, WithMaxFrameSize(limit), WithHandler(func(c *Conn, msg []byte) {
		ctx := context.Background()
		sendErrs <- c.Send(ctx, make([]byte, limit+1))
		sendErrs <- c.Send(ctx, bytes.Repeat([]byte("x"), limit))
		echo(c, msg)
	}))
	c := connectClient(t, addr)

	require.NoError(t, c.Send(testContext(t), []byte("go")))
	require.ErrorIs(t, recv(t, sendErrs), ErrFrameTooLarge)
	require.NoError(t, recv(t, sendErrs), "a payload at the limit is fine")
	require.Equal(t, limit, len(recv(t, c.msgs)))
	require.Equal(t, "echo: go", recv(t, c.msgs))
	c.requireStillConnected(t)
}

func TestConnCloseSendsCloseFrame(t *testing.T) {
	type result struct{ closeErr, sendErr error }
	results := make(chan result, 64)
	closeOpt, closed := reportConnClose()
	_, addr := startServer(t, closeOpt, WithHandler(func(c *Conn, msg []byte) {
		var res result
		res.closeErr = c.Close()
		res.sendErr = c.Send(context.Background(), []byte("too late"))
		_ = c.Close() // idempotent
		results <- res
	}))
	c := connectClient(t, addr)

	require.NoError(t, c.Send(testContext(t), []byte("bye")))
	res := recv(t, results)
	require.NoError(t, res.closeErr)
	require.ErrorIs(t, res.sendErr, ErrClosed)
	require.Equal(t, CloseNormal, closeErr(t, recv(t, c.disconnects)).Code)
	require.ErrorIs(t, recv(t, closed).err, ErrClosed)
	select {
	case m := <-c.msgs:
		t.Fatalf("client received %q after the close", m)
	default:
	}
}

// ---------------------------------------------------------------------------
// Options.

func TestNewServerRejectsInvalidOptions(t *testing.T) {
	for name, opt := range map[string]ServerOption{
		"negative max connections": WithMaxConnections(-1),
		"negative max frame size":  WithMaxFrameSize(-1),
		"TLS without certificate":  WithTLSConfig(&tls.Config{}),
	} {
		t.Run(name, func(t *testing.T) {
			s, err := NewServer(WithLogger(quietLogger()), opt)
			require.ErrorIs(t, err, ErrInvalidOption)
			require.Nil(t, s)
		})
	}

	// The same options with sane values are accepted.
	s, err := NewServer(WithLogger(quietLogger()), WithMaxConnections(1), WithMaxFrameSize(1),
		WithTLSConfig(&tls.Config{GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return nil, errors.New("unused")
		}}))
	require.NoError(t, err)
	require.NoError(t, s.Close())
}

// ---------------------------------------------------------------------------
// Who is connected.

// account is what the test authenticator learns from a client's
// certificate and token.
type account struct {
	user, tenant string
}

func TestConnIdentityAndTLSState(t *testing.T) {
	// Mutual TLS: the authenticator sees the client's certificate and the
	// addresses, and what it returns is the identity every later callback
	// sees.
	serverCfg, clientCfg := testTLS(t)
	serverCfg.ClientAuth = tls.RequireAndVerifyClientCert
	serverCfg.ClientCAs = clientCfg.RootCAs
	clientCfg.Certificates = serverCfg.Certificates

	type seen struct {
		identity any
		cn       string
		remote   string
		local    string
		value    any
	}
	authSeen := make(chan seen, 1)
	handled := make(chan seen, 1)
	srv, addr := startServer(t, WithTLSConfig(serverCfg),
		WithAuthenticator(func(c *Conn, token []byte) (any, error) {
			authSeen <- seen{cn: c.TLS().PeerCertificates[0].Subject.CommonName,
				remote: c.RemoteAddr().String(), local: c.LocalAddr().String()}
			return account{user: c.TLS().PeerCertificates[0].Subject.CommonName, tenant: string(token)}, nil
		}),
		WithOnConnOpen(func(c *Conn) { c.SetValue(1) }),
		WithHandler(func(c *Conn, msg []byte) {
			c.SetValue(c.Value().(int) + 1)
			handled <- seen{identity: c.Identity(), cn: c.TLS().PeerCertificates[0].Subject.CommonName,
				remote: c.RemoteAddr().String(), local: c.LocalAddr().String(), value: c.Value()}
		}))

	var local string
	dialer := &net.Dialer{}
	c := newTestClient(t, addr, WithTLSConfig(clientCfg),
		WithCredentials(func(context.Context) ([]byte, error) { return []byte("blue"), nil }),
		WithDialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
			nc, err := dialer.DialContext(ctx, network, addr)
			if err == nil {
				local = nc.LocalAddr().String()
			}
			return nc, err
		}))
	require.NoError(t, c.WaitConnected(testContext(t)))
	require.NoError(t, c.Send(testContext(t), []byte("hi")))

	auth := recv(t, authSeen)
	assert.Equal(t, seen{cn: "vgo test", remote: local, local: addr}, auth)
	got := recv(t, handled)
	assert.Equal(t, seen{identity: account{user: "vgo test", tenant: "blue"}, cn: "vgo test",
		remote: local, local: addr, value: 2}, got)

	// The value is readable from other goroutines while the handler
	// writes it.
	require.NoError(t, c.Send(testContext(t), []byte("again")))
	srv.Range(func(conn *Conn) bool {
		assert.Contains(t, []any{2, 3}, conn.Value())
		return true
	})
	assert.Equal(t, 3, recv(t, handled).value)
}

func TestConnWithoutAuthenticatorOrTLS(t *testing.T) {
	opened := make(chan *Conn, 1)
	_, addr := startServer(t, WithOnConnOpen(func(c *Conn) { opened <- c }))
	connectClient(t, addr)
	conn := recv(t, opened)
	assert.Nil(t, conn.Identity())
	assert.Nil(t, conn.TLS())
	assert.Nil(t, conn.Value())
	assert.Equal(t, addr, conn.LocalAddr().String())
}

func TestConnContextEndsWhenConnectionCloses(t *testing.T) {
	// The context ends as soon as the connection starts to close, while
	// the reader is still held up by a handler waiting on it: the handler
	// can stop its work for a client that is gone.
	type ended struct {
		id    uint64
		cause error
	}
	handling := make(chan uint64, 1)
	handlerDone := make(chan ended, 1)
	closed := make(chan error, 1)
	srv, addr := startServer(t,
		WithHandler(func(c *Conn, _ []byte) {
			handling <- c.ID()
			select {
			case <-c.Context().Done():
			case <-time.After(waitFor):
			}
			handlerDone <- ended{c.ID(), context.Cause(c.Context())}
		}),
		WithOnConnClose(func(c *Conn, err error) { closed <- err }))
	w := connectClient(t, addr)
	require.NoError(t, w.Send(testContext(t), []byte("work")))
	id := recv(t, handling)

	conn, ok := srv.Conn(id)
	require.True(t, ok, "an open connection is found by its ID")
	require.NoError(t, conn.Context().Err(), "not canceled while open")
	require.NoError(t, conn.Close())
	got := recv(t, handlerDone)
	assert.Equal(t, id, got.id)
	assert.ErrorIs(t, got.cause, ErrClosed)
	assert.ErrorIs(t, recv(t, closed), ErrClosed, "the close callback gets the same cause")
	assert.ErrorIs(t, context.Cause(conn.Context()), ErrClosed, "a context asked for after the end is already over")

	require.Eventually(t, func() bool {
		_, ok := srv.Conn(id)
		return !ok
	}, waitFor, time.Millisecond, "a closed connection is no longer found")
	_, ok = srv.Conn(id + 1000)
	assert.False(t, ok)
}

func TestConnContextEndsOnPeerClose(t *testing.T) {
	// The cause is the one the close callback is given.
	opened := make(chan *Conn, 1)
	closed := make(chan error, 1)
	_, addr := startServer(t,
		WithOnConnOpen(func(c *Conn) { opened <- c }),
		WithOnConnClose(func(c *Conn, err error) { closed <- err }))
	w := connectClient(t, addr)
	conn := recv(t, opened)
	ctx := conn.Context()
	require.NoError(t, w.Close())
	cause := recv(t, closed)
	<-ctx.Done()
	assert.Equal(t, cause, context.Cause(ctx))
	assert.Equal(t, CloseNormal, closeErr(t, context.Cause(ctx)).Code)
}

func TestConnContextEndsWhenHandshakeFailsAfterAuthentication(t *testing.T) {
	// What the authenticator sets up is released through the context even
	// when the connection never opens, and so never reaches the close
	// callback: here the server shuts down before the hello goes out.
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	var releaseOnce sync.Once
	unblock := func() { releaseOnce.Do(func() { close(release) }) }
	var sessions atomic.Int32
	released := make(chan error, 1)
	l := listen(t)
	srv, _ := serveOn(t, l,
		WithAuthenticator(func(c *Conn, _ []byte) (any, error) {
			sessions.Add(1)
			context.AfterFunc(c.Context(), func() {
				sessions.Add(-1)
				// Runs while the authenticator still does: reading
				// the identity must not race with its being set.
				_ = c.Identity()
				released <- context.Cause(c.Context())
			})
			entered <- struct{}{}
			<-release
			return "someone", nil
		}),
		WithOnConnOpen(func(*Conn) { t.Error("the connection must not open") }),
		WithOnConnClose(func(*Conn, error) { t.Error("a connection that never opened is not reported closed") }))
	t.Cleanup(unblock)
	c := newTestClient(t, l.Addr().String(), WithMaxAttempts(1))
	recv(t, entered)

	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(testContext(t)) }()
	// Shutdown closes the connection under the running authenticator.
	assert.ErrorIs(t, recv(t, released), ErrServerClosed)
	assert.Zero(t, sessions.Load())
	unblock()
	require.NoError(t, recv(t, shut))
	<-c.Done()
	assert.Equal(t, CloseGoingAway, closeErr(t, c.Err()).Code, "client saw %v", c.Err())
}

func TestServerAddr(t *testing.T) {
	srv, err := NewServer(WithLogger(quietLogger()))
	require.NoError(t, err)
	assert.Nil(t, srv.Addr(), "nil before Serve")

	served := make(chan error, 1)
	go func() { served <- srv.ListenAndServe("127.0.0.1:0") }()
	require.Eventually(t, func() bool { return srv.Addr() != nil }, waitFor, time.Millisecond)
	addr := srv.Addr().String()
	assert.NotEqual(t, "127.0.0.1:0", addr, "the port actually bound")
	connectClient(t, addr)

	require.NoError(t, srv.Close())
	require.ErrorIs(t, recv(t, served), ErrServerClosed)
	assert.Nil(t, srv.Addr(), "nil once Serve has returned")
}

func TestWaitConnectedBeforeStart(t *testing.T) {
	_, addr := startServer(t)
	c, err := NewClient(addr, WithLogger(quietLogger()))
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	assert.ErrorIs(t, c.WaitConnected(testContext(t)), ErrNotStarted, "fails at once rather than wait for ctx")
	c.Start()
	require.NoError(t, c.WaitConnected(testContext(t)))
}
