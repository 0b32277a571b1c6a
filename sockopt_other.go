//go:build !linux

package vgo

import "net"

// limitUnsent does nothing here: the option that bounds a socket's unsent
// bytes is set on Linux only.
func limitUnsent(net.Conn) {}
