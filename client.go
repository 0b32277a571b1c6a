package vgo

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// State is where a Client is in its life.
type State int32

// The states of a Client, in the order it passes through them.
const (
	StateIdle         State = iota // created, Start not yet called
	StateConnecting                // dialing for the first time
	StateConnected                 // a connection is up
	StateReconnecting              // a connection was lost; dialing again
	StateClosed                    // stopped for good
)

// String returns the state's name in lower case.
func (s State) String() string {
	switch s {
	case StateIdle:
		return "idle"
	case StateConnecting:
		return "connecting"
	case StateConnected:
		return "connected"
	case StateReconnecting:
		return "reconnecting"
	case StateClosed:
		return "closed"
	}
	return fmt.Sprintf("State(%d)", int32(s))
}

// A Client keeps one connection to a server alive: it dials with backoff,
// pings while connected, and when the connection fails it tears it down once
// and dials again, until Close.
//
// All methods are safe for concurrent use.
type Client struct {
	opts clientOptions
	log  logrus.FieldLogger

	// ctx is canceled by Close; every wait in the client selects on it.
	ctx    context.Context
	cancel context.CancelFunc
	// exited is closed once the client has stopped for good.
	exited chan struct{}

	// live is link, for Send to read without c.mu.
	live atomic.Pointer[link]

	mu       sync.Mutex
	started  bool
	state    State
	changed  chan struct{} // closed and replaced on every state change
	link     *link         // the live connection, nil while there is none
	sendBuf  sendBuffer    // messages sent while link was nil
	err      error         // why the client stopped, once it has
	endpoint string        // the address connected to or being dialed

	// addrs are the endpoints in the order they are tried, the one given
	// to NewClient first; next, the one to dial next, belongs to the run
	// goroutine.
	addrs []string
	next  int
	stats clientStats

	// sess is the client's session with WithResume, nil without; its id
	// is zero until a server has granted one. sessionOver says the server
	// ended it, so the next connection starts a new one.
	sess        *session
	sessionOver atomic.Bool
}

// NewClient returns a client for the server at addr (host:port). It checks
// the options and returns an error wrapping ErrInvalidOption for a bad
// configuration. The client does nothing until Start.
func NewClient(addr string, opts ...ClientOption) (*Client, error) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return nil, invalid("address %q: %v", addr, err)
	}
	o, err := newClientOptions(opts)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	var sess *session
	if o.resumeOn {
		sess = newSession(sessionID{}, o.resume, o.maxFrameSize)
	}
	return &Client{
		sess:    sess,
		sendBuf: o.sendBuffer,
		addrs:   append([]string{addr}, o.fallbacks...),
		opts:    o,
		log:     o.logger.WithField("remote", addr),
		ctx:     ctx,
		cancel:  cancel,
		exited:  make(chan struct{}),
		changed: make(chan struct{}),
	}, nil
}

// Start begins connecting in the background and returns at once. Calls
// after the first, and calls after Close, do nothing.
func (c *Client) Start() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.started {
		return
	}
	c.started = true
	c.setStateLocked(StateConnecting)
	go c.run()
}

// WaitConnected blocks until the client is connected, and returns nil. It
// returns ctx.Err() if ctx ends first, and the client's Err if it stops
// first. If Start has not been called yet it fails at once with
// ErrNotStarted, rather than wait for a connection that will never come:
// call Start first, not in a goroutine of its own.
func (c *Client) WaitConnected(ctx context.Context) error {
	for {
		c.mu.Lock()
		state, changed, err := c.state, c.changed, c.err
		c.mu.Unlock()
		switch state {
		case StateConnected:
			return nil
		case StateClosed:
			return err
		case StateIdle:
			return ErrNotStarted
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Send sends payload as one message. Messages leave in the order Send was
// called. It returns nil once the message is queued on the connection,
// which does not mean the server has received it: messages sent shortly
// before the connection dies are lost with it, and the loss is reported as
// the disconnect, not by Send. Send copies payload and does not keep it.
//
// With a session (WithResume) nothing is lost that way: Send keeps the
// message until the server acknowledges it, also while disconnected, and
// waits for room while the session's log is full; see WithResume. The
// rest of this comment is about a client without one, or whose server
// does not offer sessions.
//
// When the connection's send queue (64 KiB) is full, Send waits for room as
// long as ctx allows and then returns ctx.Err(). While there is no
// connection it fails at once with ErrNotConnected, or with a send buffer
// (WithSendBuffer) keeps the message for the next connection; after the
// client stopped it returns Err. A payload longer than the maximum message
// size, the client's own or the smaller one the server announced, fails with
// ErrFrameTooLarge and nothing is sent.
func (c *Client) Send(ctx context.Context, payload []byte) error {
	return c.send(ctx, payload, true)
}

// TrySend is Send without waiting: when the connection's send queue is
// full it fails at once with ErrQueueFull, and a send buffer with
// BufferBlock refuses with ErrBufferFull instead of waiting for room.
func (c *Client) TrySend(payload []byte) error {
	return c.send(context.Background(), payload, false)
}

func (c *Client) send(ctx context.Context, payload []byte, wait bool) error {
	if err := checkPayload(payload, c.opts.maxFrameSize); err != nil {
		return err
	}
	if c.sess != nil {
		// The session has its own lock, and ends with the client
		// (finish), after which it returns the client's error. It
		// counts what it takes (Stats).
		return c.sess.send(ctx, payload, wait)
	}
	for {
		if l := c.live.Load(); l != nil && !c.sendBuf.enabled() && c.ctx.Err() == nil {
			// Without a send buffer there is nothing to decide under
			// c.mu: the connection in use takes the message or says why
			// not. One that is going, or a client closing, is left to
			// the path below.
			switch err := l.offer(payload); {
			case err == nil:
				return nil
			case err == ErrQueueFull:
				if !wait {
					return err
				}
				if err := l.waitRoom(ctx); err != nil {
					return err
				}
				continue
			case errors.Is(err, ErrFrameTooLarge):
				return err
			}
		}
		// Whether the message goes on the live connection or into the
		// buffer is decided under c.mu, where publish hands the buffer
		// to a new connection, so no message can be left in the buffer
		// while a connection is up.
		c.mu.Lock()
		l := c.link
		switch {
		case c.err != nil:
			err := c.err
			c.mu.Unlock()
			return err
		case c.ctx.Err() != nil:
			c.mu.Unlock()
			return ErrClosed
		case l == nil && c.sendBuf.enabled():
			return c.buffer(ctx, payload, wait)
		case l == nil:
			c.mu.Unlock()
			return ErrNotConnected
		}
		err := l.offer(payload)
		switch {
		case err == nil:
			c.mu.Unlock()
			return nil
		case err == ErrQueueFull:
			c.mu.Unlock()
			if !wait {
				return err
			}
		case errors.Is(err, ErrFrameTooLarge):
			c.mu.Unlock()
			return err
		case c.ctx.Err() != nil:
			// Close took the connection down under this Send.
			c.mu.Unlock()
			return ErrClosed
		case c.sendBuf.enabled():
			// The connection is down but not yet replaced: the next
			// one takes the buffer.
			return c.buffer(ctx, payload, wait)
		default:
			c.mu.Unlock()
			return ErrNotConnected
		}
		if err := l.waitRoom(ctx); err != nil {
			return err
		}
	}
}

// State returns the client's current state.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// RTT returns the round-trip time measured by the last pong, or 0 before
// the first one.
func (c *Client) RTT() time.Duration {
	return time.Duration(c.stats.rttLast.Load())
}

// Endpoint returns the server address the client is connected to or, while
// disconnected, the one it is dialing or will dial next.
func (c *Client) Endpoint() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.endpointLocked()
}

func (c *Client) endpointLocked() string {
	if c.endpoint == "" {
		return c.addrs[0]
	}
	return c.endpoint
}

// Stats returns a snapshot of the client's counters.
func (c *Client) Stats() ClientStats {
	c.mu.Lock()
	st := c.stats.snapshot()
	if c.link != nil {
		// The live connection counts what Send gives it; its counts
		// join the others as it ends, under c.mu.
		msgs, bytes := c.link.sentCounts()
		st.MessagesOut += msgs
		st.BytesOut += bytes
	}
	st.Endpoint = c.endpointLocked()
	c.mu.Unlock()
	if c.sess != nil {
		msgs, bytes := c.sess.acceptedCounts()
		st.MessagesOut += msgs
		st.BytesOut += bytes
	}
	return st
}

// Done returns a channel that is closed when the client has stopped for
// good, after Close or after giving up.
func (c *Client) Done() <-chan struct{} {
	return c.exited
}

// Err returns nil while the client runs, and why it stopped afterwards:
// ErrClosed after Close, or an error wrapping ErrGaveUp or ErrUnauthorized.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Close stops the client: it interrupts a dial or a backoff wait at once,
// sends the server a close frame if connected, and returns once every
// goroutine the client started has exited. It is safe to call more than
// once; it always returns nil. Because it waits for the client's
// goroutines, calling it from one of the client's callbacks deadlocks: from
// there, call it in a new goroutine.
func (c *Client) Close() error {
	c.cancel()
	c.mu.Lock()
	started := c.started
	c.started = true
	c.mu.Unlock()
	if !started {
		c.finish(nil)
	}
	<-c.exited
	return nil
}

// finish records why the client stopped and reports it. err is nil after
// Close.
func (c *Client) finish(err error) {
	c.cancel()
	c.mu.Lock()
	c.err = err
	if err == nil {
		c.err = ErrClosed
	}
	c.setStateLocked(StateClosed)
	c.sendBuf.take() // nothing will send them now
	c.mu.Unlock()
	if c.sess != nil {
		c.sess.end(c.err)
	}
	if fn := c.opts.onClose; fn != nil {
		fn(err)
	}
	close(c.exited)
}

func (c *Client) setStateLocked(s State) {
	if c.state == s {
		return
	}
	c.state = s
	close(c.changed)
	c.changed = make(chan struct{})
}

// serve runs one established connection until it fails or the client is
// closed, and returns the cause. It starts the reader and the pinger and
// waits for both, so no goroutine of this connection outlives it.
//
// out is what preceded this connection since the last healthy one was
// lost; the connect line reports it.
func (c *Client) serve(l *link, hb *heartbeat, out outage) error {
	remote := l.nc.RemoteAddr()
	log := c.log.WithField("local", l.nc.LocalAddr().String())
	c.publish(l)
	c.stats.connects.Add(1)
	now := time.Now()
	c.stats.connectedSince.Store(now.UnixNano())
	if out.since.IsZero() {
		log.Info("connected")
	} else {
		down := now.Sub(out.since)
		attempts := "attempts"
		if out.dials == 1 {
			attempts = "attempt"
		}
		log.WithFields(logrus.Fields{"dials": out.dials, "downtime": down}).
			Infof("reconnected after %d %s in %.1f s", out.dials, attempts, down.Seconds())
	}
	if fn := c.opts.onConnect; fn != nil {
		deliverTo(c.sess, func() { fn(remote) })
	}

	var wg sync.WaitGroup
	wg.Go(func() { c.readLoop(l, hb) })
	if hb.interval > 0 {
		wg.Go(func() {
			ping := func(p []byte) error { return l.beat(framePing, p) }
			if err := hb.run(l.done, ping); err != nil {
				l.shutdown(err)
			}
		})
	}
	select {
	case <-l.done:
	case <-c.ctx.Done():
		ackAll(l)
		l.closeWith(CloseNormal, "client closing", ErrClosed)
	}
	wg.Wait()
	l.wait()
	l.release()
	err := l.cause()
	if c.sess != nil {
		c.sess.detach(l)
	}

	c.stats.connectedSince.Store(0)
	c.mu.Lock()
	c.link = nil
	c.live.Store(nil)
	msgs, bytes := l.sentCounts()
	c.stats.msgsOut.Add(msgs)
	c.stats.bytesOut.Add(bytes)
	if c.ctx.Err() == nil {
		c.setStateLocked(StateReconnecting)
	}
	c.mu.Unlock()
	log.WithField("err", err).Info("disconnected")
	if fn := c.opts.onDisconnect; fn != nil {
		deliverTo(c.sess, func() { fn(err) })
	}
	return err
}

// readLoop is the connection's only reader. It answers pings, measures
// pongs and hands messages to the message callback.
func (c *Client) readLoop(l *link, hb *heartbeat) {
	g := readerID(l)
	for {
		err := l.awaitInput()
		var t frameType
		var p []byte
		if err == nil {
			t, p, err = l.fr.next()
		}
		if err != nil {
			endRead(l, err)
			return
		}
		switch t {
		case frameData:
			if !deliverMessage(l, g, len(p), func() {
				c.stats.msgsIn.Add(1)
				c.stats.bytesIn.Add(uint64(len(p)))
				if fn := c.opts.onMessage; fn != nil {
					fn(p)
				}
			}) {
				return
			}
		case frameAck:
			if err := takeAck(l, p); err != nil {
				endRead(l, err)
				return
			}
		case framePing:
			if l.beat(framePong, p) != nil {
				return
			}
		case framePong:
			if rtt, ok := hb.pong(p); ok {
				c.stats.rtt(rtt)
				if debugEnabled(c.log) {
					c.log.WithField("rtt", rtt).Debug("pong")
				}
				if fn := c.opts.onPong; fn != nil {
					fn(rtt)
				}
			}
			if !ackOwed(l) {
				return
			}
		case frameGoodbye:
			window, ends := parseGoodbye(p)
			l.goodbye.Store(int64(window))
			if ends && l.sess != nil {
				c.sessionOver.Store(true)
			}
		case frameClose:
			if l.sess != nil {
				// A close frame ends the session with the connection.
				c.sessionOver.Store(true)
			}
			l.shutdown(parseClose(p))
			return
		default:
			endRead(l, protocolErrorf("unexpected %s frame", t))
			return
		}
	}
}

// endRead tears l down after its reader failed with err: with a close frame
// that says why for a protocol error, at once for anything else.
func endRead(l *link, err error) {
	var pe *protocolError
	if errors.As(err, &pe) {
		l.closeWith(CloseProtocolError, pe.detail, err)
		return
	}
	l.shutdown(readError(err))
}

// join makes l the connection of the client's session: the one it asked
// to resume if the server's hello h grants it, or else a new one (or none,
// from a server without sessions), reporting the old one lost.
func (c *Client) join(l *link, h hello, asked sessionID) error {
	s := c.sess
	if h.session && asked != (sessionID{}) && h.sessionID == asked {
		if err := s.check(h.received); err != nil {
			return err
		}
		s.resume(l, h.received)
		l.sess = s
		c.stats.resumes.Add(1)
		c.log.WithField("session", asked.String()).Info("session resumed")
		return nil
	}
	old := s.current()
	lost := s.restart(h.sessionID, l, !h.session)
	if h.session {
		l.sess = s
	}
	c.sessionOver.Store(false)
	if old == (sessionID{}) && len(lost) == 0 {
		return nil
	}
	c.stats.sessionsLost.Add(1)
	log := c.log.WithFields(logrus.Fields{"session": old.String(), "unacked": len(lost)})
	if h.session {
		log = log.WithField("new_session", h.sessionID.String())
	}
	log.Warn("session lost; starting a new one")
	if fn := c.opts.onSessionLost; fn != nil {
		deliverTo(s, func() { fn(lost) })
	}
	return nil
}
