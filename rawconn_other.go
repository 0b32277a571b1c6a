//go:build !linux

package vgo

import (
	"net"
	"syscall"
)

// rawSocket returns nil here: every write goes through the writer goroutine.
func rawSocket(net.Conn) syscall.RawConn { return nil }

// directWrite is empty here; see rawconn_linux.go.
type directWrite struct{}

// tryWrite is never called here: links have no raw socket.
func (l *link) tryWrite([]byte) (int, error) { return 0, nil }

// readIdle is never called here: links have no raw socket.
func (r *frameReader) readIdle(uintptr) bool { return true }
