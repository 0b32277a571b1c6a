package vgo

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// A session carries messages across connections, exactly once and in
// order, when the server enables sessions (WithSessions) and the client
// asks for them (WithResume). PROTOCOL.md describes it on the wire; in
// short:
//
//   - The server's hello names the session with an id of 128 random bits.
//     A client that reconnects presents the id, and each side's hello says
//     how many of the other's messages it has received.
//   - The data messages of a session are numbered from 1 in each
//     direction, without a number on the wire: the first one a side sends
//     on a connection follows the last one its peer said it received.
//   - A receiver acknowledges what it has received with an ack frame now
//     and then (ackEvery). A sender keeps every message until it is
//     acknowledged, and on resume sends again those its peer lacks.
//
// The same session type serves both sides.

// sessionIDSize is the length of a session id: 128 bits.
const sessionIDSize = 16

type sessionID [sessionIDSize]byte

// newSessionID returns a session id no one can guess.
func newSessionID() sessionID {
	var id sessionID
	_, _ = rand.Read(id[:]) // crypto/rand.Read never fails
	return id
}

// The receiver of a session acknowledges after every ackEvery messages or
// ackBytes bytes, when its input runs dry (at once if the last ack is at
// least ackDelay old, or else by a timer once it is), and with every ping
// it answers (the server) or pong it receives (the client). A burst is
// therefore acknowledged within ackDelay of its end, and a stream costs
// about an ack frame per ackDelay, or per ackEvery messages.
const (
	ackEvery = 256
	ackBytes = 64 << 10
	ackDelay = 5 * time.Millisecond
)

// recordHeader is the length prefix of each message in a session's log.
const recordHeader = 4

// session is one side's state of a resumable session: the messages it sent
// that the peer has not acknowledged, and how many it has received.
type session struct {
	max int // the log's bound in bytes (see send)

	mu sync.Mutex
	id sessionID
	// log holds the messages sent and not yet acknowledged, each as a
	// 4-byte length and its bytes, the oldest at head; nil when empty.
	log  *buffer
	head int
	// first is the number of the message at head, next the number the
	// next message sent gets. Numbers start at 1.
	first, next uint64
	// accepted and acceptedBytes count the messages send put in the log,
	// over every session this one has been; those sent while the session
	// runs plain are counted by the connection (link.offer).
	accepted, acceptedBytes uint64
	// wrote is the number of the last message handed to a connection:
	// those after it have not been near the network.
	wrote uint64
	// link is the connection messages go to, nil while there is none.
	// plain says it is a connection without sessions (a server that does
	// not offer them): messages go to it as they would without a
	// session, and are not kept.
	link  *link
	plain bool
	room  chan struct{} // closed and replaced when the log shrinks or the session ends
	ended error         // set once the session is over; sends return it
	// peerMax is the longest message the peer accepts, as the last
	// connection said: messages sent while there is none are checked
	// against it.
	peerMax int
	// low is the least the log has held since the connection in use
	// opened; see overrunBytes.
	low int

	// runner is the number of the goroutine running the application's
	// code for this session where its reader does (a handler, or a
	// callback), 0 while none is (see send).
	runner atomic.Uint64

	// The receiving side. received and acked are also read by the ack
	// timer (ackSoon); unacked and lastAck belong to the reader of the
	// connection in use.
	received atomic.Uint64 // messages received and delivered
	acked    atomic.Uint64 // the highest count an ack has carried
	unacked  int           // bytes received since the reader's last ack
	lastAck  time.Time
}

// newSession returns a session named id whose log holds maxBytes, for a
// side that accepts messages of up to maxMessage bytes, the limit assumed
// of the peer until a connection says otherwise.
func newSession(id sessionID, maxBytes, maxMessage int) *session {
	return &session{id: id, max: maxBytes, peerMax: maxMessage, first: 1, next: 1}
}

// current returns the session's id.
func (s *session) current() sessionID {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.id
}

// buffered returns the bytes in the log; s.mu is held.
func (s *session) buffered() int {
	if s.log == nil {
		return 0
	}
	return len(s.log.b) - s.head
}

// size returns the bytes in the log.
func (s *session) size() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buffered()
}

// send keeps p in the log and queues it on the connection, if there is
// one, and waits, as a connection without a session does, for room in the
// connection's send queue. When the log is full (max bytes, though a
// message alone in it may be longer) it waits for acknowledgements as long
// as ctx allows, or, with wait false, fails with ErrQueueFull.
//
// The application's code that runs where the session's reader does (its
// handler, and the callbacks before the reader starts or between
// connections) is the exception: while it runs no acknowledgement is read,
// so a send from it never waits for them. The log then grows past its
// bound by what the peer has been sent and has not yet acknowledged, and
// that growth has a bound too (overrunBytes): past it, a peer that is
// connected is dropped as a slow consumer, and the session survives it;
// without a connection, the send fails with ErrQueueFull.
func (s *session) send(ctx context.Context, p []byte, wait bool) error {
	s.mu.Lock()
	for {
		switch {
		case s.ended != nil:
			err := s.ended
			s.mu.Unlock()
			return err
		case s.plain:
			l := s.link
			s.mu.Unlock()
			if wait {
				return l.send(ctx, p)
			}
			return l.offer(p)
		case len(p) > s.peerMax:
			s.mu.Unlock()
			return checkPayload(p, s.peerMax)
		}
		if room, err := s.roomLocked(ctx, len(p), wait); err != nil {
			return err
		} else if !room {
			continue
		}
		// Then the connection's send queue: a session bounds it as a
		// connection without one does, so that its buffers stay ones
		// the pool keeps and its writes full.
		l := s.link
		pushed := false
		if l != nil {
			var full bool
			if pushed, full = l.pushIfRoom(p); full {
				s.mu.Unlock()
				if !wait {
					return ErrQueueFull
				}
				if err := l.waitRoom(ctx); err != nil {
					return err
				}
				s.mu.Lock()
				continue
			}
		}
		if s.log == nil {
			s.log = getLogBuffer()
		}
		s.log.b = binary.BigEndian.AppendUint32(s.log.b, uint32(len(p)))
		s.log.b = append(s.log.b, p...)
		s.next++
		s.accepted++
		s.acceptedBytes += uint64(len(p))
		if pushed {
			s.wrote = s.next - 1
			if grown := s.buffered() - s.low; grown > s.overrunBytes() && s.next-s.first > 1 {
				l.shutdown(fmt.Errorf("%w: %d bytes sent and not acknowledged", ErrSlowConsumer, grown))
			}
		}
		s.mu.Unlock()
		return nil
	}
}

// acceptedCounts returns the counts of messages send put in the log.
func (s *session) acceptedCounts() (msgs, bytes uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.accepted, s.acceptedBytes
}

// roomLocked reports whether the log has room for a message of n bytes,
// as send decides it, waiting for acknowledgements if wait allows. On
// false the caller looks again; on error s.mu is released.
func (s *session) roomLocked(ctx context.Context, n int, wait bool) (bool, error) {
	held := s.buffered()
	if held == 0 || held+recordHeader+n <= s.max {
		return true, nil
	}
	if g := s.runner.Load(); g != 0 && g == goroutineID() {
		// The writer bounds what goes on a connection; without one,
		// nothing holds the log back but this.
		if l := s.link; (l == nil || l.isDown()) && held+recordHeader+n > overrun*s.max {
			s.mu.Unlock()
			return false, ErrQueueFull
		}
		return true, nil
	}
	if !wait {
		s.mu.Unlock()
		return false, ErrQueueFull
	}
	if s.room == nil {
		s.room = make(chan struct{})
	}
	room := s.room
	s.mu.Unlock()
	select {
	case <-room:
	case <-ctx.Done():
		return false, ctx.Err()
	}
	s.mu.Lock()
	return false, nil
}

// overrunBytes is how far past its lowest point since the connection
// opened the log may grow while the application's code runs on the
// reader: overrun times its bound, and at least what the sockets of a
// slow reader may hold.
func (s *session) overrunBytes() int { return max(overrun*s.max, 8<<20) }

// overrun is how many times its bound a session's log may hold while the
// application's code runs on its reader.
const overrun = 4

// beginDelivery marks goroutine g as running the application's code
// where the session's reader does, until endDelivery.
func (s *session) beginDelivery(g uint64) { s.runner.Store(g) }

func (s *session) endDelivery() { s.runner.Store(0) }

// goroutineID returns the number of the calling goroutine, from the first
// line of its stack trace. It costs about a microsecond: a reader reads it
// once, and send only when a log is full, to tell the session's own reader
// from the other senders, which may wait for acknowledgements.
func goroutineID() uint64 {
	var buf [32]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	var id uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			break
		}
		id = id*10 + uint64(c-'0')
	}
	return id
}

// readerID returns the number of the goroutine reading l, for a link with
// a session (see session.send), and 0 for one without.
func readerID(l *link) uint64 {
	if l.sess == nil {
		return 0
	}
	return goroutineID()
}

// deliverMessage runs deliver, which hands a data message of n bytes read
// on l to the application, on l's reader, goroutine g. With a session it
// marks deliver as the session's own code (see send), then counts and
// acknowledges the message; and once l is down it hands over nothing more,
// since what is still buffered is not counted and comes again on resume.
// It reports false when the reader should stop.
func deliverMessage(l *link, g uint64, n int, deliver func()) bool {
	s := l.sess
	if s == nil {
		deliver()
		return true
	}
	if l.cause() != nil {
		return false
	}
	s.beginDelivery(g)
	deliver()
	s.endDelivery()
	return acknowledge(l, s, n)
}

// deliverTo runs fn, the application's code, on the session's reader or
// the goroutine that will start it, marked as such (see send). s may be
// nil.
func deliverTo(s *session, fn func()) {
	if s == nil {
		fn()
		return
	}
	s.beginDelivery(goroutineID())
	defer s.endDelivery()
	fn()
}

// peerAcked drops the messages up to number n, which the peer says it has
// received. An ack for a message not sent is a protocol error; one below
// an earlier ack is ignored.
func (s *session) peerAcked(n uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n >= s.next {
		return protocolErrorf("ack for message %d, of %d sent", n, s.next-1)
	}
	s.dropLocked(n)
	return nil
}

// dropLocked drops the messages up to number n from the log.
func (s *session) dropLocked(n uint64) {
	if n < s.first {
		return
	}
	for s.first <= n {
		s.head += recordHeader + int(binary.BigEndian.Uint32(s.log.b[s.head:]))
		s.first++
	}
	switch {
	case s.head == len(s.log.b):
		putLogBuffer(s.log)
		s.log, s.head = nil, 0
	case s.head >= len(s.log.b)/2:
		// Move the rest to the front, each byte at most once per
		// time the log doubles.
		s.log.b = s.log.b[:copy(s.log.b, s.log.b[s.head:])]
		s.head = 0
	}
	s.low = min(s.low, s.buffered())
	s.wakeLocked()
}

func (s *session) wakeLocked() {
	if s.room != nil {
		close(s.room)
		s.room = nil
	}
}

// each calls fn with every message in the log, oldest first, and its
// number.
func (s *session) each(fn func(seq uint64, p []byte)) {
	if s.log == nil {
		return
	}
	seq := s.first
	for off := s.head; off < len(s.log.b); seq++ {
		n := int(binary.BigEndian.Uint32(s.log.b[off:]))
		off += recordHeader
		fn(seq, s.log.b[off:off+n])
		off += n
	}
}

// check refuses to resume for a peer that says it has received the first
// peerReceived messages, when that is not a count between what it has
// acknowledged and what was sent: a protocol error.
func (s *session) check(peerReceived uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if peerReceived+1 < s.first || peerReceived >= s.next {
		return protocolErrorf("resume after message %d, of %d to %d", peerReceived, s.first-1, s.next-1)
	}
	return nil
}

// resume makes l, whose peer has received the first peerReceived messages
// of the session (a count check accepted), the connection in use, and
// queues on it every message the peer lacks. The caller has queued the
// hello on l, and l's reader has not started.
func (s *session) resume(l *link, peerReceived uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropLocked(peerReceived)
	s.attachLocked(l)
}

// attachLocked makes l the session's connection and queues the log on it.
func (s *session) attachLocked(l *link) {
	s.link, s.plain = l, false
	s.peerMax = l.maxMessage()
	s.low = s.buffered()
	s.wakeLocked()
	s.each(func(seq uint64, p []byte) {
		if l.push(p) {
			s.wrote = seq
		}
	})
	s.acked.Store(s.received.Load()) // the hello said as much
	s.unacked = 0
	s.lastAck = time.Time{}
}

// restart begins the session anew, as id, on l, because the old one could
// not be resumed; with plain, l is a connection to a server without
// sessions and there is no new session. It returns the messages the peer
// may or may not have received: those that went onto a connection and
// were never acknowledged, which the application must now settle. The
// messages that never went near the network are sent on l, first.
func (s *session) restart(id sessionID, l *link, plain bool) (lost [][]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var (
		kept  *buffer
		count uint64
	)
	limit := l.maxMessage()
	s.each(func(seq uint64, p []byte) {
		switch {
		case seq <= s.wrote, len(p) > limit:
			// Those the new server does not accept are handed back
			// too, rather than end the new session at once.
			lost = append(lost, append([]byte(nil), p...))
		case plain:
			if !l.push(p) {
				lost = append(lost, append([]byte(nil), p...))
			}
		default:
			if kept == nil {
				kept = getLogBuffer()
			}
			kept.b = binary.BigEndian.AppendUint32(kept.b, uint32(len(p)))
			kept.b = append(kept.b, p...)
			count++
		}
	})
	putLogBuffer(s.log)
	s.log, s.head = kept, 0
	s.id = id
	s.first, s.next, s.wrote = 1, 1+count, 0
	s.received.Store(0)
	s.wakeLocked()
	if plain {
		s.link, s.plain = l, true
		s.peerMax = limit
	} else {
		s.attachLocked(l)
	}
	return lost
}

// detach forgets l, which is down, as the session's connection: messages
// sent from now on wait in the log for the next one.
func (s *session) detach(l *link) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.link == l {
		s.link, s.plain = nil, false
		s.wakeLocked()
	}
}

// end closes the session for good: sends return err from now on. It
// frees the log. It returns how many messages were never
// acknowledged, and reports false if the session had already ended.
func (s *session) end(err error) (unacked uint64, first bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended != nil {
		return 0, false
	}
	s.ended = err
	unacked = s.next - s.first
	putLogBuffer(s.log)
	s.log, s.head = nil, 0
	s.first = s.next
	s.link, s.plain = nil, false
	s.wakeLocked()
	return unacked, true
}

// ackDue is what a reader does after handing a message to the
// application: nothing, ack now, or ack once ackDelay has passed.
type ackDue int

const (
	ackNone ackDue = iota
	ackNow
	ackSoon
)

// delivered counts a message of n bytes handed to the application, on the
// reader's goroutine, and says when to acknowledge it: drained says the
// reader has no more input buffered.
func (s *session) delivered(n int, drained bool) ackDue {
	r := s.received.Add(1)
	s.unacked += n
	switch {
	case r-s.acked.Load() >= ackEvery || s.unacked >= ackBytes:
		return ackNow
	case !drained:
		return ackNone
	case time.Since(s.lastAck) >= ackDelay:
		return ackNow
	}
	return ackSoon
}

// owesAck reports whether a message has been received since the last ack.
func (s *session) owesAck() bool { return s.received.Load() > s.acked.Load() }

// readerAck returns the count for an ack of every message received, sent
// by the reader, and notes it as sent.
func (s *session) readerAck() uint64 {
	s.unacked, s.lastAck = 0, time.Now()
	return s.noteAck()
}

// noteAck returns the count of messages received and records that an ack
// carries it.
func (s *session) noteAck() uint64 {
	r := s.received.Load()
	for {
		old := s.acked.Load()
		if old >= r || s.acked.CompareAndSwap(old, r) {
			return r
		}
	}
}

// acknowledge counts a message of n bytes of session s, received on l and
// handed to the application, and acknowledges it now or soon, as due. It
// reports false if l is down.
func acknowledge(l *link, s *session, n int) bool {
	switch s.delivered(n, l.fr.buffered() == 0) {
	case ackNow:
		return l.ack(s.readerAck()) == nil
	case ackSoon:
		l.ackSoon(s)
	}
	return true
}

// ackAll queues an ack for every message l's session has received, as l
// closes, so that the peer does not count as unacknowledged what arrived.
// The reader may still be running; the peer ignores an ack below an
// earlier one.
func ackAll(l *link) {
	if s := l.sess; s != nil && s.owesAck() {
		_ = l.ack(s.noteAck())
	}
}

// ackOwed sends an ack on a heartbeat, a ping received or a pong, if a
// message has come since the last one. It reports false if l is down.
func ackOwed(l *link) bool {
	if s := l.sess; s != nil && s.owesAck() {
		return l.ack(s.readerAck()) == nil
	}
	return true
}

// takeAck applies an ack frame received on l.
func takeAck(l *link, p []byte) error {
	if l.sess == nil {
		return protocolErrorf("ack frame without a session")
	}
	n, err := parseAck(p)
	if err != nil {
		return err
	}
	return l.sess.peerAcked(n)
}

// parseAck decodes an ack frame's payload.
func parseAck(p []byte) (uint64, error) {
	if len(p) != 8 {
		return 0, protocolErrorf("ack frame of %d bytes, want 8", len(p))
	}
	return binary.BigEndian.Uint64(p), nil
}

// String returns the id in hexadecimal, for logs.
func (id sessionID) String() string { return fmt.Sprintf("%x", id[:]) }

// The server keeps its sessions in Server.sessions, by id, from the moment
// the first connection opens until the session ends. A session's Conn is
// in one of three states, all under Server.mu:
//
//   - attached: a connection serves it; attached is open until that
//     connection's goroutine lets go of it (leave);
//   - suspended: no connection; it waits in the suspended queue for its
//     client, at most the resume window;
//   - claimed: a new connection is resuming it, waiting for the old one's
//     goroutine to let go if need be.
//
// A resume takes the session over from its old connection even if that
// one still looks alive, as a half-open connection does: the client knows
// better.

// sessionState is a session Conn's part of the table, guarded by
// Server.mu.
type sessionState struct {
	attached chan struct{} // closed when the connection serving it lets go
	claimed  bool          // a new connection is resuming it
	// closeRequested says Conn.Close was called while a connection
	// served the session: it ends when that connection lets go.
	closeRequested bool
	// suspended is the number of its current suspension in the queue, 0
	// when it is not suspended; buffered is its log's size then.
	suspended uint64
	buffered  int
}

// errTakenOver is the cause a session's old connection goes down with
// when its client resumes the session on a new one.
var errTakenOver = errors.New("vgo: session resumed on a new connection")

// errResumed ends the context of a connection that resumed a session: the
// session's Conn carries on in its place.
var errResumed = errors.New("vgo: the connection resumed a session")

// closedSession stands in the Conn that the authenticator saw for a
// connection that resumed a session, so that it sends nothing outside the
// session's numbering: its sends fail with ErrClosed.
var closedSession = &session{ended: ErrClosed}

// suspendQueue holds the suspended sessions, oldest first. Entries of
// sessions resumed or ended since are skipped when they come up, so the
// expiry sweep needs no timer per session: one timer, set for the oldest.
type suspendQueue struct {
	entries []suspension
	head    int
	next    uint64 // the number of the next suspension
	count   int    // sessions suspended
	bytes   int    // their logs when suspended
	timer   *time.Timer
	armed   bool
}

type suspension struct {
	c     *Conn
	n     uint64
	until time.Time
}

// endsSession reports whether a connection's end, with cause, ends its
// session: a close frame sent or received, or the server closing. Any
// other failure suspends it.
func endsSession(cause error) bool {
	var ce *CloseError
	return errors.As(cause, &ce) || errors.Is(cause, ErrClosed) ||
		errors.Is(cause, ErrServerClosed) || errors.Is(cause, ErrProtocol)
}

// claim finds the session a client asks to resume with hello h on
// connection c, and takes it from the connection serving it, if any,
// waiting until deadline for that one's goroutine to let go. It returns
// nil, for a new session, when there is no such session or it belongs to
// another identity.
func (s *Server) claim(c *Conn, h hello, deadline time.Time) (*Conn, error) {
	s.mu.Lock()
	old := s.sessions[h.sessionID]
	switch {
	case old == nil || old.claimed || old.closeRequested:
		s.mu.Unlock()
		return nil, nil
	case !reflect.DeepEqual(old.Identity(), c.Identity()):
		s.mu.Unlock()
		c.logger().WithField("session", h.sessionID.String()).Warn("resume refused: the session belongs to another identity")
		return nil, nil
	}
	old.claimed = true
	s.unsuspendLocked(old)
	attached, l := old.attached, old.l
	s.mu.Unlock()
	if attached != nil {
		l.shutdown(errTakenOver)
		var expired <-chan time.Time
		if !deadline.IsZero() {
			t := time.NewTimer(time.Until(deadline))
			defer t.Stop()
			expired = t.C
		}
		select {
		case <-attached:
		case <-expired:
			s.unclaim(old)
			return nil, handshakeError("resume", ErrHandshakeTimeout)
		}
	}
	s.mu.Lock()
	live := s.sessions[h.sessionID] == old
	s.mu.Unlock()
	if !live {
		return nil, nil
	}
	if err := old.sess.Load().check(h.received); err != nil {
		s.unclaim(old)
		return nil, err
	}
	return old, nil
}

// unclaim gives back a session whose resume failed: it is suspended again,
// or ended if it was closed or the server is closing meanwhile. A session
// whose old connection has not let go yet is left to that connection
// (leave).
func (s *Server) unclaim(c *Conn) {
	s.mu.Lock()
	c.claimed = false
	if _, live := s.sessions[c.sess.Load().id]; !live || c.attached != nil {
		s.mu.Unlock()
		return
	}
	var (
		cause   error
		evicted []*Conn
	)
	switch {
	case c.closeRequested:
		cause = ErrClosed
	case s.closing:
		cause = ErrServerClosed
	default:
		evicted = s.suspendLocked(c)
	}
	if cause != nil {
		s.dropLocked(c)
	}
	s.mu.Unlock()
	if cause != nil {
		s.closeSession(c, cause)
	}
	s.closeSessions(evicted, ErrSessionEvicted)
}

// adoptLocked moves connection c, just opened, into the session's Conn
// sc, which it serves from now on.
func (s *Server) adoptLocked(sc, c *Conn) {
	sc.l, sc.remote, sc.local, sc.proxy = c.l, c.remote, c.local, c.proxy
	sc.underTLS, sc.trusted, sc.sealed = c.underTLS, c.trusted, c.sealed
	sc.opened, c.opened = true, false
	sc.claimed = false
	sc.attached = make(chan struct{})
	delete(s.conns, c.id)
	s.conns[sc.id] = sc
}

// leave lets go of the session of c, whose connection ended with cause:
// the session is suspended, or ended if cause ends it. It also forgets the
// connection.
func (s *Server) leave(c *Conn, cause error) {
	c.sess.Load().detach(c.l)
	c.l.release()
	s.mu.Lock()
	s.forgetLocked(c)
	close(c.attached)
	c.attached = nil
	// Once c.attached is closed, a new connection may take c over:
	// read nothing of it after unlocking but what is kept here.
	var evicted []*Conn
	if c.closeRequested {
		// Conn.Close found the connection already going: its close
		// frame may not have been sent, but the session ends.
		cause = ErrClosed
	}
	ends := endsSession(cause) || s.closing
	suspends := !ends && !c.claimed
	log := c.logger()
	switch {
	case ends:
		s.dropLocked(c)
	case suspends:
		evicted = s.suspendLocked(c)
	}
	s.mu.Unlock()
	if ends {
		s.closeSession(c, cause)
	} else if suspends {
		log.WithField("session", c.sess.Load().id.String()).Info("session suspended")
	}
	s.closeSessions(evicted, ErrSessionEvicted)
}

// suspendLocked puts c's session in the suspended queue, and returns the
// sessions the bounds on suspended ones push out, already dropped.
func (s *Server) suspendLocked(c *Conn) (evicted []*Conn) {
	q := &s.suspended
	q.next++
	c.suspended = q.next
	c.buffered = c.sess.Load().size()
	q.count++
	q.bytes += c.buffered
	q.entries = append(q.entries, suspension{c: c, n: c.suspended, until: time.Now().Add(s.opts.sessions.Window)})
	s.armLocked()
	for q.count > s.opts.sessions.MaxSuspended || q.bytes > s.opts.sessions.MaxBytes {
		old := s.oldestLocked()
		s.dropLocked(old)
		evicted = append(evicted, old)
	}
	return evicted
}

// oldestLocked returns the session suspended longest; there is one.
func (s *Server) oldestLocked() *Conn {
	q := &s.suspended
	for {
		e := q.entries[q.head]
		if e.c.suspended == e.n {
			return e.c
		}
		q.popLocked()
	}
}

// popLocked removes the queue's first entry.
func (q *suspendQueue) popLocked() {
	q.entries[q.head] = suspension{}
	q.head++
	if q.head == len(q.entries) {
		q.entries, q.head = q.entries[:0], 0
	} else if q.head >= len(q.entries)/2 && q.head >= 64 {
		q.entries = q.entries[:copy(q.entries, q.entries[q.head:])]
		q.head = 0
	}
}

// unsuspendLocked takes c out of the suspended sessions, if it is one.
func (s *Server) unsuspendLocked(c *Conn) {
	if c.suspended == 0 {
		return
	}
	c.suspended = 0
	s.suspended.count--
	s.suspended.bytes -= c.buffered
}

// dropLocked removes c's session from the table; the caller then ends it
// with closeSession.
func (s *Server) dropLocked(c *Conn) {
	s.unsuspendLocked(c)
	delete(s.sessions, c.sess.Load().id)
}

// armLocked sets the expiry timer for the oldest suspended session.
func (s *Server) armLocked() {
	q := &s.suspended
	if q.armed || s.closing {
		return
	}
	for q.head < len(q.entries) && q.entries[q.head].c.suspended != q.entries[q.head].n {
		q.popLocked()
	}
	if q.head == len(q.entries) {
		return
	}
	d := time.Until(q.entries[q.head].until)
	if q.timer == nil {
		q.timer = time.AfterFunc(d, s.expire)
	} else {
		q.timer.Reset(d)
	}
	q.armed = true
}

// expire ends the suspended sessions whose window has passed.
func (s *Server) expire() {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return
	}
	s.wg.Add(1) // Close waits for the callbacks below
	defer s.wg.Done()
	q := &s.suspended
	q.armed = false
	now := time.Now()
	var expired []*Conn
	for q.head < len(q.entries) {
		e := q.entries[q.head]
		if e.c.suspended == e.n {
			if e.until.After(now) {
				break
			}
			s.dropLocked(e.c)
			expired = append(expired, e.c)
		}
		q.popLocked()
	}
	s.armLocked()
	s.mu.Unlock()
	s.closeSessions(expired, ErrSessionExpired)
}

// takeSuspendedLocked drops every suspended session, for a server that is
// closing, and returns them.
func (s *Server) takeSuspendedLocked() []*Conn {
	q := &s.suspended
	var all []*Conn
	for _, e := range q.entries[q.head:] {
		if e.c.suspended == e.n {
			s.dropLocked(e.c)
			all = append(all, e.c)
		}
	}
	q.entries, q.head = nil, 0
	if q.timer != nil {
		q.timer.Stop()
	}
	q.armed = false
	return all
}

func (s *Server) closeSessions(cs []*Conn, cause error) {
	for _, c := range cs {
		s.closeSession(c, cause)
	}
}

// closeSession ends c's session, already dropped from the table, with
// cause: sends fail from now on, the unacknowledged messages are let go,
// its context ends and WithOnConnClose runs.
func (s *Server) closeSession(c *Conn, cause error) {
	unacked, first := c.sess.Load().end(ErrClosed)
	if !first {
		return
	}
	if errors.Is(cause, ErrSessionExpired) || errors.Is(cause, ErrSessionEvicted) {
		s.stats.expired.Add(1)
	}
	c.finish(cause)
	c.logger().WithFields(logrus.Fields{"session": c.sess.Load().id.String(), "unacked": unacked, "err": cause}).Info("session ended")
	if fn := s.opts.onConnClose; fn != nil {
		fn(c, cause)
	}
}
