package vgo

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The tests in this file run inside testing/synctest bubbles over net.Pipe
// connections. Time in a bubble is fake and moves only when every goroutine
// in it is blocked, so each timeout fires at an exact instant however loaded
// the machine is, and the tests assert those instants. Everything a test
// uses, listener, logger and peers included, is created inside its bubble,
// and everything it starts is stopped before the bubble ends.
//
// Raw peers encode and decode frames here from PROTOCOL.md rather than with
// the package's codec, so that the tests hold the library to the documented
// format and depend on nothing but its public API.

// Frame types on the wire, from PROTOCOL.md.
const (
	wireHello byte = 0x01
	wireData  byte = 0x02
	wirePing  byte = 0x03
	wirePong  byte = 0x04
)

// wireFrame encodes one frame: a type byte, a big-endian uint32 length, the
// payload.
func wireFrame(typ byte, payload []byte) []byte {
	b := append([]byte{typ}, binary.BigEndian.AppendUint32(nil, uint32(len(payload)))...)
	return append(b, payload...)
}

// readWireFrame reads one frame from r.
func readWireFrame(r io.Reader) (byte, []byte, error) {
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return 0, nil, err
	}
	p := make([]byte, binary.BigEndian.Uint32(hdr[1:]))
	if _, err := io.ReadFull(r, p); err != nil {
		return 0, nil, err
	}
	return hdr[0], p, nil
}

// errPipeRefused is what dialing a closed pipeListener returns.
var errPipeRefused = errors.New("pipe listener: connection refused")

// pipeListener is an in-memory net.Listener: dial creates a net.Pipe, hands
// its server end to Accept and returns its client end. It must be created
// inside the bubble that uses it, like the pipes it makes.
type pipeListener struct {
	conns     chan net.Conn
	closed    chan struct{}
	closeOnce sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), closed: make(chan struct{})}
}

// Accept waits for the next dial, and returns net.ErrClosed once the
// listener is closed.
func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case nc := <-l.conns:
		return nc, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

// Close unblocks Accept and refuses later dials. It may be called more
// than once.
func (l *pipeListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

// dial has the signature WithDialFunc wants. It returns once Accept has
// taken the server end, or fails when the listener is closed or ctx ends.
func (l *pipeListener) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	var err error
	select {
	case l.conns <- server:
		return client, nil
	case <-l.closed:
		err = errPipeRefused
	case <-ctx.Done():
		err = ctx.Err()
	}
	client.Close()
	server.Close()
	return nil, err
}

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// pipeServerAddr is the address the clients in these tests are given; their
// dial function ignores it.
const pipeServerAddr = "pipe.test:1"

// stamped is a value with the fake time at which it was observed.
type stamped[T any] struct {
	at time.Time
	v  T
}

func stamp[T any](v T) stamped[T] { return stamped[T]{time.Now(), v} }

// awaitFake returns the next value on ch. It fails the test if none comes
// within an hour of fake time, which costs nothing in a bubble and turns a
// missing event into a failure instead of a hang.
func awaitFake[T any](t *testing.T, ch <-chan T) T {
	t.Helper()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	select {
	case v := <-ch:
		return v
	case <-timer.C:
		t.Fatal("no event within an hour of fake time")
		panic("unreachable")
	}
}

// servePipe runs a server with opts on a new pipeListener. At cleanup it
// closes the server and checks that Serve returned ErrServerClosed.
func servePipe(t *testing.T, opts ...ServerOption) (*Server, *pipeListener) {
	t.Helper()
	s, err := NewServer(append([]ServerOption{WithLogger(quietLogger())}, opts...)...)
	require.NoError(t, err)
	l := newPipeListener()
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		require.NoError(t, s.Close())
		require.ErrorIs(t, <-served, ErrServerClosed)
	})
	return s, l
}

// servePipeRaw runs handle in a goroutine of its own on the server end of
// each connection dialed through a new pipeListener, and closes that end
// when handle returns. At cleanup it closes the listener and waits for the
// handlers, which must return once their peer has closed.
func servePipeRaw(t *testing.T, handle func(nc net.Conn)) *pipeListener {
	t.Helper()
	l := newPipeListener()
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer nc.Close()
				handle(nc)
			})
		}
	})
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
	})
	return l
}

// answerHello reads a client's hello from nc and answers it as a server
// with no ping range would.
func answerHello(nc net.Conn) error {
	typ, _, err := readWireFrame(nc)
	if err != nil {
		return err
	}
	if typ != wireHello {
		return fmt.Errorf("first frame of type %#x, want a hello", typ)
	}
	_, err = nc.Write(rawHello(ProtocolVersion))
	return err
}

// dialPipeRaw dials l as a raw client that sends nothing yet. The
// connection is closed at cleanup.
func dialPipeRaw(t *testing.T, l *pipeListener) net.Conn {
	t.Helper()
	nc, err := l.dial(t.Context(), "pipe", "")
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	return nc
}

// dialPipeHello dials l as a raw client and completes the hello exchange.
func dialPipeHello(t *testing.T, l *pipeListener) net.Conn {
	t.Helper()
	nc := dialPipeRaw(t, l)
	_, err := nc.Write(rawHello(ProtocolVersion))
	require.NoError(t, err)
	typ, _, err := readWireFrame(nc)
	require.NoError(t, err)
	require.Equal(t, wireHello, typ, "the server's first frame")
	return nc
}

// newPipeClient starts a client that dials through dial, and closes it at
// cleanup.
func newPipeClient(t *testing.T, dial func(ctx context.Context, network, addr string) (net.Conn, error), opts ...ClientOption) *Client {
	t.Helper()
	base := []ClientOption{WithLogger(quietLogger()), WithDialFunc(dial)}
	c, err := NewClient(pipeServerAddr, append(base, opts...)...)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	c.Start()
	return c
}

// reportConnCloses returns a server option that sends each closed
// connection's cause, stamped, on the returned channel.
func reportConnCloses() (ServerOption, <-chan stamped[error]) {
	ch := make(chan stamped[error], 100)
	return WithOnConnClose(func(_ *Conn, err error) { ch <- stamp(err) }), ch
}

func TestSynctestPipeListener(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := newPipeListener()
		t.Cleanup(func() { l.Close() })
		accepted := make(chan error, 2)
		go func() {
			for {
				nc, err := l.Accept()
				accepted <- err
				if err != nil {
					return
				}
				_, _ = nc.Write([]byte("hi"))
				nc.Close()
			}
		}()

		nc, err := l.dial(t.Context(), "pipe", "")
		require.NoError(t, err)
		got, err := io.ReadAll(nc)
		require.NoError(t, err)
		assert.Equal(t, "hi", string(got))
		require.NoError(t, <-accepted)
		nc.Close()

		// Accept is blocked again; Close releases it at once.
		synctest.Wait()
		start := time.Now()
		require.NoError(t, l.Close())
		assert.ErrorIs(t, <-accepted, net.ErrClosed)
		assert.Zero(t, time.Since(start))
		require.NoError(t, l.Close(), "a second Close")
		_, err = l.dial(t.Context(), "pipe", "")
		assert.ErrorIs(t, err, errPipeRefused)

		// A dial that nobody accepts ends with its context.
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		start = time.Now()
		_, err = newPipeListener().dial(ctx, "pipe", "")
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Equal(t, time.Second, time.Since(start))
	})
}

func TestSynctestClientHeartbeatTimeout(t *testing.T) {
	// A server that completes the hello, answers some pings, then goes
	// silent while still reading: only the heartbeat can tell. Its pongs
	// leave a millisecond after the ping arrives, as across a real link.
	const pongDelay = time.Millisecond
	const redial = 10 * time.Second
	for _, tc := range []struct {
		interval, timeout time.Duration
		answered          int // pings answered before the silence
	}{
		{time.Second, 3 * time.Second, 0},
		{time.Second, 3 * time.Second, 3},
		{DefaultPingInterval, DefaultPongTimeout, 0},
		{DefaultPingInterval, DefaultPongTimeout, 3},
	} {
		name := fmt.Sprintf("ping %v pong timeout %v silent after %d pongs", tc.interval, tc.timeout, tc.answered)
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				lastFrame := make(chan time.Time, 100) // when the server last wrote
				pings := make(chan time.Time, 100)     // when it read a ping
				l := servePipeRaw(t, func(nc net.Conn) {
					if answerHello(nc) != nil {
						return
					}
					lastFrame <- time.Now()
					for n := 0; ; {
						typ, p, err := readWireFrame(nc)
						if err != nil {
							return
						}
						if typ != wirePing {
							continue
						}
						pings <- time.Now()
						if n++; n <= tc.answered {
							time.Sleep(pongDelay)
							if _, err := nc.Write(wireFrame(wirePong, p)); err != nil {
								return
							}
							lastFrame <- time.Now()
						}
					}
				})
				connects := make(chan time.Time, 10)
				disconnects := make(chan stamped[error], 10)
				start := time.Now()
				newPipeClient(t, l.dial,
					WithPingInterval(tc.interval), WithPongTimeout(tc.timeout),
					WithBackoff(Backoff{BaseDelay: redial, Jitter: -1}),
					WithOnConnect(func(net.Addr) { connects <- time.Now() }),
					WithOnDisconnect(func(err error) { disconnects <- stamp(err) }))

				assert.Zero(t, awaitFake(t, connects).Sub(start), "connected at once")
				lost := awaitFake(t, disconnects)
				require.ErrorIs(t, lost.v, ErrHeartbeatTimeout)
				var ne net.Error
				require.ErrorAs(t, lost.v, &ne)
				assert.True(t, ne.Timeout())

				// The server's frames: its hello and its pongs.
				var last time.Time
				for range 1 + tc.answered {
					last = <-lastFrame
				}
				// Pings leave every interval from the connect on; the
				// first after the last pong goes unanswered.
				var firstUnanswered time.Time
				for i := range tc.answered + 1 {
					at := <-pings
					assert.Equal(t, time.Duration(i+1)*tc.interval, at.Sub(start), "ping %d", i+1)
					firstUnanswered = at
				}
				assert.LessOrEqual(t, lost.at.Sub(last), tc.interval+tc.timeout,
					"declared dead later than interval + pong timeout after the last frame")
				assert.GreaterOrEqual(t, lost.at.Sub(firstUnanswered), tc.timeout,
					"declared dead before the pong timeout after the first unanswered ping")
				assert.Equal(t, tc.timeout, lost.at.Sub(firstUnanswered), "exactly the pong timeout")
				t.Logf("dead after %v, %v after the last frame, %v after the first unanswered ping",
					lost.at.Sub(start), lost.at.Sub(last), lost.at.Sub(firstUnanswered))

				// With or without a pong to make the connection healthy,
				// this is the first wait since one was: the base delay.
				assert.Equal(t, redial, awaitFake(t, connects).Sub(lost.at), "redialed after the backoff")
			})
		})
	}
}

func TestSynctestClientStaysConnectedToHealthyServer(t *testing.T) {
	// A real server answers every ping: over a minute of pings, nothing is
	// lost on either side.
	const interval, timeout, span = time.Second, 3 * time.Second, time.Minute
	synctest.Test(t, func(t *testing.T) {
		pings := make(chan struct{}, 1000)
		closeOpt, serverLost := reportConnCloses()
		srv, l := servePipe(t, closeOpt, WithOnPing(func(*Conn) { pings <- struct{}{} }))
		pongs := make(chan struct{}, 1000)
		disconnects := make(chan error, 10)
		c := newPipeClient(t, l.dial,
			WithPingInterval(interval), WithPongTimeout(timeout),
			WithOnPong(func(time.Duration) { pongs <- struct{}{} }),
			WithOnDisconnect(func(err error) { disconnects <- err }))
		require.NoError(t, c.WaitConnected(t.Context()))

		time.Sleep(span)
		synctest.Wait()
		assert.Empty(t, disconnects)
		assert.Empty(t, serverLost)
		assert.Equal(t, StateConnected, c.State())
		assert.Equal(t, 1, srv.Len())
		assert.Len(t, pings, int(span/interval), "one ping a second")
		assert.Len(t, pongs, int(span/interval), "each answered")
	})
}

func TestSynctestServerClosesStalePeer(t *testing.T) {
	// A peer that sends its hello and then nothing is closed exactly at the
	// heartbeat timeout.
	const heartbeat = 10 * time.Second
	synctest.Test(t, func(t *testing.T) {
		closeOpt, closed := reportConnCloses()
		srv, l := servePipe(t, WithHeartbeatTimeout(heartbeat), closeOpt)
		start := time.Now()
		nc := dialPipeHello(t, l)

		_, _, err := readWireFrame(nc)
		assert.ErrorIs(t, err, io.EOF, "the server closes without a frame")
		assert.Equal(t, heartbeat, time.Since(start), "closed at the heartbeat timeout")
		lost := awaitFake(t, closed)
		require.ErrorIs(t, lost.v, ErrHeartbeatTimeout)
		assert.Equal(t, heartbeat, lost.at.Sub(start))
		synctest.Wait()
		assert.Equal(t, uint64(1), srv.Stats().StaleClosed)
		assert.Zero(t, srv.Len())
	})
}

func TestSynctestServerKeepsPingingPeer(t *testing.T) {
	// A peer that pings just inside the heartbeat timeout stays open for
	// many timeouts, and once it stops it is closed exactly one timeout
	// after its last ping.
	const heartbeat = 10 * time.Second
	const gap = heartbeat - time.Millisecond
	synctest.Test(t, func(t *testing.T) {
		closeOpt, closed := reportConnCloses()
		srv, l := servePipe(t, WithHeartbeatTimeout(heartbeat), closeOpt)
		nc := dialPipeHello(t, l)

		var last time.Time
		for i := range 10 {
			time.Sleep(gap)
			payload := []byte{byte(i)}
			_, err := nc.Write(wireFrame(wirePing, payload))
			require.NoError(t, err, "ping %d", i)
			typ, p, err := readWireFrame(nc)
			require.NoError(t, err, "pong %d", i)
			require.Equal(t, wirePong, typ)
			require.Equal(t, payload, p, "the pong echoes the ping")
			last = time.Now()
		}
		synctest.Wait()
		require.Empty(t, closed, "closed while pinging")
		assert.Equal(t, 1, srv.Len())

		_, _, err := readWireFrame(nc)
		assert.ErrorIs(t, err, io.EOF)
		assert.Equal(t, heartbeat, time.Since(last), "closed a heartbeat timeout after the last ping")
		lost := awaitFake(t, closed)
		require.ErrorIs(t, lost.v, ErrHeartbeatTimeout)
		assert.Equal(t, heartbeat, lost.at.Sub(last))
	})
}

func TestSynctestServerClosesTricklingPeer(t *testing.T) {
	// Bytes that never make up a whole frame do not keep a connection
	// alive: the peer is closed a heartbeat timeout after its hello,
	// although it sent a byte every 300ms.
	const heartbeat = time.Second
	synctest.Test(t, func(t *testing.T) {
		closeOpt, closed := reportConnCloses()
		_, l := servePipe(t, WithHeartbeatTimeout(heartbeat), closeOpt)
		start := time.Now()
		nc := dialPipeHello(t, l)

		frame := wireFrame(wireData, make([]byte, 4096))
		sent := 0
		for ; sent < len(frame); sent++ {
			time.Sleep(300 * time.Millisecond)
			if _, err := nc.Write(frame[sent : sent+1]); err != nil {
				break
			}
		}
		assert.Equal(t, 3, sent, "bytes written before the server closed")
		lost := awaitFake(t, closed)
		require.ErrorIs(t, lost.v, ErrHeartbeatTimeout)
		assert.Equal(t, heartbeat, lost.at.Sub(start))
	})
}

func TestSynctestServerHandshakeTimeout(t *testing.T) {
	// A peer that connects and does not complete its hello is closed
	// exactly at the handshake timeout, however it trickles bytes, and
	// never counts as open.
	const handshake = 2 * time.Second
	hello := rawHello(ProtocolVersion)
	for _, tc := range []struct {
		name string
		send func(nc net.Conn)
	}{
		{"silent", func(net.Conn) {}},
		{"part of a hello", func(nc net.Conn) { _, _ = nc.Write(hello[:3]) }},
		{"hello a byte every 300ms", func(nc net.Conn) {
			for i := range hello {
				time.Sleep(300 * time.Millisecond)
				if _, err := nc.Write(hello[i : i+1]); err != nil {
					return
				}
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				opened := make(chan struct{}, 1)
				srv, l := servePipe(t, WithHandshakeTimeout(handshake),
					WithOnConnOpen(func(*Conn) { opened <- struct{}{} }))
				start := time.Now()
				nc := dialPipeRaw(t, l)
				sent := make(chan struct{})
				go func() {
					defer close(sent)
					tc.send(nc)
				}()

				_, _, err := readWireFrame(nc)
				assert.ErrorIs(t, err, io.EOF, "closed without a frame")
				assert.Equal(t, handshake, time.Since(start), "closed at the handshake timeout")
				<-sent
				synctest.Wait()
				assert.Empty(t, opened)
				assert.Zero(t, srv.Len())
				assert.Equal(t, uint64(1), srv.Stats().Accepted)
			})
		})
	}
}

func TestSynctestClientHandshakeTimeout(t *testing.T) {
	// A server that reads the hello and never answers fails the attempt
	// with ErrHandshakeTimeout exactly at the handshake timeout.
	const handshake = 2 * time.Second
	synctest.Test(t, func(t *testing.T) {
		accepted := make(chan time.Time, 10)
		l := servePipeRaw(t, func(nc net.Conn) {
			accepted <- time.Now()
			_, _ = io.Copy(io.Discard, nc)
		})
		closed := make(chan stamped[error], 1)
		c := newPipeClient(t, l.dial, WithHandshakeTimeout(handshake), WithMaxAttempts(1),
			WithOnClose(func(err error) { closed <- stamp(err) }))

		gaveUp := awaitFake(t, closed)
		assert.ErrorIs(t, gaveUp.v, ErrGaveUp)
		assert.ErrorIs(t, gaveUp.v, ErrHandshakeTimeout)
		var ne net.Error
		require.ErrorAs(t, gaveUp.v, &ne)
		assert.True(t, ne.Timeout())
		assert.Equal(t, handshake, gaveUp.at.Sub(awaitFake(t, accepted)), "failed at the handshake timeout")
		assert.Empty(t, accepted, "a single attempt")
		assert.ErrorIs(t, c.Err(), ErrHandshakeTimeout)
	})
}

func TestSynctestBackoff(t *testing.T) {
	// With the jitter draw fixed at 0.75, each wait is the formula's:
	// BaseDelay * Multiplier^n * (1 + Jitter*(2*0.75-1)) below the cap,
	// never above MaxDelay, and MaxDelay * (1 - Jitter*0.75) once the
	// growth has reached it. A dial that fails, a connection dropped before
	// the hello and one dropped after it, never healthy, all count as
	// failed attempts, so the waits keep growing.
	b := Backoff{BaseDelay: time.Second, Multiplier: 2, Jitter: 0.5, MaxDelay: 10 * time.Second}
	want := []time.Duration{
		1250 * time.Millisecond, // 1s * 1.25
		2500 * time.Millisecond, // 2s * 1.25
		5 * time.Second,         // 4s * 1.25
		10 * time.Second,        // 8s * 1.25, held to the cap
		6250 * time.Millisecond, // 16s is past the cap: 10s * (1 - 0.375)
		6250 * time.Millisecond,
	}
	errDial := errors.New("dial failed")
	for _, tc := range []struct {
		name string
		// server handles a dialed connection; nil makes every dial fail.
		server func(nc net.Conn)
	}{
		{"dial fails", nil},
		{"dropped before hello", func(net.Conn) {}},
		{"dropped after hello", func(nc net.Conn) { _ = answerHello(nc) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				dials := make(chan time.Time, 100)
				dial := func(context.Context, string, string) (net.Conn, error) {
					dials <- time.Now()
					return nil, errDial
				}
				if tc.server != nil {
					l := servePipeRaw(t, tc.server)
					dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
						dials <- time.Now()
						return l.dial(ctx, network, addr)
					}
				}
				type wait struct {
					attempt int
					delay   time.Duration
				}
				waits := make(chan wait, 100)
				c := newPipeClient(t, dial, WithBackoff(b), withRand(func() float64 { return 0.75 }),
					WithOnReconnect(func(attempt int, d time.Duration) { waits <- wait{attempt, d} }))

				prev := awaitFake(t, dials)
				for i, d := range want {
					next := awaitFake(t, dials)
					assert.Equal(t, d, next.Sub(prev), "wait %d", i)
					w := awaitFake(t, waits)
					assert.Equal(t, wait{i + 2, d}, w, "reported wait %d", i)
					prev = next
				}

				// The client is now in its next wait; Close ends it at once.
				synctest.Wait()
				require.Equal(t, wait{len(want) + 2, 6250 * time.Millisecond}, awaitFake(t, waits))
				start := time.Now()
				require.NoError(t, c.Close())
				assert.Zero(t, time.Since(start), "Close waited for the backoff")
				assert.Equal(t, StateClosed, c.State())
				assert.ErrorIs(t, c.Err(), ErrClosed)
				synctest.Wait()
				assert.Empty(t, dials, "dialed after Close")
			})
		})
	}
}

func TestSynctestConnContextEndsWhenClosingBegins(t *testing.T) {
	// A peer that reads nothing keeps the close frame from leaving for the
	// whole 250ms Close gives it; the context must not wait for that.
	synctest.Test(t, func(t *testing.T) {
		opened := make(chan *Conn, 1)
		_, l := servePipe(t, WithOnConnOpen(func(c *Conn) { opened <- c }))
		dialPipeHello(t, l) // and never read again
		conn := awaitFake(t, opened)
		ctx := conn.Context()
		require.NoError(t, conn.TrySend([]byte("stuck in the pipe")))

		start := time.Now()
		closed := make(chan struct{})
		go func() {
			conn.Close()
			close(closed)
		}()
		<-ctx.Done()
		assert.Zero(t, time.Since(start), "canceled when the close began")
		assert.ErrorIs(t, context.Cause(ctx), ErrClosed)
		<-closed
		assert.Equal(t, closeFrameTimeout, time.Since(start), "Close still gave its frame the time it has")
	})
}

func TestSynctestSuspendedSessionsExpireOnTime(t *testing.T) {
	// Sessions suspended at different times each end exactly one window
	// after their connection was lost, and one that resumes just before
	// its window passes is kept.
	const window = time.Minute
	synctest.Test(t, func(t *testing.T) {
		closeOpt, closed := reportConnCloses()
		srv, l := servePipe(t, WithSessions(Sessions{Window: window}), WithHeartbeatTimeout(-1), closeOpt)
		open := func(id sessionID) (net.Conn, hello) {
			nc := dialPipeRaw(t, l)
			_, err := nc.Write(appendFrame(nil, frameHello, hello{version: ProtocolVersion, resume: true, sessionID: id}.marshal()))
			require.NoError(t, err)
			typ, p, err := readWireFrame(nc)
			require.NoError(t, err)
			require.Equal(t, wireHello, typ)
			h, err := parseHello(p, true)
			require.NoError(t, err)
			return nc, h
		}
		start := time.Now()
		first, _ := open(sessionID{})
		second, kept := open(sessionID{})
		third, _ := open(sessionID{})
		first.Close()
		synctest.Wait()
		time.Sleep(10 * time.Second)
		second.Close()
		third.Close()
		synctest.Wait()
		require.Equal(t, 3, srv.Stats().Suspended)

		time.Sleep(window - time.Second) // 1 s before the second's window ends
		_, h := open(kept.sessionID)
		require.Equal(t, kept.sessionID, h.sessionID, "resumed within its window")

		got := awaitFake(t, closed)
		require.ErrorIs(t, got.v, ErrSessionExpired)
		require.Equal(t, window, got.at.Sub(start), "the first ends one window after it was lost")
		got = awaitFake(t, closed)
		require.ErrorIs(t, got.v, ErrSessionExpired)
		require.Equal(t, window+10*time.Second, got.at.Sub(start), "the third ends one window after it was lost")
		synctest.Wait()
		require.Zero(t, srv.Stats().Suspended)
		require.EqualValues(t, 2, srv.Stats().Expired)
		require.Empty(t, closed, "the resumed session lives on")
	})
}
