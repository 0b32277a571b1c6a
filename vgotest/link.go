package vgotest

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

const (
	// readSize is the largest chunk read from a socket at once.
	readSize = 32 << 10
	// queueLen is how many chunks a direction holds between its reader and
	// its writer. With readSize it bounds what a frozen or delayed
	// direction without a rate limit keeps in memory, about 2 MiB.
	queueLen = 64
	// queueTime is how much a bandwidth-limited direction holds, in time
	// at its rate, beyond what its latency keeps in flight. Like the short
	// queue of a router in front of a slow link, it makes a fast sender
	// meet backpressure within a fraction of a second, where a queue of
	// megabytes would let it write on for many seconds and keep its later
	// bytes, such as a heartbeat, waiting behind them.
	queueTime = time.Second / 4
	// minQueue is the least a bandwidth-limited direction holds, so that at
	// a very low rate it can still take in a small message whole.
	minQueue = 1 << 10
	// pacesPerSecond splits a bandwidth-limited stream into pieces of
	// about 20ms each, so that it flows smoothly instead of in bursts.
	pacesPerSecond = 50
)

// Link is one connection forwarded by a Proxy: the client's connection to
// the proxy and the proxy's connection to the target. A Link stays valid
// after it ends; its fault setters then do nothing.
type Link struct {
	p      *Proxy
	id     int
	client *net.TCPConn
	server *net.TCPConn
	half   [2]half
	stop   chan struct{} // closed when the link is cut
	done   chan struct{} // closed when every goroutine of the link has exited

	mu sync.Mutex
	faults
	limit   [2]int64 // sent count at which the link is cut; 0 for none
	sent    [2]int64 // bytes written, or being written (see gate)
	cut     bool
	dropped bool
	cause   Closer
	running int           // goroutines of the link still running
	wake    chan struct{} // closed and replaced whenever a fault changes
	// held counts the bytes read in each direction and not yet written or
	// discarded: those in the queue and the rest of the writer's chunk.
	held [2]int
	// drained is closed when a direction's writer lowers held, to wake a
	// reader waiting for room; nil while no reader waits.
	drained [2]chan struct{}
}

// half is one direction of a link.
type half struct {
	queue chan chunk
	quit  chan struct{} // closed when the writer stops, to release the reader
}

// chunk is what one read returned: bytes, or the end of the stream.
type chunk struct {
	b   []byte
	at  time.Time // when the proxy read it; latency counts from here
	end error     // io.EOF for a FIN, another error for a reset
}

// verdict tells a writer what to do with the bytes it holds.
type verdict int

const (
	proceed verdict = iota
	discard
	halt
)

func newLink(p *Proxy, id int, client, server *net.TCPConn, f faults, limits [2]int64) *Link {
	l := &Link{
		p:       p,
		id:      id,
		client:  client,
		server:  server,
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
		faults:  f,
		limit:   limits,
		running: 4,
		wake:    make(chan struct{}),
	}
	for d := range l.half {
		l.half[d] = half{queue: make(chan chunk, queueLen), quit: make(chan struct{})}
	}
	return l
}

// ID returns the link's number: links are numbered from 1 in the order
// the proxy accepted them.
func (l *Link) ID() int {
	return l.id
}

// ClientAddr returns the client's address, which is the LocalAddr of the
// client's connection to the proxy.
func (l *Link) ClientAddr() net.Addr {
	return l.client.RemoteAddr()
}

// ServerAddr returns the proxy's address on its connection to the target,
// which the server sees as the RemoteAddr of the connection.
func (l *Link) ServerAddr() net.Addr {
	return l.server.LocalAddr()
}

// Bytes returns how many bytes the link has forwarded in direction d. A
// write to the destination that is in progress counts in full, as it does
// for ResetAfter; should it fail, only what it wrote stays counted.
func (l *Link) Bytes(d Direction) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sent[d]
}

// Done returns a channel that is closed when the link has ended: both of
// its sockets are closed and the proxy's counters include it.
func (l *Link) Done() <-chan struct{} {
	return l.done
}

// ClosedBy reports who ended the link, or NotClosed until Done is closed.
func (l *Link) ClosedBy() Closer {
	select {
	case <-l.done:
	default:
		return NotClosed
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cause
}

// Cut closes both sockets of the link with a RST at once, dropping
// whatever the link was holding. Both peers read ECONNRESET.
func (l *Link) Cut() {
	l.kill(ClosedByProxy)
}

// DropServer resets the proxy's connection to the server but leaves the
// client's connection open and silent: no FIN, no RST, no data. Whatever
// the client sends afterwards is read and discarded, so the link ends when
// the client closes its connection or when it is cut.
func (l *Link) DropServer() {
	l.mu.Lock()
	if l.cut || l.dropped {
		l.mu.Unlock()
		return
	}
	l.dropped = true
	l.blameLocked(ClosedByProxy)
	l.changedLocked()
	l.mu.Unlock()
	reset(l.server)
}

// Freeze stops the link from forwarding anything in either direction until
// Thaw, while both sockets stay open; see the package documentation for
// what is held. A write to a socket already in progress completes.
func (l *Link) Freeze() {
	l.change(func() { l.frozen = true })
}

// Thaw resumes forwarding on a frozen link, delivering in order what it
// held.
func (l *Link) Thaw() {
	l.change(func() { l.frozen = false })
}

// SetLatency delays every chunk in direction d until latency has passed
// since the proxy read it, including chunks already waiting. Order is
// preserved, and the end of the stream is delayed like data. Zero, the
// default, forwards at once.
func (l *Link) SetLatency(d Direction, latency time.Duration) {
	l.change(func() { l.latency[d] = latency })
}

// SetBandwidth limits direction d to bytesPerSecond. The proxy writes no
// more than about a fiftieth of a second's worth at a time and waits, before
// each write, for as long as the bytes take at that rate, so sending n bytes
// takes at least n/bytesPerSecond seconds.
//
// Like a router in front of a slow link, the proxy then queues little: it
// holds, read but not yet written, no more than a quarter of a second's
// worth at that rate plus what the latency of direction d keeps in flight
// at that rate, and at least 1 KiB. It reads from the source only as its
// writes make room, so the sender's socket buffers fill and its writes
// block, and bytes it sends later wait in the proxy, besides the latency,
// behind a quarter of a second of data at most. A read already waiting for
// data when the limit is set may still bring up to 32 KiB once. The bound
// holds while the link is frozen too.
//
// Zero or less, the default, removes the limit, and with it the bound:
// the direction holds up to about 2 MiB again.
func (l *Link) SetBandwidth(d Direction, bytesPerSecond int) {
	l.change(func() { l.rate[d] = bytesPerSecond })
}

// ResetAfter cuts the link, as Cut does, once n more bytes have been
// forwarded in direction d, counting from Bytes(d) at the time of the
// call. The proxy forwards exactly n bytes and then cuts: a write already
// in progress when ResetAfter is called is counted by Bytes already, and
// every later write is cut short at the limit. Zero or less removes the
// limit.
func (l *Link) ResetAfter(d Direction, n int64) {
	l.change(func() {
		l.limit[d] = 0
		if n > 0 {
			l.limit[d] = l.sent[d] + n
		}
	})
}

// change applies f to the link's faults and wakes its writers to take it
// into account.
func (l *Link) change(f func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f()
	l.changedLocked()
}

func (l *Link) changedLocked() {
	close(l.wake)
	l.wake = make(chan struct{})
}

func (l *Link) blameLocked(by Closer) {
	if l.cause == NotClosed {
		l.cause = by
	}
}

func (l *Link) blame(by Closer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.blameLocked(by)
}

// kill cuts the link, blaming by unless someone was blamed already.
func (l *Link) kill(by Closer) {
	l.mu.Lock()
	if l.cut {
		l.mu.Unlock()
		return
	}
	l.cut = true
	l.blameLocked(by)
	close(l.stop)
	l.mu.Unlock()
	reset(l.client)
	reset(l.server)
}

// exit is called by each goroutine of the link as it returns; the last one
// closes the sockets and reports the end of the link.
func (l *Link) exit() {
	l.mu.Lock()
	l.running--
	last := l.running == 0
	cause := l.cause
	l.mu.Unlock()
	if !last {
		return
	}
	l.client.Close()
	l.server.Close()
	l.p.unregister(l, cause)
	close(l.done)
}

// ends returns the socket that direction d reads and the one it writes.
func (l *Link) ends(d Direction) (src, dst *net.TCPConn) {
	if d == ClientToServer {
		return l.client, l.server
	}
	return l.server, l.client
}

// receive reads direction d into its queue until the source ends.
func (l *Link) receive(d Direction) {
	defer l.exit()
	src, _ := l.ends(d)
	h := &l.half[d]
	buf := make([]byte, readSize)
	for {
		room, ok := l.room(d)
		if !ok {
			return
		}
		n, err := src.Read(buf[:room])
		at := time.Now()
		if n > 0 {
			l.mu.Lock()
			l.held[d] += n
			l.mu.Unlock()
			if !l.hold(h, chunk{b: bytes.Clone(buf[:n]), at: at}) {
				return
			}
		}
		if err != nil {
			// A read failing because the proxy closed the socket finds
			// the proxy blamed already.
			l.blame(d.from())
			l.hold(h, chunk{at: at, end: err})
			return
		}
	}
}

// room blocks while direction d holds all that its rate allows, and
// returns how many bytes its reader may read next, or false if the link
// ends meanwhile. Any change of faults wakes it, since the rate and the
// latency set the bound.
func (l *Link) room(d Direction) (int, bool) {
	for {
		l.mu.Lock()
		free := readSize
		if l.rate[d] > 0 {
			free = min(free, queueSize(l.rate[d], l.latency[d])-l.held[d])
		}
		if free > 0 {
			l.mu.Unlock()
			return free, true
		}
		if l.drained[d] == nil {
			l.drained[d] = make(chan struct{})
		}
		drained, wake := l.drained[d], l.wake
		l.mu.Unlock()
		select {
		case <-drained:
		case <-wake:
		case <-l.half[d].quit:
			return 0, false
		case <-l.stop:
			return 0, false
		}
	}
}

// hold queues c for the writer and reports whether the writer will take
// it.
func (l *Link) hold(h *half, c chunk) bool {
	select {
	case h.queue <- c:
		return true
	case <-h.quit:
		return false
	case <-l.stop:
		return false
	}
}

// deliver writes the chunks of direction d to the destination as the
// link's faults allow, until the end of the stream or of the link.
func (l *Link) deliver(d Direction) {
	defer l.exit()
	h := &l.half[d]
	defer close(h.quit)
	_, dst := l.ends(d)
	discarding := false
	for {
		var c chunk
		select {
		case c = <-h.queue:
		case <-l.stop:
			return
		}
		if discarding {
			if c.end != nil {
				return
			}
			l.discard(d, len(c.b))
			continue
		}
		if c.end != nil {
			if _, v := l.gate(d, c.at, 0); v != proceed {
				return
			}
			if !errors.Is(c.end, io.EOF) {
				l.kill(d.from())
				return
			}
			if dst.CloseWrite() != nil {
				l.failed(d)
			}
			return
		}
		for rest := c.b; len(rest) > 0; {
			n, v := l.gate(d, c.at, len(rest))
			if v == halt {
				return
			}
			if v == discard {
				discarding = true
				l.discard(d, len(rest))
				break
			}
			w, err := dst.Write(rest[:n])
			rest = rest[w:]
			if l.wrote(d, n, w) {
				l.kill(ClosedByProxy)
				return
			}
			if err != nil {
				if l.failed(d) == discard {
					discarding = true
					l.discard(d, len(rest))
					break
				}
				return
			}
		}
	}
}

// gate blocks until the next piece of a chunk read at time at may be
// written in direction d, and returns its size: at most rest bytes, fewer
// under a bandwidth or ResetAfter limit. A rest of zero stands for the end
// of the stream, which waits for freezes and latency like data. A piece
// that may proceed is counted as sent before gate returns, under the same
// lock as the limit it was sized by, so that a ResetAfter during its write
// counts from past it.
func (l *Link) gate(d Direction, at time.Time, rest int) (int, verdict) {
	var due time.Time // when the piece would have crossed a limited link
	n := rest
	for {
		l.mu.Lock()
		var until time.Time // zero: wait for a change of faults only
		now := time.Now()
		rate := l.rate[d]
		switch {
		case l.cut, l.dropped && d == ServerToClient:
			l.mu.Unlock()
			return 0, halt
		case l.dropped:
			l.mu.Unlock()
			return 0, discard
		case l.frozen:
		case now.Before(at.Add(l.latency[d])):
			until = at.Add(l.latency[d])
		case rate > 0 && rest > 0 && due.IsZero():
			n = min(rest, max(1, rate/pacesPerSecond))
			// Each piece waits out its own transmission time before it is
			// written, so n bytes never arrive sooner than n/rate.
			due = now.Add(transmitTime(n, rate))
			until = due
		case rate > 0 && now.Before(due):
			until = due
		default:
			if l.limit[d] > 0 {
				// The writer cuts the link as soon as sent reaches limit,
				// and ResetAfter sets a limit above sent, so some budget
				// is always left here.
				n = int(min(int64(n), l.limit[d]-l.sent[d]))
			}
			l.sent[d] += int64(n)
			l.mu.Unlock()
			return n, proceed
		}
		wake := l.wake
		l.mu.Unlock()
		if !l.sleep(until, wake) {
			return 0, halt
		}
	}
}

// sleep waits until the time until, if not zero, or a change of faults,
// and reports false if the link is cut meanwhile.
func (l *Link) sleep(until time.Time, wake <-chan struct{}) bool {
	var timeout <-chan time.Time
	if !until.IsZero() {
		t := time.NewTimer(time.Until(until))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case <-timeout:
	case <-wake:
	case <-l.stop:
		return false
	}
	return true
}

// wrote records that a write of a piece of n bytes in direction d, which
// gate counted as sent, wrote w of them, and reports whether the
// ResetAfter limit is reached.
func (l *Link) wrote(d Direction, n, w int) bool {
	l.mu.Lock()
	l.sent[d] -= int64(n - w)
	reached := l.limit[d] > 0 && l.sent[d] >= l.limit[d]
	l.releaseLocked(d, w)
	l.mu.Unlock()
	if w > 0 {
		l.p.count(d, w)
	}
	return reached
}

// discard records that the writer of direction d dropped n bytes it held
// instead of writing them.
func (l *Link) discard(d Direction, n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.releaseLocked(d, n)
}

// releaseLocked lowers what direction d holds by n bytes and wakes its
// reader if it waits for room.
func (l *Link) releaseLocked(d Direction, n int) {
	if n == 0 {
		return
	}
	l.held[d] -= n
	if l.drained[d] != nil {
		close(l.drained[d])
		l.drained[d] = nil
	}
}

// failed handles a failed write in direction d. A failure after
// DropServer is the proxy's own doing on the server side; any other means
// the destination is gone, which the proxy passes on to the source as a
// RST.
func (l *Link) failed(d Direction) verdict {
	l.mu.Lock()
	dropped := l.dropped
	l.mu.Unlock()
	if dropped && d == ClientToServer {
		return discard
	}
	l.kill(d.to())
	return halt
}

// transmitTime returns how long n bytes take at rate bytes per second,
// rounded up so that pacing never runs ahead of the rate.
func transmitTime(n, rate int) time.Duration {
	return time.Duration((int64(n)*int64(time.Second) + int64(rate) - 1) / int64(rate))
}

// queueSize returns how many bytes a direction limited to rate bytes per
// second, with the given latency, may hold: queueTime's worth waiting for
// the rate, plus what the latency keeps in flight so that it does not
// lower the rate. Past what queueLen chunks hold, the queue binds instead.
func queueSize(rate int, latency time.Duration) int {
	n := float64(rate) * (queueTime + latency).Seconds()
	return int(max(minQueue, min(n, queueLen*readSize)))
}
