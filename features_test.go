package vgo

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vgonet/vgo/vgotest"
)

func tokenAuth(want string) ServerOption {
	return WithAuthenticator(func(_ *Conn, creds []byte) (any, error) {
		if string(creds) != want {
			return nil, errors.New("bad token")
		}
		return nil, nil
	})
}

func staticCredentials(token string) ClientOption {
	return WithCredentials(func(context.Context) ([]byte, error) { return []byte(token), nil })
}

func TestAuthAccepts(t *testing.T) {
	srv, addr := startServer(t, tokenAuth("s3cret"))
	c := newTestClient(t, addr, staticCredentials("s3cret"))
	require.NoError(t, c.WaitConnected(testContext(t)))
	assert.Zero(t, srv.Stats().AuthFailures)
}

func TestAuthRejectionStopsTheClient(t *testing.T) {
	srv, addr := startServer(t, tokenAuth("s3cret"))
	closed := make(chan error, 1)
	var dials atomic.Int32
	c := newTestClient(t, addr, staticCredentials("wrong"),
		WithDialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}),
		WithOnClose(func(err error) { closed <- err }))
	err := recv(t, closed)
	require.ErrorIs(t, err, ErrUnauthorized)
	var ce *CloseError
	require.ErrorAs(t, err, &ce)
	assert.Equal(t, CloseUnauthorized, ce.Code)
	assert.Equal(t, "bad token", ce.Reason)
	assert.ErrorIs(t, c.Err(), ErrUnauthorized)
	assert.Equal(t, int32(1), dials.Load(), "no retry after an auth failure")
	assert.Equal(t, uint64(1), srv.Stats().AuthFailures)
}

func TestAuthRejectionRetriedWhenAsked(t *testing.T) {
	_, addr := startServer(t, tokenAuth("s3cret"))
	var calls atomic.Int32
	c := newTestClient(t, addr, WithRetryOnAuthFailure(true),
		// A token that is refreshed on every dial: wrong twice, then right.
		WithCredentials(func(context.Context) ([]byte, error) {
			if calls.Add(1) < 3 {
				return []byte("stale"), nil
			}
			return []byte("s3cret"), nil
		}))
	require.NoError(t, c.WaitConnected(testContext(t)))
	assert.Equal(t, int32(3), calls.Load())
}

func TestCredentialsErrorFailsTheAttempt(t *testing.T) {
	_, addr := startServer(t)
	closed := make(chan error, 1)
	newTestClient(t, addr, WithMaxAttempts(1),
		WithCredentials(func(context.Context) ([]byte, error) { return nil, errors.New("vault down") }),
		WithOnClose(func(err error) { closed <- err }))
	err := recv(t, closed)
	assert.ErrorIs(t, err, ErrGaveUp)
	assert.ErrorContains(t, err, "vault down")
}

func TestHeartbeatNegotiation(t *testing.T) {
	pings := make(chan time.Time, 100)
	srv, addr := startServer(t, WithHeartbeatTimeout(300*time.Millisecond),
		WithPingIntervalRange(30*time.Millisecond, 60*time.Millisecond),
		WithOnPing(func(*Conn) {
			select {
			case pings <- time.Now():
			default:
			}
		}))
	t.Run("too slow is sped up", func(t *testing.T) {
		c := newTestClient(t, addr, WithPingInterval(time.Hour))
		require.NoError(t, c.WaitConnected(testContext(t)))
		recv(t, pings) // an hour would never come
		require.Eventually(t, func() bool { return c.RTT() > 0 }, waitFor, time.Millisecond)
	})
	t.Run("off is turned on", func(t *testing.T) {
		c := newTestClient(t, addr, WithPingInterval(-1))
		require.NoError(t, c.WaitConnected(testContext(t)))
		require.Eventually(t, func() bool { return c.RTT() > 0 }, waitFor, time.Millisecond)
	})
	t.Run("too fast is slowed down", func(t *testing.T) {
		c := newTestClient(t, addr, WithPingInterval(time.Millisecond))
		require.NoError(t, c.WaitConnected(testContext(t)))
		for len(pings) > 0 {
			<-pings
		}
		// At 1ms, 300ms would bring some 300 pings; at the server's 30ms
		// minimum, about 10.
		start := time.Now()
		n := 0
		for time.Since(start) < 300*time.Millisecond {
			select {
			case <-pings:
				n++
			case <-time.After(10 * time.Millisecond):
			}
		}
		assert.Less(t, n, 50, "%d pings in 300ms", n)
		assert.Positive(t, n)
	})
	assert.Zero(t, srv.Stats().StaleClosed, "no client was closed as stale")
}

func TestPingIntervalRangeValidation(t *testing.T) {
	for name, opts := range map[string][]ServerOption{
		"max above half the timeout": {WithHeartbeatTimeout(time.Second), WithPingIntervalRange(0, 600*time.Millisecond)},
		"empty range":                {WithPingIntervalRange(2*time.Second, time.Second)},
		"negative":                   {WithPingIntervalRange(-time.Second, 0)},
	} {
		_, err := NewServer(opts...)
		assert.ErrorIs(t, err, ErrInvalidOption, name)
	}
	s, err := NewServer(WithHeartbeatTimeout(9 * time.Second))
	require.NoError(t, err)
	assert.Equal(t, 3*time.Second, s.opts.maxPing, "by default a client may miss two pings")
}

func TestShutdownSpreadsReconnects(t *testing.T) {
	// The goodbye frame's window replaces the first backoff wait, but is
	// never longer than the client's own longest wait: with the random draw
	// fixed at one half, the client waits half of the smaller of the two.
	for _, tc := range []struct {
		maxDelay, want time.Duration
	}{
		{10 * time.Second, 2 * time.Second},
		{time.Second, 500 * time.Millisecond},
	} {
		srv, addr := startServer(t, WithDrainWindow(4*time.Second))
		delays := make(chan time.Duration, 10)
		c := newTestClient(t, addr, withRand(func() float64 { return 0.5 }),
			WithBackoff(Backoff{BaseDelay: 10 * time.Millisecond, MaxDelay: tc.maxDelay}),
			WithOnReconnect(func(_ int, d time.Duration) { delays <- d }))
		require.NoError(t, c.WaitConnected(testContext(t)))
		require.NoError(t, srv.Shutdown(testContext(t)))
		assert.Equal(t, tc.want, recv(t, delays), "max delay %v", tc.maxDelay)
		require.NoError(t, c.Close())
	}
}

func TestFailoverToNextEndpoint(t *testing.T) {
	dead := listen(t)
	deadAddr := dead.Addr().String()
	dead.Close()
	_, liveAddr := startServer(t)
	connects := make(chan net.Addr, 10)
	c := newTestClient(t, deadAddr, WithFallbackAddrs(liveAddr),
		WithOnConnect(func(a net.Addr) { connects <- a }))
	assert.Equal(t, liveAddr, recv(t, connects).String())
	assert.Equal(t, liveAddr, c.Endpoint())
	st := c.Stats()
	assert.Equal(t, uint64(2), st.Dials)
	assert.Equal(t, uint64(1), st.FailedDials)
}

func TestFailoverBackoffPerRound(t *testing.T) {
	// Three dead endpoints: each round tries all three at once, then waits.
	var addrs []string
	for range 3 {
		l := listen(t)
		addrs = append(addrs, l.Addr().String())
		l.Close()
	}
	var dials atomic.Int32
	rounds := make(chan int32, 10)
	newTestClient(t, addrs[0], WithFallbackAddrs(addrs[1:]...),
		WithDialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}),
		WithOnReconnect(func(int, time.Duration) { rounds <- dials.Load() }))
	assert.Equal(t, int32(3), recv(t, rounds))
	assert.Equal(t, int32(6), recv(t, rounds))
}

func TestFallbackValidation(t *testing.T) {
	_, err := NewClient("127.0.0.1:1", WithFallbackAddrs("no-port"))
	assert.ErrorIs(t, err, ErrInvalidOption)
}

func TestStats(t *testing.T) {
	srv, addr := startServer(t, echoHandler(t))
	got := make(chan struct{}, 10)
	c := newTestClient(t, addr, WithOnMessage(func([]byte) { got <- struct{}{} }))
	require.NoError(t, c.WaitConnected(testContext(t)))
	for range 3 {
		require.NoError(t, c.Send(testContext(t), []byte("12345")))
		recv(t, got)
	}
	require.Eventually(t, func() bool { return c.Stats().RTTLast > 0 }, waitFor, time.Millisecond)
	st := c.Stats()
	assert.Equal(t, uint64(3), st.MessagesOut)
	assert.Equal(t, uint64(15), st.BytesOut)
	assert.Equal(t, uint64(3), st.MessagesIn)
	assert.Equal(t, uint64(15), st.BytesIn)
	assert.Equal(t, uint64(1), st.Dials)
	assert.Zero(t, st.Reconnects)
	assert.False(t, st.ConnectedSince.IsZero())
	assert.LessOrEqual(t, st.RTTMin, st.RTTAvg)
	assert.LessOrEqual(t, st.RTTAvg, st.RTTMax)
	assert.Equal(t, addr, st.Endpoint)

	sst := srv.Stats()
	assert.Equal(t, uint64(1), sst.Accepted)
	assert.Equal(t, 1, sst.Live)
}

func TestTLSConfigFuncPerDial(t *testing.T) {
	// Mutual TLS, with the client's configuration fetched anew on every
	// dial: a certificate rotated between dials is the one the next
	// connection presents.
	serverCfg, clientCfg, clientCert := testMutualTLS(t)
	srv, addr := startServer(t, WithTLSConfig(serverCfg))
	var dials atomic.Int32
	connects := make(chan struct{}, 10)
	newTestClient(t, addr,
		WithTLSConfigFunc(func(string) (*tls.Config, error) {
			dials.Add(1)
			cfg := clientCfg.Clone()
			cfg.Certificates = []tls.Certificate{clientCert}
			return cfg, nil
		}),
		WithOnConnect(func(net.Addr) { connects <- struct{}{} }))
	recv(t, connects)
	require.Eventually(t, func() bool { return srv.Len() == 1 }, waitFor, time.Millisecond)
	srv.Range(func(conn *Conn) bool {
		assert.NoError(t, conn.Close())
		return true
	})
	recv(t, connects)
	assert.Equal(t, int32(2), dials.Load())
}

func TestTLSClientCertificateRequired(t *testing.T) {
	serverCfg, clientCfg, _ := testMutualTLS(t)
	_, addr := startServer(t, WithTLSConfig(serverCfg))
	closed := make(chan error, 1)
	newTestClient(t, addr, WithTLSConfig(clientCfg), WithMaxAttempts(1),
		WithOnClose(func(err error) { closed <- err }))
	assert.ErrorIs(t, recv(t, closed), ErrGaveUp)
}

// testMutualTLS returns a server config that requires a client
// certificate, a client config that trusts the server, and the certificate
// the server accepts from clients, all made for the test.
func testMutualTLS(t *testing.T) (server, client *tls.Config, clientCert tls.Certificate) {
	t.Helper()
	server, client = testTLS(t)
	issued, _ := testTLS(t)
	clientCert = issued.Certificates[0]
	leaf, err := x509.ParseCertificate(clientCert.Certificate[0])
	require.NoError(t, err)
	server.ClientAuth = tls.RequireAndVerifyClientCert
	server.ClientCAs = x509.NewCertPool()
	server.ClientCAs.AddCert(leaf)
	return server, client, clientCert
}

func TestStatsCountSendsAcrossConnections(t *testing.T) {
	// The live connection counts what Send gives it; its counts join the
	// client's as it ends, without being counted twice.
	_, addr := startServer(t, echoHandler(t))
	proxy, err := vgotest.NewProxy(addr)
	require.NoError(t, err)
	t.Cleanup(func() { proxy.Close() })
	got := make(chan struct{}, 10)
	c := newTestClient(t, proxy.Addr(), WithOnMessage(func([]byte) { got <- struct{}{} }))
	for round := 1; round <= 3; round++ {
		require.NoError(t, c.WaitConnected(testContext(t)))
		require.NoError(t, c.Send(testContext(t), []byte("1234")))
		recv(t, got)
		st := c.Stats()
		assert.Equal(t, uint64(round), st.MessagesOut, "round %d", round)
		assert.Equal(t, uint64(4*round), st.BytesOut, "round %d", round)
		proxy.Cut()
		require.Eventually(t, func() bool { return c.State() != StateConnected }, waitFor, time.Millisecond)
		st = c.Stats()
		assert.Equal(t, uint64(round), st.MessagesOut, "round %d, disconnected", round)
	}
}

func TestStatsCountSendsOfPlainSession(t *testing.T) {
	// A client asking for a session from a server without sessions runs
	// plain; each message it sends is counted once.
	_, addr := startServer(t, echoHandler(t))
	got := make(chan struct{}, 10)
	c := newTestClient(t, addr, WithResume(0), WithOnMessage(func([]byte) { got <- struct{}{} }))
	require.NoError(t, c.WaitConnected(testContext(t)))
	for range 3 {
		require.NoError(t, c.Send(testContext(t), []byte("12345")))
		recv(t, got)
	}
	st := c.Stats()
	assert.Equal(t, uint64(3), st.MessagesOut)
	assert.Equal(t, uint64(15), st.BytesOut)
}
