package vgo

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Tests of how a client comes back after losing its server, and of the
// server's admission control that keeps a returning fleet from burying it.

// Frame types and a close code on the wire, from PROTOCOL.md.
const (
	wireClose         byte = 0x05
	wireGoodbye       byte = 0x06
	wireCloseTryLater byte = 0x06 // the close code, not a frame type
)

// tryLaterFrame is a close frame asking the client to dial again after d.
func tryLaterFrame(d time.Duration) []byte {
	p := binary.BigEndian.AppendUint32([]byte{wireCloseTryLater}, uint32(d/time.Millisecond))
	return wireFrame(wireClose, append(p, "busy"...))
}

// scriptedDials returns a dial function whose n-th call (from 0) follows
// script[n]: nil fails the dial, anything else serves the connection; past
// the end of the script the last entry repeats. Each call is stamped on the
// returned channel.
func scriptedDials(t *testing.T, script ...func(nc net.Conn)) (func(context.Context, string, string) (net.Conn, error), <-chan time.Time) {
	dials := make(chan time.Time, 100)
	handlers := make(chan func(net.Conn), 1)
	l := servePipeRaw(t, func(nc net.Conn) { (<-handlers)(nc) })
	n := 0
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials <- time.Now()
		h := script[min(n, len(script)-1)]
		n++
		if h == nil {
			return nil, errors.New("connection refused")
		}
		handlers <- h
		return l.dial(ctx, network, addr)
	}, dials
}

// hintAfterHello reads the client's hello and refuses it with a retry hint.
func hintAfterHello(d time.Duration) func(nc net.Conn) {
	return func(nc net.Conn) {
		if _, _, err := readWireFrame(nc); err == nil {
			_, _ = nc.Write(tryLaterFrame(d))
		}
	}
}

// helloThenHold answers the hello and keeps the connection until the client
// closes it.
func helloThenHold(nc net.Conn) {
	if answerHello(nc) == nil {
		_, _ = io.Copy(io.Discard, nc)
	}
}

type reconnectWait struct {
	attempt int
	delay   time.Duration
}

// reportWaits returns a client option that sends each wait the client
// announces on the returned channel.
func reportWaits() (ClientOption, <-chan reconnectWait) {
	ch := make(chan reconnectWait, 100)
	return WithOnReconnect(func(attempt int, d time.Duration) { ch <- reconnectWait{attempt, d} }), ch
}

// expectWaits checks that the client announces the waits in want, in
// order, and that each separates two dials exactly.
func expectWaits(t *testing.T, dials <-chan time.Time, waits <-chan reconnectWait, want []reconnectWait) {
	t.Helper()
	prev := awaitFake(t, dials)
	for i, w := range want {
		assert.Equal(t, w, awaitFake(t, waits), "wait %d", i)
		next := awaitFake(t, dials)
		assert.Equal(t, w.delay, next.Sub(prev), "time before dial %d", i+2)
		prev = next
	}
}

func TestSynctestRetryHintReplacesBackoffStep(t *testing.T) {
	// A refusal with a hint is not a failure: the client waits as hinted
	// (never longer than its MaxDelay), the attempt count and the backoff
	// stay where they were, and WithMaxAttempts does not count it. With the
	// draw fixed at 0.75 the backoff waits are 1.25 s, 2.5 s, 5 s.
	synctest.Test(t, func(t *testing.T) {
		b := Backoff{BaseDelay: time.Second, Multiplier: 2, Jitter: 0.5, MaxDelay: 10 * time.Second}
		dial, dials := scriptedDials(t,
			nil,                           // fails: wait 1.25 s
			hintAfterHello(3*time.Second), // wait 3 s
			nil,                           // fails: wait 2.5 s
			hintAfterHello(time.Minute),   // longer than MaxDelay: wait 10 s
			hintAfterHello(time.Second),   // wait 1 s
			nil,                           // fails: wait 5 s
			helloThenHold,
		)
		report, waits := reportWaits()
		connected := make(chan struct{}, 1)
		c := newPipeClient(t, dial, WithBackoff(b), withRand(func() float64 { return 0.75 }),
			WithMaxAttempts(4), report,
			WithOnConnect(func(net.Addr) { connected <- struct{}{} }))

		want := []reconnectWait{
			{2, 1250 * time.Millisecond},
			{2, 3 * time.Second},
			{3, 2500 * time.Millisecond},
			{3, 10 * time.Second},
			{3, time.Second},
			{4, 5 * time.Second},
		}
		expectWaits(t, dials, waits, want)
		awaitFake(t, connected)
		st := c.Stats()
		assert.Equal(t, uint64(3), st.FailedDials)
		assert.Equal(t, uint64(3), st.RetryHints)
		assert.Equal(t, StateConnected, c.State(), "seven dials, only three of them failures against a limit of four")
	})
}

func TestSynctestDrainWindowDoesNotAdvanceBackoff(t *testing.T) {
	// A goodbye's window replaces the first wait after a healthy
	// connection; the dials that fail after it start the backoff from its
	// first step.
	synctest.Test(t, func(t *testing.T) {
		b := Backoff{BaseDelay: time.Second, Multiplier: 2, Jitter: 0.5, MaxDelay: 10 * time.Second}
		goodbye := func(nc net.Conn) {
			if answerHello(nc) == nil {
				_, _ = nc.Write(wireFrame(wireGoodbye, binary.BigEndian.AppendUint32(nil, 4000)))
			}
		}
		dial, dials := scriptedDials(t, goodbye, nil, nil, helloThenHold)
		report, waits := reportWaits()
		newPipeClient(t, dial, WithBackoff(b), withRand(func() float64 { return 0.75 }), report)

		want := []reconnectWait{
			{1, 3 * time.Second},         // 0.75 of the 4 s window
			{2, 1250 * time.Millisecond}, // the first step, not the second
			{3, 2500 * time.Millisecond},
		}
		expectWaits(t, dials, waits, want)
	})
}

func TestSynctestReconnectLogLine(t *testing.T) {
	// One line at info when the client is back, with how many dials it
	// took and how long it was out.
	synctest.Test(t, func(t *testing.T) {
		b := Backoff{BaseDelay: time.Second, Multiplier: 2, Jitter: -1, MaxDelay: 10 * time.Second}
		// A healthy connection: hello, then a frame, then gone.
		healthyThenGone := func(nc net.Conn) {
			if answerHello(nc) == nil {
				_, _ = nc.Write(wireFrame(wirePing, nil))
				_, _, _ = readWireFrame(nc) // the pong
			}
		}
		dial, dials := scriptedDials(t, healthyThenGone, nil, nil, helloThenHold)
		log, hook := logtest.NewNullLogger()
		connected := make(chan struct{}, 10)
		newPipeClient(t, dial, WithBackoff(b), WithLogger(log),
			WithOnConnect(func(net.Addr) { connected <- struct{}{} }))
		awaitFake(t, connected)
		awaitFake(t, connected)
		for range 4 {
			awaitFake(t, dials)
		}

		var lines []*logrus.Entry
		for _, e := range hook.AllEntries() {
			if e.Message == "connected" || e.Data["downtime"] != nil {
				lines = append(lines, e)
			}
		}
		require.Len(t, lines, 2, "one line per connection")
		assert.Equal(t, "connected", lines[0].Message)
		back := lines[1]
		// Waits of 1 s, 2 s and 4 s.
		assert.Equal(t, "reconnected after 3 attempts in 7.0 s", back.Message)
		assert.Equal(t, logrus.InfoLevel, back.Level)
		assert.Equal(t, 3, back.Data["dials"])
		assert.Equal(t, 7*time.Second, back.Data["downtime"])
	})
}

func TestSynctestAdmissionControl(t *testing.T) {
	// Beyond its bound on handshakes, the server answers at once with a
	// retry hint between half and one and a half times retryAfter, without
	// waiting for a hello; a slot that frees admits the next dial.
	synctest.Test(t, func(t *testing.T) {
		srv, l := servePipe(t, WithAdmission(2, 2*time.Second))
		first := dialPipeRaw(t, l)
		dialPipeRaw(t, l)
		// A pipe is not a socket whose first bytes the server can wait
		// for, so these two count from when their handshakes begin.
		synctest.Wait()

		refused := dialPipeRaw(t, l)
		typ, p, err := readWireFrame(refused)
		require.NoError(t, err)
		require.Equal(t, wireClose, typ)
		require.Equal(t, wireCloseTryLater, p[0], "close code")
		hint := time.Duration(binary.BigEndian.Uint32(p[1:5])) * time.Millisecond
		assert.GreaterOrEqual(t, hint, time.Second)
		assert.LessOrEqual(t, hint, 3*time.Second)
		_, _, err = readWireFrame(refused)
		assert.ErrorIs(t, err, io.EOF, "closed after the hint")

		st := srv.Stats()
		assert.Equal(t, uint64(3), st.Accepted)
		assert.Equal(t, uint64(1), st.Throttled)

		// The first connection finishes its handshake and frees a slot.
		_, err = first.Write(rawHello(ProtocolVersion))
		require.NoError(t, err)
		typ, _, err = readWireFrame(first)
		require.NoError(t, err)
		require.Equal(t, wireHello, typ)
		dialPipeHello(t, l)
		assert.Equal(t, uint64(1), srv.Stats().Throttled)
	})
}

func TestAdmissionRefusedClientComesBack(t *testing.T) {
	// Over real sockets: the server's only handshake is taken by a peer
	// that sent the first bytes of its hello, so a client is refused with
	// a hint, waits as hinted without counting a failure, and connects
	// once the handshake is done.
	l := listen(t)
	srv, _ := serveOn(t, l, WithAdmission(1, 200*time.Millisecond))
	hello := rawHello(ProtocolVersion)
	holder := dialRaw(t, l.Addr().String())
	holder.write(hello[:3])
	// Taken once the server refuses a probe at once; a probe it admits
	// hears nothing.
	require.Eventually(t, func() bool {
		probe, err := net.DialTimeout("tcp", l.Addr().String(), waitFor)
		require.NoError(t, err)
		defer probe.Close()
		require.NoError(t, probe.SetReadDeadline(time.Now().Add(100*time.Millisecond)))
		_, _, err = readWireFrame(probe)
		return err == nil
	}, waitFor, 10*time.Millisecond)

	report, waits := reportWaits()
	c := newTestClient(t, l.Addr().String(), report,
		WithBackoff(Backoff{BaseDelay: 10 * time.Millisecond, MaxDelay: time.Second}))
	w := recv(t, waits)
	assert.Equal(t, 1, w.attempt, "a hint is not a failed attempt")
	assert.GreaterOrEqual(t, w.delay, 100*time.Millisecond)
	assert.LessOrEqual(t, w.delay, 300*time.Millisecond)

	holder.write(hello[3:])
	ft, _ := holder.next()
	require.Equal(t, frameHello, ft)
	require.NoError(t, c.WaitConnected(testContext(t)))
	st := c.Stats()
	assert.Positive(t, st.RetryHints)
	assert.Zero(t, st.FailedDials, "a refusal with a hint is not a failure")
	assert.Greater(t, srv.Stats().Throttled, st.RetryHints, "the probes were refused too")
}

func TestAdmissionIgnoresSilentConnections(t *testing.T) {
	// Connections that have sent nothing cost the server no work and take
	// none of its handshakes: a client connects past them at once.
	if runtime.GOOS != "linux" {
		t.Skip("a connection counts from its first bytes on Linux only")
	}
	l := listen(t)
	srv, _ := serveOn(t, l, WithAdmission(1, time.Second))
	for range 3 {
		dialRaw(t, l.Addr().String())
	}
	require.Eventually(t, func() bool { return srv.Stats().Accepted == 3 }, waitFor, time.Millisecond)
	c := newTestClient(t, l.Addr().String())
	require.NoError(t, c.WaitConnected(testContext(t)))
	assert.Zero(t, c.Stats().RetryHints)
	assert.Zero(t, srv.Stats().Throttled)
}

func TestSynctestRetryHintMovesOnToFallback(t *testing.T) {
	// A busy server's hint does not hold up the rest of the round: the
	// client tries the next endpoint at once, and waits the hint only once
	// every endpoint has been tried, without a step of its backoff.
	synctest.Test(t, func(t *testing.T) {
		type dial struct {
			at   time.Time
			addr string
		}
		dials := make(chan dial, 100)
		l := servePipeRaw(t, helloThenHold)
		busy := servePipeRaw(t, hintAfterHello(3*time.Second))
		fallbackDials := 0
		dialFn := func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials <- dial{time.Now(), addr}
			if addr == pipeServerAddr {
				return busy.dial(ctx, network, addr)
			}
			if fallbackDials++; fallbackDials == 1 {
				return nil, errors.New("connection refused")
			}
			return l.dial(ctx, network, addr)
		}
		report, waits := reportWaits()
		c := newPipeClient(t, dialFn, WithFallbackAddrs("fallback.test:1"), report,
			WithBackoff(Backoff{BaseDelay: time.Second, MaxDelay: 10 * time.Second}))

		start := awaitFake(t, dials)
		next := awaitFake(t, dials)
		assert.Equal(t, "fallback.test:1", next.addr)
		assert.Equal(t, start.at, next.at, "the fallback is dialed at once after the hint")
		assert.Equal(t, reconnectWait{2, 3 * time.Second}, awaitFake(t, waits))
		again := awaitFake(t, dials)
		assert.Equal(t, 3*time.Second, again.at.Sub(start.at))
		awaitFake(t, dials)
		require.NoError(t, c.WaitConnected(t.Context()))
		assert.Equal(t, "fallback.test:1", c.Endpoint())
		st := c.Stats()
		assert.Equal(t, uint64(2), st.RetryHints)
		assert.Equal(t, uint64(1), st.FailedDials)
	})
}

// failingWrites is a client connection whose writes fail, as after the
// server has reset it, while what the server sent before can still be
// read.
type failingWrites struct{ net.Conn }

func (failingWrites) Write([]byte) (int, error) { return 0, syscall.ECONNRESET }

func TestSynctestHintReadAfterHelloWriteFails(t *testing.T) {
	// A server that refuses at accept does not read the hello, and its
	// reset can fail the client's hello write; the hint that arrived first
	// is still read and obeyed.
	synctest.Test(t, func(t *testing.T) {
		l := servePipeRaw(t, func(nc net.Conn) { _, _ = nc.Write(tryLaterFrame(2 * time.Second)) })
		dialFn := func(ctx context.Context, network, addr string) (net.Conn, error) {
			nc, err := l.dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return failingWrites{nc}, nil
		}
		report, waits := reportWaits()
		c := newPipeClient(t, dialFn, report)
		assert.Equal(t, reconnectWait{1, 2 * time.Second}, awaitFake(t, waits))
		assert.Equal(t, uint64(1), c.Stats().RetryHints)
		assert.Zero(t, c.Stats().FailedDials)
	})
}

func TestAdmissionOptions(t *testing.T) {
	s, err := NewServer()
	require.NoError(t, err)
	assert.Equal(t, DefaultMaxHandshakes, s.opts.maxHandshakes)
	assert.Equal(t, DefaultRetryAfter, s.opts.retryAfter)

	s, err = NewServer(WithAdmission(-1, 0))
	require.NoError(t, err)
	assert.Zero(t, s.opts.maxHandshakes, "negative turns the bound off")

	for _, bad := range []time.Duration{-time.Second, 2 * time.Hour} {
		_, err = NewServer(WithAdmission(10, bad))
		assert.ErrorIs(t, err, ErrInvalidOption, "retry-after %v", bad)
	}
}

func TestTryLaterCloseFrame(t *testing.T) {
	// The example of PROTOCOL.md, "Close".
	p := marshalTryLater(1500*time.Millisecond, "too many handshakes")
	doc := "05 00 00 00 18 06 00 00 05 dc 74 6f 6f 20 6d 61 6e 79 20 68 61 6e 64 73 68 61 6b 65 73"
	want, err := hex.DecodeString(strings.ReplaceAll(doc, " ", ""))
	require.NoError(t, err)
	assert.Equal(t, want, appendFrame(nil, frameClose, p))
	ce := parseClose(p)
	assert.Equal(t, &CloseError{Code: CloseTryLater, Reason: "too many handshakes", RetryAfter: 1500 * time.Millisecond}, ce)
	assert.Equal(t, "vgo: closed by peer: try later: too many handshakes (retry after 1.5s)", ce.Error())

	// The hint belongs to CloseTryLater alone; other codes keep their
	// bytes in the reason.
	assert.Equal(t, "\x00\x00\x05x", parseClose([]byte{byte(CloseServerFull), 0, 0, 5, 'x'}).Reason)
}

func TestSynctestPingIntervalCappedForMiddleboxes(t *testing.T) {
	// A server whose heartbeat timeout allows pings every 40 s still has
	// its clients ping every 25 s, within the idle timers of load
	// balancers and NATs.
	synctest.Test(t, func(t *testing.T) {
		pings := make(chan time.Time, 10)
		_, l := servePipe(t, WithHeartbeatTimeout(2*time.Minute),
			WithOnPing(func(*Conn) { pings <- time.Now() }))
		newPipeClient(t, l.dial, WithPingInterval(40*time.Second))
		prev := awaitFake(t, pings)
		for range 3 {
			next := awaitFake(t, pings)
			assert.Equal(t, DefaultMaxPingInterval, next.Sub(prev))
			prev = next
		}
	})
}

func TestPingIntervalCapDefaults(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []ServerOption
		want time.Duration
	}{
		{"default timeout", nil, DefaultHeartbeatTimeout / 3},
		{"long timeout", []ServerOption{WithHeartbeatTimeout(2 * time.Minute)}, DefaultMaxPingInterval},
		{"timeout off", []ServerOption{WithHeartbeatTimeout(-1)}, DefaultMaxPingInterval},
		{"explicit range", []ServerOption{WithHeartbeatTimeout(-1), WithPingIntervalRange(0, time.Minute)}, time.Minute},
		{"min above the cap", []ServerOption{WithHeartbeatTimeout(2 * time.Minute), WithPingIntervalRange(30*time.Second, 0)}, 30 * time.Second},
		{"min above the cap, timeout off", []ServerOption{WithHeartbeatTimeout(-1), WithPingIntervalRange(30*time.Second, 0)}, 30 * time.Second},
	} {
		s, err := NewServer(tc.opts...)
		require.NoError(t, err, tc.name)
		assert.Equal(t, tc.want, s.opts.maxPing, tc.name)
	}
}
