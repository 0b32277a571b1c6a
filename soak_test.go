package vgo

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/vgonet/vgo/vgotest"
)

var soakFor = flag.Duration("soak", 3*time.Second, "how long TestSoak injects faults; from 30s on, TestHAProxyIdleDefaults runs too")

// soakMessage is a numbered message whose body is derived from its number,
// so the receiver can tell corruption from a different message.
func soakMessage(client uint32, seq uint64) []byte {
	p := make([]byte, 12+int(seq%64))
	binary.BigEndian.PutUint32(p, client)
	binary.BigEndian.PutUint64(p[4:], seq)
	for i := 12; i < len(p); i++ {
		p[i] = byte(seq*31 + uint64(i))
	}
	return p
}

func parseSoakMessage(p []byte) (client uint32, seq uint64, err error) {
	if len(p) < 12 {
		return 0, 0, fmt.Errorf("message of %d bytes", len(p))
	}
	client, seq = binary.BigEndian.Uint32(p), binary.BigEndian.Uint64(p[4:])
	if want := soakMessage(client, seq); string(want) != string(p) {
		return 0, 0, fmt.Errorf("client %d message %d is corrupted", client, seq)
	}
	return client, seq, nil
}

// soakSender is one client's side of the soak: what it sent, on which
// connection, and what failed.
type soakSender struct {
	client *Client
	gen    atomic.Int64 // connections made so far
	mu     sync.Mutex
	sentOn map[uint64]int64 // seq -> connection it was queued on
	failed int
	next   uint64
}

func TestSoak(t *testing.T) {
	// Clients send numbered messages through the fault proxy while random
	// faults hit it. Every message must arrive intact, once, in order
	// within its connection, or be reported: by an error from Send, or by
	// the loss of the connection it was queued on. Across connections order
	// is not promised: a frozen connection that thaws after the client has
	// moved on can still deliver its old messages. At the end goroutines and memory are back to where
	// they started.
	if testing.Short() {
		t.Skip("soak")
	}
	const clients = 8
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	goroutinesBefore := runtime.NumGoroutine()

	var mu sync.Mutex
	delivered := make(map[uint32]map[uint64]bool)
	last := make(map[uint64]uint64) // by server connection: order holds within one
	var problems []string
	srv, addr := startServer(t, WithHandler(func(c *Conn, msg []byte) {
		client, seq, err := parseSoakMessage(msg)
		mu.Lock()
		defer mu.Unlock()
		prev, seen := last[c.ID()]
		switch {
		case err != nil:
			problems = append(problems, err.Error())
		case delivered[client][seq]:
			problems = append(problems, fmt.Sprintf("client %d message %d delivered twice", client, seq))
		case seen && seq < prev:
			problems = append(problems, fmt.Sprintf("client %d message %d after %d on one connection", client, seq, prev))
		default:
			delivered[client][seq] = true
			last[c.ID()] = seq
		}
	}), WithHeartbeatTimeout(time.Second))
	proxy := newProxy(t, addr)

	senders := make([]*soakSender, clients)
	for i := range senders {
		s := &soakSender{sentOn: make(map[uint64]int64)}
		delivered[uint32(i)] = make(map[uint64]bool)
		s.client = newTestClient(t, proxy.Addr(),
			WithPingInterval(20*time.Millisecond), WithPongTimeout(150*time.Millisecond),
			WithBackoff(Backoff{BaseDelay: 5 * time.Millisecond, MaxDelay: 50 * time.Millisecond}),
			WithOnConnect(func(net.Addr) { s.gen.Add(1) }))
		senders[i] = s
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, s := range senders {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				s.send(t, uint32(i))
			}
		})
	}

	faults := injectFaults(t, proxy, *soakFor)
	close(stop)
	wg.Wait()
	proxy.Thaw()
	proxy.SetLatency(vgotest.ClientToServer, 0)
	proxy.SetLatency(vgotest.ServerToClient, 0)
	proxy.ResetAfter(vgotest.ClientToServer, 0)

	// A last message that gets through on a connection that stays up
	// shows that everything queued on that connection before it arrived.
	// A connection left half-open by the faults may still swallow one: then
	// the client finds out by heartbeat, reconnects, and sends another.
	isDelivered := func(client uint32, seq uint64) bool {
		mu.Lock()
		defer mu.Unlock()
		return delivered[client][seq]
	}
	deadline := time.Now().Add(waitFor)
	for i, s := range senders {
		for {
			require.Less(t, time.Now(), deadline, "client %d never got a last message through", i)
			require.NoError(t, s.client.WaitConnected(testContext(t)))
			seq, ok := s.send(t, uint32(i))
			if !ok {
				continue
			}
			arrived := false
			for end := time.Now().Add(time.Second); !arrived && time.Now().Before(end); {
				time.Sleep(time.Millisecond)
				arrived = isDelivered(uint32(i), seq)
			}
			if arrived {
				break
			}
		}
	}

	// The handler takes mu, and Close waits for the handlers: mu is let go
	// before the server is closed.
	mu.Lock()
	assert.Empty(t, problems)
	var sent, got, failed, lostWithConn int
	for i, s := range senders {
		s.mu.Lock()
		final := s.gen.Load()
		for seq, gen := range s.sentOn {
			if delivered[uint32(i)][seq] {
				continue
			}
			if gen >= final {
				t.Errorf("client %d message %d was lost on the connection that stayed up", i, seq)
			}
			lostWithConn++
		}
		sent += int(s.next)
		got += len(delivered[uint32(i)])
		failed += s.failed
		s.mu.Unlock()
	}
	stats := proxy.Stats()
	t.Logf("soak %v: %d faults, %d connections, %d messages sent: %d delivered, %d failed at Send, %d lost with their connection",
		*soakFor, faults, stats.Accepted, sent, got, failed, lostWithConn)
	assert.Equal(t, sent, got+failed+lostWithConn)
	assert.Positive(t, got)
	mu.Unlock()

	for _, s := range senders {
		require.NoError(t, s.client.Close())
	}
	require.NoError(t, srv.Close())
	require.NoError(t, proxy.Close())
	goroutinesAfter := settleGoroutines(goroutinesBefore)
	assert.LessOrEqual(t, goroutinesAfter, goroutinesBefore)
	// The bookkeeping is not the library's memory; the clients' callbacks,
	// which the test cleanup still holds, point at it.
	for _, s := range senders {
		s.sentOn = nil
	}
	delivered = nil
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	t.Logf("soak: goroutines %d before, %d after; heap in use %d KiB before, %d KiB after",
		goroutinesBefore, goroutinesAfter, before.HeapInuse>>10, after.HeapInuse>>10)
	assert.Less(t, int64(after.HeapInuse)-int64(before.HeapInuse), int64(16<<20))
}

// send sends the sender's next message and reports its number and whether
// Send accepted it.
func (s *soakSender) send(t *testing.T, client uint32) (uint64, bool) {
	s.mu.Lock()
	seq := s.next
	s.next++
	s.mu.Unlock()
	gen := s.gen.Load()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	err := s.client.Send(ctx, soakMessage(client, seq))
	cancel()
	if errors.Is(err, ErrNotConnected) {
		// Wait for the next connection instead of spinning on failures.
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		_ = s.client.WaitConnected(ctx)
		cancel()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.failed++
		return seq, false
	}
	s.sentOn[seq] = gen
	return seq, true
}

// injectFaults hits the proxy with random faults for d and returns how many.
func injectFaults(t *testing.T, proxy *vgotest.Proxy, d time.Duration) int {
	t.Helper()
	rnd := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	deadline := time.Now().Add(d)
	n := 0
	for ; time.Now().Before(deadline); n++ {
		links := proxy.Links()
		switch rnd.IntN(6) {
		case 0:
			if len(links) > 0 {
				links[rnd.IntN(len(links))].Cut()
			}
		case 1:
			proxy.Freeze()
			time.Sleep(time.Duration(50+rnd.IntN(250)) * time.Millisecond)
			proxy.Thaw()
		case 2:
			proxy.SetLatency(vgotest.ServerToClient, time.Duration(rnd.IntN(200))*time.Millisecond)
		case 3:
			if len(links) > 0 {
				links[rnd.IntN(len(links))].ResetAfter(vgotest.ClientToServer, int64(rnd.IntN(64<<10)))
			}
		case 4:
			if len(links) > 0 {
				links[rnd.IntN(len(links))].DropServer()
			}
		case 5:
			proxy.SetLatency(vgotest.ServerToClient, 0)
		}
		// The faults are paced so that each has time to play out; the
		// pause is part of the fault pattern, not a wait for an event.
		time.Sleep(time.Duration(20+rnd.IntN(100)) * time.Millisecond)
	}
	return n
}
