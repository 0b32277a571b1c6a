package vgo

import (
	"io"
	"net"
	"os"
	"syscall"
)

// rawSocket returns the socket under c for the writes that do not wait and
// the reads that hold no buffer, or nil unless c is a plain TCP connection:
// a type that wraps one may do its own work in Read and Write, which the
// raw socket would bypass.
func rawSocket(c net.Conn) syscall.RawConn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// directWrite is the state of one write on the raw socket. It lives on the
// link, and its callback is a method value bound once, so that a write
// allocates nothing.
type directWrite struct {
	fn  func(fd uintptr) bool
	p   []byte
	n   int
	err error
}

func (d *directWrite) write(fd uintptr) bool {
	for {
		n, err := syscall.Write(int(fd), d.p)
		switch err {
		case nil:
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			n, err = 0, nil
		default:
			n, err = 0, os.NewSyscallError("write", err)
		}
		d.n, d.err = n, err
		return true // never wait for room: the writer goroutine does
	}
}

// tryWrite writes as much of p as the socket takes at once, and returns
// how many bytes went out. It fails only if the system call did: when a
// connection that is closing, or a write deadline that has passed,
// refuses the call, it writes nothing and leaves the writer goroutine to
// find out which.
func (l *link) tryWrite(p []byte) (int, error) {
	d := &l.direct
	if d.fn == nil {
		d.fn = d.write
	}
	d.p, d.n, d.err = p, 0, nil
	_ = l.rc.Write(d.fn) // its own error only ever comes untried
	d.p = nil
	return d.n, d.err
}

// readIdle is awaitInput's callback: it reads what the socket has into
// the buffer, taking one from the pool if need be, or, when the socket is
// empty, gives the buffer back and has the read wait.
func (r *frameReader) readIdle(fd uintptr) bool {
	if r.buf == nil {
		r.takeBuffer()
	}
	for {
		n, err := syscall.Read(int(fd), r.buf)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			r.dropBuffer()
			return false
		case err != nil:
			r.readErr = os.NewSyscallError("read", err)
		case n == 0:
			r.readErr = io.EOF
		default:
			r.w = n
		}
		return true
	}
}
