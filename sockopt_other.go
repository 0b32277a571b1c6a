//go:build !linux

package vgo

import (
	"net"
	"time"
)

// limitUnsent does nothing here: the option that bounds a socket's unsent
// bytes is set on Linux only.
func limitUnsent(net.Conn) {}

// awaitData returns at once here: a connection counts as working on its
// handshake from when it is accepted.
func awaitData(net.Conn, time.Time) error { return nil }
