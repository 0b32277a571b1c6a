package vgo

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"time"

	"github.com/sirupsen/logrus"
)

// Backoff describes the delays between a client's dial attempts, in the
// shape of gRPC's connection backoff: the n-th wait (from 0) is
// BaseDelay * Multiplier^n, spread by ±Jitter of itself so that clients cut
// off together do not return together, and never more than MaxDelay. Once
// the growth reaches MaxDelay, waits are spread over the Jitter fraction
// below it.
//
// The defaults serve a lone client: the first dial after a lost connection
// comes within 125 to 375 ms, and the waits grow to at most 5 s, so a
// client is back within one such wait of its server's return. The slow
// growth keeps the waits short through the outages that are most common,
// a restart or a deploy of a few seconds (BENCHMARKS.md has the figures
// for a 3 s outage). A fleet is kept from overwhelming a restarting server
// by the server itself, which answers the dials it has no room for with a
// hint of when to come back (see WithAdmission), and by Shutdown's drain
// window.
//
// The counter restarts only once a connection has proven healthy, by
// completing its hello and receiving any frame after it. A server that accepts
// and drops at once therefore sees dials spaced by growing delays. A
// server's retry hint and its drain window each replace one wait without
// advancing the counter.
//
// A zero field takes its default.
type Backoff struct {
	// BaseDelay is the first wait, after a healthy connection was lost or a
	// first dial failed. The default is 250ms.
	BaseDelay time.Duration
	// Multiplier is how much each wait grows over the one before; at least
	// 1. The default is 1.4.
	Multiplier float64
	// Jitter is the fraction, between 0 and 1, by which each wait is
	// randomly lengthened or shortened. The default is 0.5; negative means
	// no jitter.
	Jitter float64
	// MaxDelay caps every wait, jitter included. The default is 5s, or
	// BaseDelay if that is longer.
	MaxDelay time.Duration
}

var defaultBackoff = Backoff{
	BaseDelay:  250 * time.Millisecond,
	Multiplier: 1.4,
	Jitter:     0.5,
	MaxDelay:   5 * time.Second,
}

// resolve fills in defaults and checks the fields against each other.
func (b Backoff) resolve() (Backoff, error) {
	if b.BaseDelay == 0 {
		b.BaseDelay = defaultBackoff.BaseDelay
	}
	if b.Multiplier == 0 {
		b.Multiplier = defaultBackoff.Multiplier
	}
	switch {
	case b.Jitter == 0:
		b.Jitter = defaultBackoff.Jitter
	case b.Jitter < 0:
		b.Jitter = 0
	}
	if b.MaxDelay == 0 {
		b.MaxDelay = max(defaultBackoff.MaxDelay, b.BaseDelay)
	}
	switch {
	case b.BaseDelay < 0:
		return b, invalid("backoff base delay %v is negative", b.BaseDelay)
	case b.Multiplier < 1 || math.IsNaN(b.Multiplier) || math.IsInf(b.Multiplier, 0):
		return b, invalid("backoff multiplier %v is below 1", b.Multiplier)
	case b.Jitter > 1 || math.IsNaN(b.Jitter):
		return b, invalid("backoff jitter %v is above 1", b.Jitter)
	case b.MaxDelay < b.BaseDelay:
		return b, invalid("backoff max delay %v is below the base delay %v", b.MaxDelay, b.BaseDelay)
	}
	return b, nil
}

// delay returns the n-th wait (from 0). r, in [0, 1), is the random draw
// that places the wait within the jitter band.
func (b Backoff) delay(n int, r float64) time.Duration {
	d := float64(b.BaseDelay) * math.Pow(b.Multiplier, float64(n))
	if limit := float64(b.MaxDelay); d >= limit {
		// At the cap the spread goes below it only, or half the draws
		// would land on the cap itself, all together.
		return time.Duration(limit * (1 - b.Jitter*r))
	}
	d *= 1 + b.Jitter*(2*r-1)
	return time.Duration(min(d, float64(b.MaxDelay)))
}

// run is the client's only long-lived goroutine and the owner of every
// connection: it dials, serves a connection until it fails, waits for that
// connection's goroutines to exit, reports the loss once, sleeps the
// backoff and dials again, until Close or until the attempts run out.
func (c *Client) run() {
	var (
		failed int           // attempts failed since the last healthy connection
		waits  int           // backoff waits since the last healthy connection
		tried  int           // endpoints tried in this round without a wait
		hinted time.Duration // the longest retry hint in this round
		out    outage
	)
	for {
		addr := c.addrs[c.next]
		out.dials++
		l, hb, err := c.connect(addr)
		dialed := err == nil
		healthy := false
		var window time.Duration // the drain window of a goodbye
		if dialed {
			// Healthy means the server has been heard from since its
			// hello: then it is not one that accepts and drops at once.
			base := l.fr.frames.Load()
			err = c.serve(l, hb, out)
			healthy = hb.interval <= 0 || l.fr.frames.Load() > base
			window = time.Duration(l.goodbye.Load())
			if healthy {
				out = outage{since: time.Now()}
			}
		}
		if c.ctx.Err() != nil {
			c.finish(nil)
			return
		}
		// A refusal with a retry hint is not a failure: the server is up
		// and has said when to come back.
		hint := retryHint(err)
		switch {
		case healthy:
			failed, waits, tried, hinted = 0, 0, 0, 0
		case hint > 0:
			c.stats.hints.Add(1)
			tried++
			hinted = max(hinted, hint)
		default:
			failed++
			tried++
			c.stats.failedDials.Add(1)
		}
		var ce *CloseError
		if !c.opts.retryAuth && errors.As(err, &ce) && ce.Code == CloseUnauthorized {
			err = &chainError{what: "unauthorized", is: ErrUnauthorized, err: err}
			c.log.WithFields(logrus.Fields{"endpoint": addr, "err": err}).Error("authentication failed; giving up")
			c.finish(err)
			return
		}
		if c.opts.maxAttempts > 0 && failed >= c.opts.maxAttempts {
			err = &chainError{what: fmt.Sprintf("gave up reconnecting after %d attempts", failed), is: ErrGaveUp, err: err}
			c.log.WithFields(logrus.Fields{"attempt": failed, "err": err}).Error("giving up")
			c.finish(err)
			return
		}
		c.next = (c.next + 1) % len(c.addrs)
		if !healthy && tried < len(c.addrs) {
			// The rest of the round goes at once: the backoff applies
			// per round through the endpoints.
			log := c.log.WithFields(logrus.Fields{"attempt": failed, "endpoint": addr, "next": c.addrs[c.next], "err": err})
			if hint > 0 {
				log.Info("server busy; trying the next endpoint")
			} else {
				log.Warn("dial failed; trying the next endpoint")
			}
			continue
		}
		tried = 0
		// A retry hint and a draining server's window each stand in for
		// one wait, and neither is a step of the backoff. A round in which
		// some server gave a hint waits the longest one given.
		var d time.Duration
		switch {
		case hinted > 0:
			d = min(hinted, c.opts.backoff.MaxDelay)
		case window > 0:
			// Spread over the window the server asked for, but no
			// longer than the client's own longest wait.
			d = time.Duration(c.opts.rand() * float64(min(window, c.opts.backoff.MaxDelay)))
		default:
			d = c.opts.backoff.delay(waits, c.opts.rand())
			waits++
		}
		hinted = 0
		switch {
		case hint > 0:
			c.log.WithFields(logrus.Fields{"endpoint": addr, "delay": d, "err": err}).Info("server busy; dialing again when it asked")
		case dialed:
			// serve has logged the disconnect and its cause.
			c.log.WithFields(logrus.Fields{"attempt": failed + 1, "delay": d}).Info("reconnecting")
		default:
			c.log.WithFields(logrus.Fields{"attempt": failed, "delay": d, "err": err}).Warn("dial failed")
		}
		c.stats.backoff.Store(int64(d))
		if fn := c.opts.onReconnect; fn != nil {
			deliverTo(c.sess, func() { fn(failed+1, d) })
		}
		ok := c.sleep(d)
		c.stats.backoff.Store(0)
		if !ok {
			c.finish(nil)
			return
		}
	}
}

// outage is what the client has been through since it last lost a
// healthy connection, for the line that reports it back. A connection
// that never proved healthy does not end it.
type outage struct {
	since time.Time // zero before the first healthy connection
	dials int
}

// retryHint returns the wait a busy server asked for in the close frame
// that refused a dial, or 0.
func retryHint(err error) time.Duration {
	var ce *CloseError
	if errors.As(err, &ce) && ce.Code == CloseTryLater {
		return ce.RetryAfter
	}
	return 0
}

// sleep waits for d, and reports false if the client was closed first.
func (c *Client) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.ctx.Done():
		return false
	}
}

// connect dials addr, runs the TLS handshake if configured and exchanges
// hellos. Close interrupts every step at once.
func (c *Client) connect(addr string) (*link, *heartbeat, error) {
	c.mu.Lock()
	c.endpoint = addr
	c.mu.Unlock()
	c.stats.dials.Add(1)
	ctx := c.ctx
	if c.opts.dialTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.dialTimeout)
		defer cancel()
	}
	var creds []byte
	if fn := c.opts.credentials; fn != nil {
		var err error
		if creds, err = fn(ctx); err != nil {
			return nil, nil, fmt.Errorf("vgo: credentials: %w", err)
		}
		room := MaxCredentialsSize
		if c.sess != nil {
			room = maxResumeCredentials
		}
		if len(creds) > room {
			return nil, nil, fmt.Errorf("vgo: credentials of %d bytes exceed the hello's room of %d", len(creds), room)
		}
	}
	cfg, err := c.tlsConfig(addr)
	if err != nil {
		return nil, nil, err
	}
	nc, err := c.opts.dial(ctx, "tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	// The raw connection, not a TLS wrapper around it, so that Close does
	// not wait on a TLS close_notify.
	raw := nc
	stop := context.AfterFunc(c.ctx, func() { raw.Close() })
	defer stop()

	var deadline time.Time
	if c.opts.handshakeTimeout > 0 {
		deadline = time.Now().Add(c.opts.handshakeTimeout)
	}
	if cfg != nil {
		tc := tls.Client(nc, cfg)
		nc = tc
		if err := nc.SetDeadline(deadline); err != nil {
			nc.Close()
			return nil, nil, err
		}
		if err := tc.Handshake(); err != nil {
			nc.Close()
			return nil, nil, handshakeError("TLS handshake", err)
		}
	}
	l := newLink(nc, raw, &c.opts.commonOptions, ErrNotConnected)
	interval, err := c.hello(l, deadline, creds)
	if err != nil {
		l.shutdown(err)
		return nil, nil, err
	}
	return l, newHeartbeat(interval, c.opts.pongTimeout, &l.fr.frames), nil
}

// hello sends the client's hello and reads the server's, all before
// deadline, and returns the ping interval to use: the configured one, moved
// into the range the server accepts.
func (c *Client) hello(l *link, deadline time.Time, creds []byte) (time.Duration, error) {
	l.startHandshake(deadline)
	if err := l.nc.SetWriteDeadline(deadline); err != nil {
		return 0, err
	}
	mine := hello{
		version:      ProtocolVersion,
		credentials:  creds,
		pingInterval: c.opts.pingInterval,
		maxMessage:   c.opts.maxFrameSize,
		resume:       c.sess != nil,
	}
	if c.sess != nil && !c.sessionOver.Load() {
		mine.sessionID = c.sess.current()
		mine.received = c.sess.received.Load()
	}
	// Written here, before the link's writer exists: nothing else can be
	// sent until the server has answered.
	if _, err := l.nc.Write(appendFrame(nil, frameHello, mine.marshal())); err != nil {
		// A server that refuses at accept writes its close frame and
		// closes without reading the hello; the reset that follows can
		// fail this write while the frame waits to be read.
		if t, p, rerr := l.fr.next(); rerr == nil && t == frameClose {
			return 0, parseClose(p)
		}
		return 0, handshakeError("send hello", err)
	}
	// The link's writes set deadlines of their own, or write only what
	// the socket takes at once.
	if err := l.nc.SetWriteDeadline(time.Time{}); err != nil {
		return 0, err
	}
	t, p, err := l.fr.next()
	if err != nil {
		return 0, handshakeError("read hello", err)
	}
	switch t {
	case frameHello:
	case frameClose:
		return 0, parseClose(p)
	default:
		return 0, protocolErrorf("expected hello, got %s frame", t)
	}
	h, err := parseHello(p, true)
	if err != nil {
		return 0, err
	}
	if h.version != ProtocolVersion {
		return 0, protocolErrorf("server speaks version %d, want %d", h.version, ProtocolVersion)
	}
	if !l.established(0, c.opts.maxFrameSize, h, nil) {
		return 0, l.cause()
	}
	if c.sess != nil {
		if err := c.join(l, h, mine.sessionID); err != nil {
			return 0, err
		}
	}
	return c.negotiate(h), nil
}

// negotiate moves the configured ping interval into the server's range, so
// that the two sides' settings cannot silently disagree. A server that
// announces its heartbeat timeout but no range gets a ping at least every
// third of it.
func (c *Client) negotiate(h hello) time.Duration {
	want := c.opts.pingInterval
	got := want
	if h.maxPing == 0 && h.heartbeatTimeout > 0 {
		h.maxPing = h.heartbeatTimeout / 3
	}
	switch {
	case h.maxPing > 0 && (want <= 0 || want > h.maxPing):
		got = h.maxPing
	case h.minPing > 0 && want > 0 && want < h.minPing:
		got = h.minPing
	}
	if got != want {
		c.log.WithFields(logrus.Fields{"configured": want, "interval": got, "min": h.minPing, "max": h.maxPing}).
			Warn("ping interval moved into the server's range")
	}
	return got
}

// handshakeError names the step that failed and maps a deadline to
// ErrHandshakeTimeout. A protocol error is returned as it is, so that the
// close frame answering it carries its detail.
func handshakeError(step string, err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, ErrProtocol):
		return err
	case errors.As(err, &ne) && ne.Timeout():
		err = ErrHandshakeTimeout
	default:
		err = readError(err)
	}
	return &chainError{what: step, err: err}
}

// tlsConfig returns the TLS configuration for a dial to addr, or nil for
// plain TCP. ServerName defaults to the host of addr.
func (c *Client) tlsConfig(addr string) (*tls.Config, error) {
	cfg := c.opts.tlsConfig
	if fn := c.opts.tlsConfigFunc; fn != nil {
		var err error
		if cfg, err = fn(addr); err != nil {
			return nil, fmt.Errorf("vgo: TLS config: %w", err)
		}
	}
	if cfg == nil || cfg.ServerName != "" {
		return cfg, nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		host = addr
	}
	cfg = cfg.Clone()
	cfg.ServerName = host
	return cfg, nil
}
