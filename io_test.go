package vgo

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Tests of how a link uses its socket: writes made on the sender's
// goroutine, and reads that hold no buffer while the connection is idle.

func TestPartialWriteResumesWhereItStopped(t *testing.T) {
	// Whatever part of a write the socket takes, the writer goes on from
	// the next byte, and nothing queued meanwhile cuts in: the bytes out
	// are the frames, whole and in order.
	ping := appendFrame(nil, framePing, []byte("12345678"))
	pong := appendFrame(nil, framePong, []byte("abcdefgh"))
	data := appendFrame(appendFrame(nil, frameData, []byte("first")), frameData, []byte("second"))
	late := appendFrame(nil, framePing, []byte("late...."))
	want := bytes.Join([][]byte{ping, pong, data, late}, nil)
	for n := 0; n <= len(ping)+len(pong)+len(data); n++ {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			l := &link{ackAt: -1, writing: true}
			l.beats = append(append([]byte{}, ping...), pong...)
			l.stream = &buffer{b: append([]byte{}, data...)}
			var out []byte
			beats, piece := l.takeLocked()
			out = append(append(out, beats...), piece...)[:n]
			l.wroteLocked(beats, piece, n)
			// A ping queued while the socket was full waits its turn.
			l.beats = append(l.beats, late...)
			for l.hasWorkLocked() {
				beats, piece := l.takeLocked()
				require.NotZero(t, len(beats)+len(piece))
				out = append(append(out, beats...), piece...)
				l.wroteLocked(beats, piece, len(beats)+len(piece))
			}
			assert.Equal(t, want, out)
		})
	}
}

func TestDirectWriteRefusedGoesToWriter(t *testing.T) {
	// A direct write that the socket refuses before trying, here for a
	// write deadline that has passed, leaves its frames to the writer
	// goroutine, which writes them under a deadline of its own.
	conns := make(chan *Conn, 1)
	_, addr := startServer(t, WithOnConnOpen(func(c *Conn) { conns <- c }))
	r := dialHello(t, addr)
	c := <-conns
	require.NotNil(t, c.l.rc, "a plain TCP connection writes directly")
	require.NoError(t, c.l.nc.SetWriteDeadline(time.Now().Add(-time.Second)))
	for i := range 3 {
		payload := []byte(fmt.Sprintf("ping %03d", i))
		r.send(framePing, payload)
		ft, p := r.next()
		require.Equal(t, framePong, ft)
		require.Equal(t, payload, p)
	}
}

func TestDirectWriteHandsTheRestToWriter(t *testing.T) {
	// A reply longer than the socket takes at once goes out in part from
	// the handler's goroutine, and the writer goroutine sends the rest; a
	// pong asked for meanwhile follows it, both whole.
	msg := make([]byte, 900<<10)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	_, addr := startServer(t, WithHandler(func(c *Conn, _ []byte) { _ = c.Send(context.Background(), msg) }))
	r := dialHello(t, addr)
	r.send(frameData, []byte("go"))
	// Once the reply has begun, a pong can only follow it.
	require.NoError(t, r.nc.SetReadDeadline(time.Now().Add(waitFor)))
	_, err := r.fr.peek(headerSize)
	require.NoError(t, err)
	r.send(framePing, []byte("12345678"))
	ft, p := r.next()
	require.Equal(t, frameData, ft)
	require.Equal(t, msg, p)
	ft, p = r.next()
	require.Equal(t, framePong, ft)
	require.Equal(t, []byte("12345678"), p)
}

func TestIdleConnectionsHoldNoReadBuffer(t *testing.T) {
	// The server's side of an idle connection, once it has read a long
	// message and answered a ping, holds less memory than its read buffer
	// alone would take.
	const n = 300
	s, addr := startServer(t, WithHandler(func(c *Conn, _ []byte) { _ = c.Send(context.Background(), []byte("ok")) }))
	// Clients that read into a small buffer of their own, so that the
	// heap grows by the server's side of each connection and little more.
	before, _ := heapInUse()
	// A long message last: the buffer it was read into goes back too.
	first := appendFrame(rawHello(ProtocolVersion), framePing, make([]byte, 8))
	clients := dialMany(t, addr, n, appendFrame(first, frameData, make([]byte, 3*readBufferSize)))
	for _, nc := range clients {
		require.NoError(t, nc.SetReadDeadline(time.Now().Add(waitFor)))
		var b [256]byte
		got := 0
		// The pong, then the reply to the long message.
		for got == 0 || !bytes.HasSuffix(b[:got], appendFrame(nil, frameData, []byte("ok"))) {
			m, err := nc.Read(b[got:])
			require.NoError(t, err)
			got += m
		}
	}
	require.Equal(t, n, s.Len())
	after, _ := heapInUse()
	perConn := (float64(after) - float64(before)) / n
	t.Logf("heap per idle connection: %.0f B", perConn)
	assert.Less(t, perConn, float64(readBufferSize), "idle connections hold their read buffers")
}

func TestUnreadPutsBytesBack(t *testing.T) {
	for _, tc := range []struct {
		name  string
		first int // bytes read through the reader before unread
	}{
		{"still in the buffer", 10},
		{"buffer refilled", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stream := []byte("0123456789abcdefghijklmnopqrstuvwxyz")
			r := newFrameReader(bytes.NewReader(stream), 0)
			head := make([]byte, tc.first)
			_, err := io.ReadFull(r, head)
			require.NoError(t, err)
			back := []byte("6789")
			if tc.first == 0 {
				back = []byte("??") // bytes the buffer never held
			}
			r.unread(back)
			rest, err := io.ReadAll(r)
			require.NoError(t, err)
			want := append(append([]byte{}, back...), stream[tc.first:]...)
			assert.Equal(t, string(want), string(rest))
		})
	}
}

func TestStaleCountsFromTheLastFrame(t *testing.T) {
	// The server moves its socket's read deadline lazily, behind the
	// heartbeat deadline; a peer that falls silent is still dropped a
	// full timeout after its last frame, not earlier.
	const timeout = 600 * time.Millisecond
	closed := make(chan error, 1)
	_, addr := startServer(t, WithHeartbeatTimeout(timeout), WithOnConnClose(func(_ *Conn, err error) { closed <- err }))
	r := dialHello(t, addr)
	for range 3 {
		time.Sleep(timeout / 8) // the peer's pace: a ping well within the timeout
		r.send(framePing, make([]byte, 8))
		ft, _ := r.next()
		require.Equal(t, framePong, ft)
	}
	last := time.Now()
	err := recv(t, closed)
	silent := time.Since(last)
	require.ErrorIs(t, err, ErrHeartbeatTimeout)
	// Less a margin for the pong's trip: last is taken after it.
	assert.GreaterOrEqual(t, silent, timeout-timeout/6, "dropped before a timeout of silence")
	t.Logf("dropped after %v of silence", silent)
}

// countingConn is a TCP connection whose own Read and Write count their
// calls, as a wrapper that meters or logs its traffic would.
type countingConn struct {
	*net.TCPConn
	reads, writes *atomic.Int64
}

func (c countingConn) Read(p []byte) (int, error) {
	c.reads.Add(1)
	return c.TCPConn.Read(p)
}

func (c countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.TCPConn.Write(p)
}

func TestWrappedConnectionIsNotBypassed(t *testing.T) {
	// Only a plain TCP connection is written and read through its raw
	// socket: a type that wraps one sees every byte go through its own
	// Read and Write.
	var reads, writes atomic.Int64
	_, addr := startServer(t, WithHandler(mirror))
	got := make(chan struct{}, 1)
	c := newTestClient(t, addr, WithOnMessage(func([]byte) { got <- struct{}{} }),
		WithDialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			nc, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return countingConn{TCPConn: nc.(*net.TCPConn), reads: &reads, writes: &writes}, nil
		}))
	require.NoError(t, c.WaitConnected(testContext(t)))
	before := writes.Load()
	for range 3 {
		require.NoError(t, c.Send(testContext(t), []byte("metered")))
		recv(t, got)
	}
	assert.GreaterOrEqual(t, writes.Load()-before, int64(3), "writes that bypassed the wrapper")
	assert.GreaterOrEqual(t, reads.Load(), int64(4), "reads that bypassed the wrapper")
}

// dialMany opens n plain connections to addr, each of which writes first
// at once; they close with the test.
func dialMany(t *testing.T, addr string, n int, first []byte) []net.Conn {
	t.Helper()
	clients := make([]net.Conn, n)
	for i := range clients {
		nc, err := net.DialTimeout("tcp", addr, waitFor)
		require.NoError(t, err)
		t.Cleanup(func() { nc.Close() })
		_, err = nc.Write(first)
		require.NoError(t, err)
		clients[i] = nc
	}
	return clients
}
