package vgo

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/sirupsen/logrus"
)

// A Server accepts vgo connections, answers their pings and hands their data
// frames to the handler. Its lifecycle is net/http's: Serve until Shutdown
// or Close, after which Serve returns ErrServerClosed.
//
// All methods are safe for concurrent use.
type Server struct {
	opts serverOptions
	log  logrus.FieldLogger

	nextID atomic.Uint64
	stats  serverStats
	wg     sync.WaitGroup // one count per goroutine serving a connection
	done   chan struct{}  // closed when Shutdown or Close begins
	// drained is closed once the server is closing and its last
	// connection has been forgotten.
	drained chan struct{}

	mu        sync.Mutex
	closing   bool
	listeners []net.Listener // in the order Serve was called
	conns     map[uint64]*Conn
	open      int // conns that have completed the hello
	// working counts the conns in their handshake that have sent their
	// first bytes: those the server is spending work on.
	working int
	// throttled counts the connections refused with a retry hint since
	// one was last admitted.
	throttled int
	// sessions holds every session that has not ended, by id; the
	// suspended ones wait in the order they were suspended (sessions.go).
	sessions  map[sessionID]*Conn
	suspended suspendQueue
}

// NewServer returns a server configured by opts. It returns an error
// wrapping ErrInvalidOption for a bad configuration.
func NewServer(opts ...ServerOption) (*Server, error) {
	o, err := newServerOptions(opts)
	if err != nil {
		return nil, err
	}
	return &Server{
		opts:     o,
		log:      o.logger,
		done:     make(chan struct{}),
		drained:  make(chan struct{}),
		conns:    make(map[uint64]*Conn),
		sessions: make(map[sessionID]*Conn),
	}, nil
}

// ListenAndServe listens on the TCP address addr and calls Serve. It always
// returns a non-nil error: ErrServerClosed after Shutdown or Close.
func (s *Server) ListenAndServe(addr string) error {
	if s.isClosing() {
		return ErrServerClosed
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return s.Serve(l)
}

// Serve accepts connections on l until Shutdown or Close, and closes l
// before it returns. Temporary accept errors are retried after a short
// delay that grows to a second. It always returns a non-nil error:
// ErrServerClosed after Shutdown or Close.
func (s *Server) Serve(l net.Listener) error {
	if !s.trackListener(l) {
		l.Close()
		return ErrServerClosed
	}
	defer s.untrackListener(l)
	s.log.WithField("local", l.Addr().String()).Info("listening")

	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isClosing() {
				return ErrServerClosed
			}
			if !isTemporary(err) {
				return err
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.WithFields(logrus.Fields{"delay": delay, "err": err}).Warn("accept failed; retrying")
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-s.done:
				t.Stop()
				return ErrServerClosed
			}
			continue
		}
		delay = 0
		s.stats.accepted.Add(1)
		s.accept(nc)
	}
}

// isTemporary reports whether an accept error is worth retrying, such as
// running out of file descriptors.
func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// accept registers nc and starts its goroutine, or refuses it when the
// server is shutting down, at its connection limit or at its bound on
// handshakes.
func (s *Server) accept(nc net.Conn) {
	trusted := s.trusts(nc.RemoteAddr())
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	if s.opts.maxConns > 0 && len(s.conns) >= s.opts.maxConns {
		s.mu.Unlock()
		s.refuse(nc)
		return
	}
	if s.opts.maxHandshakes > 0 && s.working >= s.opts.maxHandshakes {
		s.throttled++
		first := s.throttled == 1
		s.mu.Unlock()
		s.tryLater(nc, first)
		return
	}
	refused := s.throttled
	s.throttled = 0
	c := &Conn{
		id:      s.nextID.Add(1),
		srv:     s,
		remote:  nc.RemoteAddr(),
		local:   nc.LocalAddr(),
		trusted: trusted,
	}
	raw := nc
	if s.opts.tlsConfig != nil {
		c.underTLS = &underTLS{Conn: nc}
		nc = tls.Server(c.underTLS, s.opts.tlsConfig)
	}
	c.l = newLink(nc, raw, &s.opts.commonOptions, ErrClosed)
	c.l.watcher = c
	s.conns[c.id] = c
	s.wg.Add(1)
	s.mu.Unlock()
	if refused > 0 {
		s.log.WithField("refused", refused).Info("admission control: accepting again")
	}
	go s.serveConn(c)
}

// refuse tells a connection over the limit why it is closed, then closes
// it.
func (s *Server) refuse(nc net.Conn) {
	s.stats.refused.Add(1)
	s.log.WithFields(logrus.Fields{"remote": nc.RemoteAddr().String(), "max": s.opts.maxConns}).
		Warn("connection refused: at max connections")
	s.closeRaw(nc, marshalClose(CloseServerFull, "at max connections"))
}

// tryLater answers a connection accepted beyond the handshake bound with a
// close frame that tells the client when to dial again, without reading
// its hello. first marks the refusal that begins a run of them, the one
// logged above debug.
func (s *Server) tryLater(nc net.Conn, first bool) {
	s.stats.throttled.Add(1)
	spread := s.opts.retryAfter
	hint := spread/2 + time.Duration(rand.Int64N(int64(spread)+1))
	if first || debugEnabled(s.log) {
		log := s.log.WithFields(logrus.Fields{"remote": nc.RemoteAddr().String(), "retry_after": hint, "max": s.opts.maxHandshakes})
		if first {
			log.Warn("admission control: too many handshakes; refusing connections with a retry hint")
		} else {
			log.Debug("connection refused with a retry hint")
		}
	}
	s.closeRaw(nc, marshalTryLater(hint, "too many handshakes"))
}

// closeRaw sends a close frame on a connection that never started its
// handshake, and closes it. The frame fits in an empty socket buffer, so
// the short deadline only matters for a broken socket. Over TLS there is
// no way to send it before a TLS handshake, and the connection is closed
// without it.
func (s *Server) closeRaw(nc net.Conn, payload []byte) {
	if s.opts.tlsConfig == nil {
		if nc.SetWriteDeadline(time.Now().Add(closeFrameTimeout)) == nil {
			// Best effort: the peer learns the reason if it can.
			_, _ = nc.Write(appendFrame(nil, frameClose, payload))
		}
	}
	nc.Close()
}

// serveConn runs the handshake of one connection, then hands it to a
// goroutine of its own for the rest (serveFrames).
func (s *Server) serveConn(c *Conn) {
	defer s.wg.Done()

	resumed, err := s.handshake(c)
	if err != nil {
		if errors.Is(err, errProbe) {
			s.stats.probes.Add(1)
			if debugEnabled(c.srv.log) {
				c.logger().Debug("health probe: closed before its hello")
			}
		} else {
			c.logger().WithField("err", err).Warn("handshake failed")
			switch {
			case errors.Is(err, ErrUnauthorized):
				s.stats.auth.Add(1)
			case errors.Is(err, ErrProtocol):
				s.stats.protocol.Add(1)
			}
		}
		c.end(err)
		c.l.wait()
		c.l.release()
		s.forget(c)
		return
	}
	switch {
	case resumed != nil:
		// From here on the connection serves the session it resumed.
		c = resumed
		s.stats.resumes.Add(1)
		c.logger().WithField("session", c.sess.Load().id.String()).Info("client resumed its session")
		if fn := s.opts.onConnResume; fn != nil {
			deliverTo(c.sess.Load(), func() { fn(c) })
		}
	default:
		c.logger().Info("client connected")
		if fn := s.opts.onConnOpen; fn != nil {
			deliverTo(c.sess.Load(), func() { fn(c) })
		}
	}
	// The handshake, its log lines and the callbacks have grown this
	// goroutine's stack, which the runtime never shrinks while the
	// goroutine waits in a read; a fresh one, which waits with a few
	// frames, keeps the smallest stack for as long as the connection
	// stays idle.
	s.wg.Add(1)
	go s.serveFrames(c)
}

// serveFrames runs the read loop of an open connection, then its
// teardown.
func (s *Server) serveFrames(c *Conn) {
	defer s.wg.Done()
	c.end(s.readLoop(c))
	s.disconnected(c)
}

// disconnected tears down connection c once its reader has stopped. It is
// a function of its own to keep serveFrames' frame small (see readLoop).
func (s *Server) disconnected(c *Conn) {
	c.l.wait()
	c.l.release()
	cause := c.l.cause()
	log := c.logger().WithField("err", cause)
	switch {
	case errors.Is(cause, ErrProtocol):
		s.stats.protocol.Add(1)
		log.Warn("client disconnected: protocol error")
	case errors.Is(cause, ErrHeartbeatTimeout):
		s.stats.stale.Add(1)
		log.Info("client disconnected: stale, no heartbeat")
	case errors.Is(cause, ErrSlowConsumer):
		s.stats.slow.Add(1)
		log.Warn("client disconnected: slow consumer")
	default:
		log.Info("client disconnected")
	}
	if c.sess.Load() != nil {
		s.leave(c, cause)
		return
	}
	if fn := s.opts.onConnClose; fn != nil {
		fn(c, cause)
	}
	s.forget(c)
}

// handshake runs the TLS handshake, if any, and the hello exchange within
// the handshake timeout, so a peer that never speaks is dropped. It returns
// the session's Conn when the client resumed one, which the connection
// serves from then on.
func (s *Server) handshake(c *Conn) (resumed *Conn, err error) {
	var h hello
	deadline, err := s.greet(c, &h)
	if err != nil {
		return nil, err
	}
	return s.answer(c, h, deadline)
}

// greet runs the handshake up to the client's hello, which it checks and
// authenticates, and returns the handshake's deadline.
func (s *Server) greet(c *Conn, hp *hello) (time.Time, error) {
	var deadline time.Time
	if s.opts.handshakeTimeout > 0 {
		deadline = time.Now().Add(s.opts.handshakeTimeout)
	}
	if s.opts.maxHandshakes > 0 {
		// A connection takes one of the handshakes WithAdmission bounds
		// only once it has sent something: until then it costs no work,
		// and a peer that opens connections and stays silent keeps
		// nobody out.
		if err := awaitData(c.l.raw, deadline); err != nil {
			return deadline, handshakeError("read hello", err)
		}
		s.mu.Lock()
		c.working = true
		s.working++
		s.mu.Unlock()
	}
	if tc, ok := c.l.nc.(*tls.Conn); ok {
		if err := tc.SetDeadline(deadline); err != nil {
			return deadline, err
		}
		if c.trusted {
			if err := s.readProxyHeaderUnderTLS(c); err != nil {
				return deadline, err
			}
		}
		if err := tc.Handshake(); err != nil {
			var rh tls.RecordHeaderError
			switch {
			case endedUnheard(err) && !c.underTLS.heard:
				return deadline, errProbe
			case errors.As(err, &rh) && isProxySignature(rh.RecordHeader[:]):
				return deadline, s.unwantedProxyHeader(c)
			}
			return deadline, handshakeError("TLS handshake", err)
		}
		s.mu.Lock()
		c.sealed = true
		s.mu.Unlock()
		c.l.startHandshake(deadline)
	} else {
		c.l.startHandshake(deadline)
		if err := c.awaitHello(); err != nil {
			return deadline, err
		}
		if err := s.readProxyHeaderFrames(c); err != nil {
			return deadline, err
		}
	}
	// A balancer's check may also end right after a PROXY header, or
	// after a TLS handshake.
	if err := c.awaitHello(); err != nil {
		return deadline, err
	}
	t, p, err := c.l.fr.next()
	if err != nil {
		return deadline, handshakeError("read hello", err)
	}
	if t != frameHello {
		return deadline, protocolErrorf("expected hello, got %s frame", t)
	}
	h, err := parseHello(p, false)
	if err != nil {
		return deadline, err
	}
	if h.version != ProtocolVersion {
		return deadline, &refusal{
			code:   CloseBadVersion,
			reason: fmt.Sprintf("server speaks version %d", ProtocolVersion),
			err:    protocolErrorf("client speaks version %d, server %d", h.version, ProtocolVersion),
		}
	}
	if fn := s.opts.authenticate; fn != nil {
		identity, err := fn(c, h.credentials)
		if err != nil {
			return deadline, &refusal{code: CloseUnauthorized, reason: err.Error(), err: fmt.Errorf("%w: %w", ErrUnauthorized, err)}
		}
		c.identity.Store(&identity)
	}
	*hp = h
	return deadline, nil
}

// answer answers the client's hello h with the server's, and opens the
// connection: with a new session, or with the one the client resumes,
// which it returns, when the client asks for one.
func (s *Server) answer(c *Conn, h hello, deadline time.Time) (resumed *Conn, err error) {
	mine := hello{
		version:          ProtocolVersion,
		maxMessage:       s.opts.maxFrameSize,
		minPing:          s.opts.minPing,
		maxPing:          s.opts.maxPing,
		heartbeatTimeout: s.opts.heartbeatTimeout,
	}
	var sess *session
	if s.opts.sessionsOn && h.resume {
		if h.sessionID != (sessionID{}) {
			if resumed, err = s.claim(c, h, deadline); err != nil {
				return nil, err
			}
		}
		if resumed != nil {
			sess = resumed.sess.Load()
			mine.received = sess.received.Load()
		} else {
			sess = newSession(newSessionID(), s.opts.sessions.BufferBytes, s.opts.maxFrameSize)
		}
		mine.session, mine.sessionID = true, sess.id
	}
	// The hello is queued and the connection marked open in one step
	// under s.mu, where Shutdown decides who gets a goodbye: a client
	// that has the hello is sent one, and after Shutdown began no client
	// is sent a hello.
	s.mu.Lock()
	switch {
	case s.closing:
		err = &refusal{code: CloseGoingAway, reason: "server shutting down", err: ErrServerClosed}
	case resumed != nil && s.sessions[sess.id] != resumed:
		err = errors.New("vgo: the session ended while it was being resumed")
	case !c.l.established(s.opts.heartbeatTimeout, s.opts.maxFrameSize, h, mine.marshal()):
		err = c.l.cause()
	}
	if err != nil {
		s.mu.Unlock()
		if resumed != nil {
			s.unclaim(resumed)
		}
		return nil, err
	}
	c.opened = true
	s.open++
	if c.working {
		c.working = false
		s.working--
	}
	if sess != nil {
		c.l.sess = sess
		if resumed != nil {
			s.adoptLocked(resumed, c)
		} else {
			c.sess.Store(sess)
			c.attached = make(chan struct{})
			s.sessions[sess.id] = c
		}
		peer := h.received
		if resumed == nil {
			peer = 0 // of a session that is not this one
		}
		sess.resume(c.l, peer)
	}
	s.mu.Unlock()
	if resumed != nil {
		// The connection lives on as the session's Conn. The one the
		// authenticator saw is closed, and what it tied to it is
		// released.
		c.sess.Store(closedSession)
		c.finish(errResumed)
	}
	return resumed, nil
}

// readLoop reads frames until the connection fails, answering pings and
// handing data frames to the handler. Every socket read carries the
// heartbeat deadline, so a silent peer ends the loop with
// ErrHeartbeatTimeout.
//
// An idle connection waits in awaitInput, under serveFrames and readLoop:
// the frames of the three, with the runtime's below them, must stay within
// the goroutine's first stack of 2 KiB, or the stack doubles for good.
// What is rare (a ping's debug line, the teardown) lives in functions of
// its own, so that these frames stay small.
func (s *Server) readLoop(c *Conn) error {
	g := readerID(c.l)
	for {
		err := c.l.awaitInput()
		var t frameType
		var p []byte
		if err == nil {
			t, p, err = c.l.fr.next()
		}
		if err != nil {
			if c.l.cause() != nil {
				return nil
			}
			return readError(err)
		}
		switch t {
		case frameData:
			if !deliverMessage(c.l, g, len(p), func() {
				if fn := s.opts.handler; fn != nil {
					fn(c, p)
				}
			}) {
				return nil
			}
		case frameAck:
			if err := takeAck(c.l, p); err != nil {
				return err
			}
		case framePing:
			if !s.answerPing(c, p) {
				return nil
			}
		case framePong:
		case frameClose:
			return parseClose(p)
		default:
			return protocolErrorf("unexpected %s frame", t)
		}
	}
}

// answerPing answers a ping from c with payload p, with an ack first if
// one is owed. It reports false if the connection is down.
func (s *Server) answerPing(c *Conn, p []byte) bool {
	if debugEnabled(s.log) {
		c.logger().Debug("received ping")
	}
	if fn := s.opts.onPing; fn != nil {
		fn(c)
	}
	return ackOwed(c.l) && c.l.beat(framePong, p) == nil
}

// awaitHello waits for the first byte of what should be the hello, and
// reports a connection that ends before sending one as a probe.
func (c *Conn) awaitHello() error {
	if _, err := c.l.fr.peek(1); err != nil {
		if endedUnheard(err) {
			return errProbe
		}
		return handshakeError("read hello", err)
	}
	return nil
}

// readProxyHeader reads a PROXY protocol header from br, the start of a
// connection, if one is there, and takes the client's address from it.
// From a source that may not send one only the signature is looked at, so
// that nothing of it is parsed or allocated for.
func (s *Server) readProxyHeader(c *Conn, br *bufio.Reader) error {
	if !c.trusted {
		if b, _ := br.Peek(1); len(b) == 1 && b[0] != proxyproto.SIGV1[0] && b[0] != proxyproto.SIGV2[0] {
			return nil
		}
		if b, _ := br.Peek(len(proxyproto.SIGV1)); isProxySignature(b) {
			return s.unwantedProxyHeader(c)
		}
		return nil
	}
	h, err := proxyproto.Read(br)
	switch {
	case errors.Is(err, proxyproto.ErrNoProxyProtocol):
		return nil
	case err != nil:
		return proxyHeaderError(err)
	}
	s.useProxyHeader(c, h)
	return nil
}

// readProxyHeaderFrames reads the PROXY header that may come ahead of the
// frames of a plain TCP connection, and leaves what follows it to the
// frame reader. A header is read through a small reader of its own, whose
// bytes past the header go back.
func (s *Server) readProxyHeaderFrames(c *Conn) error {
	fr := c.l.fr
	if b, _ := fr.peek(1); len(b) == 1 && b[0] != proxyproto.SIGV1[0] && b[0] != proxyproto.SIGV2[0] {
		return nil
	}
	br := bufio.NewReaderSize(fr, proxyHeaderBuffer)
	err := s.readProxyHeader(c, br)
	if n := br.Buffered(); n > 0 {
		rest, _ := br.Peek(n)
		fr.unread(rest)
	}
	return err
}

// readProxyHeaderUnderTLS reads the PROXY header that a trusted source may
// send ahead of the TLS stream, and leaves what follows it to the TLS
// handshake.
func (s *Server) readProxyHeaderUnderTLS(c *Conn) error {
	u := c.underTLS
	br := bufio.NewReaderSize(u, proxyHeaderBuffer)
	if _, err := br.Peek(1); err != nil {
		if endedUnheard(err) {
			return errProbe
		}
		return handshakeError("TLS handshake", err)
	}
	if err := s.readProxyHeader(c, br); err != nil {
		return err
	}
	if n := br.Buffered(); n > 0 {
		u.pending, _ = br.Peek(n)
	}
	// What counts from here on is whether anything came after the
	// header.
	u.heard = len(u.pending) > 0
	return nil
}

// proxyHeaderBuffer holds a version 1 header, which must fit whole, and
// the fixed part of a version 2 one; its addresses and extensions are
// read through it.
const proxyHeaderBuffer = 256

// underTLS is the connection under a server's TLS: it hands the TLS layer
// what was read past a PROXY header first, and notes whether the peer
// sent anything, which tells a health probe from a failed handshake.
type underTLS struct {
	net.Conn
	pending []byte
	heard   bool
}

func (u *underTLS) Read(b []byte) (int, error) {
	if len(u.pending) > 0 {
		n := copy(b, u.pending)
		u.pending = u.pending[n:]
		if len(u.pending) == 0 {
			u.pending = nil
		}
		return n, nil
	}
	n, err := u.Conn.Read(b)
	if n > 0 {
		u.heard = true
	}
	return n, err
}

// unwantedProxyHeader is the error for a PROXY header from a source that
// may not send one.
func (s *Server) unwantedProxyHeader(c *Conn) error {
	if s.opts.trustedProxies == nil {
		return protocolErrorf("PROXY protocol header, which this server does not accept")
	}
	return protocolErrorf("PROXY protocol header from %s, which is not a trusted proxy", c.remote)
}

// isProxySignature reports whether b, the first five bytes of a stream,
// begin a PROXY protocol header of either version.
func isProxySignature(b []byte) bool {
	return len(b) == len(proxyproto.SIGV1) &&
		(bytes.Equal(b, proxyproto.SIGV1) || bytes.HasPrefix(proxyproto.SIGV2, b))
}

// proxyHeaderError tells a PROXY header that could not be read, because
// the connection failed or timed out, from one that is malformed.
func proxyHeaderError(err error) error {
	var ne net.Error
	if errors.As(err, &ne) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return handshakeError("read PROXY header", err)
	}
	return protocolErrorf("bad PROXY protocol header: %v", err)
}

// useProxyHeader takes a connection's addresses from its PROXY header. A
// header with the LOCAL command, or without addresses, leaves them alone:
// it comes from the proxy itself, such as a health check.
func (s *Server) useProxyHeader(c *Conn, h *proxyproto.Header) {
	if h == nil || h.Command.IsLocal() || h.SourceAddr == nil {
		return
	}
	c.proxy, c.remote = c.remote, h.SourceAddr
	if h.DestinationAddr != nil {
		c.local = h.DestinationAddr
	}
}

// trusts reports whether a connection from addr may send a PROXY header.
func (s *Server) trusts(addr net.Addr) bool {
	if s.opts.trustedProxies == nil {
		return false
	}
	var ip netip.Addr
	if ta, ok := addr.(*net.TCPAddr); ok {
		ip = ta.AddrPort().Addr().Unmap()
	} else if ap, err := netip.ParseAddrPort(addr.String()); err == nil {
		ip = ap.Addr().Unmap()
	} else {
		return false
	}
	// A link-local peer's address carries the zone it came in on, and a
	// prefix never contains a zoned address.
	ip = ip.WithZone("")
	for _, p := range s.opts.trustedProxies {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// errProbe is the end of a connection closed before it sent a hello.
var errProbe = errors.New("vgo: connection closed before its hello (a health probe)")

// endedUnheard reports whether a connection ended before it sent anything:
// a load balancer's health probe, which connects and closes.
func endedUnheard(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)
}

func (s *Server) forget(c *Conn) {
	s.mu.Lock()
	s.forgetLocked(c)
	s.mu.Unlock()
}

func (s *Server) forgetLocked(c *Conn) {
	delete(s.conns, c.id)
	if c.opened {
		s.open--
	}
	if c.working {
		s.working--
	}
	s.checkDrainedLocked()
}

// checkDrainedLocked closes drained when a closing server has no
// connection left.
func (s *Server) checkDrainedLocked() {
	if s.closing && len(s.conns) == 0 {
		select {
		case <-s.drained:
		default:
			close(s.drained)
		}
	}
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

func (s *Server) trackListener(l net.Listener) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.listeners = append(s.listeners, l)
	return true
}

func (s *Server) untrackListener(l net.Listener) {
	s.mu.Lock()
	s.listeners = slices.DeleteFunc(s.listeners, func(x net.Listener) bool { return x == l })
	s.mu.Unlock()
	l.Close()
}

// Addr returns the address the server listens on: that of the listener
// Serve was first called with among those it still serves. It is nil
// until Serve has begun and after it has returned, so a caller that starts
// ListenAndServe in a goroutine may have to wait for it; one that needs
// the port of ":0" before serving can create the listener itself and pass
// it to Serve.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.listeners) == 0 {
		return nil
	}
	return s.listeners[0].Addr()
}

// stop marks the server closing, closes its listeners, ends the suspended
// sessions and returns the connections it has.
func (s *Server) stop() []*Conn {
	s.mu.Lock()
	if !s.closing {
		s.closing = true
		close(s.done)
		s.checkDrainedLocked()
	}
	for _, l := range s.listeners {
		l.Close()
	}
	conns := slices.Collect(maps.Values(s.conns))
	suspended := s.takeSuspendedLocked()
	s.mu.Unlock()
	s.closeSessions(suspended, ErrServerClosed)
	return conns
}

// Close closes the listeners and every connection at once, without close
// frames, and returns after every connection goroutine has exited (a
// handler that never returns holds it up, and so calling Close from a
// handler or callback deadlocks). Serve then returns ErrServerClosed. Close
// is safe to call more than once.
func (s *Server) Close() error {
	for _, c := range s.stop() {
		c.l.shutdown(ErrServerClosed)
	}
	s.wg.Wait()
	return nil
}

// Shutdown stops the server gracefully: it stops accepting, sends every
// open connection a goodbye frame (see WithDrainWindow) and every
// connection a going-away close frame (over TLS, every one past its TLS
// handshake; the others are closed at once), waits up to 250ms, less if
// ctx ends sooner, for those frames to leave, closes the connections, then
// waits for their goroutines to exit. If ctx ends first it returns
// ctx.Err(); call Close to finish the job. Serve returns ErrServerClosed.
// Like Close, it must not be called from a handler or callback.
func (s *Server) Shutdown(ctx context.Context) error {
	// Every connection gets its close frame at once, and the whole server
	// waits once, briefly, for them to leave: a slow peer must not hold up
	// the others, nor Shutdown its context.
	conns := s.stop()
	closeCtx, cancel := context.WithTimeout(ctx, closeFrameTimeout)
	// A client with a session is sent a goodbye even with no drain
	// window, with the flag that its session ends.
	window := binary.BigEndian.AppendUint32(nil, millis(s.opts.drainWindow))
	endsSession := append(window[:4:4], goodbyeEndsSession)
	var goodbye []byte
	if s.opts.drainWindow > 0 {
		goodbye = window
	}
	for _, c := range conns {
		// Only a connection that has the server's hello may be sent a
		// goodbye; the handshake decides that under s.mu too.
		s.mu.Lock()
		switch {
		case !c.opened:
		case c.sess.Load() != nil:
			// A client with a session is told that it ends, so that it
			// starts a new one rather than ask the next server for it.
			ackAll(c.l)
			c.l.queueFrame(frameGoodbye, endsSession)
		case goodbye != nil:
			// Ahead of the close frame, so the client has it when it
			// plans its reconnect.
			c.l.queueFrame(frameGoodbye, goodbye)
		}
		framable := c.framable()
		s.mu.Unlock()
		if !framable {
			c.l.shutdown(ErrServerClosed)
			continue
		}
		c.l.queueClose(CloseGoingAway, "server shutting down", ErrServerClosed)
	}
	for _, c := range conns {
		c.l.flushed(closeCtx)
	}
	cancel()
	for _, c := range conns {
		c.l.shutdown(ErrServerClosed)
	}
	select {
	case <-s.drained:
		s.wg.Wait() // each goroutine is past forget, about to exit
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Stats returns a snapshot of the server's counters.
func (s *Server) Stats() ServerStats {
	return ServerStats{
		Accepted:       s.stats.accepted.Load(),
		Refused:        s.stats.refused.Load(),
		StaleClosed:    s.stats.stale.Load(),
		ProtocolErrors: s.stats.protocol.Load(),
		SlowConsumers:  s.stats.slow.Load(),
		Throttled:      s.stats.throttled.Load(),
		AuthFailures:   s.stats.auth.Load(),
		Probes:         s.stats.probes.Load(),
		Resumes:        s.stats.resumes.Load(),
		Expired:        s.stats.expired.Load(),
		Suspended:      s.suspendedCount(),
		Live:           s.Len(),
	}
}

func (s *Server) suspendedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.suspended.count
}

// Len returns the number of open connections, those that have completed
// the hello and whose goroutine has not yet finished (a connection closed
// while its handler runs counts until the handler returns), and of
// suspended sessions (see Sessions).
func (s *Server) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.open + s.suspended.count
}

// Range calls fn for each open connection and suspended session until fn
// returns false. It works on a snapshot, so fn may call any method of the
// server or the connection.
func (s *Server) Range(fn func(c *Conn) bool) {
	s.mu.Lock()
	conns := make([]*Conn, 0, s.open+s.suspended.count)
	for _, c := range s.conns {
		if c.opened {
			conns = append(conns, c)
		}
	}
	q := &s.suspended
	for _, e := range q.entries[q.head:] {
		if e.c.suspended == e.n {
			conns = append(conns, e.c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		if !fn(c) {
			return
		}
	}
}

// Broadcast queues payload on every open connection and suspended
// session and returns how many it reached, with the meaning Send gives to queueing. It waits on no
// connection: one whose send queue is full is skipped (as by TrySend), and
// one whose writes stall for the write timeout is dropped as a slow
// consumer. ctx stops a broadcast over many connections part way.
func (s *Server) Broadcast(ctx context.Context, payload []byte) int {
	n := 0
	s.Range(func(c *Conn) bool {
		if c.TrySend(payload) == nil {
			n++
		}
		return ctx.Err() == nil
	})
	return n
}

// A Conn is one client connection on a Server. Its methods are safe for
// concurrent use, also from the handler.
type Conn struct {
	id  uint64
	srv *Server
	l   *link

	// Set during the handshake, before the connection is open, and only
	// read after that: a PROXY header replaces the addresses, and proxy
	// is then the balancer's.
	remote, local, proxy net.Addr
	underTLS             *underTLS // with TLS
	trusted              bool      // its source may send a PROXY header

	opened  bool // guarded by srv.mu
	working bool // in its handshake, with bytes received; guarded by srv.mu
	sealed  bool // past its TLS handshake; guarded by srv.mu

	// sess is the connection's session, nil without one; it is set as
	// the connection opens. A session's Conn passes from connection to
	// connection: l, the addresses, underTLS, trusted and sealed
	// then change, under srv.mu, and are read under it by any goroutine
	// but the one serving the connection.
	sess atomic.Pointer[session]
	sessionState

	identity, value atomic.Pointer[any]
	// ctx is made on first use; endCause holds the cause the connection
	// began to close with, for a context made after that.
	ctx      atomic.Pointer[connContext]
	endCause atomic.Pointer[error]
}

// connContext is a connection's context and the function that ends it.
type connContext struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
}

// logger returns the connection's logger: the server's, with the
// connection's ID and its client's address, and the balancer's behind a
// PROXY header. It is made for each use, rarely (as the connection opens
// and closes), so that a connection holds none.
func (c *Conn) logger() logrus.FieldLogger {
	fields := logrus.Fields{"conn": c.id, "remote": c.remote.String()}
	if c.proxy != nil {
		fields["proxy"] = c.proxy.String()
	}
	return c.srv.log.WithFields(fields)
}

// Conn returns the open connection with the given ID, if the server has
// one.
func (s *Server) Conn(id uint64) (*Conn, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.conns[id]
	if !ok || !c.opened {
		return nil, false
	}
	return c, true
}

// ID returns the connection's number, unique within its server.
func (c *Conn) ID() uint64 { return c.id }

// RemoteAddr returns the client's address. Behind a trusted proxy that
// sends a PROXY protocol header (WithProxyProtocol), it is the address the
// header gives, the client's own, and not the proxy's.
func (c *Conn) RemoteAddr() net.Addr {
	if c.sess.Load() != nil {
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
	}
	return c.remote
}

// LocalAddr returns the server's address the client connected to: with a
// PROXY protocol header, the one the client dialed at the proxy.
func (c *Conn) LocalAddr() net.Addr {
	if c.sess.Load() != nil {
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
	}
	return c.local
}

// TLS returns the state of the connection's TLS session, with the
// client's certificates under mutual TLS, or nil for plain TCP. The
// authenticator and everything after it may call it.
func (c *Conn) TLS() *tls.ConnectionState {
	tc, ok := c.link().nc.(*tls.Conn)
	if !ok {
		return nil
	}
	state := tc.ConnectionState()
	return &state
}

// Identity returns what the authenticator (WithAuthenticator) returned for
// the connection's credentials, or nil without an authenticator. It is set
// once the authenticator has returned and does not change; a function the
// authenticator leaves behind, such as one run by context.AfterFunc, should
// keep the identity itself rather than ask for it.
func (c *Conn) Identity() any { return load(&c.identity) }

// Value returns the value last stored with SetValue, or nil.
func (c *Conn) Value() any { return load(&c.value) }

func load(p *atomic.Pointer[any]) any {
	if v := p.Load(); v != nil {
		return *v
	}
	return nil
}

// SetValue stores v on the connection for the application, such as a
// session record, to be read back with Value from any goroutine. vgo
// does not look at it.
func (c *Conn) SetValue(v any) { c.value.Store(&v) }

// Context returns a context that ends when the connection does: it is
// canceled as soon as the connection starts to close, for whatever reason,
// and context.Cause returns that reason, the one WithOnConnClose is given.
// It ends on every path, also for a connection that fails after its
// authenticator ran and before it opened, which WithOnConnClose does not
// see; release there what the authenticator set up, for example with
// context.AfterFunc. Work a handler starts for the connection can use it
// to stop when the client goes.
func (c *Conn) Context() context.Context {
	if cc := c.ctx.Load(); cc != nil {
		return cc.ctx
	}
	cc := new(connContext)
	cc.ctx, cc.cancel = context.WithCancelCause(context.Background())
	if !c.ctx.CompareAndSwap(nil, cc) {
		cc.cancel(nil)
		return c.ctx.Load().ctx
	}
	// closing may have looked for a context before there was one.
	if cause := c.endCause.Load(); cause != nil {
		cc.cancel(*cause)
	}
	return cc.ctx
}

// link returns the connection the Conn is served by: for a session, the
// latest.
func (c *Conn) link() *link {
	if c.sess.Load() != nil {
		c.srv.mu.Lock()
		defer c.srv.mu.Unlock()
	}
	return c.l
}

// closing cancels the connection's context, if it has one, once the
// connection starts to close. A session's Conn outlives its connections:
// its context ends with the session (closeSession).
func (c *Conn) closing(cause error) {
	if c.sess.Load() != nil {
		return
	}
	c.finish(cause)
}

// finish cancels the Conn's context, if it has one, with cause.
func (c *Conn) finish(cause error) {
	c.endCause.CompareAndSwap(nil, &cause)
	if cc := c.ctx.Load(); cc != nil {
		cc.cancel(cause)
	}
}

// Send sends payload to the client as one message, with the same
// guarantees as Client.Send: it returns once the message is queued,
// waiting for room in the send queue as long as ctx allows. Once the
// connection is closing it returns ErrClosed, and before it is open
// ErrNotConnected.
func (c *Conn) Send(ctx context.Context, payload []byte) error {
	if s := c.sess.Load(); s != nil {
		return s.send(ctx, payload, true)
	}
	return c.l.send(ctx, payload)
}

// TrySend is Send without waiting: when the send queue is full it fails at
// once with ErrQueueFull. A connection whose writes stall for the write
// timeout is dropped as a slow consumer.
func (c *Conn) TrySend(payload []byte) error {
	if s := c.sess.Load(); s != nil {
		return s.send(context.Background(), payload, false)
	}
	return c.l.offer(payload)
}

// end tears the connection down after err, the reason its read loop or
// handshake stopped (nil when the link is already down), and tells the
// client why with a close frame when the protocol has a code for it.
func (c *Conn) end(err error) {
	var (
		r  *refusal
		pe *protocolError
	)
	framable := c.framable()
	switch {
	case framable && errors.As(err, &r):
		c.l.closeWith(r.code, r.reason, r.err)
	case framable && errors.As(err, &pe):
		c.l.closeWith(CloseProtocolError, pe.detail, err)
	case err != nil:
		c.l.shutdown(err)
	}
}

// framable reports whether a frame can be sent to the client: not before
// its TLS handshake is done, when no frame can reach it and writing one
// would make the writer run the handshake itself, beside the connection's
// own goroutine reading the same socket. The caller holds srv.mu or is
// the connection's goroutine.
func (c *Conn) framable() bool { return c.underTLS == nil || c.sealed }

// refusal is a handshake that the server turns down with a close code of
// its own and a reason meant for the client.
type refusal struct {
	code   CloseCode
	reason string
	err    error
}

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// Close sends the client a close frame and closes the connection. It is
// safe to call more than once.
func (c *Conn) Close() error {
	if c.sess.Load() != nil {
		return c.srv.closeSessionConn(c)
	}
	c.l.closeWith(CloseNormal, "closed by server", ErrClosed)
	return nil
}

// closeSessionConn is Close for a session's Conn: a connection serving it
// sends the close frame that ends it; without one it ends at once.
func (s *Server) closeSessionConn(c *Conn) error {
	s.mu.Lock()
	if c.attached != nil {
		c.closeRequested = true
		l := c.l
		s.mu.Unlock()
		ackAll(l)
		l.closeWith(CloseNormal, "closed by server", ErrClosed)
		return nil
	}
	_, live := s.sessions[c.sess.Load().id]
	if live {
		s.dropLocked(c)
	}
	s.mu.Unlock()
	if live {
		s.closeSession(c, ErrClosed)
	}
	return nil
}
