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
