package vgo

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vgonet/vgo/vgotest"
)

// sequence checks that numbered messages arrive each exactly once and in
// order: message i carries i as a big-endian uint64 in its first 8 bytes.
type sequence struct {
	mu         sync.Mutex
	next       uint64 // the number expected next, from 1
	duplicates int
	gaps       int
	changed    chan struct{}
}

func newSequence() *sequence { return &sequence{next: 1, changed: make(chan struct{})} }

func (q *sequence) add(p []byte) {
	n := binary.BigEndian.Uint64(p)
	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case n < q.next:
		q.duplicates++
	case n > q.next:
		q.gaps++
		q.next = n + 1
	default:
		q.next++
	}
	close(q.changed)
	q.changed = make(chan struct{})
}

// wait returns once message n has arrived, or fails the test.
func (q *sequence) wait(t *testing.T, ctx context.Context, n uint64, what string) {
	t.Helper()
	for {
		q.mu.Lock()
		got, changed := q.next-1, q.changed
		q.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatalf("%s: %d of %d messages arrived", what, got, n)
		}
	}
}

func (q *sequence) check(t *testing.T, what string) {
	t.Helper()
	q.mu.Lock()
	defer q.mu.Unlock()
	require.Zero(t, q.duplicates, "%s: duplicates", what)
	require.Zero(t, q.gaps, "%s: messages lost or out of order", what)
}

func numbered(n uint64, size int) []byte {
	p := make([]byte, max(size, 8))
	binary.BigEndian.PutUint64(p, n)
	return p
}

// sessionRig is a server with sessions behind a fault proxy and a client
// that resumes, each counting the numbered messages of the other.
type sessionRig struct {
	srv      *Server
	proxy    *vgotest.Proxy
	client   *Client
	toServer *sequence // what the server's handler saw
	toClient *sequence // what the client's OnMessage saw
	opened   chan *Conn
	resumed  chan *Conn
	closed   chan error
}

func newSessionRig(t *testing.T, serverOpts []ServerOption, clientOpts ...ClientOption) *sessionRig {
	t.Helper()
	r := &sessionRig{
		toServer: newSequence(),
		toClient: newSequence(),
		opened:   make(chan *Conn, 16),
		resumed:  make(chan *Conn, 10000),
		closed:   make(chan error, 16),
	}
	var addr string
	r.srv, addr = startServer(t, append([]ServerOption{
		WithSessions(Sessions{}),
		WithHeartbeatTimeout(5 * faultTimeout),
		WithHandler(func(_ *Conn, p []byte) { r.toServer.add(p) }),
		WithOnConnOpen(func(c *Conn) { r.opened <- c }),
		WithOnConnResume(func(c *Conn) { r.resumed <- c }),
		WithOnConnClose(func(_ *Conn, err error) { r.closed <- err }),
	}, serverOpts...)...)
	r.proxy = newProxy(t, addr)
	r.client = newTestClient(t, r.proxy.Addr(), append([]ClientOption{
		WithResume(0),
		WithPingInterval(faultInterval),
		WithPongTimeout(faultTimeout),
		WithOnMessage(r.toClient.add),
	}, clientOpts...)...)
	return r
}

var sessionCuts = flag.Int("session-cuts", 5, "how many times TestSessionStreamsSurviveFaults breaks the link, each fault kind in turn")

// TestSessionStreamsSurviveFaults streams numbered messages both ways at
// full speed while the link is broken again and again by every kind of
// fault, and checks that each side saw every message once, in order, and
// that neither goroutines nor the heap grew with the faults.
func TestSessionStreamsSurviveFaults(t *testing.T) {
	connects := make(chan struct{}, 1)
	r := newSessionRig(t, nil, WithOnConnect(func(net.Addr) {
		select {
		case connects <- struct{}{}:
		default:
		}
	}))
	ctx := context.Background() // each wait below has its own bound
	require.NoError(t, r.client.WaitConnected(testContext(t)))
	conn := recv(t, r.opened)
	recv(t, connects)
	// A pong has come back: the client's reader and pinger run.
	require.Eventually(t, func() bool { return r.client.RTT() > 0 }, waitFor, time.Millisecond)
	baseline := runtime.NumGoroutine()

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sentUp, sentDown uint64
	stream := func(send func(context.Context, []byte) error, sent *uint64) {
		for i := uint64(1); ; i++ {
			select {
			case <-stop:
				*sent = i - 1
				return
			default:
			}
			if err := send(ctx, numbered(i, 64)); err != nil {
				t.Errorf("send %d: %v", i, err)
				*sent = i - 1
				return
			}
		}
	}
	wg.Go(func() { stream(r.client.Send, &sentUp) })
	wg.Go(func() { stream(conn.Send, &sentDown) })

	faults := []func(l *vgotest.Link){
		(*vgotest.Link).Cut,
		(*vgotest.Link).DropServer,
		func(l *vgotest.Link) { l.ResetAfter(vgotest.ClientToServer, 1000) },
		func(l *vgotest.Link) { l.ResetAfter(vgotest.ServerToClient, 777) },
		(*vgotest.Link).Freeze,
	}
	cuts := *sessionCuts
	var heap, peak uint64
	for i := range cuts {
		require.NoError(t, r.proxy.WaitLinks(testContext(t), 1))
		l := r.proxy.Links()[0]
		faults[i%len(faults)](l)
		recv(t, connects)
		l.Cut() // a frozen or half-open link lingers until cut
		if i%10 == 0 {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			heap, peak = ms.HeapInuse, max(peak, ms.HeapInuse)
		}
	}
	close(stop)
	wg.Wait()
	r.toServer.wait(t, testContext(t), sentUp, "client to server")
	r.toClient.wait(t, testContext(t), sentDown, "server to client")
	r.toServer.check(t, "client to server")
	r.toClient.check(t, "server to client")
	require.Empty(t, r.closed, "the session ended")
	st := r.client.Stats()
	require.Zero(t, st.SessionsLost)
	require.Equal(t, uint64(cuts), st.Resumes)
	// The server may also have resumed the session on connections that
	// failed before the client read its hello.
	require.GreaterOrEqual(t, len(r.resumed), cuts)
	for len(r.resumed) > 0 {
		require.Same(t, conn, <-r.resumed, "the session's Conn is the one that opened")
	}
	if n := settleGoroutines(baseline); n > baseline {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d goroutines, %d before the faults:\n%s", n, baseline, buf[:runtime.Stack(buf, true)])
	}
	// Both logs, the proxy's buffers and the sockets' hold a few MiB;
	// the race detector multiplies it.
	require.Less(t, peak, uint64(128<<20), "heap in use")
	t.Logf("%d messages up, %d down, %d resumes; heap in use %d MiB at the last sample, %d MiB at most",
		sentUp, sentDown, st.Resumes, heap>>20, peak>>20)
}

// rawSession opens a raw connection that asks for a session, resuming id
// (zero for a new one) after receiving received messages, with the given
// credentials, and returns it and the server's hello.
func rawSession(t *testing.T, addr string, id sessionID, received uint64, creds []byte) (*rawConn, hello) {
	t.Helper()
	r := dialRaw(t, addr)
	mine := hello{version: ProtocolVersion, credentials: creds, resume: true, sessionID: id, received: received}
	r.write(appendFrame(nil, frameHello, mine.marshal()))
	ft, p := r.next()
	require.Equal(t, frameHello, ft, "server's first frame")
	h, err := parseHello(p, true)
	require.NoError(t, err)
	require.True(t, h.session, "the server grants a session")
	require.NotZero(t, h.sessionID)
	return r, h
}

// byName is an authenticator whose identity is the credentials up to a
// colon: "alice:token1" and "alice:token2" are the same client.
func byName(_ *Conn, creds []byte) (any, error) {
	name, _, _ := bytes.Cut(creds, []byte(":"))
	return string(name), nil
}

func TestSessionResumeNeedsTheIdAndTheIdentity(t *testing.T) {
	opened := make(chan *Conn, 4)
	resumed := make(chan *Conn, 4)
	_, addr := startServer(t, WithSessions(Sessions{}), WithAuthenticator(byName),
		WithHandler(func(c *Conn, p []byte) {}),
		WithOnConnOpen(func(c *Conn) { opened <- c }),
		WithOnConnResume(func(c *Conn) { resumed <- c }))

	alice, h := rawSession(t, addr, sessionID{}, 0, []byte("alice:1"))
	aliceConn := recv(t, opened)
	require.Zero(t, h.received)
	alice.send(frameData, numbered(1, 8))
	alice.send(framePing, nil) // the server acknowledges before its pong
	ft, p := alice.next()
	require.Equal(t, frameAck, ft)
	require.Equal(t, []byte{0, 0, 0, 0, 0, 0, 0, 1}, p)
	require.NoError(t, alice.nc.Close())

	t.Run("an unknown id gets a new session", func(t *testing.T) {
		_, got := rawSession(t, addr, newSessionID(), 0, []byte("alice:1"))
		require.NotEqual(t, h.sessionID, got.sessionID)
		require.NotSame(t, aliceConn, recv(t, opened))
	})
	t.Run("another identity gets a new session", func(t *testing.T) {
		_, got := rawSession(t, addr, h.sessionID, 0, []byte("mallory:1"))
		require.NotEqual(t, h.sessionID, got.sessionID)
		recv(t, opened)
	})
	t.Run("new credentials of the same identity resume", func(t *testing.T) {
		r, got := rawSession(t, addr, h.sessionID, 0, []byte("alice:2"))
		require.Equal(t, h.sessionID, got.sessionID)
		require.EqualValues(t, 1, got.received, "the server says what it has")
		require.Same(t, aliceConn, recv(t, resumed))
		require.Equal(t, r.local(), aliceConn.RemoteAddr().String())
	})
}

func TestSessionResumeCountsAreChecked(t *testing.T) {
	opened := make(chan *Conn, 1)
	srv, addr := startServer(t, WithSessions(Sessions{}), WithOnConnOpen(func(c *Conn) { opened <- c }))
	r, h := rawSession(t, addr, sessionID{}, 0, nil)
	conn := recv(t, opened)
	require.NoError(t, conn.Send(testContext(t), []byte("one")))
	ft, p := r.next()
	require.Equal(t, frameData, ft)
	require.Equal(t, "one", string(p))
	require.NoError(t, r.nc.Close())
	require.Eventually(t, func() bool { return srv.Stats().Suspended == 1 }, waitFor, time.Millisecond)

	// The server sent one message: a client cannot have received two.
	bad := dialRaw(t, addr)
	bad.write(appendFrame(nil, frameHello, hello{version: ProtocolVersion, resume: true, sessionID: h.sessionID, received: 2}.marshal()))
	bad.expectClose(CloseProtocolError)
	require.Equal(t, 1, srv.Stats().Suspended, "a bad resume leaves the session suspended")

	// Having received it, the client is sent nothing again.
	good, got := rawSession(t, addr, h.sessionID, 1, nil)
	require.Equal(t, h.sessionID, got.sessionID)
	require.NoError(t, conn.Send(testContext(t), []byte("two")))
	ft, p = good.next()
	require.Equal(t, frameData, ft)
	require.Equal(t, "two", string(p))

	t.Run("acks", func(t *testing.T) {
		good.send(frameAck, []byte{0, 0, 0, 0, 0, 0, 0, 3})
		good.expectClose(CloseProtocolError) // for a message not sent
	})
}

func TestSessionAckWithoutSessionIsAProtocolError(t *testing.T) {
	_, addr := startServer(t, WithSessions(Sessions{}))
	r := dialHello(t, addr)
	r.send(frameAck, make([]byte, 8))
	r.expectClose(CloseProtocolError)
}

func TestSessionExpires(t *testing.T) {
	t.Parallel() // it waits on timers: a heartbeat timeout, then the window
	var lost [][]byte
	lostCh := make(chan struct{}, 1)
	down := make(chan error, 16)
	r := newSessionRig(t, []ServerOption{WithSessions(Sessions{Window: time.Second})},
		WithOnSessionLost(func(unacked [][]byte) { lost = unacked; lostCh <- struct{}{} }),
		// The client notices nothing until the link is cut below.
		WithPongTimeout(time.Minute),
		WithOnDisconnect(func(err error) { down <- err }))
	ctx := testContext(t)
	require.NoError(t, r.client.WaitConnected(ctx))
	conn := recv(t, r.opened)

	// Frozen, the link takes messages and delivers none: they are
	// written and never acknowledged.
	r.proxy.Refuse()
	l := r.proxy.Links()[0]
	l.Freeze()
	for i := uint64(1); i <= 3; i++ {
		require.NoError(t, r.client.Send(ctx, numbered(i, 8)))
	}
	require.NoError(t, conn.Send(ctx, []byte("while away")))
	connCtx := conn.Context()
	require.Eventually(t, func() bool { return r.srv.Stats().Suspended == 1 }, waitFor, time.Millisecond)
	require.NoError(t, connCtx.Err(), "the Conn's context lives as long as its session")
	require.ErrorIs(t, recv(t, r.closed), ErrSessionExpired)
	require.ErrorIs(t, context.Cause(connCtx), ErrSessionExpired)
	require.ErrorIs(t, conn.Send(ctx, []byte("after")), ErrClosed)
	require.EqualValues(t, 1, r.srv.Stats().Expired)
	require.Zero(t, r.srv.Stats().Suspended)

	l.Cut()
	recv(t, down)
	require.NoError(t, r.client.Send(ctx, numbered(4, 8))) // never written: kept
	r.proxy.Admit()
	recv(t, lostCh)
	require.Len(t, lost, 3, "the messages written and never acknowledged are handed back")
	for i, p := range lost {
		require.EqualValues(t, i+1, binary.BigEndian.Uint64(p))
	}
	recv(t, r.opened) // a new session
	r.toServer.wait(t, ctx, 4, "the message sent while away")
	require.EqualValues(t, 1, r.client.Stats().SessionsLost)
}

func TestSessionServerRestarted(t *testing.T) {
	lostCh := make(chan [][]byte, 1)
	r := newSessionRig(t, nil, WithOnSessionLost(func(unacked [][]byte) { lostCh <- unacked }))
	ctx := testContext(t)
	require.NoError(t, r.client.WaitConnected(ctx))
	recv(t, r.opened)
	require.NoError(t, r.client.Send(ctx, numbered(1, 8)))
	r.toServer.wait(t, ctx, 1, "before the restart")

	// A new server, which knows nothing of the session, takes the old
	// one's place; the old one vanishes without a word.
	opened := make(chan *Conn, 1)
	_, addr := startServer(t, WithSessions(Sessions{}), WithOnConnOpen(func(c *Conn) { opened <- c }))
	r.proxy.SetTarget(addr)
	r.proxy.Cut()
	recv(t, opened)
	lost := recv(t, lostCh)
	require.LessOrEqual(t, len(lost), 1, "at most the one message, if its ack had not come")
	require.EqualValues(t, 1, r.client.Stats().SessionsLost)
}

func TestSessionBufferFull(t *testing.T) {
	r := newSessionRig(t, []ServerOption{WithSessions(Sessions{BufferBytes: 1000})}, WithResume(1000))
	ctx := testContext(t)
	require.NoError(t, r.client.WaitConnected(ctx))
	conn := recv(t, r.opened)
	r.proxy.Links()[0].Freeze() // no acks come back

	fill := func(send func([]byte) error) {
		for i := uint64(1); ; i++ {
			if err := send(numbered(i, 100)); err != nil {
				require.ErrorIs(t, err, ErrQueueFull)
				require.Greater(t, i, uint64(8), "the log holds about 1000 bytes")
				return
			}
		}
	}
	fill(r.client.TrySend)
	fill(conn.TrySend)
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, r.client.Send(short, numbered(99, 100)), context.DeadlineExceeded, "Send waits for acks")
	require.ErrorIs(t, conn.Send(short, numbered(99, 100)), context.DeadlineExceeded, "Conn.Send waits for acks")

	_, err := NewClient("127.0.0.1:1", WithResume(0), WithSendBuffer(10, 1000, BufferBlock))
	require.ErrorIs(t, err, ErrInvalidOption, "the session's log is the send buffer")
}

func TestSessionClientCloseEndsIt(t *testing.T) {
	r := newSessionRig(t, nil)
	ctx := testContext(t)
	require.NoError(t, r.client.WaitConnected(ctx))
	recv(t, r.opened)
	require.NoError(t, r.client.Close())
	var ce *CloseError
	require.ErrorAs(t, recv(t, r.closed), &ce, "the client's close frame ends the session")
	require.Zero(t, r.srv.Stats().Suspended)
	require.Zero(t, r.srv.Len())
}

func TestSessionShutdownEndsIt(t *testing.T) {
	r := newSessionRig(t, nil)
	ctx := testContext(t)
	require.NoError(t, r.client.WaitConnected(ctx))
	recv(t, r.opened)

	// A second client, gone, has a suspended session.
	away, _ := rawSession(t, r.srv.Addr().String(), sessionID{}, 0, nil)
	recv(t, r.opened)
	require.NoError(t, away.nc.Close())
	require.Eventually(t, func() bool { return r.srv.Stats().Suspended == 1 }, waitFor, time.Millisecond)

	// The client's next hello goes to a listener that reads it.
	next := listen(t)
	r.proxy.SetTarget(next.Addr().String())
	require.NoError(t, r.srv.Shutdown(ctx))
	require.ErrorIs(t, recv(t, r.closed), ErrServerClosed)
	require.ErrorIs(t, recv(t, r.closed), ErrServerClosed)
	nc, err := next.Accept()
	require.NoError(t, err)
	defer nc.Close()
	ft, p, err := newFrameReader(nc, DefaultMaxFrameSize).next()
	require.NoError(t, err)
	require.Equal(t, frameHello, ft)
	h, err := parseHello(p, false)
	require.NoError(t, err)
	require.True(t, h.resume)
	require.Zero(t, h.sessionID, "the goodbye said the session ended: the client asks for a new one")
}

func TestSessionPeersWithoutSessions(t *testing.T) {
	t.Run("a resuming client and a plain server", func(t *testing.T) {
		got := newSequence()
		_, addr := startServer(t, WithHandler(func(_ *Conn, p []byte) { got.add(p) }))
		c := newTestClient(t, addr, WithResume(1000))
		ctx := testContext(t)
		require.NoError(t, c.WaitConnected(ctx))
		// Far more than the log holds: nothing waits for acks.
		for i := uint64(1); i <= 1000; i++ {
			require.NoError(t, c.Send(ctx, numbered(i, 100)))
		}
		got.wait(t, ctx, 1000, "to the plain server")
		got.check(t, "to the plain server")
	})
	t.Run("a plain client and a server with sessions", func(t *testing.T) {
		closed := make(chan error, 1)
		_, addr := startServer(t, WithSessions(Sessions{}), WithOnConnClose(func(_ *Conn, err error) { closed <- err }))
		r := dialHello(t, addr)
		require.NoError(t, r.nc.Close())
		require.ErrorIs(t, recv(t, closed), errPeerClosed, "without a session, the connection's end is the Conn's")
	})
}

func TestSessionSuspendedBounds(t *testing.T) {
	closed := make(chan error, 4)
	srv, addr := startServer(t, WithSessions(Sessions{MaxSuspended: 1}),
		WithOnConnClose(func(_ *Conn, err error) { closed <- err }))
	before := runtime.NumGoroutine()
	first, _ := rawSession(t, addr, sessionID{}, 0, nil)
	second, _ := rawSession(t, addr, sessionID{}, 0, nil)
	require.NoError(t, first.nc.Close())
	require.Eventually(t, func() bool { return srv.Stats().Suspended == 1 }, waitFor, time.Millisecond)
	require.NoError(t, second.nc.Close())
	require.ErrorIs(t, recv(t, closed), ErrSessionEvicted, "the oldest suspended session makes room")
	require.Equal(t, 1, srv.Stats().Suspended)
	require.LessOrEqual(t, settleGoroutines(before), before, "a suspended session has no goroutine")
}

// FuzzSessionLog drives a session's log with sends, acks and resumes
// read from the input, and checks it against a plain model: the log holds
// exactly the messages sent and not acknowledged, in order, and a resume
// is refused for exactly the counts outside them.
func FuzzSessionLog(f *testing.F) {
	f.Add([]byte{0, 10, 0, 20, 1, 1, 2, 1, 0, 200, 1, 3})
	f.Add([]byte{0, 255, 0, 255, 0, 255, 0, 255, 0, 255, 1, 4, 2, 9})
	f.Fuzz(func(t *testing.T, ops []byte) {
		const bound = 1000
		s := newSession(sessionID{1}, bound, 1<<20)
		var (
			model [][]byte // unacknowledged, oldest first
			first uint64   = 1
		)
		for len(ops) >= 2 {
			op, arg := ops[0]%3, ops[1]
			ops = ops[2:]
			switch op {
			case 0: // send a message of arg bytes
				p := bytes.Repeat([]byte{arg}, int(arg))
				s.mu.Lock()
				full := s.buffered() > 0 && s.buffered()+recordHeader+len(p) > bound
				s.mu.Unlock()
				err := s.send(context.Background(), p, false)
				if full {
					require.ErrorIs(t, err, ErrQueueFull)
					continue
				}
				require.NoError(t, err)
				model = append(model, p)
			case 1: // the peer acknowledges up to arg more than the oldest
				n := first - 1 + uint64(arg)
				err := s.peerAcked(n)
				if n >= first+uint64(len(model)) {
					require.ErrorIs(t, err, ErrProtocol)
					continue
				}
				require.NoError(t, err)
				model = model[n+1-first:]
				first = n + 1
			case 2: // a resume after arg messages
				n := uint64(arg)
				err := s.check(n)
				if n+1 < first || n >= first+uint64(len(model)) {
					require.ErrorIs(t, err, ErrProtocol)
					continue
				}
				require.NoError(t, err)
				s.mu.Lock()
				s.dropLocked(n)
				s.mu.Unlock()
				model = model[n+1-first:]
				first = n + 1
			}
			var got [][]byte
			s.mu.Lock()
			s.each(func(seq uint64, p []byte) {
				require.Equal(t, first+uint64(len(got)), seq)
				got = append(got, append([]byte(nil), p...))
			})
			s.mu.Unlock()
			require.Equal(t, len(model), len(got))
			for i := range model {
				require.True(t, bytes.Equal(model[i], got[i]), "message %d", first+uint64(i))
			}
		}
	})
}

// TestSessionHandlerAnswersOnItsOwnSession has a handler echo with Send,
// without a deadline, to a client that stops reading for a while. The
// handler's reader cannot read acknowledgements while the handler waits,
// so Send must not wait for them: the echo server keeps going, and every
// echo arrives once, in order.
func TestSessionHandlerAnswersOnItsOwnSession(t *testing.T) {
	var handled atomic.Int64
	_, addr := startServer(t, WithSessions(Sessions{BufferBytes: 4 << 10}),
		WithHandler(func(c *Conn, p []byte) {
			handled.Add(1)
			if err := c.Send(context.Background(), p); err != nil {
				t.Errorf("echo: %v", err)
			}
		}))
	gate := make(chan struct{})
	echoes := newSequence()
	c := newTestClient(t, addr, WithResume(0), WithOnMessage(func(p []byte) {
		<-gate
		echoes.add(p)
	}))
	ctx := testContext(t)
	require.NoError(t, c.WaitConnected(ctx))
	const n = 3000
	for i := uint64(1); i <= n; i++ {
		require.NoError(t, c.Send(ctx, numbered(i, 8)))
	}
	// Far past the server's log bound of about 340 such messages.
	require.Eventually(t, func() bool { return handled.Load() >= 1000 }, waitFor, time.Millisecond)
	close(gate)
	echoes.wait(t, ctx, n, "echoes")
	echoes.check(t, "echoes")
}

func TestSessionCloseWhileItsConnectionIsGoing(t *testing.T) {
	// Conn.Close while a resume has taken the session's connection down,
	// before that connection's handler has returned, still ends the
	// session; the resuming client gets a new one.
	inHandler := make(chan *Conn, 1)
	release := make(chan struct{})
	closed := make(chan error, 4)
	_, addr := startServer(t, WithSessions(Sessions{}),
		WithOnConnClose(func(_ *Conn, err error) { closed <- err }),
		WithHandler(func(c *Conn, p []byte) {
			if string(p) == "hold the reader" {
				inHandler <- c
				<-release
			}
		}))
	r, h := rawSession(t, addr, sessionID{}, 0, nil)
	r.send(frameData, []byte("hold the reader"))
	conn := recv(t, inHandler)
	again := dialRaw(t, addr) // its resume waits for the handler
	again.write(appendFrame(nil, frameHello, hello{version: ProtocolVersion, resume: true, sessionID: h.sessionID}.marshal()))
	require.Eventually(t, func() bool { return conn.link().cause() != nil }, waitFor, time.Millisecond,
		"the resume takes the old connection down")
	require.NoError(t, conn.Close())
	close(release)
	require.ErrorIs(t, recv(t, closed), ErrClosed)
	require.ErrorIs(t, conn.Send(testContext(t), []byte("late")), ErrClosed)
	ft, p := again.next()
	require.Equal(t, frameHello, ft)
	got, err := parseHello(p, true)
	require.NoError(t, err)
	require.NotEqual(t, h.sessionID, got.sessionID, "a closed session is not resumed")
}

func TestSessionResumeThatTimesOutLeavesOneSession(t *testing.T) {
	// A resume that gives up waiting for the old connection's handler
	// leaves the session to that connection, which suspends it once.
	inHandler := make(chan struct{}, 1)
	release := make(chan struct{})
	srv, addr := startServer(t, WithSessions(Sessions{}), WithHandshakeTimeout(100*time.Millisecond),
		WithHandler(func(c *Conn, p []byte) {
			inHandler <- struct{}{}
			<-release
		}))
	r, h := rawSession(t, addr, sessionID{}, 0, nil)
	r.send(frameData, []byte("hold the reader"))
	recv(t, inHandler)
	again := dialRaw(t, addr)
	again.write(appendFrame(nil, frameHello, hello{version: ProtocolVersion, resume: true, sessionID: h.sessionID}.marshal()))
	_, _, err := again.read()
	require.Error(t, err, "the resume gives up at the handshake timeout")
	require.Zero(t, srv.Stats().Suspended, "the session is still the old connection's")
	close(release)
	require.Eventually(t, func() bool { return srv.Stats().Suspended == 1 }, waitFor, time.Millisecond)
	require.Equal(t, 1, srv.Len())
	n := 0
	srv.Range(func(*Conn) bool { n++; return true })
	require.Equal(t, 1, n)
}

func TestSessionSendsFromCallbacks(t *testing.T) {
	// Sends from the callbacks that run where the reader would, before it
	// starts, do not wait for acknowledgements that nothing reads: past
	// the log's bound they wait for the writer instead.
	const many = 100
	big := make([]byte, 1024)
	got := make(chan struct{}, 2*many)
	_, addr := startServer(t, WithSessions(Sessions{BufferBytes: 4 << 10}),
		WithHandler(func(*Conn, []byte) { got <- struct{}{} }),
		WithOnConnOpen(func(c *Conn) {
			for range many {
				if err := c.Send(context.Background(), big); err != nil {
					t.Errorf("send from OnConnOpen: %v", err)
					return
				}
			}
		}))
	client := make(chan *Client, 1)
	c := newTestClient(t, addr, WithResume(4<<10),
		WithOnMessage(func([]byte) { got <- struct{}{} }),
		WithOnConnect(func(net.Addr) {
			c := <-client
			for range many {
				if err := c.Send(context.Background(), big); err != nil {
					t.Errorf("send from OnConnect: %v", err)
					return
				}
			}
		}))
	client <- c
	for range 2 * many {
		recv(t, got)
	}
}

func TestSessionLogBoundWhileHandlerHoldsALostConnection(t *testing.T) {
	// OnMessage, on the reader, sends without waiting for the acks that
	// reader cannot read; when the connection is gone under it, the log
	// still stops at overrun times its bound.
	conns := make(chan *Conn, 1)
	_, addr := startServer(t, WithSessions(Sessions{}), WithOnConnOpen(func(c *Conn) { conns <- c }))
	const bound = 16 << 10
	in := make(chan struct{}, 1)
	down := make(chan struct{})
	filled := make(chan error, 1)
	var c *Client
	client := make(chan *Client, 1)
	c = newTestClient(t, addr, WithResume(bound), WithOnMessage(func([]byte) {
		c := <-client
		in <- struct{}{}
		<-down
		for {
			if err := c.TrySend(make([]byte, 1024)); err != nil {
				filled <- err
				return
			}
		}
	}))
	client <- c
	require.NoError(t, c.WaitConnected(testContext(t)))
	require.NoError(t, recv(t, conns).Send(testContext(t), []byte("hold the reader")))
	recv(t, in)
	// The reader reads no pong: the pong timeout takes the link down.
	require.Eventually(t, func() bool {
		c.sess.mu.Lock()
		defer c.sess.mu.Unlock()
		return c.sess.link != nil && c.sess.link.isDown()
	}, waitFor, time.Millisecond)
	close(down)
	require.ErrorIs(t, recv(t, filled), ErrQueueFull)
	n := c.sess.size()
	require.Greater(t, n, bound, "OnMessage does not wait at the bound")
	require.LessOrEqual(t, n, overrun*bound)
}

func TestSessionMessageLongerThanTheLog(t *testing.T) {
	// A message longer than the whole log goes, alone, and costs no
	// reconnect.
	got := make(chan int, 1)
	_, addr := startServer(t, WithSessions(Sessions{}), WithHandler(func(_ *Conn, p []byte) { got <- len(p) }))
	c := newTestClient(t, addr, WithResume(1024))
	require.NoError(t, c.WaitConnected(testContext(t)))
	require.NoError(t, c.Send(testContext(t), make([]byte, 5000)))
	require.Equal(t, 5000, recv(t, got))
	require.NoError(t, c.Send(testContext(t), make([]byte, 10)))
	require.Equal(t, 10, recv(t, got))
	require.Zero(t, c.Stats().Reconnects)
}

func TestSessionQuietTailIsAcknowledged(t *testing.T) {
	// The last messages of a burst are acknowledged soon after it ends,
	// not with the next ping, here a minute away: a sender whose log is
	// full does not wait for the heartbeat.
	_, addr := startServer(t, WithSessions(Sessions{}), WithHeartbeatTimeout(-1))
	c := newTestClient(t, addr, WithResume(16<<10), WithPingInterval(time.Minute))
	ctx := testContext(t)
	require.NoError(t, c.WaitConnected(ctx))
	for range 100 {
		require.NoError(t, c.Send(ctx, make([]byte, 1024)), "waiting for acks")
	}
	require.Eventually(t, func() bool { return c.sess.size() == 0 }, waitFor, time.Millisecond, "the tail is acknowledged")
}

func TestSessionMessageTooLongForTheServerWhileAway(t *testing.T) {
	// A message longer than the server accepts is refused while
	// disconnected too, as the last connection said.
	r := newSessionRig(t, []ServerOption{WithMaxFrameSize(1000)})
	ctx := testContext(t)
	require.NoError(t, r.client.WaitConnected(ctx))
	require.ErrorIs(t, r.client.Send(ctx, make([]byte, 1001)), ErrFrameTooLarge)
	r.proxy.Refuse()
	r.proxy.Cut()
	require.Eventually(t, func() bool { return r.client.State() != StateConnected }, waitFor, time.Millisecond)
	require.ErrorIs(t, r.client.Send(ctx, make([]byte, 1001)), ErrFrameTooLarge)
	require.NoError(t, r.client.Send(ctx, numbered(1, 1000)))
	r.proxy.Admit()
	r.toServer.wait(t, ctx, 1, "the message that fits")
}

func TestSessionAuthenticatorsConnAfterResume(t *testing.T) {
	// The Conn the authenticator saw for a connection that resumed a
	// session sends nothing outside the session: it is closed, and the
	// session's Conn carries on.
	type user struct {
		Name  string
		Roles []string // not comparable: identities are compared deeply
	}
	seen := make(chan *Conn, 4)
	resumed := make(chan *Conn, 1)
	_, addr := startServer(t, WithSessions(Sessions{}),
		WithAuthenticator(func(c *Conn, _ []byte) (any, error) {
			seen <- c
			return user{"alice", []string{"admin"}}, nil
		}),
		WithOnConnResume(func(c *Conn) { resumed <- c }))
	r, h := rawSession(t, addr, sessionID{}, 0, nil)
	first := recv(t, seen)
	require.NoError(t, r.nc.Close())
	_, got := rawSession(t, addr, h.sessionID, 0, nil)
	require.Equal(t, h.sessionID, got.sessionID, "the same identity resumes")
	require.Same(t, first, recv(t, resumed))
	second := recv(t, seen)
	require.ErrorIs(t, second.Send(testContext(t), []byte("outside")), ErrClosed)
	require.ErrorIs(t, second.TrySend([]byte("outside")), ErrClosed)
	require.ErrorIs(t, context.Cause(second.Context()), errResumed)
}
