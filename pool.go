package vgo

import "sync"

// A connection borrows its large buffers (the send queue, a long message
// being read) from a pool while it has work and gives them back when it
// goes idle, so an idle connection holds what a never-busy one holds,
// however large its last burst was.

// maxPooledBuffer is the largest buffer given back to the pool; larger ones,
// grown for a rare long message, are left to the collector.
const maxPooledBuffer = 256 << 10

// buffer wraps a byte slice so that the pool stores a pointer and a Put
// does not allocate.
type buffer struct{ b []byte }

var buffers = sync.Pool{New: func() any { return new(buffer) }}

// getBuffer returns an empty buffer from the pool.
func getBuffer() *buffer {
	buf := buffers.Get().(*buffer)
	buf.b = buf.b[:0]
	return buf
}

// A session's log of unacknowledged messages has a pool of its own, which
// keeps buffers of any size: a log holds up to its bound, 1 MiB by
// default, and empties each time the peer acknowledges all of it.
var logBuffers = sync.Pool{New: func() any { return new(buffer) }}

func getLogBuffer() *buffer {
	buf := logBuffers.Get().(*buffer)
	buf.b = buf.b[:0]
	return buf
}

func putLogBuffer(buf *buffer) {
	if buf != nil {
		logBuffers.Put(buf)
	}
}

// putBuffer gives buf back to the pool, unless it grew too large to keep.
// nil is allowed.
func putBuffer(buf *buffer) {
	if buf == nil {
		return
	}
	if cap(buf.b) > maxPooledBuffer {
		buf.b = nil
	}
	buffers.Put(buf)
}
