package vgo

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"strings"
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

// Frame types and close codes on the wire, from PROTOCOL.md.
const (
	wireClose    byte = 0x05
	wireGoodbye  byte = 0x06
	wireTryLater byte = 0x06 // close code
)

// tryLaterFrame is a close frame asking the client to dial again after d.
func tryLaterFrame(d time.Duration) []byte {
	p := binary.BigEndian.AppendUint32([]byte{wireTryLater}, uint32(d/time.Millisecond))
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
		dropAfterHello := func(nc net.Conn) { _ = answerHello(nc) }
		dial, dials := scriptedDials(t, dropAfterHello, nil, nil, helloThenHold)
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
		// Waits of 1 s (the first step: a connection that was never
		// healthy counts as failed), 2 s and 4 s.
		assert.Equal(t, "reconnected after 3 attempts in 7.0 s", back.Message)
		assert.Equal(t, logrus.InfoLevel, back.Level)
		assert.Equal(t, 3, back.Data["attempt"])
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

		refused := dialPipeRaw(t, l)
		typ, p, err := readWireFrame(refused)
		require.NoError(t, err)
		require.Equal(t, wireClose, typ)
		require.Equal(t, wireTryLater, p[0], "close code")
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
	// Over real sockets: the server's only handshake slot is taken, so a
	// client is refused with a hint, waits as hinted without counting a
	// failure, and connects once the slot is free. The hint must reach the
	// client even though the server closes without reading its hello.
	l := listen(t)
	srv, _ := serveOn(t, l, WithAdmission(1, 200*time.Millisecond))
	holder := dialRaw(t, l.Addr().String())
	require.Eventually(t, func() bool { return srv.Stats().Accepted == 1 }, waitFor, time.Millisecond)

	delays := make(chan time.Duration, 100)
	c := newTestClient(t, l.Addr().String(),
		WithOnReconnect(func(_ int, d time.Duration) { delays <- d }))
	d := recv(t, delays)
	assert.GreaterOrEqual(t, d, 100*time.Millisecond)
	assert.LessOrEqual(t, d, 300*time.Millisecond)

	holder.write(rawHello(ProtocolVersion))
	ft, _ := holder.next()
	require.Equal(t, frameHello, ft)
	require.NoError(t, c.WaitConnected(testContext(t)))
	st := c.Stats()
	assert.Positive(t, st.RetryHints)
	assert.Zero(t, st.FailedDials, "a refusal with a hint is not a failure")
	assert.Equal(t, st.RetryHints, srv.Stats().Throttled)
}

func TestAdmissionOptions(t *testing.T) {
	s, err := NewServer()
	require.NoError(t, err)
	assert.Equal(t, DefaultMaxHandshakes, s.opts.maxHandshakes)
	assert.Equal(t, DefaultRetryAfter, s.opts.retryAfter)

	s, err = NewServer(WithAdmission(-1, 0))
	require.NoError(t, err)
	assert.Zero(t, s.opts.maxHandshakes, "negative turns the bound off")

	_, err = NewServer(WithAdmission(10, -time.Second))
	assert.ErrorIs(t, err, ErrInvalidOption)
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
	} {
		s, err := NewServer(tc.opts...)
		require.NoError(t, err, tc.name)
		assert.Equal(t, tc.want, s.opts.maxPing, tc.name)
	}
}
