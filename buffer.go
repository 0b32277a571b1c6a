package vgo

import (
	"context"
	"fmt"

	"github.com/sirupsen/logrus"
)

// BufferPolicy says what Client.Send does, while disconnected, with a
// message that does not fit in the send buffer.
type BufferPolicy int

const (
	// BufferFailNew refuses the new message with ErrBufferFull.
	BufferFailNew BufferPolicy = iota
	// BufferDropOldest drops the oldest buffered messages to make room.
	BufferDropOldest
	// BufferBlock makes Send wait for room, for the connection, or for its
	// context to end.
	BufferBlock
)

// sendBuffer holds the messages sent while the client had no connection,
// until the next connection takes them. It is guarded by the client's mu.
type sendBuffer struct {
	maxBytes, maxMessages int
	policy                BufferPolicy

	msgs  [][]byte
	bytes int
	// room is closed and replaced whenever messages leave the buffer or
	// the client's state changes, waking senders that block for room.
	room chan struct{}
}

func (b *sendBuffer) enabled() bool { return b.maxMessages > 0 }

func (b *sendBuffer) fits(n int) bool {
	return len(b.msgs) < b.maxMessages && b.bytes+n <= b.maxBytes
}

// take empties the buffer and returns what it held, oldest first.
func (b *sendBuffer) take() [][]byte {
	msgs := b.msgs
	b.msgs, b.bytes = nil, 0
	b.wake()
	return msgs
}

// wake releases every sender waiting for room.
func (b *sendBuffer) wake() {
	if b.room != nil {
		close(b.room)
		b.room = nil
	}
}

// buffer keeps payload for the next connection, applying the policy when
// there is no room; without wait, BufferBlock refuses instead of waiting.
// It is called with c.mu held and returns with it released.
func (c *Client) buffer(ctx context.Context, payload []byte, wait bool) error {
	b := &c.sendBuf
	if len(payload) > b.maxBytes {
		c.mu.Unlock()
		c.stats.rejected.Add(1)
		return fmt.Errorf("%w: a message of %d bytes exceeds the buffer's %d", ErrBufferFull, len(payload), b.maxBytes)
	}
	for !b.fits(len(payload)) {
		switch b.policy {
		case BufferDropOldest:
			b.bytes -= len(b.msgs[0])
			b.msgs[0] = nil
			b.msgs = b.msgs[1:]
			c.stats.dropped.Add(1)
			continue
		case BufferBlock:
			if !wait {
				break
			}
			if b.room == nil {
				b.room = make(chan struct{})
			}
			room := b.room
			c.mu.Unlock()
			select {
			case <-room:
			case <-ctx.Done():
				c.stats.rejected.Add(1)
				return ctx.Err()
			}
			// The state may have changed while waiting: start over.
			return c.send(ctx, payload, wait)
		}
		c.mu.Unlock()
		c.stats.rejected.Add(1)
		return ErrBufferFull
	}
	b.msgs = append(b.msgs, append([]byte(nil), payload...))
	b.bytes += len(payload)
	c.mu.Unlock()
	c.stats.msgsOut.Add(1)
	c.stats.bytesOut.Add(uint64(len(payload)))
	return nil
}

// publish makes l the connection Send writes to, with every message
// buffered while there was none queued on it first, in order. The backlog
// is queued whole, beyond the queue's usual bound, so that publishing never
// waits on the network: the reader is not running yet, and a server that
// answers the backlog must not find both directions full.
func (c *Client) publish(l *link) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if msgs := c.sendBuf.take(); len(msgs) > 0 {
		tooLong, limit, ok := l.queueAll(msgs)
		if !ok {
			// l is already down: keep the messages for the next one.
			c.sendBuf.msgs = msgs
			for _, m := range msgs {
				c.sendBuf.bytes += len(m)
			}
		}
		for _, m := range tooLong {
			// Send took it before this server said what it accepts.
			c.stats.rejected.Add(1)
			c.log.WithFields(logrus.Fields{"size": len(m), "max": limit}).
				Warn("buffered message longer than the server accepts; dropped")
		}
	}
	c.link = l
	c.live.Store(l)
	c.setStateLocked(StateConnected)
}
