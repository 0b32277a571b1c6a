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
	"time"
)

// errPeerClosed is the cause of a disconnect when the peer closed the stream
// without a close frame.
var errPeerClosed = fmt.Errorf("vgo: connection closed by peer: %w", io.EOF)

// closeFrameTimeout bounds the best-effort close frame sent before a
// connection is torn down; the teardown must not wait on a slow peer.
const closeFrameTimeout = 250 * time.Millisecond

// Frames wait in a per-connection queue that one flusher goroutine writes
// out, so small frames sent close together leave in one system call. The
// flusher runs only while the queue has frames: an idle connection has no
// writer goroutine.
const (
	// sendQueueLimit is how many bytes of frames may wait for the socket
	// before writers block.
	sendQueueLimit = 64 << 10
	// directWriteMin is the payload size from which a writer skips the
	// queue and writes the frame itself once the queue has drained, to
	// spare the copy.
	directWriteMin = 32 << 10
	// keepBufferMax is the largest queue buffer an idle connection keeps:
	// enough for a full queue plus the frame that overflowed it, so a busy
	// connection reuses its two buffers instead of growing new ones.
	keepBufferMax = sendQueueLimit + directWriteMin + headerSize
)

// link is one framed connection, shared by the client and server sides: a
// frame reader for the single reader goroutine, ordered writes that each
// carry a deadline, and a teardown that happens once and keeps its first
// cause.
type link struct {
	nc           net.Conn
	rd           *deadlineReader
	fr           *frameReader
	writeTimeout time.Duration
	maxData      int
	// closedErr is what writes return once the link is down.
	closedErr error

	// flushFn is l.flush, bound once so that starting the flusher does not
	// allocate.
	flushFn  func()
	flushers sync.WaitGroup

	mu       sync.Mutex
	queue    []byte // frames waiting for the socket, in order
	spare    []byte // the last written batch, reused as the next queue
	writing  bool   // the flusher or a direct writer owns the socket
	closed   bool   // set by shutdown: nothing more is queued
	closing  error  // the cause closeWith will shut down with
	directs  int    // direct writers waiting: queued writes hold back for them
	progress chan struct{}
	hdr      [headerSize]byte
	ctrl     []byte      // a control frame written by its sender
	iov      [2][]byte   // header and payload of a direct write
	bufs     net.Buffers // views iov; a field so WriteTo does not allocate

	// goodbye is the reconnect window a departing server asked for.
	goodbye atomic.Int64

	once sync.Once
	done chan struct{}
	err  error // first cause; read only after done is closed
}

func newLink(nc net.Conn, o *commonOptions, closedErr error) *link {
	rd := &deadlineReader{conn: nc}
	l := &link{
		nc: nc,
		rd: rd,
		// Until the hello exchange completes no data frame is allowed,
		// so no peer can make us allocate before it has said who it is.
		fr:           newFrameReader(rd, 0),
		maxData:      o.maxFrameSize,
		writeTimeout: o.writeTimeout,
		closedErr:    closedErr,
		done:         make(chan struct{}),
	}
	l.fr.count = &rd.frames
	l.flushFn = l.flush
	return l
}

// startHandshake makes every read until established share deadline (zero
// for none).
func (l *link) startHandshake(deadline time.Time) {
	l.rd.fixed = deadline
}

// established ends the handshake: data frames up to the maximum size are
// accepted from now on, and each read may wait for idle (0 for ever).
func (l *link) established(idle time.Duration) {
	l.rd.fixed = time.Time{}
	l.rd.idle = idle
	l.fr.maxData = l.maxData
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
		l.mu.Unlock()
		l.err = err
		l.nc.Close()
		close(l.done)
	})
	<-l.done
	return l.err
}

// wait returns once the flusher has exited; call it after shutdown.
func (l *link) wait() { l.flushers.Wait() }

// cause returns why the link went down, or nil while it is up.
func (l *link) cause() error {
	select {
	case <-l.done:
		return l.err
	default:
		return nil
	}
}

// write sends one frame, after every frame written before it. A small frame
// is queued and write returns at once; the flusher writes it with the write
// timeout. A large one is written by the caller once the queue has drained,
// and write returns when it is on the socket. ctx bounds only the wait for
// room in the queue or for the socket: a frame is never abandoned half
// written, which would corrupt the stream. A failed write tears the link
// down.
func (l *link) write(ctx context.Context, t frameType, payload []byte) error {
	if len(payload) >= directWriteMin {
		return l.writeDirect(ctx, t, payload)
	}
	need := headerSize + len(payload)
	l.mu.Lock()
	for !l.closed && (l.directs > 0 || len(l.queue) > 0 && len(l.queue)+need > sendQueueLimit) {
		if err := l.waitLocked(ctx); err != nil {
			return err
		}
	}
	if l.closed {
		l.mu.Unlock()
		return l.closedErr
	}
	l.queue = appendFrame(l.queue, t, payload)
	if !l.writing {
		l.startFlusherLocked()
	}
	l.mu.Unlock()
	return nil
}

// queueAll queues data frames for msgs, whatever their size, without
// waiting; it reports false if the link is down.
func (l *link) queueAll(msgs [][]byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false
	}
	for _, m := range msgs {
		l.queue = appendFrame(l.queue, frameData, m)
	}
	if !l.writing {
		l.startFlusherLocked()
	}
	return true
}

// errQueueFull is returned by writeControl when the send queue has no room.
var errQueueFull = errors.New("vgo: send queue full")

// writeControl sends a ping or a pong without waiting. On an idle link the
// caller writes the frame itself, which spares starting the flusher for
// the one frame that heartbeats send at a time; on a busy link the frame
// joins the queue. When the queue is full it sends nothing and returns
// errQueueFull: data is flowing then, and any frame tells the peer the link
// is alive.
func (l *link) writeControl(t frameType, payload []byte) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return l.closedErr
	}
	if l.writing || len(l.queue) > 0 || l.directs > 0 {
		if len(l.queue)+headerSize+len(payload) > sendQueueLimit {
			l.mu.Unlock()
			return errQueueFull
		}
		l.queue = appendFrame(l.queue, t, payload)
		if !l.writing {
			l.startFlusherLocked()
		}
		l.mu.Unlock()
		return nil
	}
	l.writing = true
	l.mu.Unlock()

	l.ctrl = appendFrame(l.ctrl[:0], t, payload)
	err := l.nc.SetWriteDeadline(l.writeDeadline())
	if err == nil {
		_, err = l.nc.Write(l.ctrl)
	}

	return l.endWrite(t, err)
}

// endWrite gives the socket back after a write by its caller, hands it to
// the flusher if frames queued up meanwhile, and tears the link down if the
// write failed.
func (l *link) endWrite(t frameType, err error) error {
	l.mu.Lock()
	l.writing = false
	if err == nil && !l.closed && len(l.queue) > 0 {
		l.startFlusherLocked()
	}
	l.signalLocked()
	l.mu.Unlock()
	if err == nil {
		return nil
	}
	err = fmt.Errorf("vgo: write %s frame: %w", t, err)
	if cause := l.shutdown(err); cause != err {
		return l.closedErr // the link was already going down for another reason
	}
	return err
}

// answerPing sends the pong for a ping's payload. A full queue is no
// failure: the data in it tells the peer as much as the pong would.
func (l *link) answerPing(p []byte) error {
	if err := l.writeControl(framePong, p); err != errQueueFull {
		return err
	}
	return nil
}

func (l *link) startFlusherLocked() {
	l.writing = true
	l.flushers.Add(1)
	go l.flushFn()
}

// writeDirect writes a frame from the caller's goroutine, without copying
// the payload, once the queue ahead of it has drained.
func (l *link) writeDirect(ctx context.Context, t frameType, payload []byte) error {
	l.mu.Lock()
	l.directs++
	for !l.closed && (l.writing || len(l.queue) > 0) {
		if err := l.waitLocked(ctx); err != nil {
			l.mu.Lock()
			l.directs--
			l.signalLocked()
			l.mu.Unlock()
			return err
		}
	}
	l.directs--
	if l.closed {
		l.signalLocked()
		l.mu.Unlock()
		return l.closedErr
	}
	l.writing = true
	l.mu.Unlock()

	l.hdr[0] = byte(t)
	binary.BigEndian.PutUint32(l.hdr[1:], uint32(len(payload)))
	l.iov = [2][]byte{l.hdr[:], payload}
	err := l.nc.SetWriteDeadline(l.writeDeadline())
	if err == nil {
		// One writev for both, without copying the payload.
		l.bufs = l.iov[:]
		_, err = l.bufs.WriteTo(l.nc)
	}
	l.iov, l.bufs = [2][]byte{}, nil // do not keep the caller's payload

	return l.endWrite(t, err)
}

// flush writes the queue out, a batch per system call, until it is empty.
func (l *link) flush() {
	defer l.flushers.Done()
	l.mu.Lock()
	for len(l.queue) > 0 && !l.closed {
		batch := l.queue
		l.queue = l.spare[:0]
		l.spare = nil
		l.signalLocked()
		l.mu.Unlock()

		err := l.nc.SetWriteDeadline(l.writeDeadline())
		if err == nil {
			_, err = l.nc.Write(batch)
		}

		l.mu.Lock()
		l.spare = batch[:0]
		if err != nil {
			l.writing = false
			l.mu.Unlock()
			l.shutdown(fmt.Errorf("vgo: write: %w", err))
			return
		}
	}
	l.writing = false
	if cap(l.queue) > keepBufferMax {
		l.queue = nil
	}
	if cap(l.spare) > keepBufferMax {
		l.spare = nil
	}
	l.signalLocked()
	l.mu.Unlock()
}

func (l *link) writeDeadline() time.Time {
	if l.writeTimeout <= 0 {
		return time.Time{}
	}
	return time.Now().Add(l.writeTimeout)
}

// waitLocked waits for the flusher to make progress. It is called with l.mu
// held and returns with it held, except on error, when it has released it.
func (l *link) waitLocked(ctx context.Context) error {
	if l.progress == nil {
		l.progress = make(chan struct{})
	}
	progress := l.progress
	l.mu.Unlock()
	select {
	case <-progress:
	case <-l.done:
		return l.closedErr
	case <-ctx.Done():
		return ctx.Err()
	}
	l.mu.Lock()
	return nil
}

// signalLocked wakes the writers waiting for progress, if any.
func (l *link) signalLocked() {
	if l.progress != nil {
		close(l.progress)
		l.progress = nil
	}
}

// closeWith sends a close frame, waits a short while for it to leave, then
// tears the link down. A writer stuck on a dead peer must not stall the
// teardown, so the wait is bounded.
func (l *link) closeWith(code CloseCode, reason string, cause error) {
	ctx, cancel := context.WithTimeout(context.Background(), closeFrameTimeout)
	defer cancel()
	l.sendClose(ctx, code, reason, cause)
	l.flushed(ctx)
	l.shutdown(cause)
}

// sendClose queues a close frame, waiting for room no longer than ctx
// allows, and makes cause the reason the link will go down with.
func (l *link) sendClose(ctx context.Context, code CloseCode, reason string, cause error) {
	l.mu.Lock()
	if !l.closed && l.closing == nil {
		l.closing = cause
	}
	l.mu.Unlock()
	// Without room in time the peer is told nothing; the teardown that
	// follows still happens.
	_ = l.write(ctx, frameClose, marshalClose(code, reason))
}

// flushed waits until everything queued has been written, the link is
// down, or ctx ends.
func (l *link) flushed(ctx context.Context) {
	l.mu.Lock()
	for !l.closed && (l.writing || len(l.queue) > 0) {
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

// deadlineReader sets the read deadline before each read of the socket, so
// that silence is detected without a timer goroutine per connection. While
// fixed is set (during the handshake) every read shares that deadline.
// Afterwards, with idle set, the deadline is idle after the last read that
// followed a complete frame: bytes that never make up a frame do not push it
// forward, so a peer cannot stay alive by trickling them.
type deadlineReader struct {
	conn  net.Conn
	fixed time.Time
	idle  time.Duration
	// frames counts the frames decoded so far; the frame reader keeps it.
	frames uint64
	seen   uint64    // frames at the last push of the deadline
	next   time.Time // the idle deadline
	set    time.Time // the deadline in force on conn
}

func (r *deadlineReader) Read(p []byte) (int, error) {
	deadline := r.fixed
	if deadline.IsZero() && r.idle > 0 {
		if r.next.IsZero() || r.frames != r.seen {
			r.seen = r.frames
			r.next = time.Now().Add(r.idle)
		}
		deadline = r.next
	}
	if !deadline.Equal(r.set) {
		if err := r.conn.SetReadDeadline(deadline); err != nil {
			return 0, err
		}
		r.set = deadline
	}
	return r.conn.Read(p)
}
