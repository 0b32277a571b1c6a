// Package vgotest provides an in-process TCP proxy that injects network
// faults between a client and a server on the loopback interface, for use
// in tests.
//
// A Proxy listens on a free port of 127.0.0.1 and forwards every connection
// it accepts to a target address. Point the client at Proxy.Addr instead of
// the server, and the proxy can then cut connections, turn them into black
// holes, refuse new ones, add latency, limit bandwidth, or reset a
// connection after some bytes, as a real network or a crashing peer would.
// The proxy never looks at the bytes it forwards, so it works with any
// protocol over TCP.
//
// Each forwarded connection is a Link: the client's connection to the proxy
// and the proxy's connection to the target. Faults set on a Proxy apply to
// every live link, overriding what was set on the link, and to every link
// accepted later. Faults set on a Link apply to that link only.
//
// # Faults
//
// Cut closes both sockets of a link with a TCP RST, as when a process dies
// or a firewall resets the connection: both peers read ECONNRESET.
//
// Freeze turns a link into a black hole: nothing goes through in either
// direction, neither data nor FIN nor RST, while both sockets stay open, as
// when a cable is pulled or a NAT entry expires. Only a timeout, such as a
// heartbeat, can detect it. The proxy keeps reading what the peers send
// while the link is frozen, as far as each direction may hold (see What
// the proxy holds below: about 2 MiB, far less under SetBandwidth), and
// then stops reading so that the peers' writes block as they would on a
// silent network. Nothing is dropped: on Thaw the held bytes are delivered
// in order, followed by any FIN or RST that arrived meanwhile. Because the
// ends of the streams are held too, a frozen link stays live until it is
// thawed or cut, even after both peers have closed their sockets.
//
// Refuse makes the proxy reset every new connection at once. The kernel
// completes the TCP handshake before the proxy sees the connection, so the
// client's dial usually succeeds and its first read or write fails with
// ECONNRESET; when the reset is quick enough the dial itself fails with
// ECONNRESET. Either is close to what a port with no listener gives.
//
// SetLatency delays each chunk of bytes in one direction until the latency
// has passed since the proxy read it, preserving order, and SetBandwidth
// paces one direction to a number of bytes per second. ResetAfter cuts a
// link once a number of bytes has been forwarded in one direction.
//
// DropServer leaves a half-open connection: the proxy resets its connection
// to the server but keeps the client's open and silent, as when the
// server's host vanishes without a word.
//
// In every setter a zero value removes the fault.
//
// # What the proxy holds
//
// Each direction of a link reads ahead of its writes, so that latency does
// not hold back the reads behind a delayed chunk. Without a rate limit it
// holds up to about 2 MiB, read but not yet written. With SetBandwidth it
// behaves like a slow link behind a router with a short queue: it holds no
// more than a quarter of a second's worth at its rate, plus what its
// latency keeps in flight at that rate, and at least 1 KiB. Once that much
// waits, the proxy stops reading until its writes make room, so the
// sender's socket buffers fill, its writes block, and what it sends later,
// such as a heartbeat, waits behind no more than a quarter of a second of
// data in the proxy.
//
// # Waiting
//
// Tests should not sleep to let the proxy act. Stats reports counters
// (connections accepted, live, closed and by whom, bytes forwarded each
// way) and Wait blocks until a condition on them holds. WaitLinks waits for
// a number of live links, and a Link's Done channel is closed when the link
// has ended.
//
// # Goroutines
//
// A Proxy runs one goroutine that accepts connections and four per link:
// in each direction one reads from the source and one writes to the
// destination, so that a delayed chunk does not hold back the reads behind
// it. Close returns only after all of them have exited.
//
// All methods of Proxy and Link are safe for concurrent use.
package vgotest

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"
)

const (
	// dialTimeout bounds the proxy's dial to its target; the client's
	// connection is reset when it expires.
	dialTimeout = 5 * time.Second
	// acceptRetry is the pause after a failed accept, such as one for lack
	// of file descriptors, so that the loop does not spin.
	acceptRetry = 10 * time.Millisecond
)

// Direction names one of the two byte streams of a link. The methods that
// take a Direction panic when given any value other than the two below.
type Direction int

const (
	// ClientToServer is the stream from the client to the target.
	ClientToServer Direction = iota
	// ServerToClient is the stream from the target back to the client.
	ServerToClient
)

// String returns "client->server" or "server->client".
func (d Direction) String() string {
	switch d {
	case ClientToServer:
		return "client->server"
	case ServerToClient:
		return "server->client"
	}
	return fmt.Sprintf("Direction(%d)", int(d))
}

// from returns the side whose end of the stream is read.
func (d Direction) from() Closer {
	if d == ClientToServer {
		return ClosedByClient
	}
	return ClosedByServer
}

// to returns the side whose end of the stream is written.
func (d Direction) to() Closer {
	if d == ClientToServer {
		return ClosedByServer
	}
	return ClosedByClient
}

// Closer tells which party ended a link: the first side seen to close or
// reset its connection, or the proxy when a fault or Close ended it.
type Closer int

const (
	// NotClosed is reported for a link that is still open.
	NotClosed Closer = iota
	// ClosedByClient means the client closed or reset its connection first.
	ClosedByClient
	// ClosedByServer means the server closed or reset its connection first,
	// or a write to it failed.
	ClosedByServer
	// ClosedByProxy means Cut, ResetAfter, DropServer or Close ended the
	// link.
	ClosedByProxy
)

// String returns a lower-case description such as "closed by client".
func (c Closer) String() string {
	switch c {
	case NotClosed:
		return "not closed"
	case ClosedByClient:
		return "closed by client"
	case ClosedByServer:
		return "closed by server"
	case ClosedByProxy:
		return "closed by proxy"
	}
	return fmt.Sprintf("Closer(%d)", int(c))
}

// Stats counts what a Proxy has done since it was created. Accepted equals
// Refused + DialFailed + Live + ClosedByClient + ClosedByServer +
// ClosedByProxy, except for connections whose dial is still in progress.
type Stats struct {
	// Accepted counts the connections taken from the listener, refused
	// ones included.
	Accepted int
	// Refused counts the connections reset at once because the proxy was
	// refusing.
	Refused int
	// DialFailed counts the connections reset at once because the target
	// could not be dialled.
	DialFailed int
	// Live is the number of links currently open.
	Live int
	// ClosedByClient, ClosedByServer and ClosedByProxy count the links
	// that have ended, by who ended them.
	ClosedByClient int
	ClosedByServer int
	ClosedByProxy  int
	// ClientToServer and ServerToClient count the bytes forwarded in each
	// direction over all links.
	ClientToServer int64
	ServerToClient int64
}

// faults are the settings that a Proxy hands down to its links.
type faults struct {
	frozen  bool
	latency [2]time.Duration
	rate    [2]int // bytes per second; 0 for no limit
}

// Proxy is a TCP proxy on the loopback interface that forwards connections
// to a target and injects faults into them. Create one with NewProxy and
// Close it when done.
type Proxy struct {
	ln *net.TCPListener
	// ctx ends with Close, aborting dials in progress.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	target   string
	refusing bool
	closing  bool // Close has started: new links are cut at once
	closed   bool // Close has finished: Stats will not change again
	faults   faults
	limits   [2]int64 // ResetAfter byte counts for new links; 0 for none
	links    map[int]*Link
	lastID   int
	stats    Stats
	changed  chan struct{} // closed and replaced whenever stats change
}

// NewProxy starts a proxy listening on a free port of 127.0.0.1 that
// forwards each connection it accepts to target, a host:port address. The
// target is dialled anew for every connection, with a timeout of five
// seconds; a connection whose dial fails is reset. NewProxy fails only if
// it cannot listen.
func NewProxy(target string) (*Proxy, error) {
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, fmt.Errorf("vgotest: listen: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{
		ln:      ln,
		ctx:     ctx,
		cancel:  cancel,
		target:  target,
		links:   make(map[int]*Link),
		changed: make(chan struct{}),
	}
	p.spawn(p.accept)
	return p, nil
}

// Addr returns the address, host:port, that clients should dial instead of
// the target.
func (p *Proxy) Addr() string {
	return p.ln.Addr().String()
}

// SetTarget changes the address that the proxy dials for the connections it
// accepts from now on, for instance after the server restarted on another
// port. Live links keep their server. A client that connected just before
// the call may still be sent to the new target, since the proxy picks the
// target when it takes the connection from the listener.
func (p *Proxy) SetTarget(target string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.target = target
}

// Close stops listening, cuts every link with a RST, and returns once every
// goroutine of the proxy has exited. Later calls wait the same way and
// return nil.
func (p *Proxy) Close() error {
	p.mu.Lock()
	first := !p.closing
	p.closing = true
	links := p.liveLocked()
	p.mu.Unlock()
	var err error
	if first {
		// Cancel before closing the listener, so that the accept loop
		// knows its error is the end and not a hiccup.
		p.cancel()
		err = p.ln.Close()
		for _, l := range links {
			l.kill(ClosedByProxy)
		}
	}
	p.wg.Wait()
	p.mu.Lock()
	p.closed = true
	p.broadcastLocked()
	p.mu.Unlock()
	return err
}

// Links returns the live links in the order they were accepted.
func (p *Proxy) Links() []*Link {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.liveLocked()
}

// Stats returns a snapshot of the proxy's counters.
func (p *Proxy) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// Wait blocks until cond holds for the proxy's counters and returns nil,
// or returns an error when ctx ends first or when the proxy is closed and
// cond does not hold for its final counters. The error wraps ctx.Err() or
// net.ErrClosed and shows the last counters. Wait calls cond without
// holding any lock of the proxy, once at first and again after every
// change of the counters.
func (p *Proxy) Wait(ctx context.Context, cond func(Stats) bool) error {
	for {
		p.mu.Lock()
		s, changed, closed := p.stats, p.changed, p.closed
		p.mu.Unlock()
		if cond(s) {
			return nil
		}
		if closed {
			return fmt.Errorf("vgotest: proxy closed before the condition held (%+v): %w", s, net.ErrClosed)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("vgotest: condition not met (%+v): %w", s, ctx.Err())
		}
	}
}

// WaitLinks blocks until exactly n links are live, as Wait does.
func (p *Proxy) WaitLinks(ctx context.Context, n int) error {
	return p.Wait(ctx, func(s Stats) bool { return s.Live == n })
}

// Cut cuts every live link, as Link.Cut does. Links accepted later are not
// affected.
func (p *Proxy) Cut() {
	for _, l := range p.Links() {
		l.Cut()
	}
}

// DropServer drops the server side of every live link, as Link.DropServer
// does. Links accepted later are not affected.
func (p *Proxy) DropServer() {
	for _, l := range p.Links() {
		l.DropServer()
	}
}

// Freeze freezes every live link and every link accepted until Thaw, as
// Link.Freeze does. The proxy still accepts connections and dials the
// target while frozen: a TCP handshake with the proxy cannot be held back,
// so new clients connect but receive nothing, and the server sees a
// connection on which nothing arrives.
func (p *Proxy) Freeze() {
	p.update(func() { p.faults.frozen = true }, (*Link).Freeze)
}

// Thaw thaws every live link, including those frozen one by one, and stops
// freezing new links.
func (p *Proxy) Thaw() {
	p.update(func() { p.faults.frozen = false }, (*Link).Thaw)
}

// Refuse makes the proxy reset every connection it accepts from now on,
// until Admit. Live links are not affected.
func (p *Proxy) Refuse() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refusing = true
}

// Admit undoes Refuse: connections accepted from now on are forwarded.
func (p *Proxy) Admit() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refusing = false
}

// SetLatency sets the latency of direction d on every live link and on
// links accepted later, as Link.SetLatency does.
func (p *Proxy) SetLatency(d Direction, latency time.Duration) {
	p.update(func() { p.faults.latency[d] = latency }, func(l *Link) { l.SetLatency(d, latency) })
}

// SetBandwidth limits direction d of every live link, and of links accepted
// later, to bytesPerSecond each, as Link.SetBandwidth does.
func (p *Proxy) SetBandwidth(d Direction, bytesPerSecond int) {
	p.update(func() { p.faults.rate[d] = bytesPerSecond }, func(l *Link) { l.SetBandwidth(d, bytesPerSecond) })
}

// ResetAfter makes every live link, and every link accepted later, cut
// itself once n more bytes have been forwarded in direction d, as
// Link.ResetAfter does. Each link counts its own bytes, from this call or
// from its start. An n of zero or less removes the limit.
func (p *Proxy) ResetAfter(d Direction, n int64) {
	p.update(func() { p.limits[d] = max(n, 0) }, func(l *Link) { l.ResetAfter(d, n) })
}

// update changes a default for new links and applies the same change to
// every live link, under one lock so that no link escapes both.
func (p *Proxy) update(setDefault func(), apply func(*Link)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	setDefault()
	for _, l := range p.links {
		apply(l)
	}
}

// spawn runs f on a goroutine that Close waits for.
func (p *Proxy) spawn(f func()) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		f()
	}()
}

func (p *Proxy) accept() {
	for {
		c, err := p.ln.AcceptTCP()
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			select {
			case <-time.After(acceptRetry):
			case <-p.ctx.Done():
				return
			}
			continue
		}
		p.mu.Lock()
		p.stats.Accepted++
		refuse, target := p.refusing, p.target
		if refuse {
			p.stats.Refused++
		}
		p.broadcastLocked()
		p.mu.Unlock()
		if refuse {
			reset(c)
			continue
		}
		p.spawn(func() { p.serve(c, target) })
	}
}

// serve dials target for client and, once connected, becomes the link's
// client-to-server reader.
func (p *Proxy) serve(client *net.TCPConn, target string) {
	dialer := net.Dialer{Timeout: dialTimeout}
	c, err := dialer.DialContext(p.ctx, "tcp", target)
	if err != nil {
		reset(client)
		p.mu.Lock()
		p.stats.DialFailed++
		p.broadcastLocked()
		p.mu.Unlock()
		return
	}
	l := p.register(client, c.(*net.TCPConn))
	p.spawn(func() { l.deliver(ClientToServer) })
	p.spawn(func() { l.receive(ServerToClient) })
	p.spawn(func() { l.deliver(ServerToClient) })
	l.receive(ClientToServer)
}

// register creates the link between client and server with the proxy's
// current faults.
func (p *Proxy) register(client, server *net.TCPConn) *Link {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.lastID++
	l := newLink(p, p.lastID, client, server, p.faults, p.limits)
	p.links[l.id] = l
	p.stats.Live++
	p.broadcastLocked()
	if p.closing {
		// Close has already cut the links it saw; this one came too late.
		l.kill(ClosedByProxy)
	}
	return l
}

// unregister records the end of l.
func (p *Proxy) unregister(l *Link, by Closer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.links, l.id)
	p.stats.Live--
	switch by {
	case ClosedByClient:
		p.stats.ClosedByClient++
	case ClosedByServer:
		p.stats.ClosedByServer++
	default:
		p.stats.ClosedByProxy++
	}
	p.broadcastLocked()
}

// count records n bytes forwarded in direction d.
func (p *Proxy) count(d Direction, n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d == ClientToServer {
		p.stats.ClientToServer += int64(n)
	} else {
		p.stats.ServerToClient += int64(n)
	}
	p.broadcastLocked()
}

func (p *Proxy) liveLocked() []*Link {
	links := make([]*Link, 0, len(p.links))
	for _, l := range p.links {
		links = append(links, l)
	}
	slices.SortFunc(links, func(a, b *Link) int { return a.id - b.id })
	return links
}

// broadcastLocked wakes every Wait.
func (p *Proxy) broadcastLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// reset closes c with a RST rather than a FIN, so that the peer reads
// ECONNRESET instead of a clean end of stream.
func reset(c *net.TCPConn) {
	c.SetLinger(0)
	c.Close()
}
