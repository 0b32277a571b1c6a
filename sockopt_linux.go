package vgo

import (
	"net"
	"syscall"
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
