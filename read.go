package vgo

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// readBufferSize is the size of a frame reader's buffer. Frames that fit
// in it are handed to the application in place, without a copy.
const readBufferSize = 4 << 10

// An idle connection holds no read buffer. A link's frame reader takes one
// from the pool when bytes arrive and gives it back once it has decoded
// every whole frame in it and the socket has nothing more: the read that
// finds the socket empty lets the buffer go and waits for the next bytes
// in the same call (awaitInput). This works on plain TCP sockets on Linux;
// over TLS, which buffers what it decrypts, or on other connections, the
// reader keeps its buffer once it has one.

var readBuffers = sync.Pool{New: func() any {
	b := make([]byte, readBufferSize)
	return &b
}}

// maxEmptyReads bounds the reads in a row that return nothing and no
// error before the reader gives up with io.ErrNoProgress.
const maxEmptyReads = 100

// buffered returns how many bytes have been read and not yet decoded.
func (r *frameReader) buffered() int { return r.w - r.r }

// frameBuffered reports whether the next frame is buffered whole.
func (r *frameReader) frameBuffered() bool {
	n := r.w - r.r
	return n >= headerSize && n-headerSize >= int(binary.BigEndian.Uint32(r.buf[r.r+1:]))
}

// takeBuffer gives the reader a buffer from the pool.
func (r *frameReader) takeBuffer() {
	r.bufp = readBuffers.Get().(*[]byte)
	r.buf = *r.bufp
}

// dropBuffer gives the reader's buffer back to the pool; what it held is
// lost.
func (r *frameReader) dropBuffer() {
	if r.bufp != nil {
		readBuffers.Put(r.bufp)
	}
	r.buf, r.bufp, r.r, r.w = nil, nil, 0, 0
}

// fill reads more of the stream into the buffer, after what it holds.
func (r *frameReader) fill() error {
	if r.buf == nil {
		r.takeBuffer()
	}
	if r.r > 0 {
		r.w = copy(r.buf, r.buf[r.r:r.w])
		r.r = 0
	}
	for range maxEmptyReads {
		n, err := r.src.Read(r.buf[r.w:])
		r.w += n
		if err != nil {
			return err
		}
		if n > 0 {
			return nil
		}
	}
	return io.ErrNoProgress
}

// peek returns the next n bytes, n at most readBufferSize, without
// consuming them. With fewer available it returns those and the error
// that stopped it.
func (r *frameReader) peek(n int) ([]byte, error) {
	for r.w-r.r < n {
		if err := r.fill(); err != nil {
			return r.buf[r.r:r.w], err
		}
	}
	return r.buf[r.r : r.r+n], nil
}

// discard consumes n buffered bytes.
func (r *frameReader) discard(n int) {
	r.r += n
	if r.r == r.w {
		r.r, r.w = 0, 0
	}
}

// Read reads the stream through the buffer: what it holds first, and a
// read as long as the buffer or longer straight from the stream.
func (r *frameReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if r.r == r.w {
		if len(p) >= readBufferSize {
			return r.src.Read(p)
		}
		if err := r.fill(); err != nil && r.r == r.w {
			return 0, err
		}
	}
	n := copy(p, r.buf[r.r:r.w])
	r.discard(n)
	return n, nil
}

// unread puts p back in front of what is buffered: the bytes that a
// reader stacked on this one read and did not use.
func (r *frameReader) unread(p []byte) {
	if len(p) == 0 {
		return
	}
	if len(p) <= r.r && bytes.Equal(r.buf[r.r-len(p):r.r], p) {
		r.r -= len(p) // they are still there
		return
	}
	rest := r.buf[r.r:r.w]
	b := make([]byte, 0, max(readBufferSize, len(p)+len(rest)))
	b = append(append(b, p...), rest...)
	r.dropBuffer()
	r.buf, r.w = b[:cap(b)], len(b)
}

// awaitInput waits for the next bytes of l's stream when none is
// buffered, and reads them. On a raw socket it holds no buffer while it
// waits. The readers call it at the top of their loops: a goroutine that
// waits here, and sets the read deadline here, keeps the runtime's
// smallest stack, which an idle connection would otherwise hold at twice
// the size for as long as it lives.
func (l *link) awaitInput() error {
	if l.rc == nil || l.fr.r != l.fr.w {
		return nil
	}
	for {
		if err := l.rd.arm(); err != nil {
			return err
		}
		if err := l.fr.awaitInput(l.rd); !l.rd.early(err) {
			return err
		}
	}
}

// awaitInput reads the next bytes of d, the frame reader's source, from
// its raw socket into an empty buffer, with the read deadline armed.
// While the socket has none it holds no buffer.
func (r *frameReader) awaitInput(d *deadlineReader) error {
	if r.want < 0 && r.held != nil {
		// The last long message's buffer, which next would give back.
		putBuffer(r.held)
		r.held = nil
	}
	r.r, r.w, r.readErr = 0, 0, nil
	if r.readIdleFn == nil {
		r.readIdleFn = r.readIdle
	}
	err := d.rc.Read(r.readIdleFn)
	if r.w > 0 {
		d.reads.Store(d.reads.Load() + 1) // the reader is the only writer
	}
	if err == nil && r.readErr != nil {
		err = r.readErr
		if err != io.EOF {
			err = &net.OpError{Op: "read", Net: "tcp", Source: d.conn.LocalAddr(), Addr: d.conn.RemoteAddr(), Err: err}
		}
	}
	return err
}

// release gives the read buffers back to the pool, once the reader has
// stopped for good.
func (r *frameReader) release() {
	if r.want < 0 {
		putBuffer(r.held)
	}
	r.held = nil
	r.dropBuffer()
}

// deadlineReader is what a link's frames are read from. It sets the read
// deadline before each read of the socket, so that silence is detected
// without a timer goroutine per connection. While fixed is set (during
// the handshake) every read shares that deadline. Afterwards, with idle
// set, the deadline is idle after the last read that followed a complete
// frame (a fragment counts): bytes that never make up a frame do not push
// it forward, so a peer cannot stay alive by trickling them.
//
// On a raw socket the connection's deadline trails the idle deadline: it
// is pushed only once it lags by more than half of idle, which, with pings
// at a third of the timeout, halves the work of moving it. A read that
// reaches it early is tried again (early), so silence is still found at
// the idle deadline.
type deadlineReader struct {
	conn net.Conn
	// rc is the link's raw socket, if it has one (link.rc).
	rc    syscall.RawConn
	fixed time.Time
	idle  time.Duration
	// frames counts the frames decoded so far; the frame reader keeps it.
	frames *atomic.Uint64
	// reads counts the reads that returned bytes.
	reads atomic.Uint64
	seen  uint64    // frames when next was last moved
	next  time.Time // the idle deadline
	set   time.Time // the deadline in force on conn
	// setIdle says set is an idle deadline, not the handshake's.
	setIdle bool
}

// arm puts the deadline the next read must meet on the connection.
func (d *deadlineReader) arm() error {
	deadline := d.fixed
	idle := deadline.IsZero() && d.idle > 0
	if idle {
		d.moveIdle()
		deadline = d.next
		if d.rc != nil && d.setIdle && deadline.Sub(d.set) <= d.idle/2 {
			return nil // early catches the difference
		}
	}
	if !deadline.Equal(d.set) {
		if err := d.conn.SetReadDeadline(deadline); err != nil {
			return err
		}
		d.set, d.setIdle = deadline, idle
	}
	return nil
}

// moveIdle moves the idle deadline past the frames decoded since it last
// moved.
func (d *deadlineReader) moveIdle() {
	if n := d.frames.Load(); d.next.IsZero() || n != d.seen {
		d.seen = n
		d.next = time.Now().Add(d.idle)
	}
}

// early reports whether err is the connection's deadline, passed before
// the idle deadline: the read is to be tried again.
func (d *deadlineReader) early(err error) bool {
	if err == nil || !d.setIdle || d.set.Equal(d.next) && d.frames.Load() == d.seen ||
		!errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	d.moveIdle()
	if time.Now().Before(d.next) {
		d.setIdle = false // the deadline in force has passed: arm moves it
		return true
	}
	return false
}

func (d *deadlineReader) Read(p []byte) (int, error) {
	for {
		if err := d.arm(); err != nil {
			return 0, err
		}
		n, err := d.conn.Read(p)
		if n > 0 {
			d.reads.Store(d.reads.Load() + 1) // the reader is the only writer
		}
		if n > 0 || !d.early(err) {
			return n, err
		}
	}
}
