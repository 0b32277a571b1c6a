package vgo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// errPeerClosed is the cause of a disconnect when the peer closed the stream
// without a close frame.
var errPeerClosed = fmt.Errorf("vgo: connection closed by peer: %w", io.EOF)

// closeFrameTimeout bounds the best-effort close frame sent before a
// connection is torn down; the teardown must not wait on a slow peer.
const closeFrameTimeout = 250 * time.Millisecond

// largeWriteBuffer is the write buffer capacity above which a link drops its
// buffer after a write, so a connection that once sent a big frame does not
// hold the memory while idle.
const largeWriteBuffer = 64 << 10

// link is one framed connection, shared by the client and server sides: a
// frame reader for the single reader goroutine, serialized writes with a
// deadline, and a teardown that happens once and keeps its first cause.
type link struct {
	nc           net.Conn
	rd           *deadlineReader
	fr           *frameReader
	writeTimeout time.Duration
	// closedErr is what writes return once the link is down.
	closedErr error

	// wsem holds the write lock; a channel rather than a mutex so that a
	// writer can give up waiting when its context ends.
	wsem chan struct{}
	wbuf []byte

	once sync.Once
	done chan struct{}
	err  error // first cause; read only after done is closed
}

func newLink(nc net.Conn, o *commonOptions, closedErr error) *link {
	rd := &deadlineReader{conn: nc}
	return &link{
		nc:           nc,
		rd:           rd,
		fr:           newFrameReader(rd, o.maxFrameSize),
		writeTimeout: o.writeTimeout,
		closedErr:    closedErr,
		wsem:         make(chan struct{}, 1),
		done:         make(chan struct{}),
	}
}

// shutdown tears the link down with cause err. Only the first call has an
// effect; it returns the cause that won.
func (l *link) shutdown(err error) error {
	l.once.Do(func() {
		l.err = err
		l.nc.Close()
		close(l.done)
	})
	<-l.done
	return l.err
}

// cause returns why the link went down, or nil while it is up.
func (l *link) cause() error {
	select {
	case <-l.done:
		return l.err
	default:
		return nil
	}
}

// write sends one frame. ctx bounds only the wait for the write lock: once
// the frame is being written the write timeout applies, because abandoning a
// half-written frame would corrupt the stream. A failed write tears the link
// down.
func (l *link) write(ctx context.Context, t frameType, payload []byte) error {
	select {
	case l.wsem <- struct{}{}:
	case <-l.done:
		return l.closedErr
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-l.wsem }()
	if l.cause() != nil {
		return l.closedErr
	}
	if err := l.writeFrame(t, payload, l.writeTimeout); err != nil {
		return l.fail(fmt.Errorf("vgo: write %s frame: %w", t, err))
	}
	return nil
}

// writeFrame writes one frame with the given timeout (0 for none). The
// caller holds the write lock.
func (l *link) writeFrame(t frameType, payload []byte, timeout time.Duration) error {
	l.wbuf = appendFrame(l.wbuf[:0], t, payload)
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	if err := l.nc.SetWriteDeadline(deadline); err != nil {
		return err
	}
	_, err := l.nc.Write(l.wbuf)
	if cap(l.wbuf) > largeWriteBuffer {
		l.wbuf = nil
	}
	return err
}

// fail tears the link down after a write error and returns the error the
// writer should see.
func (l *link) fail(err error) error {
	if cause := l.shutdown(err); cause != err {
		return l.closedErr
	}
	return err
}

// closeWith sends a best-effort close frame, then tears the link down. It
// does not wait long for the write lock: a writer stuck on a dead peer must
// not stall the teardown.
func (l *link) closeWith(code CloseCode, reason string, cause error) {
	timer := time.NewTimer(closeFrameTimeout)
	defer timer.Stop()
	select {
	case l.wsem <- struct{}{}:
		if l.cause() == nil {
			// The write's own error is of no interest: the link is
			// going down either way, with cause.
			_ = l.writeFrame(frameClose, marshalClose(code, reason), closeFrameTimeout)
		}
		<-l.wsem
	case <-l.done:
	case <-timer.C:
	}
	l.shutdown(cause)
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

// deadlineReader sets a read deadline before every read of the socket, so
// that silence is detected without a timer goroutine per connection. While
// fixed is set (during the handshake) every read shares that deadline;
// afterwards each read may block for at most idle, or forever when idle is 0.
type deadlineReader struct {
	conn  net.Conn
	fixed time.Time
	idle  time.Duration
	armed bool // a deadline is in force on conn
}

func (r *deadlineReader) Read(p []byte) (int, error) {
	var deadline time.Time
	switch {
	case !r.fixed.IsZero():
		deadline = r.fixed
	case r.idle > 0:
		deadline = time.Now().Add(r.idle)
	}
	if !deadline.IsZero() || r.armed {
		if err := r.conn.SetReadDeadline(deadline); err != nil {
			return 0, err
		}
		r.armed = !deadline.IsZero()
	}
	return r.conn.Read(p)
}
