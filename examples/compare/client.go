package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// maxDialing bounds the dials and handshakes in flight, so that the
// server's accept queue never overflows.
const maxDialing = 200

// dialTimeout bounds each dial and handshake.
const dialTimeout = 10 * time.Second

// The client's phases: traffic before the window is not recorded.
const (
	phaseWarmup = iota
	phaseMeasure
	phaseDone
)

// client is the client child: plain Go that speaks the wire protocol to
// either server. One goroutine per connection does the traffic.
type client struct {
	log   *logrus.Entry
	phase atomic.Int32
	conns []*clientConn

	markAt time.Time // set by mark, read by stop, both on the command loop

	errMu    sync.Mutex
	errs     int
	firstErr error
}

// clientConn is one connection of the client and the round-trip times
// recorded on it in the window.
type clientConn struct {
	nc    net.Conn
	r     *bufio.Reader
	w     *bufio.Writer
	start time.Time // when the handshake completed; ping payloads count from it

	mu   sync.Mutex
	rtts []time.Duration
}

// runClient is the client child. It answers the parent's commands until
// told to quit; its connections' goroutines end with the process.
func runClient(ctx context.Context, log *logrus.Entry) error {
	c := &client{log: log}
	return commands(ctx, c.handle)
}

func (c *client) handle(ctx context.Context, m msg) (msg, error) {
	switch m.Kind {
	case kindConnect:
		return msg{}, c.connect(ctx, m)
	case kindMark:
		c.markAt = time.Now()
		c.phase.Store(phaseMeasure)
		return msg{}, nil
	case kindStop:
		return msg{Report: c.stop()}, nil
	}
	return msg{}, errors.New("unknown command " + m.Kind)
}

// connect opens m.Conns connections to m.Addr, at most maxDialing at a
// time, and starts the scenario's traffic: echo once every connection is
// up, pings on each connection as soon as it is.
func (c *client) connect(ctx context.Context, m msg) error {
	if c.conns != nil {
		return errors.New("already connected")
	}
	var hello []byte
	switch m.Scenario {
	case scenarioEcho:
		// The smallest hello of version 1: the magic and the version.
		hello = appendFrame(nil, frameHello, helloPrefix)
	case scenarioIdle:
		// A client that pings says how often (tag 02, milliseconds).
		p := append(append([]byte(nil), helloPrefix...), 0x02, 0, 4)
		p = binary.BigEndian.AppendUint32(p, uint32(max(1, m.Interval.Milliseconds())))
		hello = appendFrame(nil, frameHello, p)
	default:
		return fmt.Errorf("unknown scenario %q", m.Scenario)
	}
	began := time.Now()
	c.conns = make([]*clientConn, m.Conns)
	var (
		wg    sync.WaitGroup
		sem   = make(chan struct{}, maxDialing)
		errMu sync.Mutex
		first error
		fails int
	)
	for i := range c.conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			cc, err := dial(ctx, m.Addr, hello)
			if err != nil {
				errMu.Lock()
				fails++
				if first == nil {
					first = err
				}
				errMu.Unlock()
				return
			}
			c.conns[i] = cc
			if m.Scenario == scenarioIdle {
				go c.pinger(cc, m.Interval)
			}
		})
	}
	wg.Wait()
	if first != nil {
		return fmt.Errorf("%d of %d connections failed, the first with: %w", fails, m.Conns, first)
	}
	if m.Scenario == scenarioEcho {
		payload := bytes.Repeat([]byte{'e'}, m.Size)
		for _, cc := range c.conns {
			go c.echo(cc, payload)
		}
	}
	c.log.WithFields(logrus.Fields{"conns": m.Conns, "took": time.Since(began).Round(time.Millisecond)}).Info("client connected")
	return nil
}

// dial opens a connection and exchanges hellos.
func dial(ctx context.Context, addr string, hello []byte) (*clientConn, error) {
	d := net.Dialer{Timeout: dialTimeout}
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	cc := &clientConn{nc: nc, r: bufio.NewReader(nc), w: bufio.NewWriter(nc)}
	if err := cc.handshake(hello); err != nil {
		nc.Close()
		return nil, err
	}
	cc.start = time.Now()
	return cc, nil
}

func (cc *clientConn) handshake(hello []byte) error {
	if err := cc.nc.SetDeadline(time.Now().Add(dialTimeout)); err != nil {
		return err
	}
	if _, err := cc.w.Write(hello); err != nil {
		return err
	}
	if err := cc.w.Flush(); err != nil {
		return err
	}
	t, p, err := cc.readFrame(nil, maxHelloSize)
	switch {
	case err != nil:
		return fmt.Errorf("read hello: %w", err)
	case t == frameClose && len(p) > 0:
		return fmt.Errorf("refused with code %d: %q", p[0], p[1:])
	case t != frameHello:
		return fmt.Errorf("expected a hello, got frame type 0x%02x", t)
	case !bytes.HasPrefix(p, helloPrefix):
		return fmt.Errorf("hello of another protocol or version: % x", p[:min(len(p), 4)])
	}
	return cc.nc.SetDeadline(time.Time{})
}

// readFrame reads one frame whose payload it accepts up to limit bytes,
// into buf when it fits.
func (cc *clientConn) readFrame(buf []byte, limit int) (byte, []byte, error) {
	var hdr [headerSize]byte
	if _, err := io.ReadFull(cc.r, hdr[:]); err != nil {
		return 0, nil, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if hdr[0] == frameClose {
		limit = maxCloseSize
	}
	if n > limit {
		return 0, nil, fmt.Errorf("frame type 0x%02x of %d bytes, limit %d", hdr[0], n, limit)
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	_, err := io.ReadFull(cc.r, buf)
	return hdr[0], buf, err
}

// echo sends a data frame and waits for its echo, again and again, until
// the window ends.
func (c *client) echo(cc *clientConn, payload []byte) {
	frame := appendFrame(nil, frameData, payload)
	buf := make([]byte, len(payload))
	for c.phase.Load() != phaseDone {
		sent := time.Now()
		if _, err := cc.w.Write(frame); err != nil {
			c.fail(err)
			return
		}
		if err := cc.w.Flush(); err != nil {
			c.fail(err)
			return
		}
		t, p, err := cc.readFrame(buf, len(payload))
		switch {
		case err != nil:
			c.fail(err)
			return
		case t != frameData || !bytes.Equal(p, payload):
			c.fail(fmt.Errorf("expected the echo, got frame type 0x%02x of %d bytes", t, len(p)))
			return
		}
		cc.record(c, time.Since(sent))
	}
}

// pinger sends a ping every interval, the first at a random offset within
// it, and reads each pong. Its payload is the time the ping left, in
// nanoseconds since the handshake, as vgo's client sends it.
func (c *client) pinger(cc *clientConn, interval time.Duration) {
	next := cc.start.Add(rand.N(interval))
	t := time.NewTimer(time.Until(next))
	var ping [headerSize + 8]byte
	ping[0] = framePing
	binary.BigEndian.PutUint32(ping[1:], 8)
	buf := make([]byte, 8)
	for range t.C {
		binary.BigEndian.PutUint64(ping[headerSize:], uint64(time.Since(cc.start)))
		if _, err := cc.w.Write(ping[:]); err != nil {
			c.fail(err)
			return
		}
		if err := cc.w.Flush(); err != nil {
			c.fail(err)
			return
		}
		typ, p, err := cc.readFrame(buf, maxPingSize)
		switch {
		case err != nil:
			c.fail(err)
			return
		case typ != framePong || len(p) != 8:
			c.fail(fmt.Errorf("expected a pong, got frame type 0x%02x of %d bytes", typ, len(p)))
			return
		}
		cc.record(c, time.Since(cc.start)-time.Duration(binary.BigEndian.Uint64(p)))
		// Keep to the schedule; a ping that is late does not shift the
		// ones after it, and none is sent twice to catch up.
		now := time.Now()
		next = next.Add(interval)
		if late := now.Sub(next); late >= 0 {
			next = next.Add((late/interval + 1) * interval)
		}
		t.Reset(next.Sub(now))
	}
}

// record keeps a round-trip time that ended in the window.
func (cc *clientConn) record(c *client, rtt time.Duration) {
	cc.mu.Lock()
	if c.phase.Load() == phaseMeasure {
		cc.rtts = append(cc.rtts, rtt)
	}
	cc.mu.Unlock()
}

// fail counts a connection that failed. Failures after the window are the
// server's exit, which ends every run.
func (c *client) fail(err error) {
	if c.phase.Load() == phaseDone {
		return
	}
	c.errMu.Lock()
	defer c.errMu.Unlock()
	c.errs++
	if c.firstErr == nil {
		c.firstErr = err
		c.log.WithField("err", err).Warn("connection failed")
	}
}

// stop ends the window and reports what was recorded in it.
func (c *client) stop() *clientReport {
	c.phase.Store(phaseDone)
	window := time.Since(c.markAt)
	var all []time.Duration
	for _, cc := range c.conns {
		if cc == nil {
			continue // its dial failed
		}
		cc.mu.Lock()
		all = append(all, cc.rtts...)
		cc.rtts = nil
		cc.mu.Unlock()
	}
	slices.Sort(all)
	rep := &clientReport{Count: len(all), Window: window, P50: percentile(all, 0.50), P99: percentile(all, 0.99)}
	c.errMu.Lock()
	rep.Errors = c.errs
	if c.firstErr != nil {
		rep.FirstErr = c.firstErr.Error()
	}
	c.errMu.Unlock()
	return rep
}

// percentile returns the nearest-rank p-quantile of sorted durations, 0 for
// none.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
