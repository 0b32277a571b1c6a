package vgo

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// errPeerClosed is the cause of a disconnect when the peer closed the stream
// without a close frame.
var errPeerClosed = fmt.Errorf("vgo: connection closed by peer: %w", io.EOF)

// closeFrameTimeout bounds the best-effort close frame sent before a
// connection is torn down; the teardown must not wait on a slow peer.
const closeFrameTimeout = 250 * time.Millisecond

// Every frame a connection sends goes through one write path. Senders
// append encoded frames to the link's queues and return without waiting on
// the socket. One writer at a time writes them out: the writer goroutine,
// started when work arrives and gone once the queues drain, each of its
// writes under the write timeout; or, on a plain TCP socket, a sender that
// finds the link idle in a conversation writes its own frames with one
// system call that does not wait, and hands what the socket did not take
// to the writer goroutine (startLocked). Nothing that keeps time (the
// pinger, the server's reader, a teardown) ever waits on the socket, so a
// stuck peer is always found by its timer.
//
// There are two queues. The stream queue holds data and the frames that
// must stay in order with it (hello, goodbye, close). The heartbeat queue
// holds pings and pongs, which the writer puts ahead of the next piece of
// the stream. A message longer than fragmentSize is queued as fragments and
// the writer takes at most writeChunk bytes of the stream per write, so a
// ping never waits behind more than that, however long the message.
const (
	// sendQueueLimit is how many bytes of the stream may wait before
	// senders wait (Send) or are refused (TrySend). One message may take
	// the queue past it.
	sendQueueLimit = 64 << 10
	// fragmentSize is the most message bytes one data frame carries.
	fragmentSize = 16 << 10
	// writeChunk is the most stream bytes one write takes.
	writeChunk = 64 << 10
	// maxHeartbeatQueue bounds the pings and pongs waiting to be written.
	// A peer that keeps pinging while not reading its pongs fills it and
	// is dropped as a slow consumer.
	maxHeartbeatQueue = 4 << 10
)

// link is one framed connection, shared by the client and server sides: a
// frame reader for the single reader goroutine, the write path described
// above, and a teardown that happens once and keeps its first cause.
type link struct {
	nc           net.Conn // frames are read and written here: a *tls.Conn with TLS
	raw          net.Conn // the connection under nc; closing it never waits on the peer
	rd           *deadlineReader
	fr           *frameReader
	writeTimeout time.Duration
	// closedErr is what sends return once the link is down.
	closedErr error

	// writeFn is l.writeLoop, bound once so that starting the writer does
	// not allocate.
	writeFn func()
	writers sync.WaitGroup

	mu sync.Mutex
	// ready says the hello exchange is done: messages may be queued.
	ready bool
	// maxSend is the longest message that may be sent: our own limit, or
	// the peer's if it announced a smaller one. fragments says whether the
	// peer reassembles fragmented messages.
	maxSend    int
	fragments  bool
	stream     *buffer // stream frames waiting, in order; nil while idle
	beats      []byte  // pings, pongs and acks waiting
	beatsSpare []byte  // the last written beats, reused
	// ackAt is where in beats the ack waiting to be written starts, -1
	// for none: a newer ack overwrites it rather than queue behind it.
	ackAt int
	// writing says someone holds the writer's role: the writer goroutine,
	// or a sender writing directly (writeDirectLocked).
	writing bool
	closed  bool  // set by shutdown or a failed write: nothing more is queued
	closing error // the cause closeWith will shut down with
	// The writer's place, kept by whoever holds the role: the batch of
	// the stream being written, how much of it has gone out, and where
	// the piece being written ends. beatsOut is what is left of the
	// heartbeats of a write the socket took only part of; beatsTaken is
	// the buffer they are in.
	batch      *buffer
	off        int
	pieceEnd   int
	beatsOut   []byte
	beatsTaken []byte
	// deadlineSet says the writer goroutine left a write deadline on the
	// connection, which would refuse a direct write once it passed.
	deadlineSet bool
	// rc is the socket of a plain TCP link, for writes that do not wait
	// and for waiting for input without a buffer; nil over TLS and for
	// any connection but a *net.TCPConn (rawSocket).
	rc     syscall.RawConn
	direct directWrite
	// heardAt is the count of reads that returned bytes when the last
	// direct write began: a sender writes directly only once something
	// has arrived since (startLocked).
	heardAt uint64
	// Waiters for the writer's progress: those whose context can end wait
	// on progress, closed and replaced after every write; the others on
	// cond, which spares them a channel each time.
	progress chan struct{}
	cond     sync.Cond
	iov      [2][]byte
	bufs     net.Buffers // views iov; a field so that WriteTo does not allocate

	// sent and sentBytes count the messages offer queued.
	sent, sentBytes uint64

	// goodbye is the reconnect window a departing server asked for.
	goodbye atomic.Int64
	// sess is the session the link carries, nil for none. It is set
	// before the reader starts.
	sess *session
	// ackTimer sends the ack a reader put off (ackSoon); ackArmed says it
	// is set.
	ackTimer atomic.Pointer[time.Timer]
	ackArmed atomic.Bool

	once sync.Once
	done chan struct{}
	err  error // first cause; read only after done is closed
	// watcher, if set, is told the cause when the link starts to close,
	// when its close frame is queued, and again once it is down, with the
	// same cause: shutdown may overtake the call from queueClose, and
	// returns only after its own.
	watcher closeWatcher
}

// A closeWatcher learns when a link starts to close. It is an interface
// rather than a func so that setting one allocates nothing.
type closeWatcher interface {
	closing(cause error)
}

// newLink returns a link over nc, which runs over raw (the same connection
// without TLS).
func newLink(nc, raw net.Conn, o *commonOptions, closedErr error) *link {
	l := &link{
		nc:           nc,
		raw:          raw,
		maxSend:      o.maxFrameSize,
		writeTimeout: o.writeTimeout,
		closedErr:    closedErr,
		done:         make(chan struct{}),
		ackAt:        -1,
	}
	l.cond.L = &l.mu
	if nc == raw {
		l.rc = rawSocket(raw)
	}
	l.rd = &deadlineReader{conn: nc, rc: l.rc}
	// Until the hello exchange completes only a hello, or a close, is
	// read, so no peer can make us allocate before it has said who it is.
	l.fr = newLinkReader(l.rd)
	l.fr.handshake = true
	l.writeFn = l.writeLoop
	limitUnsent(raw)
	return l
}

// startHandshake makes every read until established share deadline (zero
// for none).
func (l *link) startHandshake(deadline time.Time) {
	l.rd.fixed = deadline
}

// established ends the handshake, on the reader's goroutine: data frames
// up to maxData bytes are accepted from now on, and each read may wait for
// idle (0 for ever). peer is the other side's hello. reply, the server's
// hello, is queued ahead of every message, which may be sent from now on.
// It reports false if the link is already down.
func (l *link) established(idle time.Duration, maxData int, peer hello, reply []byte) bool {
	l.rd.fixed = time.Time{}
	l.rd.idle = idle
	l.fr.maxData = maxData
	l.fr.handshake = false
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return false
	}
	if peer.maxMessage > 0 {
		l.fragments = true
		l.maxSend = min(l.maxSend, peer.maxMessage)
	}
	l.ready = true
	direct := false
	if reply != nil {
		direct = l.queueFrameLocked(frameHello, reply)
	}
	l.unlock(direct)
	return true
}

// shutdown tears the link down with cause err. Only the first call has an
// effect; it returns the cause that won. The owner then calls wait.
func (l *link) shutdown(err error) error {
	l.once.Do(func() {
		l.mu.Lock()
		l.closed = true
		if l.closing != nil {
			// The peer may hang up on our close frame before closeWith
			// gets here; the disconnect is still ours.
			err = l.closing
		}
		l.signalLocked()
		l.mu.Unlock()
		l.err = err
		// The raw connection: closing a TLS connection would first try
		// to send close_notify into a socket that may be full.
		l.raw.Close()
		if t := l.ackTimer.Load(); t != nil {
			t.Stop()
		}
		close(l.done)
		if l.watcher != nil {
			l.watcher.closing(err)
		}
	})
	<-l.done
	return l.err
}

// wait returns once the link is down and its writer goroutine has exited.
// Call it once the link is going: a direct write that failed may still be
// on its way to shutdown.
func (l *link) wait() {
	l.writers.Wait()
	<-l.done
}

// release gives the read buffers of a link whose reader has exited back to
// the pool; a suspended session keeps its last link, without them.
func (l *link) release() { l.fr.release() }

// cause returns why the link went down, or nil while it is up.
func (l *link) cause() error {
	select {
	case <-l.done:
		return l.err
	default:
		return nil
	}
}

// offer queues message p if the stream queue has room. It returns
// ErrQueueFull if not; closedErr if the link is down or closing;
// ErrNotConnected before the hello exchange is done; and an error wrapping
// ErrFrameTooLarge for a message longer than either side accepts. A queue
// cannot stay full for longer than the write timeout: the writer's write
// in progress fails first, tearing the link down as a slow consumer.
func (l *link) offer(p []byte) error {
	l.mu.Lock()
	switch {
	case l.closed || l.closing != nil:
		l.mu.Unlock()
		return l.closedErr
	case !l.ready:
		l.mu.Unlock()
		return ErrNotConnected
	case len(p) > l.maxSend:
		l.mu.Unlock()
		return checkPayload(p, l.maxSend)
	case l.queuedLocked() >= sendQueueLimit:
		l.mu.Unlock()
		return ErrQueueFull
	}
	l.sent++
	l.sentBytes += uint64(len(p))
	l.unlock(l.appendMessageLocked(p))
	return nil
}

// sentCounts returns how many messages, and bytes of them, offer queued.
func (l *link) sentCounts() (msgs, bytes uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sent, l.sentBytes
}

// send queues message p, waiting for room in the stream queue as long as
// ctx allows.
func (l *link) send(ctx context.Context, p []byte) error {
	for {
		err := l.offer(p)
		if err != ErrQueueFull {
			return err
		}
		if err := l.waitRoom(ctx); err != nil {
			return err
		}
	}
}

// waitRoom waits until the stream queue may have room, or the link is down
// (the next offer says which), or ctx ends.
func (l *link) waitRoom(ctx context.Context) error {
	l.mu.Lock()
	for !l.closed && l.queuedLocked() >= sendQueueLimit {
		if err := l.waitLocked(ctx); err != nil {
			return err
		}
	}
	l.mu.Unlock()
	return nil
}

// pushIfRoom queues message p of a session if the stream queue has room,
// and reports full if not. It reports pushed false, and full false, if the
// link is down or closing, or not yet open.
func (l *link) pushIfRoom(p []byte) (pushed, full bool) {
	l.mu.Lock()
	switch {
	case l.closed || l.closing != nil || !l.ready:
		l.mu.Unlock()
		return false, false
	case l.queuedLocked() >= sendQueueLimit:
		l.mu.Unlock()
		return false, true
	}
	l.unlock(l.appendMessageLocked(p))
	return true, false
}

// push queues message p whatever room there is: a session's log, replayed
// on a new connection, or the messages of a session that has none. It
// reports false if the link is down or closing, or not yet open.
func (l *link) push(p []byte) bool {
	l.mu.Lock()
	if l.closed || l.closing != nil || !l.ready {
		l.mu.Unlock()
		return false
	}
	l.unlock(l.appendMessageLocked(p))
	return true
}

// queueAll queues msgs whatever room there is, except those longer than
// max, the most the peer accepts, which it returns. It reports false, and
// queues nothing, if the link is down.
func (l *link) queueAll(msgs [][]byte) (tooLong [][]byte, max int, ok bool) {
	l.mu.Lock()
	if l.closed || l.closing != nil {
		l.mu.Unlock()
		return nil, 0, false
	}
	direct := false
	for _, m := range msgs {
		if len(m) > l.maxSend {
			tooLong = append(tooLong, m)
			continue
		}
		direct = l.appendMessageLocked(m) || direct
	}
	max = l.maxSend
	l.unlock(direct)
	return tooLong, max, true
}

// queueFrame queues one frame on the stream, whatever room there is: the
// frames that go this way (hello, goodbye, close) are few and small. It
// reports false if the link is down.
func (l *link) queueFrame(t frameType, payload []byte) bool {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return false
	}
	l.unlock(l.queueFrameLocked(t, payload))
	return true
}

// queueFrameLocked appends a frame to the stream. Like startLocked, it
// reports whether the caller is to write it (unlock).
func (l *link) queueFrameLocked(t frameType, payload []byte) (direct bool) {
	l.streamLocked().b = appendFrame(l.stream.b, t, payload)
	return l.startLocked()
}

// beat queues a ping or a pong ahead of the stream. It never waits: a
// heartbeat queue that overflows means the peer sends pings and does not
// read the pongs, and the link is torn down as a slow consumer.
func (l *link) beat(t frameType, payload []byte) error {
	l.mu.Lock()
	return l.beatLocked(t, payload)
}

// beatLocked is beat with l.mu held, which it releases.
func (l *link) beatLocked(t frameType, payload []byte) error {
	if l.closed {
		l.mu.Unlock()
		return l.closedErr
	}
	if len(l.beats)+headerSize+len(payload) > maxHeartbeatQueue {
		l.mu.Unlock()
		l.shutdown(fmt.Errorf("%w: %d bytes of heartbeats unsent", ErrSlowConsumer, maxHeartbeatQueue))
		return l.closedErr
	}
	l.beats = appendFrame(l.beats, t, payload)
	l.unlock(l.startLocked())
	return nil
}

// ack queues an ack frame for n messages ahead of the stream, or raises
// the count of the one already waiting. Like beat, it never waits.
func (l *link) ack(n uint64) error {
	var p [8]byte
	binary.BigEndian.PutUint64(p[:], n)
	l.mu.Lock()
	if !l.closed && l.ackAt >= 0 {
		// Acks race from the reader and the timer: keep the higher.
		if q := l.beats[l.ackAt+headerSize:]; binary.BigEndian.Uint64(q) < n {
			copy(q, p[:])
		}
		l.mu.Unlock()
		return nil
	}
	l.ackAt = len(l.beats)
	return l.beatLocked(frameAck, p[:])
}

// ackSoon has an ack of everything s received sent after ackDelay, unless
// one is already due then. It is called by the reader.
func (l *link) ackSoon(s *session) {
	if !l.ackArmed.CompareAndSwap(false, true) {
		return
	}
	if t := l.ackTimer.Load(); t != nil {
		t.Reset(ackDelay)
		return
	}
	l.ackTimer.Store(time.AfterFunc(ackDelay, func() {
		l.ackArmed.Store(false)
		if s.owesAck() {
			_ = l.ack(s.noteAck())
		}
	}))
}

// isDown reports whether the link is down or closing: nothing more can be
// queued on it.
func (l *link) isDown() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed || l.closing != nil
}

// maxMessage returns the longest message that may be sent on the link.
func (l *link) maxMessage() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.maxSend
}

// queuedLocked returns how many bytes of the stream wait to be written.
func (l *link) queuedLocked() int {
	n := 0
	if l.batch != nil {
		n = len(l.batch.b) - l.off
	}
	if l.stream != nil {
		n += len(l.stream.b)
	}
	return n
}

func (l *link) streamLocked() *buffer {
	if l.stream == nil {
		l.stream = getBuffer()
	}
	return l.stream
}

// appendMessageLocked encodes message p onto the stream: one data frame,
// or fragments when it is long and the peer reassembles them. Like
// startLocked, it reports whether the caller is to write it (unlock).
func (l *link) appendMessageLocked(p []byte) (direct bool) {
	buf := l.streamLocked()
	if len(p) <= fragmentSize || !l.fragments {
		buf.b = appendFrame(buf.b, frameData, p)
	} else {
		first := p[:fragmentSize]
		buf.b = append(buf.b, byte(frameFirst))
		buf.b = binary.BigEndian.AppendUint32(buf.b, uint32(4+len(first)))
		buf.b = binary.BigEndian.AppendUint32(buf.b, uint32(len(p)))
		buf.b = append(buf.b, first...)
		for rest := p[fragmentSize:]; len(rest) > 0; {
			n := min(len(rest), fragmentSize)
			buf.b = appendFrame(buf.b, frameFragment, rest[:n])
			rest = rest[n:]
		}
	}
	return l.startLocked()
}

// startLocked takes the writer's role for what the caller just queued,
// unless someone holds it already. A link in a conversation, one that has
// read bytes since its last direct write and has decoded all it read, is
// likely to have nothing else to send for a while: there the caller
// writes the frames itself with a system call that does not wait
// (writeDirectLocked), sparing a goroutine's wake-up on either side of a
// request and its reply, and startLocked reports direct. Otherwise it
// starts the writer goroutine, which gathers what senders queue meanwhile
// into large writes: a stream of messages with nothing coming back goes
// that way after its first, and so do the replies to pipelined requests.
func (l *link) startLocked() (direct bool) {
	if l.writing {
		return false
	}
	l.writing = true
	if l.rc != nil && !l.fr.more.Load() && (len(l.beats) == 0 || l.stream == nil) {
		if n := l.rd.reads.Load(); n != l.heardAt {
			l.heardAt = n
			return true
		}
	}
	l.writers.Add(1)
	go l.writeFn()
	return false
}

// unlock releases l.mu, after writing what the caller queued if
// startLocked left that to it.
func (l *link) unlock(direct bool) {
	if direct {
		l.writeDirectLocked()
		return
	}
	l.mu.Unlock()
}

// writeDirectLocked writes the frames just queued on the caller's
// goroutine, with one system call that does not wait for room in the
// socket, and hands whatever the socket did not take to the writer
// goroutine. It is called with l.mu held and the writer's role taken, and
// returns with l.mu released.
func (l *link) writeDirectLocked() {
	beats, piece := l.takeLocked()
	p := piece
	if len(beats) > 0 {
		p = beats // startLocked let only one kind through
	}
	l.mu.Unlock()
	n, err := l.tryWrite(p)
	l.mu.Lock()
	if err != nil {
		// The write may have cut a frame short: no writer may follow it.
		l.closed = true
		l.idleLocked()
		l.mu.Unlock()
		l.shutdown(writeError(err))
		return
	}
	l.wroteLocked(beats, piece, n)
	if !l.closed && l.hasWorkLocked() {
		// The socket is full, or more came meanwhile.
		l.writers.Add(1)
		go l.writeFn()
	} else {
		l.idleLocked()
	}
	l.mu.Unlock()
}

// writeLoop is the writer goroutine: it writes the heartbeat queue and the
// stream, a piece of at most writeChunk stream bytes per write with the
// heartbeats in front, until both are empty or the link is down. While it
// writes one batch of the stream, senders append to the other buffer.
func (l *link) writeLoop() {
	defer l.writers.Done()
	var err error
	l.mu.Lock()
	for !l.closed {
		beats, piece := l.takeLocked()
		if len(beats) == 0 && len(piece) == 0 {
			if !l.deadlineSet {
				break
			}
			// Clear the write deadline before giving up the role, so
			// that a direct write does not find it passed.
			l.deadlineSet = false
			l.mu.Unlock()
			err = l.nc.SetWriteDeadline(time.Time{})
			l.mu.Lock()
			if err != nil {
				l.closed = true
				break
			}
			continue
		}
		l.mu.Unlock()
		err = l.writeOut(beats, piece)
		l.mu.Lock()
		if err != nil {
			// The write may have cut a frame short: no writer may
			// follow it onto the stream.
			l.closed = true
			break
		}
		l.wroteLocked(beats, piece, len(beats)+len(piece))
	}
	l.idleLocked()
	l.mu.Unlock()
	if err != nil {
		l.shutdown(writeError(err))
	}
}

// takeLocked returns the next write: the rest of one the socket took only
// part of, which may end inside a frame and so goes before anything else;
// or the heartbeats waiting and the next piece of the stream.
func (l *link) takeLocked() (beats, piece []byte) {
	if l.beatsOut != nil || l.batch != nil && l.off < l.pieceEnd {
		if l.batch != nil {
			piece = l.batch.b[l.off:l.pieceEnd]
		}
		return l.beatsOut, piece
	}
	if l.batch == nil || l.off == len(l.batch.b) {
		if l.batch != nil {
			l.batch.b = l.batch.b[:0]
		}
		l.batch, l.stream = l.stream, l.batch
		l.off, l.pieceEnd = 0, 0
	}
	if l.batch != nil {
		l.pieceEnd = chunkEnd(l.batch.b, l.off, writeChunk)
		piece = l.batch.b[l.off:l.pieceEnd]
	}
	if len(l.beats) > 0 {
		beats = l.beats
		l.beatsTaken = beats
		l.beats, l.beatsSpare = l.beatsSpare[:0], nil
		l.ackAt = -1
	}
	return beats, piece
}

// wroteLocked records that the first n bytes of a write of beats, then
// piece, went out, and wakes those waiting for room.
func (l *link) wroteLocked(beats, piece []byte, n int) {
	nb := min(n, len(beats))
	if nb < len(beats) {
		l.beatsOut = beats[nb:]
	} else {
		l.beatsOut = nil
		if l.beatsTaken != nil {
			l.beatsSpare, l.beatsTaken = l.beatsTaken[:0], nil
		}
	}
	l.off += n - nb
	l.signalLocked()
}

// hasWorkLocked reports whether anything waits to be written.
func (l *link) hasWorkLocked() bool {
	return l.beatsOut != nil || len(l.beats) > 0 || l.queuedLocked() > 0
}

// idleLocked gives up the writer's role, the link idle or down: the
// buffers go back to the pool.
func (l *link) idleLocked() {
	l.writing = false
	putBuffer(l.batch)
	l.batch, l.off, l.pieceEnd = nil, 0, 0
	l.beatsOut, l.beatsTaken = nil, nil
	if l.stream != nil && (l.closed || len(l.stream.b) == 0) {
		putBuffer(l.stream)
		l.stream = nil
	}
	l.signalLocked()
}

// writeOut writes beats, then piece, in one system call where it can.
func (l *link) writeOut(beats, piece []byte) error {
	// Also without a write timeout: the zero time clears the deadline
	// the handshake set.
	var deadline time.Time
	if l.writeTimeout > 0 {
		deadline = time.Now().Add(l.writeTimeout)
		l.deadlineSet = true
	}
	if err := l.nc.SetWriteDeadline(deadline); err != nil {
		return err
	}
	var err error
	switch {
	case len(beats) == 0:
		_, err = l.nc.Write(piece)
	case len(piece) == 0:
		_, err = l.nc.Write(beats)
	default:
		l.iov = [2][]byte{beats, piece}
		l.bufs = l.iov[:]
		_, err = l.bufs.WriteTo(l.nc)
		l.iov = [2][]byte{}
	}
	return err
}

// writeError turns a failed write into a disconnect cause: a write that
// ran out of time means the peer is not reading.
func writeError(err error) error {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("%w: a write did not complete in time", ErrSlowConsumer)
	}
	return fmt.Errorf("vgo: write: %w", err)
}

// chunkEnd returns where the piece of b that starts at off ends: after the
// last whole frame that keeps it within limit bytes, or after the first
// frame if that alone is longer.
func chunkEnd(b []byte, off, limit int) int {
	if len(b)-off <= limit {
		return len(b)
	}
	end := off
	for end < len(b) {
		next := end + headerSize + int(binary.BigEndian.Uint32(b[end+1:]))
		if next-off > limit && end > off {
			break
		}
		end = next
	}
	return end
}

// waitLocked waits for the writer to make progress. It is called with l.mu
// held and returns with it held, except on error, when it has released it.
func (l *link) waitLocked(ctx context.Context) error {
	if ctx.Done() == nil {
		l.cond.Wait()
		return nil
	}
	if l.progress == nil {
		l.progress = make(chan struct{})
	}
	progress := l.progress
	l.mu.Unlock()
	select {
	case <-progress:
	case <-ctx.Done():
		return ctx.Err()
	}
	l.mu.Lock()
	return nil
}

// signalLocked wakes whoever waits for progress.
func (l *link) signalLocked() {
	l.cond.Broadcast()
	if l.progress != nil {
		close(l.progress)
		l.progress = nil
	}
}

// closeWith sends a close frame after whatever is queued, waits a short
// while for it to leave, then tears the link down.
func (l *link) closeWith(code CloseCode, reason string, cause error) {
	l.queueClose(code, reason, cause)
	ctx, cancel := context.WithTimeout(context.Background(), closeFrameTimeout)
	defer cancel()
	l.flushed(ctx)
	l.shutdown(cause)
}

// queueClose queues a close frame and makes cause the reason the link will
// go down with.
func (l *link) queueClose(code CloseCode, reason string, cause error) {
	l.mu.Lock()
	first := !l.closed && l.closing == nil
	if first {
		l.closing = cause
	}
	l.mu.Unlock()
	if first && l.watcher != nil {
		l.watcher.closing(cause)
	}
	l.queueFrame(frameClose, marshalClose(code, reason))
}

// flushed waits until everything queued has been written, the link is
// down, or ctx ends.
func (l *link) flushed(ctx context.Context) {
	l.mu.Lock()
	for !l.closed && l.writing {
		if l.waitLocked(ctx) != nil {
			return
		}
	}
	l.mu.Unlock()
}

// readError turns an error from the frame reader into a disconnect cause.
func readError(err error) error {
	switch {
	case errors.Is(err, io.EOF):
		return errPeerClosed
	case errors.Is(err, os.ErrDeadlineExceeded):
		return ErrHeartbeatTimeout
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("vgo: connection closed inside a frame: %w", err)
	}
	return err
}
