package vgo

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// freeAddr returns a loopback address that nothing listens on yet.
func freeAddr(t *testing.T) string {
	t.Helper()
	l := listen(t)
	addr := l.Addr().String()
	l.Close()
	return addr
}

// collectingServer serves on addr and returns a channel of every message
// received, as strings, in order.
func collectingServer(t *testing.T, addr string) <-chan string {
	t.Helper()
	got := make(chan string, 100)
	l, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	startServerOn(t, l, WithHandler(func(_ *Conn, msg []byte) { got <- string(msg) }))
	return got
}

func TestSendBufferFailNew(t *testing.T) {
	addr := freeAddr(t)
	c := newTestClient(t, addr, WithSendBuffer(3, 1<<10, BufferFailNew))
	ctx := testContext(t)
	for _, m := range []string{"a", "b", "c"} {
		require.NoError(t, c.Send(ctx, []byte(m)))
	}
	assert.ErrorIs(t, c.Send(ctx, []byte("d")), ErrBufferFull)
	assert.ErrorIs(t, c.Send(ctx, make([]byte, 2<<10)), ErrBufferFull, "larger than the whole buffer")

	got := collectingServer(t, addr)
	require.NoError(t, c.WaitConnected(ctx))
	require.NoError(t, c.Send(ctx, []byte("new")))
	for _, want := range []string{"a", "b", "c", "new"} {
		assert.Equal(t, want, recv(t, got), "buffered messages first, in order, then new ones")
	}
	st := c.Stats()
	assert.Equal(t, uint64(2), st.Rejected)
	assert.Zero(t, st.Dropped)
	assert.Equal(t, uint64(4), st.MessagesOut)
}

func TestSendBufferDropOldest(t *testing.T) {
	addr := freeAddr(t)
	c := newTestClient(t, addr, WithSendBuffer(2, 1<<10, BufferDropOldest))
	ctx := testContext(t)
	for _, m := range []string{"a", "b", "c"} {
		require.NoError(t, c.Send(ctx, []byte(m)))
	}
	got := collectingServer(t, addr)
	assert.Equal(t, "b", recv(t, got))
	assert.Equal(t, "c", recv(t, got))
	assert.Equal(t, uint64(1), c.Stats().Dropped)
}

func TestSendBufferBytesBound(t *testing.T) {
	addr := freeAddr(t)
	c := newTestClient(t, addr, WithSendBuffer(100, 10, BufferDropOldest))
	ctx := testContext(t)
	for _, m := range []string{"aaaa", "bbbb", "cccc"} {
		require.NoError(t, c.Send(ctx, []byte(m)))
	}
	got := collectingServer(t, addr)
	assert.Equal(t, "bbbb", recv(t, got), "12 bytes do not fit in 10: the oldest goes")
	assert.Equal(t, "cccc", recv(t, got))
}

func TestSendBufferBlock(t *testing.T) {
	addr := freeAddr(t)
	c := newTestClient(t, addr, WithSendBuffer(1, 1<<10, BufferBlock))
	require.NoError(t, c.Send(testContext(t), []byte("a")))

	short, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, c.Send(short, []byte("lost")), context.DeadlineExceeded)

	sent := make(chan error, 1)
	go func() { sent <- c.Send(testContext(t), []byte("b")) }()
	got := collectingServer(t, addr)
	require.NoError(t, recv(t, sent), "the blocked Send goes through once connected")
	assert.Equal(t, "a", recv(t, got))
	assert.Equal(t, "b", recv(t, got))
	assert.Equal(t, uint64(1), c.Stats().Rejected)
}

func TestSendBufferBlockedSendEndsWithClient(t *testing.T) {
	c := newTestClient(t, freeAddr(t), WithSendBuffer(1, 1<<10, BufferBlock))
	require.NoError(t, c.Send(testContext(t), []byte("a")))
	sent := make(chan error, 1)
	go func() { sent <- c.Send(context.Background(), []byte("b")) }()
	require.NoError(t, c.Close())
	assert.ErrorIs(t, recv(t, sent), ErrClosed)
}

func TestSendBufferValidation(t *testing.T) {
	for name, opt := range map[string]ClientOption{
		"no messages":    WithSendBuffer(0, 10, BufferFailNew),
		"no bytes":       WithSendBuffer(10, -1, BufferFailNew),
		"unknown policy": WithSendBuffer(10, 10, BufferPolicy(9)),
	} {
		_, err := NewClient("127.0.0.1:1", opt)
		assert.ErrorIs(t, err, ErrInvalidOption, name)
	}
}

func TestSendBufferBacklogMeetsAnsweringServer(t *testing.T) {
	// A backlog larger than the socket buffers goes to an echo server: the
	// client reads the echoes while it writes, so neither side stalls and
	// every message arrives, in order.
	const messages = 400
	addr := freeAddr(t)
	echoed := make(chan int, messages)
	disconnects := make(chan error, 10)
	c := newTestClient(t, addr, WithSendBuffer(messages, messages<<14, BufferFailNew),
		WithWriteTimeout(2*time.Second),
		WithOnMessage(func(msg []byte) { echoed <- int(msg[0]) | int(msg[1])<<8 }),
		WithOnDisconnect(func(err error) { disconnects <- err }))
	for i := range messages {
		msg := make([]byte, 16<<10)
		msg[0], msg[1] = byte(i), byte(i>>8)
		require.NoError(t, c.Send(testContext(t), msg))
	}
	l, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	startServerOn(t, l, echoHandler(t))
	for i := range messages {
		require.Equal(t, i, recv(t, echoed))
	}
	assert.Empty(t, disconnects)
}

func TestCloseWhileBacklogBlocked(t *testing.T) {
	// The server reads nothing, so the backlog fills the connection and
	// stops; Close must still return promptly.
	l := listen(t)
	connected := make(chan struct{}, 1)
	c := newTestClient(t, l.Addr().String(), WithSendBuffer(1000, 64<<20, BufferFailNew),
		WithOnConnect(func(net.Addr) {
			select {
			case connected <- struct{}{}:
			default:
			}
		}))
	// Until the server answers the hello the client is not connected, so
	// all of these are buffered.
	for range 1000 {
		require.NoError(t, c.Send(testContext(t), make([]byte, 16<<10)))
	}
	stop := make(chan struct{})
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		nc, err := l.Accept()
		if err != nil {
			return
		}
		defer nc.Close()
		if _, err := acceptHello(nc); err == nil {
			<-stop
		}
	}()
	t.Cleanup(func() {
		close(stop)
		<-accepted
	})
	recv(t, connected)
	closeWithin(t, c, 2*closeFrameTimeout+time.Second)
}

func TestSendDuringCloseReportsClosed(t *testing.T) {
	// A Send blocked on a connection that stopped draining returns
	// ErrClosed when the client closes, never nil.
	stop := make(chan struct{})
	rs := newRawServer(t, func(nc net.Conn) {
		if _, err := acceptHello(nc); err == nil {
			<-stop
		}
	})
	t.Cleanup(func() { close(stop) })
	// No pings: the silent server must not be dropped before the sends
	// fill the queue.
	c := newTestClient(t, rs.addr(), WithSendBuffer(10, 1<<20, BufferFailNew), WithWriteTimeout(time.Hour),
		WithPingInterval(-1))
	require.NoError(t, c.WaitConnected(testContext(t)))
	last := make(chan error, 1)
	go func() {
		var err error
		for err == nil {
			err = c.Send(context.Background(), make([]byte, 16<<10))
		}
		last <- err
	}()
	// More than the send queue holds: the sender is blocked or about to be.
	require.Eventually(t, func() bool { return c.Stats().MessagesOut > sendQueueLimit/(16<<10) }, waitFor, time.Millisecond)
	require.NoError(t, c.Close())
	assert.ErrorIs(t, recv(t, last), ErrClosed)
}

func TestSendBufferDropsWhatTheServerRefuses(t *testing.T) {
	// A message buffered before the server said it accepts at most 100
	// bytes is dropped and counted, and the rest of the backlog goes on.
	addr := freeAddr(t)
	c := newTestClient(t, addr, WithSendBuffer(10, 1<<10, BufferFailNew))
	ctx := testContext(t)
	for _, m := range []string{"a", string(make([]byte, 200)), "b"} {
		require.NoError(t, c.Send(ctx, []byte(m)))
	}
	got := make(chan string, 10)
	l, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	startServerOn(t, l, WithMaxFrameSize(100), WithHandler(func(_ *Conn, msg []byte) { got <- string(msg) }))
	require.NoError(t, c.WaitConnected(ctx))
	require.NoError(t, c.Send(ctx, []byte("new")))
	for _, want := range []string{"a", "b", "new"} {
		assert.Equal(t, want, recv(t, got))
	}
	assert.EqualValues(t, 1, c.Stats().Rejected)
	assert.Zero(t, c.Stats().Reconnects, "the refused message cost the connection")
}
