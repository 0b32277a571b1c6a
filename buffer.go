package vgo

import (
	"context"
	"errors"
	"fmt"
)

// ErrBufferFull is returned by Client.Send while disconnected when the send
// buffer has no room and its policy is BufferFailNew.
var ErrBufferFull = errors.New("vgo: send buffer full")

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
// there is no room. It is called with c.mu held and returns with it
// released.
func (c *Client) buffer(ctx context.Context, payload []byte) error {
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
			return c.Send(ctx, payload)
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

// publish makes l the client's connection, after writing to it, in order,
// every message buffered while there was none, including those sent while
// this runs. It reports false if l failed first; the messages not written
// then stay buffered for the next connection.
func (c *Client) publish(l *link) bool {
	for {
		c.mu.Lock()
		if len(c.sendBuf.msgs) == 0 {
			c.link = l
			c.setStateLocked(StateConnected)
			c.sendBuf.wake()
			c.mu.Unlock()
			return true
		}
		msgs := c.sendBuf.take()
		c.mu.Unlock()
		for i, m := range msgs {
			if err := l.write(c.ctx, frameData, m); err != nil {
				c.mu.Lock()
				c.sendBuf.msgs = append(msgs[i:], c.sendBuf.msgs...)
				for _, m := range msgs[i:] {
					c.sendBuf.bytes += len(m)
				}
				c.mu.Unlock()
				return false
			}
		}
	}
}
