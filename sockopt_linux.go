package vgo

import (
	"net"
	"syscall"
	"time"
)

// unsentLowWater is how many bytes a socket may hold that the network has
// not yet taken. Without a bound the kernel accepts megabytes on a slow
// link, and a ping written after them waits for all of them; with it the
// backlog stays in the send queue, where pings go ahead of data.
const unsentLowWater = 16 << 10

// tcpNotSentLowat is TCP_NOTSENT_LOWAT from linux/tcp.h, which package
// syscall does not define.
const tcpNotSentLowat = 25

// limitUnsent bounds the unsent bytes of a TCP connection. It is best
// effort: a connection of another kind, or a kernel without the option,
// keeps its defaults.
func limitUnsent(c net.Conn) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpNotSentLowat, unsentLowWater)
	})
}

// awaitData waits until c has bytes to read, or until deadline, without
// taking any: the first read of the handshake takes them. It returns at
// once for a connection it cannot wait on this way, and an error only when
// the wait itself failed; what the bytes are, or an end of stream, is the
// handshake's to find out.
func awaitData(c net.Conn, deadline time.Time) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	if err := c.SetReadDeadline(deadline); err != nil {
		return err
	}
	var b [1]byte
	return rc.Read(func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		return err != syscall.EAGAIN
	})
}
