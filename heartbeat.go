package vgo

import (
	"encoding/binary"
	"sync/atomic"
	"time"
)

// Liveness works differently on the two sides.
//
// The client pings: its pinger goroutine sends a ping every interval and
// declares the link dead when nothing at all has arrived within the pong
// timeout after the oldest unanswered ping. Any inbound frame counts as an
// answer, so a busy link needs no pongs.
//
// The server only listens: every read of the socket carries a deadline of
// now + heartbeat timeout (see deadlineReader), so a connection that stays
// silent for that long fails its read and is closed. That costs no timer
// goroutine per connection.

// heartbeat is one client connection's liveness state, shared by the reader
// goroutine, which counts the frames that arrive and measures pongs, and the
// pinger goroutine.
type heartbeat struct {
	start    time.Time
	interval time.Duration
	timeout  time.Duration
	// frames counts the frames received on the link, fragments included.
	frames *atomic.Uint64
}

func newHeartbeat(interval, timeout time.Duration, frames *atomic.Uint64) *heartbeat {
	return &heartbeat{start: time.Now(), interval: interval, timeout: timeout, frames: frames}
}

func (h *heartbeat) now() int64 { return int64(time.Since(h.start)) }

// pong returns the round-trip time carried by a pong's payload. It reports
// false for a payload this heartbeat did not send.
func (h *heartbeat) pong(p []byte) (time.Duration, bool) {
	if len(p) != 8 {
		return 0, false
	}
	sent := int64(binary.BigEndian.Uint64(p))
	now := h.now()
	if sent < 0 || sent > now {
		return 0, false
	}
	return time.Duration(now - sent), true
}

// run queues a ping every interval until done is closed. It returns
// ErrHeartbeatTimeout when no frame at all has arrived within the pong
// timeout after the oldest unanswered ping, so a dead link is found at most
// interval + timeout after its last frame, or the error of a failed ping.
// send only queues the ping: however stuck the socket, the expiry fires on
// time.
//
// Pings are not staggered on purpose: clients that connect in a burst ping
// in step, which lets the server answer many pings per wake-up; spread out,
// the same pings cost it twice the CPU (BENCHMARKS.md).
func (h *heartbeat) run(done <-chan struct{}, send func(payload []byte) error) error {
	tick := time.NewTicker(h.interval)
	defer tick.Stop()
	expiry := time.NewTimer(h.timeout)
	expiry.Stop()
	defer expiry.Stop()

	// pending says a ping is unanswered; seen is the frame count when it
	// was sent.
	pending := false
	var seen uint64
	var payload [8]byte
	for {
		select {
		case <-done:
			return nil
		case <-expiry.C:
			if h.frames.Load() == seen {
				return ErrHeartbeatTimeout
			}
			pending = false
		case <-tick.C:
			if pending && h.frames.Load() != seen {
				pending = false
			}
			if !pending {
				pending = true
				seen = h.frames.Load()
				expiry.Reset(h.timeout)
			}
			binary.BigEndian.PutUint64(payload[:], uint64(h.now()))
			if err := send(payload[:]); err != nil {
				return err
			}
		}
	}
}
