package vgo

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// helloPeer starts a server with the given heartbeat timeout that reports
// each closed connection's cause on closed, and returns a raw connection to
// it that has sent its hello.
func helloPeer(t *testing.T, timeout time.Duration, closed chan<- error) net.Conn {
	t.Helper()
	_, addr := startServer(t, WithHeartbeatTimeout(timeout),
		WithOnConnClose(func(_ *Conn, err error) { closed <- err }))
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	_, err = nc.Write(rawHello(ProtocolVersion))
	require.NoError(t, err)
	return nc
}

func TestServerClosesPeerTricklingBytes(t *testing.T) {
	// One byte at a time, never a whole frame: bytes alone must not keep a
	// connection alive, or a slowloris peer could hold it forever.
	const timeout = 150 * time.Millisecond
	closed := make(chan error, 1)
	nc := helloPeer(t, timeout, closed)

	start := time.Now()
	frame := appendFrame(nil, frameData, make([]byte, 4096))
	ticker := time.NewTicker(10 * time.Millisecond)
	defer ticker.Stop()
	for i := 0; ; i++ {
		select {
		case err := <-closed:
			assert.ErrorIs(t, err, ErrHeartbeatTimeout)
			assert.GreaterOrEqual(t, time.Since(start), timeout)
			return
		case <-ticker.C:
			require.Less(t, i, len(frame), "the server never closed the trickling peer")
			// The write fails once the server has closed; the close
			// callback then ends the loop.
			_, _ = nc.Write(frame[i : i+1])
		}
	}
}

func TestServerKeepsPeerSendingFrames(t *testing.T) {
	// The same trickle in whole frames keeps the connection up.
	const timeout = 500 * time.Millisecond
	closed := make(chan error, 1)
	nc := helloPeer(t, timeout, closed)
	ping := appendFrame(nil, framePing, []byte("x"))
	for range 4 * timeout / (20 * time.Millisecond) {
		_, err := nc.Write(ping)
		require.NoError(t, err)
		select {
		case err := <-closed:
			t.Fatalf("closed while pinging: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func TestClientDisconnectCauseAfterClose(t *testing.T) {
	// The server hangs up as soon as it reads the close frame, sometimes
	// before the client has finished closing: the cause must still be the
	// client's own Close.
	_, addr := startServer(t)
	for i := range 20 {
		causes := make(chan error, 1)
		c := newTestClient(t, addr, WithOnDisconnect(func(err error) { causes <- err }))
		require.NoError(t, c.WaitConnected(testContext(t)))
		require.NoError(t, c.Close())
		err := recv(t, causes)
		require.True(t, errors.Is(err, ErrClosed), "round %d: %v", i, err)
	}
}
