package vgo

import (
	"context"
	"io"
	"net"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitFor bounds every wait on an event in the tests. It is generous on
// purpose: the tests must pass on a loaded two-core machine.
const waitFor = 10 * time.Second

// quietLogger discards log lines; tests assert on events, not on logs.
func quietLogger() logrus.FieldLogger {
	l := logrus.New()
	if os.Getenv("VGO_TEST_LOG") == "" {
		l.SetOutput(io.Discard)
	}
	return l
}

// testContext returns a context that ends after waitFor or with the test.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	t.Cleanup(cancel)
	return ctx
}

// listen returns a listener on a free loopback port, closed with the test.
func listen(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	return l
}

// startServer runs a server on a fresh loopback listener and closes it with
// the test, checking that Serve returned ErrServerClosed.
func startServer(t *testing.T, opts ...ServerOption) (*Server, string) {
	t.Helper()
	s, err := NewServer(append([]ServerOption{WithLogger(quietLogger())}, opts...)...)
	require.NoError(t, err)
	l := listen(t)
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	t.Cleanup(func() {
		require.NoError(t, s.Close())
		select {
		case err := <-served:
			require.ErrorIs(t, err, ErrServerClosed)
		case <-time.After(waitFor):
			t.Error("Serve did not return after Close")
		}
	})
	return s, l.Addr().String()
}

// newTestClient returns a started client with fast heartbeats and backoff,
// closed with the test.
func newTestClient(t *testing.T, addr string, opts ...ClientOption) *Client {
	t.Helper()
	base := []ClientOption{
		WithLogger(quietLogger()),
		WithPingInterval(20 * time.Millisecond),
		WithPongTimeout(200 * time.Millisecond),
		WithBackoff(Backoff{BaseDelay: 10 * time.Millisecond, MaxDelay: 100 * time.Millisecond}),
	}
	c, err := NewClient(addr, append(base, opts...)...)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	c.Start()
	return c
}

// recv waits for a value on ch.
func recv[T any](t *testing.T, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitFor):
		t.Fatalf("no event within %v", waitFor)
		var zero T
		return zero
	}
}

// rawHello returns the bytes of a hello frame of the given version.
func rawHello(version uint8) []byte {
	return appendFrame(nil, frameHello, hello{version: version}.marshal())
}

// settleGoroutines waits until at most n goroutines run, and returns the
// count it saw last. It polls on the caller's goroutine because
// require.Eventually would add a goroutine of its own to the count.
func settleGoroutines(n int) int {
	deadline := time.Now().Add(waitFor)
	for {
		got := runtime.NumGoroutine()
		if got <= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(5 * time.Millisecond)
	}
}
