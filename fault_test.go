package vgo

import (
	"context"
	"errors"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vgonet/vgo/vgotest"
)

// The fault matrix: each case puts a real server behind a vgotest proxy,
// injects one kind of network failure and checks what the client and the
// server make of it. Measured figures are logged (go test -v -run Fault).

const (
	faultInterval = 20 * time.Millisecond
	faultTimeout  = 100 * time.Millisecond
)

// faultRig is a server, a proxy in front of it and a client of the proxy,
// with the client's events on channels.
type faultRig struct {
	srv         *Server
	proxy       *vgotest.Proxy
	client      *Client
	connects    chan time.Time
	disconnects chan error
	serverLost  chan error
}

func newFaultRig(t *testing.T, serverOpts []ServerOption, clientOpts ...ClientOption) *faultRig {
	t.Helper()
	r := &faultRig{
		connects:    make(chan time.Time, 1000),
		disconnects: make(chan error, 1000),
		serverLost:  make(chan error, 1000),
	}
	var addr string
	r.srv, addr = startServer(t, append([]ServerOption{
		WithHeartbeatTimeout(5 * faultTimeout),
		WithOnConnClose(func(_ *Conn, err error) { r.serverLost <- err }),
	}, serverOpts...)...)
	r.proxy = newProxy(t, addr)
	r.client = newTestClient(t, r.proxy.Addr(), append([]ClientOption{
		WithPingInterval(faultInterval),
		WithPongTimeout(faultTimeout),
		WithOnConnect(func(net.Addr) { r.connects <- time.Now() }),
		WithOnDisconnect(func(err error) { r.disconnects <- err }),
	}, clientOpts...)...)
	recv(t, r.connects)
	return r
}

// newProxy returns a proxy to target, closed with the test.
func newProxy(t *testing.T, target string) *vgotest.Proxy {
	t.Helper()
	p, err := vgotest.NewProxy(target)
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return p
}

// disconnected waits for the client's next disconnect and returns how long
// it took from start, and its cause.
func (r *faultRig) disconnected(t *testing.T, start time.Time) (time.Duration, error) {
	t.Helper()
	err := recv(t, r.disconnects)
	return time.Since(start), err
}

func TestFaultServerProcessGone(t *testing.T) {
	// A RST on both sides, as when the server process dies: the client
	// notices at once, not by heartbeat, and is back promptly.
	r := newFaultRig(t, nil)
	start := time.Now()
	r.proxy.Cut()
	took, err := r.disconnected(t, start)
	assert.NotErrorIs(t, err, ErrHeartbeatTimeout, "a reset is seen directly: %v", err)
	assert.Error(t, recv(t, r.serverLost))
	back := recv(t, r.connects).Sub(start)
	t.Logf("reset: detected in %v, reconnected after %v", took, back)
}

func TestFaultGracefulShutdown(t *testing.T) {
	// A FIN after a going-away close frame: the client reports the server's
	// reason and reconnects to the next server on the same proxy.
	r := newFaultRig(t, []ServerOption{WithDrainWindow(50 * time.Millisecond)})
	ctx := testContext(t)
	require.NoError(t, r.srv.Shutdown(ctx))
	var ce *CloseError
	require.ErrorAs(t, recv(t, r.disconnects), &ce)
	assert.Equal(t, CloseGoingAway, ce.Code)

	next, addr := startServer(t)
	r.proxy.SetTarget(addr)
	start := time.Now()
	recv(t, r.connects)
	t.Logf("shutdown: reconnected to the next server after %v", time.Since(start))
	require.Eventually(t, func() bool { return next.Len() == 1 }, waitFor, time.Millisecond)
}

func TestFaultBlackHole(t *testing.T) {
	// Nothing passes, no FIN, no RST: only heartbeats can tell. The client
	// must give up within interval + timeout of the last frame, the server
	// within its heartbeat timeout.
	r := newFaultRig(t, nil)
	start := time.Now()
	r.proxy.Freeze()
	took, err := r.disconnected(t, start)
	require.ErrorIs(t, err, ErrHeartbeatTimeout)
	assert.GreaterOrEqual(t, took, faultTimeout, "declared dead before the pong timeout")
	serverErr := recv(t, r.serverLost)
	serverTook := time.Since(start)
	require.ErrorIs(t, serverErr, ErrHeartbeatTimeout)
	assert.GreaterOrEqual(t, serverTook, 5*faultTimeout-faultInterval)
	t.Logf("black hole: client detected in %v (bound %v), server in %v (timeout %v)",
		took, faultInterval+faultTimeout, serverTook, 5*faultTimeout)

	r.proxy.Thaw()
	recv(t, r.connects)
}

func TestFaultHalfOpen(t *testing.T) {
	// The server side vanishes and the client is not told: its socket stays
	// open and silent, so again only the heartbeat finds out.
	r := newFaultRig(t, nil)
	start := time.Now()
	r.proxy.DropServer()
	assert.Error(t, recv(t, r.serverLost), "the server sees the reset at once")
	took, err := r.disconnected(t, start)
	require.ErrorIs(t, err, ErrHeartbeatTimeout)
	t.Logf("half-open: client detected in %v (bound %v)", took, faultInterval+faultTimeout)
	recv(t, r.connects)
}

func TestFaultRefusedDialsAreSpaced(t *testing.T) {
	// While every new connection is reset, dials follow the backoff.
	r := newFaultRig(t, nil, WithBackoff(Backoff{BaseDelay: 20 * time.Millisecond, Multiplier: 2, Jitter: -1, MaxDelay: time.Second}))
	r.proxy.Refuse()
	r.proxy.Cut()
	recv(t, r.disconnects)
	ctx := testContext(t)
	var times []time.Time
	require.NoError(t, r.proxy.Wait(ctx, func(s vgotest.Stats) bool {
		if len(times) < s.Refused {
			times = append(times, time.Now())
		}
		return s.Refused >= 5
	}))
	for i := 2; i < len(times); i++ {
		// Observed from the proxy, a gap can come out short by the
		// scheduling noise of two accepts, so the bound is halved.
		assert.GreaterOrEqual(t, times[i].Sub(times[i-1]), 20*time.Millisecond<<(i-1)/2, "gap %d", i)
	}
	r.proxy.Admit()
	recv(t, r.connects)
}

func TestFaultFlapping(t *testing.T) {
	// A hundred resets in a row: the client recovers every time and holds
	// no more goroutines at the end than at the start.
	r := newFaultRig(t, nil, WithBackoff(Backoff{BaseDelay: time.Millisecond, MaxDelay: 5 * time.Millisecond}))
	before := runtime.NumGoroutine()
	start := time.Now()
	for i := range 100 {
		r.proxy.Cut()
		recv(t, r.disconnects)
		recv(t, r.connects)
		require.NoError(t, r.client.WaitConnected(testContext(t)), "round %d", i)
	}
	t.Logf("flapping: 100 resets and reconnects in %v", time.Since(start))
	// A flusher goroutine comes and goes with each queued ping and pong, so
	// allow for those; a leak would grow with the hundred rounds.
	after := settleGoroutines(before + 2)
	assert.LessOrEqual(t, after, before+2)
	t.Logf("flapping: goroutines before %d, after %d", before, after)
}

func TestFaultServerStopsReading(t *testing.T) {
	// A server whose handler hangs reads nothing more: the client's queue
	// and socket fill up, and the link is torn down, never left hanging:
	// by the heartbeat, since no pong comes back either, or with heartbeats
	// off by the write deadline.
	for _, tc := range []struct {
		name      string
		opts      []ClientOption
		heartbeat bool
	}{
		{"heartbeat", nil, true},
		{"write deadline", []ClientOption{WithPingInterval(-1)}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			release := make(chan struct{})
			defer close(release)
			r := newFaultRig(t, []ServerOption{
				WithHeartbeatTimeout(-1),
				WithHandler(func(*Conn, []byte) { <-release }),
			}, append([]ClientOption{WithWriteTimeout(200 * time.Millisecond)}, tc.opts...)...)
			start := time.Now()
			payload := make([]byte, 16<<10)
			for r.client.Send(context.Background(), payload) == nil {
				require.Less(t, time.Since(start), waitFor, "Send never failed")
			}
			took, err := r.disconnected(t, start)
			var ne net.Error
			require.ErrorAs(t, err, &ne)
			assert.True(t, ne.Timeout(), "%v", err)
			assert.Equal(t, tc.heartbeat, errors.Is(err, ErrHeartbeatTimeout), "%v", err)
			t.Logf("server stops reading: torn down after %v by %v", took, err)
		})
	}
}

func TestFaultClientStopsReading(t *testing.T) {
	// A client that reads nothing cannot hold the server: the writes to it
	// hit the write deadline and only its connection is closed, while a
	// well-behaved client keeps receiving.
	lost := make(chan error, 10)
	srv, addr := startServer(t, WithWriteTimeout(200*time.Millisecond),
		WithOnConnClose(func(_ *Conn, err error) { lost <- err }))
	got := make(chan int, 1000)
	good := newTestClient(t, addr, WithOnMessage(func(msg []byte) {
		select {
		case got <- len(msg):
		default:
		}
	}))
	require.NoError(t, good.WaitConnected(testContext(t)))

	stuck, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	defer stuck.Close()
	_, err = stuck.Write(rawHello(ProtocolVersion))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return srv.Len() == 2 }, waitFor, time.Millisecond)

	payload := make([]byte, 16<<10)
	start := time.Now()
	for srv.Len() == 2 {
		require.Less(t, time.Since(start), waitFor, "the stuck client was never dropped")
		srv.Broadcast(testContext(t), payload)
	}
	var ne net.Error
	require.ErrorAs(t, recv(t, lost), &ne)
	assert.True(t, ne.Timeout())
	t.Logf("client stops reading: dropped after %v", time.Since(start))

	for len(got) > 0 {
		<-got
	}
	// Broadcast skips a full queue: the good client's may still hold the
	// flood for a moment.
	var reached int
	require.Eventually(t, func() bool {
		reached = srv.Broadcast(testContext(t), []byte("still there"))
		return reached > 0
	}, waitFor, time.Millisecond)
	assert.Equal(t, 1, reached, "only the good client is left")
	for recv(t, got) != len("still there") {
	}
	assert.Equal(t, StateConnected, good.State())
}

func TestFaultLatency(t *testing.T) {
	t.Run("above the pong timeout is dead", func(t *testing.T) {
		r := newFaultRig(t, nil, WithBackoff(Backoff{BaseDelay: time.Hour}))
		r.proxy.SetLatency(vgotest.ServerToClient, 2*faultTimeout)
		took, err := r.disconnected(t, time.Now())
		require.ErrorIs(t, err, ErrHeartbeatTimeout)
		t.Logf("latency %v over a %v pong timeout: dropped after %v", 2*faultTimeout, faultTimeout, took)
	})
	t.Run("below the pong timeout stays up", func(t *testing.T) {
		pongs := make(chan time.Duration, 1000)
		r := newFaultRig(t, nil, WithOnPong(func(rtt time.Duration) { pongs <- rtt }))
		r.proxy.SetLatency(vgotest.ServerToClient, faultTimeout/4)
		var slow time.Duration
		for slow < faultTimeout/4 {
			slow = recv(t, pongs)
		}
		for range 20 {
			recv(t, pongs)
		}
		assert.Empty(t, r.disconnects)
		t.Logf("latency %v under a %v pong timeout: still connected, rtt %v", faultTimeout/4, faultTimeout, r.client.RTT())
	})
}

func TestFaultReconnectStorm(t *testing.T) {
	// 200 clients lose their server at once; the server comes back on the
	// same address. All must return, and their redials must be spread by
	// the jitter rather than land together.
	if testing.Short() {
		t.Skip("200 clients")
	}
	const clients = 200
	l := listen(t)
	addr := l.Addr().String()
	first := startServerOn(t, l)

	var mu sync.Mutex
	var dials []time.Time
	var cut time.Time
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		if !cut.IsZero() {
			dials = append(dials, time.Now())
		}
		mu.Unlock()
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	connected := make(chan struct{}, 2*clients)
	for range clients {
		// Heartbeats slow enough that 200 clients under the race
		// detector on two cores are not dropped as dead meanwhile.
		newTestClient(t, addr, WithDialFunc(dial),
			WithPingInterval(time.Second), WithPongTimeout(5*time.Second),
			WithBackoff(Backoff{BaseDelay: 500 * time.Millisecond}), // default ±60% jitter
			WithOnConnect(func(net.Addr) { connected <- struct{}{} }))
	}
	for range clients {
		recv(t, connected)
	}

	mu.Lock()
	cut = time.Now()
	mu.Unlock()
	require.NoError(t, first.Close())
	l2, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	second := startServerOn(t, l2)
	for range clients {
		recv(t, connected)
	}
	require.Eventually(t, func() bool { return second.Len() == clients }, waitFor, time.Millisecond)

	mu.Lock()
	defer mu.Unlock()
	buckets := map[int]int{}
	most := 0
	for _, d := range dials {
		b := int(d.Sub(cut) / (100 * time.Millisecond))
		buckets[b]++
		most = max(most, buckets[b])
	}
	t.Logf("storm: %d redials after the cut, by 100 ms bucket: %v", len(dials), buckets)
	assert.GreaterOrEqual(t, len(dials), clients)
	assert.Less(t, most, len(dials)/2, "one 100 ms bucket holds most redials")
}

func TestFaultResetMidStream(t *testing.T) {
	// A reset after some bytes from the client: the stream up to the cut is
	// delivered intact, frame by frame, and the client reconnects.
	var mu sync.Mutex
	var seen []byte
	r := newFaultRig(t, []ServerOption{WithHandler(func(_ *Conn, msg []byte) {
		mu.Lock()
		seen = append(seen, msg...)
		mu.Unlock()
	})})
	r.proxy.ResetAfter(vgotest.ClientToServer, 10_000)
	payload := []byte("0123456789abcdef")
	for r.client.Send(context.Background(), payload) == nil {
	}
	recv(t, r.disconnects)
	// The server's side of the cut: once it has closed, its reader has
	// handed every frame that arrived to the handler. The client can learn
	// of the reset before the server has read what came before it.
	recv(t, r.serverLost)
	mu.Lock()
	defer mu.Unlock()
	require.NotEmpty(t, seen)
	for i := 0; i+len(payload) <= len(seen); i += len(payload) {
		require.Equal(t, string(payload), string(seen[i:i+len(payload)]), "corrupted at byte %d", i)
	}
	assert.Zero(t, len(seen)%len(payload), "a partial frame reached the handler")
}
