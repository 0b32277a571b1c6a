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
// min(BaseDelay * Multiplier^n, MaxDelay), then spread by ±Jitter of
// itself, so that clients cut off together do not return together.
//
// The counter restarts only once a connection has proven healthy, by
// completing its hello and receiving a first pong. A server that accepts
// and drops at once therefore sees dials spaced by growing delays.
//
// A zero field takes its default.
type Backoff struct {
	// BaseDelay is the first wait, after a healthy connection was lost or a
	// first dial failed. The default is 1s.
	BaseDelay time.Duration
	// Multiplier is how much each wait grows over the one before; at least
	// 1. The default is 1.6.
	Multiplier float64
	// Jitter is the fraction, between 0 and 1, by which each wait is
	// randomly lengthened or shortened. The default is 0.2; negative means
	// no jitter.
	Jitter float64
	// MaxDelay caps a wait before jitter is applied. The default is 30s.
	MaxDelay time.Duration
}

var defaultBackoff = Backoff{
	BaseDelay:  time.Second,
	Multiplier: 1.6,
	Jitter:     0.2,
	MaxDelay:   30 * time.Second,
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
	d = min(d, float64(b.MaxDelay))
	d *= 1 + b.Jitter*(2*r-1)
	return time.Duration(d)
}

// run is the client's only long-lived goroutine and the owner of every
// connection: it dials, serves a connection until it fails, waits for that
// connection's goroutines to exit, reports the loss once, sleeps the
// backoff and dials again, until Close or until the attempts run out.
func (c *Client) run() {
	var (
		failed int // attempts failed since the last healthy connection
		waits  int // backoff waits since the last healthy connection
	)
	for {
		l, hb, err := c.connect()
		dialed := err == nil
		if dialed {
			err = c.serve(l, hb)
			if hb.answered.Load() {
				failed, waits = 0, 0
			} else {
				failed++
			}
		} else {
			failed++
		}
		if c.ctx.Err() != nil {
			c.finish(nil)
			return
		}
		if c.opts.maxAttempts > 0 && failed >= c.opts.maxAttempts {
			err = fmt.Errorf("%w after %d attempts: %w", ErrGaveUp, failed, err)
			c.log.WithFields(logrus.Fields{"attempt": failed, "err": err}).Error("giving up")
			c.finish(err)
			return
		}
		d := c.opts.backoff.delay(waits, c.opts.rand())
		waits++
		if dialed {
			// serve has logged the disconnect and its cause.
			c.log.WithFields(logrus.Fields{"attempt": failed + 1, "delay": d}).Info("reconnecting")
		} else {
			c.log.WithFields(logrus.Fields{"attempt": failed, "delay": d, "err": err}).Warn("dial failed")
		}
		if fn := c.opts.onReconnect; fn != nil {
			fn(failed+1, d)
		}
		if !c.sleep(d) {
			c.finish(nil)
			return
		}
	}
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

// connect dials, runs the TLS handshake if configured and exchanges hellos.
// Close interrupts every step at once.
func (c *Client) connect() (*link, *heartbeat, error) {
	ctx := c.ctx
	if c.opts.dialTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.opts.dialTimeout)
		defer cancel()
	}
	nc, err := c.opts.dial(ctx, "tcp", c.addr)
	if err != nil {
		return nil, nil, err
	}
	stop := context.AfterFunc(c.ctx, func() { nc.Close() })
	defer stop()

	var deadline time.Time
	if c.opts.handshakeTimeout > 0 {
		deadline = time.Now().Add(c.opts.handshakeTimeout)
	}
	if cfg := c.opts.tlsConfig; cfg != nil {
		tc := tls.Client(nc, c.tlsConfigFor(cfg))
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
	l := newLink(nc, &c.opts.commonOptions, ErrNotConnected)
	if err := c.hello(l, deadline); err != nil {
		l.shutdown(err)
		return nil, nil, err
	}
	hb := newHeartbeat(c.opts.pingInterval, c.opts.pongTimeout)
	if c.opts.pingInterval <= 0 {
		hb.answered.Store(true)
	}
	hb.received()
	return l, hb, nil
}

// hello sends the client's hello and reads the server's, all before deadline.
func (c *Client) hello(l *link, deadline time.Time) error {
	l.startHandshake(deadline)
	if err := l.nc.SetWriteDeadline(deadline); err != nil {
		return err
	}
	if _, err := l.nc.Write(appendFrame(nil, frameHello, hello{version: ProtocolVersion}.marshal())); err != nil {
		return handshakeError("send hello", err)
	}
	t, p, err := l.fr.next()
	if err != nil {
		return handshakeError("read hello", err)
	}
	switch t {
	case frameHello:
	case frameClose:
		return parseClose(p)
	default:
		return fmt.Errorf("%w: expected hello, got %s frame", ErrProtocol, t)
	}
	h, err := parseHello(p)
	if err != nil {
		return err
	}
	if h.version != ProtocolVersion {
		return fmt.Errorf("%w: server speaks version %d, want %d", ErrProtocol, h.version, ProtocolVersion)
	}
	l.established(0)
	return nil
}

// handshakeError names the step that failed and maps a deadline to
// ErrHandshakeTimeout.
func handshakeError(step string, err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("vgo: %s: %w", step, ErrHandshakeTimeout)
	}
	return fmt.Errorf("vgo: %s: %w", step, readError(err))
}

// tlsConfigFor returns cfg with ServerName set to the dialed host when the
// caller left it empty.
func (c *Client) tlsConfigFor(cfg *tls.Config) *tls.Config {
	if cfg.ServerName != "" {
		return cfg
	}
	host, _, err := net.SplitHostPort(c.addr)
	if err != nil {
		host = c.addr
	}
	cfg = cfg.Clone()
	cfg.ServerName = host
	return cfg
}
