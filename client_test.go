package vgo

import (
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rawServer accepts connections on a loopback port and runs handle on each
// in its own goroutine. It stops accepting, closes every connection and
// waits for the handlers when the test ends.
type rawServer struct {
	l       net.Listener
	mu      sync.Mutex
	conns   []net.Conn
	wg      sync.WaitGroup
	accepts chan time.Time
}

func newRawServer(t *testing.T, handle func(nc net.Conn)) *rawServer {
	t.Helper()
	rs := &rawServer{l: listen(t), accepts: make(chan time.Time, 1000)}
	rs.wg.Go(func() {
		for {
			nc, err := rs.l.Accept()
			if err != nil {
				return
			}
			rs.accepts <- time.Now()
			rs.mu.Lock()
			rs.conns = append(rs.conns, nc)
			rs.mu.Unlock()
			rs.wg.Go(func() { handle(nc) })
		}
	})
	t.Cleanup(func() {
		rs.l.Close()
		rs.mu.Lock()
		for _, nc := range rs.conns {
			nc.Close()
		}
		rs.mu.Unlock()
		rs.wg.Wait()
	})
	return rs
}

func (rs *rawServer) addr() string { return rs.l.Addr().String() }

// acceptHello reads the client's hello and answers it, as a server would.
func acceptHello(nc net.Conn) (*frameReader, error) {
	fr := newFrameReader(nc, DefaultMaxFrameSize)
	t, _, err := fr.next()
	if err != nil {
		return nil, err
	}
	if t != frameHello {
		return nil, fmt.Errorf("got %s frame, want hello", t)
	}
	_, err = nc.Write(rawHello(ProtocolVersion))
	return fr, err
}

// drain reads until the connection fails.
func drain(fr *frameReader) {
	for {
		if _, _, err := fr.next(); err != nil {
			return
		}
	}
}

func echoHandler(t *testing.T) ServerOption {
	return WithHandler(func(c *Conn, msg []byte) {
		assert.NoError(t, c.Send(context.Background(), msg))
	})
}

func TestClientConnectsAndExchangesMessages(t *testing.T) {
	_, addr := startServer(t, echoHandler(t))
	got := make(chan string, 1)
	pongs := make(chan time.Duration, 100)
	c := newTestClient(t, addr,
		WithOnMessage(func(msg []byte) { got <- string(msg) }),
		WithOnPong(func(rtt time.Duration) {
			select {
			case pongs <- rtt:
			default:
			}
		}))
	require.NoError(t, c.WaitConnected(testContext(t)))
	assert.Equal(t, StateConnected, c.State())

	require.NoError(t, c.Send(testContext(t), []byte("hello")))
	assert.Equal(t, "hello", recv(t, got))
	require.NoError(t, c.Send(testContext(t), nil))
	assert.Equal(t, "", recv(t, got))

	rtt := recv(t, pongs)
	assert.Positive(t, rtt)
	assert.Positive(t, c.RTT())
	assert.Nil(t, c.Err())
}

func TestClientReconnectsAfterServerRestart(t *testing.T) {
	l := listen(t)
	addr := l.Addr().String()
	s1, err := NewServer(WithLogger(quietLogger()))
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- s1.Serve(l) }()

	connects := make(chan net.Addr, 10)
	disconnects := make(chan error, 10)
	c := newTestClient(t, addr,
		WithOnConnect(func(remote net.Addr) { connects <- remote }),
		WithOnDisconnect(func(err error) { disconnects <- err }))
	assert.Equal(t, addr, recv(t, connects).String())

	require.NoError(t, s1.Close())
	require.ErrorIs(t, recv(t, served), ErrServerClosed)
	require.Error(t, recv(t, disconnects))
	require.Eventually(t, func() bool { return c.State() == StateReconnecting }, waitFor, time.Millisecond)
	assert.ErrorIs(t, c.Send(testContext(t), []byte("x")), ErrNotConnected)

	// The same address again, as a restarted server process would.
	l2, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	startServerOn(t, l2)
	assert.Equal(t, addr, recv(t, connects).String())
	require.NoError(t, c.WaitConnected(testContext(t)))
	select {
	case err := <-disconnects:
		t.Fatalf("unexpected second disconnect: %v", err)
	default:
	}
}

// startServerOn serves on l until the test ends.
func startServerOn(t *testing.T, l net.Listener, opts ...ServerOption) *Server {
	t.Helper()
	s, err := NewServer(append([]ServerOption{WithLogger(quietLogger())}, opts...)...)
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		require.NoError(t, s.Close())
		require.ErrorIs(t, recv(t, served), ErrServerClosed)
	})
	return s
}

func TestBackoffDelay(t *testing.T) {
	b, err := Backoff{BaseDelay: 100 * time.Millisecond, Multiplier: 2, Jitter: 0.5, MaxDelay: time.Second}.resolve()
	require.NoError(t, err)
	tests := []struct {
		n    int
		r    float64
		want time.Duration
	}{
		{0, 0.5, 100 * time.Millisecond}, // the middle of the band is the raw delay
		{1, 0.5, 200 * time.Millisecond},
		{2, 0.5, 400 * time.Millisecond},
		{3, 0.5, 800 * time.Millisecond},
		{4, 0.5, 750 * time.Millisecond}, // at the cap, spread below it
		{40, 0.5, 750 * time.Millisecond},
		{4, 0, time.Second},
		{4, 0.999, 500500 * time.Microsecond},
		{0, 0, 50 * time.Millisecond}, // the bottom of the band
		{3, 0.999, time.Second},       // the cap holds with jitter too
		{2, 0.999, 599600 * time.Microsecond},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("n=%d,r=%v", tt.n, tt.r), func(t *testing.T) {
			assert.InDelta(t, float64(tt.want), float64(b.delay(tt.n, tt.r)), float64(time.Millisecond))
		})
	}
}

func TestBackoffDefaultsAndValidation(t *testing.T) {
	b, err := Backoff{}.resolve()
	require.NoError(t, err)
	assert.Equal(t, defaultBackoff, b)

	b, err = Backoff{Jitter: -1}.resolve()
	require.NoError(t, err)
	assert.Zero(t, b.Jitter, "negative jitter turns it off")
	assert.Equal(t, defaultBackoff.BaseDelay, b.delay(0, 0.9))

	b, err = Backoff{BaseDelay: time.Minute}.resolve()
	require.NoError(t, err)
	assert.Equal(t, time.Minute, b.MaxDelay, "the default cap never undercuts the base")

	for _, bad := range []Backoff{
		{BaseDelay: -time.Second},
		{Multiplier: 0.5},
		{Jitter: 1.5},
		{BaseDelay: time.Second, MaxDelay: time.Millisecond},
	} {
		_, err := NewClient("127.0.0.1:1", WithBackoff(bad))
		assert.ErrorIs(t, err, ErrInvalidOption, "%+v", bad)
	}
}

func TestClientJitterSpreadsDelays(t *testing.T) {
	// With the real random source, waits stay inside the band and differ.
	o, err := newClientOptions(nil)
	require.NoError(t, err)
	seen := map[time.Duration]bool{}
	for range 100 {
		d := o.backoff.delay(0, o.rand())
		require.GreaterOrEqual(t, d, 125*time.Millisecond)
		require.LessOrEqual(t, d, 375*time.Millisecond)
		seen[d] = true
	}
	assert.Greater(t, len(seen), 50)
}

func TestClientAnswersServerPing(t *testing.T) {
	pong := make(chan []byte, 1)
	rs := newRawServer(t, func(nc net.Conn) {
		fr, err := acceptHello(nc)
		if err != nil {
			return
		}
		if _, err := nc.Write(appendFrame(nil, framePing, []byte("abc"))); err != nil {
			return
		}
		for {
			typ, p, err := fr.next()
			if err != nil {
				return
			}
			if typ == framePong {
				pong <- append([]byte(nil), p...)
			}
		}
	})
	newTestClient(t, rs.addr(), WithPingInterval(-1))
	assert.Equal(t, []byte("abc"), recv(t, pong))
}

func TestClientSeesCloseFrame(t *testing.T) {
	rs := newRawServer(t, func(nc net.Conn) {
		if _, err := acceptHello(nc); err == nil {
			_, _ = nc.Write(appendFrame(nil, frameClose, marshalClose(CloseGoingAway, "maintenance")))
		}
	})
	disconnects := make(chan error, 10)
	newTestClient(t, rs.addr(), WithOnDisconnect(func(err error) { disconnects <- err }))
	var ce *CloseError
	require.ErrorAs(t, recv(t, disconnects), &ce)
	assert.Equal(t, CloseGoingAway, ce.Code)
	assert.Equal(t, "maintenance", ce.Reason)
	assert.Equal(t, "vgo: closed by peer: going away: maintenance", ce.Error())
}

func TestClientProtocolErrorFromServer(t *testing.T) {
	// The client answers a broken frame with a close frame that says why.
	told := make(chan *CloseError, 1)
	rs := newRawServer(t, func(nc net.Conn) {
		fr, err := acceptHello(nc)
		if err != nil {
			return
		}
		_, _ = nc.Write([]byte{0x7f, 0, 0, 0, 0})
		for {
			typ, p, err := fr.next()
			if err != nil {
				return
			}
			if typ == frameClose {
				told <- parseClose(p)
			}
		}
	})
	disconnects := make(chan error, 10)
	newTestClient(t, rs.addr(), WithOnDisconnect(func(err error) { disconnects <- err }))
	assert.ErrorIs(t, recv(t, disconnects), ErrProtocol)
	ce := recv(t, told)
	assert.Equal(t, CloseProtocolError, ce.Code)
	assert.Contains(t, ce.Reason, "unknown frame type 0x7f")
}

func TestClientLargeSendNotStarvedBySmallOnes(t *testing.T) {
	// A steady stream of small frames must not keep a large one, which
	// waits for the queue to drain, from ever going out.
	bigs := make(chan int, 1)
	_, addr := startServer(t, WithHandler(func(_ *Conn, msg []byte) {
		if len(msg) > 1 {
			bigs <- len(msg)
		}
	}))
	c := newTestClient(t, addr)
	require.NoError(t, c.WaitConnected(testContext(t)))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if c.Send(context.Background(), []byte("s")) != nil {
					return
				}
			}
		})
	}
	defer wg.Wait()
	defer close(stop)
	require.NoError(t, c.Send(testContext(t), make([]byte, 4*fragmentSize)))
	assert.Equal(t, 4*fragmentSize, recv(t, bigs))
}

func TestClientGivesUpAfterMaxAttempts(t *testing.T) {
	l := listen(t)
	addr := l.Addr().String()
	l.Close() // nothing listens here now

	var reconnects []int
	closed := make(chan error, 1)
	c := newTestClient(t, addr,
		WithMaxAttempts(3),
		WithOnReconnect(func(attempt int, _ time.Duration) { reconnects = append(reconnects, attempt) }),
		WithOnClose(func(err error) { closed <- err }))
	err := recv(t, closed)
	require.ErrorIs(t, err, ErrGaveUp)
	<-c.Done()
	assert.ErrorIs(t, c.Err(), ErrGaveUp)
	assert.Equal(t, StateClosed, c.State())
	assert.Equal(t, []int{2, 3}, reconnects)
	assert.ErrorIs(t, c.Send(testContext(t), []byte("x")), ErrGaveUp)
	assert.ErrorIs(t, c.WaitConnected(testContext(t)), ErrGaveUp)
}

func TestClientCloseInterruptsDial(t *testing.T) {
	dialing := make(chan struct{})
	dialErr := make(chan error, 1)
	c := newTestClient(t, "127.0.0.1:1", WithDialFunc(func(ctx context.Context, _, _ string) (net.Conn, error) {
		close(dialing)
		<-ctx.Done()
		dialErr <- ctx.Err()
		return nil, ctx.Err()
	}), WithDialTimeout(-1))
	recv(t, dialing)
	closeWithin(t, c, time.Second)
	assert.ErrorIs(t, recv(t, dialErr), context.Canceled)
}

func TestClientCloseInterruptsHandshake(t *testing.T) {
	accepted := make(chan struct{}, 1)
	rs := newRawServer(t, func(nc net.Conn) {
		accepted <- struct{}{}
		drain(newFrameReader(nc, DefaultMaxFrameSize))
	})
	c := newTestClient(t, rs.addr(), WithHandshakeTimeout(time.Hour))
	recv(t, accepted)
	closeWithin(t, c, time.Second)
}

// closeWithin closes c and fails if that takes longer than bound, which is
// far above what Close needs but far below the waits it must interrupt.
func closeWithin(t *testing.T, c *Client, bound time.Duration) {
	t.Helper()
	start := time.Now()
	require.NoError(t, c.Close())
	assert.Less(t, time.Since(start), bound)
	assert.Equal(t, StateClosed, c.State())
	assert.ErrorIs(t, c.Err(), ErrClosed)
}

func TestClientConcurrentSend(t *testing.T) {
	const senders, perSender = 8, 200
	var mu sync.Mutex
	next := make(map[int]int)
	var errs []string
	done := make(chan struct{})
	total := 0
	_, addr := startServer(t, WithHandler(func(_ *Conn, msg []byte) {
		var g, seq int
		_, err := fmt.Sscanf(string(msg), "%d/%d", &g, &seq)
		mu.Lock()
		defer mu.Unlock()
		if err != nil || seq != next[g] {
			errs = append(errs, fmt.Sprintf("%q: want seq %d (%v)", msg, next[g], err))
		}
		next[g] = seq + 1
		total++
		if total == senders*perSender {
			close(done)
		}
	}))
	c := newTestClient(t, addr)
	require.NoError(t, c.WaitConnected(testContext(t)))

	var wg sync.WaitGroup
	for g := range senders {
		wg.Go(func() {
			for seq := range perSender {
				assert.NoError(t, c.Send(testContext(t), fmt.Appendf(nil, "%d/%d", g, seq)))
			}
		})
	}
	wg.Wait()
	recv(t, done)
	mu.Lock()
	defer mu.Unlock()
	assert.Empty(t, errs, "each sender's messages arrive once and in order")
}

func TestClientSendErrors(t *testing.T) {
	c, err := NewClient("127.0.0.1:1", WithLogger(quietLogger()), WithMaxFrameSize(8))
	require.NoError(t, err)
	assert.Equal(t, StateIdle, c.State())
	assert.ErrorIs(t, c.Send(context.Background(), []byte("x")), ErrNotConnected)
	assert.ErrorIs(t, c.Send(context.Background(), make([]byte, 9)), ErrFrameTooLarge)
	require.NoError(t, c.Close())
	require.NoError(t, c.Close(), "Close is idempotent")
	c.Start() // after Close: no effect
	assert.Equal(t, StateClosed, c.State())
	assert.ErrorIs(t, c.Send(context.Background(), []byte("x")), ErrClosed)
	assert.ErrorIs(t, c.WaitConnected(context.Background()), ErrClosed)
}

func TestClientOversizedSendKeepsConnection(t *testing.T) {
	_, addr := startServer(t, echoHandler(t))
	got := make(chan string, 1)
	disconnects := make(chan error, 1)
	c := newTestClient(t, addr, WithMaxFrameSize(16),
		WithOnMessage(func(msg []byte) { got <- string(msg) }),
		WithOnDisconnect(func(err error) { disconnects <- err }))
	require.NoError(t, c.WaitConnected(testContext(t)))
	assert.ErrorIs(t, c.Send(testContext(t), make([]byte, 17)), ErrFrameTooLarge)
	require.NoError(t, c.Send(testContext(t), []byte("still here")))
	assert.Equal(t, "still here", recv(t, got))
	assert.Empty(t, disconnects)
}

func TestClientWaitConnectedHonoursContext(t *testing.T) {
	rs := newRawServer(t, func(nc net.Conn) { nc.Close() })
	c := newTestClient(t, rs.addr())
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, c.WaitConnected(ctx), context.DeadlineExceeded)
}

func TestClientSendBlocksWhenPeerStopsReading(t *testing.T) {
	// A peer that never reads fills the socket buffers and then the send
	// queue: Send must then wait for room, give up when its context ends,
	// and Close must still return promptly.
	stop := make(chan struct{})
	rs := newRawServer(t, func(nc net.Conn) {
		if _, err := acceptHello(nc); err == nil {
			<-stop
		}
	})
	t.Cleanup(func() { close(stop) })
	c := newTestClient(t, rs.addr(), WithPingInterval(-1), WithWriteTimeout(waitFor))
	require.NoError(t, c.WaitConnected(testContext(t)))
	payload := make([]byte, 16<<10)
	var err error
	for sent := 0; err == nil; sent += len(payload) {
		require.Less(t, sent, 1<<30, "Send never blocked")
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		err = c.Send(ctx, payload)
		cancel()
	}
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	closeWithin(t, c, 2*closeFrameTimeout+time.Second)
}

func TestClientCallbackOrder(t *testing.T) {
	// connect, then the messages, then disconnect, then the reconnect
	// attempt: in that order, for every connection.
	var mu sync.Mutex
	var events []string
	record := func(e string) {
		mu.Lock()
		events = append(events, e)
		mu.Unlock()
	}
	_, addr := startServer(t, WithOnConnOpen(func(c *Conn) {
		for i := range 3 {
			assert.NoError(t, c.Send(context.Background(), []byte{byte('0' + i)}))
		}
		assert.NoError(t, c.Close())
	}))
	reconnected := make(chan struct{}, 10)
	newTestClient(t, addr,
		WithOnConnect(func(net.Addr) { record("connect") }),
		WithOnMessage(func(msg []byte) { record("msg " + string(msg)) }),
		WithOnDisconnect(func(error) { record("disconnect") }),
		WithOnReconnect(func(int, time.Duration) {
			record("reconnect")
			reconnected <- struct{}{}
		}))
	recv(t, reconnected)
	recv(t, reconnected)
	mu.Lock()
	defer mu.Unlock()
	want := []string{"connect", "msg 0", "msg 1", "msg 2", "disconnect", "reconnect"}
	require.GreaterOrEqual(t, len(events), 2*len(want))
	assert.Equal(t, append(want, want...), events[:2*len(want)])
}

func TestClientOptionValidation(t *testing.T) {
	for name, tc := range map[string]struct {
		addr string
		opts []ClientOption
	}{
		"no port":               {"localhost", nil},
		"empty address":         {"", nil},
		"negative pong timeout": {"127.0.0.1:1", []ClientOption{WithPongTimeout(-time.Second)}},
		"negative attempts":     {"127.0.0.1:1", []ClientOption{WithMaxAttempts(-1)}},
		"negative frame size":   {"127.0.0.1:1", []ClientOption{WithMaxFrameSize(-1)}},
		"frame size over 4 GiB": {"127.0.0.1:1", []ClientOption{WithMaxFrameSize(1 << 33)}},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := NewClient(tc.addr, tc.opts...)
			assert.ErrorIs(t, err, ErrInvalidOption)
		})
	}

	// Heartbeats off: no pong timeout is needed.
	c, err := NewClient("127.0.0.1:1", WithPingInterval(-1), WithPongTimeout(-1), nil)
	require.NoError(t, err)
	assert.Zero(t, c.opts.pingInterval)
	assert.Equal(t, DefaultDialTimeout, c.opts.dialTimeout)
	assert.Equal(t, DefaultWriteTimeout, c.opts.writeTimeout)
	require.NoError(t, c.Close())
}

func TestStateString(t *testing.T) {
	for s, want := range map[State]string{
		StateIdle: "idle", StateConnecting: "connecting", StateConnected: "connected",
		StateReconnecting: "reconnecting", StateClosed: "closed", State(42): "State(42)",
	} {
		assert.Equal(t, want, s.String())
	}
}

func TestClientReportsJitteredDelays(t *testing.T) {
	// With the random draw injected, the reported waits are exactly the
	// backoff's: the bottom of the band, then the top.
	l := listen(t)
	addr := l.Addr().String()
	l.Close()
	draws := []float64{0, 0.999999, 0, 0.999999}
	var i atomic.Int32
	delays := make(chan time.Duration, 10)
	b := Backoff{BaseDelay: 10 * time.Millisecond, Multiplier: 2, Jitter: 0.5, MaxDelay: 25 * time.Millisecond}
	newTestClient(t, addr, WithBackoff(b), WithMaxAttempts(5),
		withRand(func() float64 { return draws[int(i.Add(1)-1)%len(draws)] }),
		WithOnReconnect(func(_ int, d time.Duration) { delays <- d }))
	for _, want := range []time.Duration{5 * time.Millisecond, 25 * time.Millisecond, 25 * time.Millisecond, 12500 * time.Microsecond} {
		assert.InDelta(t, float64(want), float64(recv(t, delays)), float64(time.Microsecond))
	}
}

func TestTimeoutErrorsAreNetErrors(t *testing.T) {
	for _, err := range []error{ErrHeartbeatTimeout, ErrHandshakeTimeout} {
		var ne net.Error
		require.ErrorAs(t, err, &ne)
		assert.True(t, ne.Timeout())
	}
}
