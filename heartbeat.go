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
// goroutine, which records arrivals and pongs, and the pinger goroutine.
type heartbeat struct {
	start    time.Time
	interval time.Duration
	timeout  time.Duration
	// lastRecv is when the last frame arrived, in nanoseconds since start.
	lastRecv atomic.Int64
	// answered is set by the first pong: the link has proven it works.
	answered atomic.Bool
}

func newHeartbeat(interval, timeout time.Duration) *heartbeat {
	return &heartbeat{start: time.Now(), interval: interval, timeout: timeout}
}

func (h *heartbeat) now() int64 { return int64(time.Since(h.start)) }

// received records that a frame arrived.
func (h *heartbeat) received() { h.lastRecv.Store(h.now()) }

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
	h.answered.Store(true)
	return time.Duration(now - sent), true
}

// run sends a ping every interval until done is closed. It returns
// ErrHeartbeatTimeout when the oldest unanswered ping has gone without any
// inbound frame for the pong timeout, so a dead link is found at most
// interval + timeout after its last frame, or the error of a failed ping.
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

	// pending is when the oldest unanswered ping was sent, or -1.
	pending := int64(-1)
	var payload [8]byte
	for {
		select {
		case <-done:
			return nil
		case <-expiry.C:
			if h.lastRecv.Load() <= pending {
				return ErrHeartbeatTimeout
			}
			pending = -1
		case <-tick.C:
			now := h.now()
			if pending >= 0 && h.lastRecv.Load() > pending {
				pending = -1
			}
			if pending < 0 {
				pending = now
				expiry.Reset(h.timeout)
			}
			binary.BigEndian.PutUint64(payload[:], uint64(now))
			// A full queue means data is flowing and will do as a sign of
			// life; the expiry check goes on either way.
			if err := send(payload[:]); err != nil && err != errQueueFull {
				return err
			}
		}
	}
}
