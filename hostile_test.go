package vgo

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHostilePeersDoNotHurtGoodClient(t *testing.T) {
	// A thousand peers send random bytes at a live server while a
	// well-behaved client keeps its heartbeat and its replies: the server
	// drops each bad peer, never the good client, and memory stays bounded.
	if testing.Short() {
		t.Skip("1000 peers")
	}
	const peers, concurrent = 1000, 200
	srv, addr := startServer(t, echoHandler(t), WithHandshakeTimeout(time.Second))
	disconnects := make(chan error, 10)
	replies := make(chan struct{}, 1000)
	good := newTestClient(t, addr,
		WithPingInterval(50*time.Millisecond), WithPongTimeout(2*time.Second),
		WithOnDisconnect(func(err error) { disconnects <- err }),
		WithOnMessage(func([]byte) { replies <- struct{}{} }))
	require.NoError(t, good.WaitConnected(testContext(t)))

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	var peak atomic.Uint64
	stopSampling := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Go(func() {
		ticker := time.NewTicker(5 * time.Millisecond)
		defer ticker.Stop()
		var m runtime.MemStats
		for {
			select {
			case <-stopSampling:
				return
			case <-ticker.C:
				runtime.ReadMemStats(&m)
				if m.HeapInuse > peak.Load() {
					peak.Store(m.HeapInuse)
				}
			}
		}
	})

	var stalled, dropped atomic.Int32
	var wg sync.WaitGroup
	slots := make(chan struct{}, concurrent)
	for i := range peers {
		slots <- struct{}{}
		wg.Go(func() {
			defer func() { <-slots }()
			rnd := rand.New(rand.NewPCG(uint64(i), 7))
			garbage := make([]byte, 2048)
			for j := range garbage {
				garbage[j] = byte(rnd.Uint32())
			}
			if garbageIsDropped(addr, garbage) {
				dropped.Add(1)
			} else {
				stalled.Add(1)
			}
		})
		if i%50 == 0 {
			// The good client is served throughout.
			require.NoError(t, good.Send(testContext(t), []byte("still here")))
			recv(t, replies)
		}
	}
	wg.Wait()
	close(stopSampling)
	sampler.Wait()

	assert.Equal(t, int32(peers), dropped.Load(), "%d peers were never dropped", stalled.Load())
	assert.Empty(t, disconnects, "the good client was disconnected")
	assert.Equal(t, StateConnected, good.State())
	require.Eventually(t, func() bool { return srv.Len() == 1 }, waitFor, time.Millisecond)
	grew := int64(peak.Load()) - int64(before.HeapInuse)
	t.Logf("%d hostile peers dropped; heap in use grew by at most %d KiB", peers, grew>>10)
	assert.Less(t, grew, int64(64<<20), "memory under attack is not bounded")
}

// garbageIsDropped sends garbage to the server and reports whether the
// server closed the connection, rather than leaving it to time out.
func garbageIsDropped(addr string, garbage []byte) bool {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return false
	}
	defer nc.Close()
	if err := nc.SetDeadline(time.Now().Add(waitFor)); err != nil {
		return false
	}
	// The server may close before it has read everything: a failed write
	// is expected.
	_, _ = nc.Write(garbage)
	_, err = io.Copy(io.Discard, nc)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

func TestSendAfterServerClosedConnection(t *testing.T) {
	// A write to a connection the server has dropped fails or is lost, but
	// never blocks or panics, and the client reports a single disconnect.
	lost := make(chan error, 10)
	_, addr := startServer(t, WithOnConnOpen(func(c *Conn) { assert.NoError(t, c.Close()) }))
	c := newTestClient(t, addr, WithBackoff(Backoff{BaseDelay: time.Hour}),
		WithOnDisconnect(func(err error) { lost <- err }))
	var ce *CloseError
	require.ErrorAs(t, recv(t, lost), &ce)
	for range 100 {
		err := c.Send(context.Background(), []byte("x"))
		require.ErrorIs(t, err, ErrNotConnected)
	}
	assert.Empty(t, lost)
}
