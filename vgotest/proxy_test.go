package vgotest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// transfer sends data through c to an echo server while reading the echo
// back, and returns what came back.
func transfer(c net.Conn, data []byte) ([]byte, error) {
	if err := c.SetDeadline(time.Now().Add(waitFor)); err != nil {
		return nil, err
	}
	written := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		written <- err
	}()
	got := make([]byte, len(data))
	_, rerr := io.ReadFull(c, got)
	return got, errors.Join(<-written, rerr)
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return b
}

// echoThrough sends size random bytes on each of conns connections to addr
// at once, checks that each gets them back unchanged, and closes the
// connections if asked to.
func echoThrough(t *testing.T, addr string, conns, size int, closeAfter bool) {
	t.Helper()
	var wg sync.WaitGroup
	for range conns {
		c := dial(t, addr)
		data := randomBytes(t, size)
		wg.Go(func() {
			got, err := transfer(c, data)
			if assert.NoError(t, err) {
				assert.True(t, bytes.Equal(data, got), "echo differs from what was sent")
			}
			if closeAfter {
				c.Close()
			}
		})
	}
	wg.Wait()
}

func TestForwardsManyConnections(t *testing.T) {
	const conns, size = 20, 256 << 10
	p := newProxy(t, startEcho(t))

	echoThrough(t, p.Addr(), conns, size, true)

	require.NoError(t, p.WaitLinks(testContext(t), 0))
	assert.Equal(t, Stats{
		Accepted:       conns,
		ClosedByClient: conns,
		ClientToServer: conns * size,
		ServerToClient: conns * size,
	}, p.Stats())
}

func TestHalfClosePassesFIN(t *testing.T) {
	p := newProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	l := linkOf(t, p, c)

	send(t, c, "bye")
	require.NoError(t, c.CloseWrite())
	got, err := readUntilError(t, c)
	require.ErrorIs(t, err, io.EOF)
	require.Equal(t, "bye", string(got))

	waitDone(t, l)
	require.Equal(t, ClosedByClient, l.ClosedBy())
}

func TestLinkDescribesConnection(t *testing.T) {
	addr, conns := startSink(t)
	p := newProxy(t, addr)

	c1 := dial(t, p.Addr())
	s1 := accepted(t, conns)
	l1 := linkOf(t, p, c1)
	c2 := dial(t, p.Addr())
	accepted(t, conns)
	l2 := linkOf(t, p, c2)

	assert.Equal(t, 1, l1.ID())
	assert.Equal(t, 2, l2.ID())
	assert.Equal(t, []*Link{l1, l2}, p.Links())
	assert.Equal(t, c1.LocalAddr().String(), l1.ClientAddr().String())
	assert.Equal(t, s1.RemoteAddr().String(), l1.ServerAddr().String())
	assert.Equal(t, NotClosed, l1.ClosedBy())
}

func TestCut(t *testing.T) {
	t.Run("link", func(t *testing.T) {
		addr, conns := startSink(t)
		p := newProxy(t, addr)
		c := dial(t, p.Addr())
		s := accepted(t, conns)
		l := linkOf(t, p, c)
		other := dial(t, p.Addr())
		otherServer := accepted(t, conns)

		send(t, c, "a")
		expect(t, s, "a")
		l.Cut()

		_, err := readUntilError(t, c)
		require.ErrorIs(t, err, syscall.ECONNRESET, "client")
		_, err = readUntilError(t, s)
		require.ErrorIs(t, err, syscall.ECONNRESET, "server")
		waitDone(t, l)
		require.Equal(t, ClosedByProxy, l.ClosedBy())

		// Only the cut link is affected.
		send(t, other, "b")
		expect(t, otherServer, "b")
		require.Equal(t, 1, p.Stats().Live)
	})

	t.Run("proxy", func(t *testing.T) {
		p := newProxy(t, startEcho(t))
		c1 := dial(t, p.Addr())
		c2 := dial(t, p.Addr())
		require.NoError(t, p.WaitLinks(testContext(t), 2))

		p.Cut()
		for _, c := range []net.Conn{c1, c2} {
			_, err := readUntilError(t, c)
			require.ErrorIs(t, err, syscall.ECONNRESET)
		}
		require.NoError(t, p.WaitLinks(testContext(t), 0))
		require.Equal(t, 2, p.Stats().ClosedByProxy)

		// New connections go through.
		roundTrip(t, dial(t, p.Addr()), "after")
	})
}

func TestFreeze(t *testing.T) {
	p, c, s, l := linked(t)
	send(t, c, "up")
	expect(t, s, "up")
	require.NoError(t, p.Wait(testContext(t), func(s Stats) bool { return s.ClientToServer == 2 }))
	before := p.Stats()

	l.Freeze()
	send(t, c, "ping")
	send(t, s, "pong")
	expectSilence(t, s)
	expectSilence(t, c)
	// The end of a stream is held like data.
	require.NoError(t, c.CloseWrite())
	expectSilence(t, s)
	require.Equal(t, before, p.Stats(), "nothing forwarded while frozen")
	require.Equal(t, []*Link{l}, p.Links())

	l.Thaw()
	expect(t, s, "ping")
	expect(t, c, "pong")
	got, err := readUntilError(t, s)
	require.ErrorIs(t, err, io.EOF)
	require.Empty(t, got)
}

func TestFreezeHoldsReset(t *testing.T) {
	_, c, s, l := linked(t)

	l.Freeze()
	// A client dying with unread data sends a RST.
	send(t, s, "unread")
	reset(c)
	expectSilence(t, s)

	l.Thaw()
	_, err := readUntilError(t, s)
	require.ErrorIs(t, err, syscall.ECONNRESET)
	waitDone(t, l)
	require.Equal(t, ClosedByClient, l.ClosedBy())
}

func TestProxyFreezeAppliesToNewLinks(t *testing.T) {
	p := newProxy(t, startEcho(t))
	old := dial(t, p.Addr())
	roundTrip(t, old, "x")

	p.Freeze()
	c := dial(t, p.Addr())
	require.NoError(t, p.WaitLinks(testContext(t), 2))
	send(t, c, "new")
	send(t, old, "old")
	expectSilence(t, c)
	expectSilence(t, old)

	p.Thaw()
	expect(t, c, "new")
	expect(t, old, "old")
}

func TestRefuse(t *testing.T) {
	p := newProxy(t, startEcho(t))
	live := dial(t, p.Addr())
	roundTrip(t, live, "before")

	p.Refuse()
	expectReset(t, p.Addr())
	require.NoError(t, p.Wait(testContext(t), func(s Stats) bool { return s.Refused == 1 }))
	roundTrip(t, live, "during")

	p.Admit()
	roundTrip(t, dial(t, p.Addr()), "after")
	s := p.Stats()
	require.Equal(t, 3, s.Accepted)
	require.Equal(t, 1, s.Refused)
	require.Equal(t, 2, s.Live)
}

func TestDialFailure(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedPort := ln.Addr().String()
	require.NoError(t, ln.Close())

	p := newProxy(t, closedPort)
	expectReset(t, p.Addr())
	require.NoError(t, p.Wait(testContext(t), func(s Stats) bool { return s.DialFailed == 1 }))
	require.Zero(t, p.Stats().Live)
}

func TestSetTarget(t *testing.T) {
	addrA, connsA := startSink(t)
	addrB, connsB := startSink(t)
	p := newProxy(t, addrA)
	c1 := dial(t, p.Addr())
	s1 := accepted(t, connsA)
	linkOf(t, p, c1)

	p.SetTarget(addrB)
	c2 := dial(t, p.Addr())
	s2 := accepted(t, connsB)

	send(t, c1, "to A")
	expect(t, s1, "to A")
	send(t, c2, "to B")
	expect(t, s2, "to B")
}

func TestLatency(t *testing.T) {
	const latency = 30 * time.Millisecond
	p := newProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	roundTrip(t, c, "warm")

	p.SetLatency(ClientToServer, latency)
	p.SetLatency(ServerToClient, latency)
	start := time.Now()
	roundTrip(t, c, "slow")
	require.GreaterOrEqual(t, time.Since(start), 2*latency)

	// Many small writes keep their order.
	var msgs strings.Builder
	start = time.Now()
	for i := range 100 {
		msg := string(rune('a' + i%26))
		msgs.WriteString(msg)
		send(t, c, msg)
	}
	expect(t, c, msgs.String())
	require.GreaterOrEqual(t, time.Since(start), 2*latency)

	p.SetLatency(ClientToServer, 0)
	p.SetLatency(ServerToClient, 0)
	roundTrip(t, c, "fast again")
}

func TestLatencyOfOneLinkAndOfNewLinks(t *testing.T) {
	const latency = 30 * time.Millisecond
	p := newProxy(t, startEcho(t))
	first := dial(t, p.Addr())
	l := linkOf(t, p, first)

	l.SetLatency(ServerToClient, latency)
	start := time.Now()
	roundTrip(t, first, "slow")
	require.GreaterOrEqual(t, time.Since(start), latency)

	p.SetLatency(ClientToServer, latency)
	second := dial(t, p.Addr())
	start = time.Now()
	roundTrip(t, second, "slow too")
	require.GreaterOrEqual(t, time.Since(start), latency)
}

func TestBandwidth(t *testing.T) {
	const size, rate = 40_000, 200_000 // a fifth of a second
	p := newProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	roundTrip(t, c, "warm")

	p.SetBandwidth(ClientToServer, rate)
	data := randomBytes(t, size)
	start := time.Now()
	got, err := transfer(c, data)
	elapsed := time.Since(start)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got), "echo differs from what was sent")
	require.GreaterOrEqual(t, elapsed, time.Duration(size)*time.Second/rate)

	p.SetBandwidth(ClientToServer, 0)
	got, err = transfer(c, data)
	require.NoError(t, err)
	require.True(t, bytes.Equal(data, got), "echo differs from what was sent")
}

// held returns how many bytes l has read in direction d and not yet
// written.
func held(l *Link, d Direction) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.held[d]
}

func TestBandwidthBacksUpSender(t *testing.T) {
	const rate, size = 100_000, 1 << 20
	bound := queueSize(rate, 0)
	require.Equal(t, rate/4, bound)
	addr, conns := startSink(t)
	p := newProxy(t, addr)
	// Limited from its start, the link never reads more than the bound.
	p.SetBandwidth(ClientToServer, rate)
	c := dial(t, p.Addr())
	// The sender's own buffer is kept modest, as on a real host: on
	// loopback the kernel lets it grow to megabytes, which would take the
	// whole write before the proxy's queue mattered.
	require.NoError(t, c.SetWriteBuffer(64<<10))
	s := accepted(t, conns)
	l := linkOf(t, p, c)

	// The server reads at once, so the rate is the only bottleneck.
	require.NoError(t, s.SetReadDeadline(time.Now().Add(2*waitFor)))
	received := make(chan []byte, 1)
	go func() {
		got := make([]byte, size)
		n, _ := io.ReadFull(s, got)
		received <- got[:n]
	}()
	data := randomBytes(t, size)
	require.NoError(t, c.SetWriteDeadline(time.Now().Add(2*waitFor)))
	written := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		written <- err
	}()

	// A third of a second at the rate: the sender is still writing.
	most := 0
	require.Eventually(t, func() bool {
		most = max(most, held(l, ClientToServer))
		return l.Bytes(ClientToServer) >= 30_000
	}, waitFor, time.Millisecond, "less than 30 KB forwarded")
	require.LessOrEqual(t, most, bound, "held more than the bound")
	select {
	case err := <-written:
		t.Fatalf("a %d-byte write went through a %d B/s link at once (%v)", size, rate, err)
	default:
	}

	// Frozen, the link fills its short queue and holds no more.
	l.Freeze()
	require.Eventually(t, func() bool {
		h := held(l, ClientToServer)
		most = max(most, h)
		return h == bound
	}, waitFor, time.Millisecond, "the frozen link did not fill its queue")
	require.Equal(t, bound, most, "held more than the bound")
	// Only the change of rate can wake the reader now: the writer is frozen.
	l.SetBandwidth(ClientToServer, 0)
	require.Eventually(t, func() bool {
		return held(l, ClientToServer) > bound
	}, waitFor, time.Millisecond, "lifting the limit did not wake the reader")

	l.Thaw()
	require.NoError(t, <-written)
	require.True(t, bytes.Equal(data, <-received), "the server got other bytes")
}

func TestQueueSize(t *testing.T) {
	assert.Equal(t, 25_000, queueSize(100_000, 0))
	assert.Equal(t, 35_000, queueSize(100_000, 100*time.Millisecond), "latency keeps bytes in flight")
	assert.Equal(t, minQueue, queueSize(1, 0))
	assert.Equal(t, queueLen*readSize, queueSize(1<<40, time.Hour))
}

func TestDropServerDiscardsLimitedDirection(t *testing.T) {
	const rate = 1000
	addr, conns := startSink(t)
	p := newProxy(t, addr)
	p.SetBandwidth(ClientToServer, rate)
	c := dial(t, p.Addr())
	accepted(t, conns)
	l := linkOf(t, p, c)

	l.DropServer()
	// Far more than the limited direction may hold: the discarded bytes
	// must make room, or the proxy would never read the client's FIN.
	send(t, c, strings.Repeat("x", 64*queueSize(rate, 0)))
	require.NoError(t, c.CloseWrite())
	waitDone(t, l)
	require.Equal(t, ClosedByProxy, l.ClosedBy())
}

func TestResetAfter(t *testing.T) {
	const limit = 10_000
	p := newProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	l := linkOf(t, p, c)

	l.ResetAfter(ClientToServer, limit)
	data := randomBytes(t, 10*limit)
	require.NoError(t, c.SetWriteDeadline(time.Now().Add(waitFor)))
	written := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		written <- err
	}()
	got, rerr := readUntilError(t, c)
	werr := <-written
	// Whichever of the read and the write notices the RST first reports
	// ECONNRESET; the other may see a plain end of stream.
	require.True(t, errors.Is(rerr, syscall.ECONNRESET) || errors.Is(werr, syscall.ECONNRESET),
		"no ECONNRESET: read %v, write %v", rerr, werr)

	waitDone(t, l)
	require.Equal(t, ClosedByProxy, l.ClosedBy())
	sent := l.Bytes(ClientToServer)
	require.GreaterOrEqual(t, sent, int64(limit))
	require.LessOrEqual(t, sent, int64(limit+readSize))
	require.LessOrEqual(t, int64(len(got)), sent)
}

func TestProxyResetAfter(t *testing.T) {
	const limit = 1000
	p := newProxy(t, startEcho(t))
	live := dial(t, p.Addr())
	roundTrip(t, live, "before the limit")

	// The live link counts from now, new links from their start.
	p.ResetAfter(ServerToClient, limit)
	for _, c := range []net.Conn{live, dial(t, p.Addr())} {
		l := linkOf(t, p, c)
		before := l.Bytes(ServerToClient)
		send(t, c, strings.Repeat("x", 3*limit))
		got, err := readUntilError(t, c)
		require.ErrorIs(t, err, syscall.ECONNRESET)
		require.LessOrEqual(t, len(got), limit)
		waitDone(t, l)
		require.EqualValues(t, limit, l.Bytes(ServerToClient)-before)
	}

	p.ResetAfter(ServerToClient, 0)
	roundTrip(t, dial(t, p.Addr()), strings.Repeat("y", 3*limit))
}

func TestResetAfterCountsWriteInProgress(t *testing.T) {
	const limit = 1000
	p, c, s, l := linked(t)

	// The server reads nothing yet, so the proxy's write to it blocks once
	// the socket buffers are full.
	require.NoError(t, c.SetWriteDeadline(time.Now().Add(waitFor)))
	written := make(chan error, 1)
	go func() {
		_, err := c.Write(make([]byte, 64<<20))
		written <- err
	}()
	// Bytes counts a piece from before its write, Stats once it is written,
	// so Bytes exceeds Stats while a write is in progress. One that stays
	// so for a while is blocked, and stays blocked while the server does
	// not read.
	var (
		last   int64
		stable int
	)
	require.Eventually(t, func() bool {
		b := l.Bytes(ClientToServer)
		if b != last || b <= p.Stats().ClientToServer {
			last, stable = b, 0
			return false
		}
		stable++
		return stable == 10
	}, waitFor, 10*time.Millisecond, "no write to the server blocked")
	before := l.Bytes(ClientToServer)
	l.ResetAfter(ClientToServer, limit)
	require.Equal(t, before, l.Bytes(ClientToServer), "a piece was committed during ResetAfter")
	require.Less(t, p.Stats().ClientToServer, before, "no write in progress during ResetAfter")

	_, err := readUntilError(t, s)
	require.ErrorIs(t, err, syscall.ECONNRESET)
	require.Error(t, <-written)
	waitDone(t, l)
	require.Equal(t, ClosedByProxy, l.ClosedBy())
	require.EqualValues(t, before+limit, l.Bytes(ClientToServer))
}

func TestDropServer(t *testing.T) {
	addr, conns := startSink(t)
	p := newProxy(t, addr)
	c := dial(t, p.Addr())
	s := accepted(t, conns)
	l := linkOf(t, p, c)
	send(t, c, "a")
	expect(t, s, "a")

	l.DropServer()
	_, err := readUntilError(t, s)
	require.ErrorIs(t, err, syscall.ECONNRESET, "server")
	// The client is not told: writes succeed and reads stay unanswered.
	send(t, c, "anyone there?")
	expectSilence(t, c)
	select {
	case <-l.Done():
		t.Fatal("link ended while the client kept its connection")
	default:
	}

	require.NoError(t, c.Close())
	waitDone(t, l)
	require.Equal(t, ClosedByProxy, l.ClosedBy())
	require.Equal(t, 1, p.Stats().ClosedByProxy)

	// The same for every live link at once.
	c1 := dial(t, p.Addr())
	s1 := accepted(t, conns)
	c2 := dial(t, p.Addr())
	s2 := accepted(t, conns)
	require.NoError(t, p.WaitLinks(testContext(t), 2))
	p.DropServer()
	for _, s := range []net.Conn{s1, s2} {
		_, err := readUntilError(t, s)
		require.ErrorIs(t, err, syscall.ECONNRESET, "server")
	}
	expectSilence(t, c1)
	expectSilence(t, c2)
}

func TestStatsCountClosers(t *testing.T) {
	addr, conns := startSink(t)
	p := newProxy(t, addr)

	// The client closes first.
	c := dial(t, p.Addr())
	s := accepted(t, conns)
	l := linkOf(t, p, c)
	send(t, c, "abc")
	expect(t, s, "abc")
	send(t, s, "de")
	expect(t, c, "de")
	require.NoError(t, c.Close())
	_, err := readUntilError(t, s)
	require.ErrorIs(t, err, io.EOF)
	require.NoError(t, s.Close())
	waitDone(t, l)
	require.Equal(t, ClosedByClient, l.ClosedBy())

	// The server closes first.
	c = dial(t, p.Addr())
	s = accepted(t, conns)
	l = linkOf(t, p, c)
	require.NoError(t, s.Close())
	_, err = readUntilError(t, c)
	require.ErrorIs(t, err, io.EOF)
	require.NoError(t, c.Close())
	waitDone(t, l)
	require.Equal(t, ClosedByServer, l.ClosedBy())

	// The proxy cuts.
	c = dial(t, p.Addr())
	accepted(t, conns)
	l = linkOf(t, p, c)
	l.Cut()
	waitDone(t, l)

	require.Equal(t, Stats{
		Accepted:       3,
		ClosedByClient: 1,
		ClosedByServer: 1,
		ClosedByProxy:  1,
		ClientToServer: 3,
		ServerToClient: 2,
	}, p.Stats())
}

func TestStrings(t *testing.T) {
	assert.Equal(t, "client->server", ClientToServer.String())
	assert.Equal(t, "server->client", ServerToClient.String())
	assert.Equal(t, "Direction(7)", Direction(7).String())
	assert.Equal(t, "not closed", NotClosed.String())
	assert.Equal(t, "closed by client", ClosedByClient.String())
	assert.Equal(t, "closed by server", ClosedByServer.String())
	assert.Equal(t, "closed by proxy", ClosedByProxy.String())
	assert.Equal(t, "Closer(9)", Closer(9).String())
}

func TestWait(t *testing.T) {
	p, err := NewProxy(startEcho(t))
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(context.Background(), silence)
	defer cancel()
	err = p.WaitLinks(ctx, 1)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Contains(t, err.Error(), "Live:0")

	ctx = testContext(t)
	waited := make(chan error, 1)
	go func() { waited <- p.WaitLinks(ctx, 3) }()
	for range 3 {
		dial(t, p.Addr())
	}
	require.NoError(t, <-waited)

	require.NoError(t, p.Close())
	require.ErrorIs(t, p.WaitLinks(testContext(t), 3), net.ErrClosed)
	require.NoError(t, p.WaitLinks(testContext(t), 0))
}

func TestClose(t *testing.T) {
	p, err := NewProxy(startEcho(t))
	require.NoError(t, err)
	c := dial(t, p.Addr())
	roundTrip(t, c, "x")

	// A frozen link with a client blocked writing into it.
	p.Freeze()
	blocked := dial(t, p.Addr())
	require.NoError(t, p.WaitLinks(testContext(t), 2))
	// More than the proxy and both kernels can buffer.
	big := make([]byte, 64<<20)
	require.NoError(t, blocked.SetWriteDeadline(time.Now().Add(waitFor)))
	written := make(chan error, 1)
	go func() {
		_, err := blocked.Write(big)
		written <- err
	}()

	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			assert.NoError(t, p.Close())
		}()
	}
	wg.Wait()
	require.NoError(t, p.Close())

	_, err = readUntilError(t, c)
	require.ErrorIs(t, err, syscall.ECONNRESET)
	require.ErrorIs(t, <-written, syscall.ECONNRESET)
	require.Empty(t, p.Links())
	s := p.Stats()
	require.Zero(t, s.Live)
	require.Equal(t, 2, s.ClosedByProxy)

	_, err = net.DialTimeout("tcp", p.Addr(), waitFor)
	require.Error(t, err, "still listening")
}

func TestConcurrentFaults(t *testing.T) {
	const conns, size = 8, 128 << 10
	p := newProxy(t, startEcho(t))

	done := make(chan struct{})
	var chaos sync.WaitGroup
	chaos.Add(1)
	go func() {
		defer chaos.Done()
		pause := func() bool {
			select {
			case <-done:
				return false
			case <-time.After(time.Millisecond):
				return true
			}
		}
		for i := 0; ; i++ {
			p.Freeze()
			for _, l := range p.Links() {
				l.SetLatency(Direction(i%2), time.Duration(i%3)*time.Millisecond)
				l.Freeze()
				l.Thaw()
			}
			p.SetBandwidth(ClientToServer, (i%2)*(50<<20))
			p.SetLatency(ServerToClient, time.Duration(i%2)*time.Millisecond)
			_ = p.Stats()
			ok := pause()
			p.Thaw()
			if !ok || !pause() {
				return
			}
		}
	}()

	echoThrough(t, p.Addr(), conns, size, false)
	close(done)
	chaos.Wait()

	err := p.Wait(testContext(t), func(s Stats) bool {
		return s.ClientToServer == conns*size && s.ServerToClient == conns*size
	})
	require.NoError(t, err)
}
