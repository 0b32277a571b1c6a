package vgo

import (
	"context"
	"encoding/binary"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vgonet/vgo/vgotest"
)

// sequence checks that numbered messages arrive each exactly once and in
// order: message i carries i as a big-endian uint64 in its first 8 bytes.
type sequence struct {
	mu         sync.Mutex
	next       uint64 // the number expected next, from 1
	duplicates int
	gaps       int
	changed    chan struct{}
}

func newSequence() *sequence { return &sequence{next: 1, changed: make(chan struct{})} }

func (q *sequence) add(p []byte) {
	n := binary.BigEndian.Uint64(p)
	q.mu.Lock()
	defer q.mu.Unlock()
	switch {
	case n < q.next:
		q.duplicates++
	case n > q.next:
		q.gaps++
		q.next = n + 1
	default:
		q.next++
	}
	close(q.changed)
	q.changed = make(chan struct{})
}

// wait returns once message n has arrived, or fails the test.
func (q *sequence) wait(t *testing.T, ctx context.Context, n uint64, what string) {
	t.Helper()
	for {
		q.mu.Lock()
		got, changed := q.next-1, q.changed
		q.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			t.Fatalf("%s: %d of %d messages arrived", what, got, n)
		}
	}
}

func (q *sequence) check(t *testing.T, what string) {
	t.Helper()
	q.mu.Lock()
	defer q.mu.Unlock()
	require.Zero(t, q.duplicates, "%s: duplicates", what)
	require.Zero(t, q.gaps, "%s: messages lost or out of order", what)
}

func numbered(n uint64, size int) []byte {
	p := make([]byte, max(size, 8))
	binary.BigEndian.PutUint64(p, n)
	return p
}

// sessionRig is a server with sessions behind a fault proxy and a client
// that resumes, each counting the numbered messages of the other.
type sessionRig struct {
	srv      *Server
	proxy    *vgotest.Proxy
	client   *Client
	toServer *sequence // what the server's handler saw
	toClient *sequence // what the client's OnMessage saw
	opened   chan *Conn
	resumed  chan *Conn
	closed   chan error
}

func newSessionRig(t *testing.T, serverOpts []ServerOption, clientOpts ...ClientOption) *sessionRig {
	t.Helper()
	r := &sessionRig{
		toServer: newSequence(),
		toClient: newSequence(),
		opened:   make(chan *Conn, 16),
		resumed:  make(chan *Conn, 1000),
		closed:   make(chan error, 16),
	}
	var addr string
	r.srv, addr = startServer(t, append([]ServerOption{
		WithSessions(Sessions{}),
		WithHeartbeatTimeout(5 * faultTimeout),
		WithHandler(func(_ *Conn, p []byte) { r.toServer.add(p) }),
		WithOnConnOpen(func(c *Conn) { r.opened <- c }),
		WithOnConnResume(func(c *Conn) { r.resumed <- c }),
		WithOnConnClose(func(_ *Conn, err error) { r.closed <- err }),
	}, serverOpts...)...)
	r.proxy = newProxy(t, addr)
	r.client = newTestClient(t, r.proxy.Addr(), append([]ClientOption{
		WithResume(0),
		WithPingInterval(faultInterval),
		WithPongTimeout(faultTimeout),
		WithOnMessage(r.toClient.add),
	}, clientOpts...)...)
	return r
}

// TestSessionStreamsSurviveFaults streams numbered messages both ways at
// full speed while the link is broken again and again by every kind of
// fault, and checks that each side saw every message once, in order.
func TestSessionStreamsSurviveFaults(t *testing.T) {
	r := newSessionRig(t, nil)
	ctx := testContext(t)
	require.NoError(t, r.client.WaitConnected(ctx))
	conn := recv(t, r.opened)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sentUp, sentDown uint64
	stream := func(send func(context.Context, []byte) error, sent *uint64) {
		for i := uint64(1); ; i++ {
			select {
			case <-stop:
				*sent = i - 1
				return
			default:
			}
			if err := send(ctx, numbered(i, 64)); err != nil {
				t.Errorf("send %d: %v", i, err)
				*sent = i - 1
				return
			}
		}
	}
	wg.Go(func() { stream(r.client.Send, &sentUp) })
	wg.Go(func() { stream(conn.Send, &sentDown) })

	faults := []func(l *vgotest.Link){
		(*vgotest.Link).Cut,
		(*vgotest.Link).DropServer,
		func(l *vgotest.Link) { l.ResetAfter(vgotest.ClientToServer, 1000) },
		func(l *vgotest.Link) { l.ResetAfter(vgotest.ServerToClient, 777) },
		(*vgotest.Link).Freeze,
	}
	const cuts = 10
	for i := range cuts {
		require.NoError(t, r.proxy.WaitLinks(ctx, 1))
		l := r.proxy.Links()[0]
		faults[i%len(faults)](l)
		require.Same(t, conn, recv(t, r.resumed))
		l.Cut() // a frozen or half-open link lingers until cut
	}
	close(stop)
	wg.Wait()
	r.toServer.wait(t, ctx, sentUp, "client to server")
	r.toClient.wait(t, ctx, sentDown, "server to client")
	r.toServer.check(t, "client to server")
	r.toClient.check(t, "server to client")
	require.Empty(t, r.closed, "the session ended")
	st := r.client.Stats()
	require.Zero(t, st.SessionsLost)
	require.Equal(t, uint64(cuts), st.Resumes)
	t.Logf("%d messages up, %d down, %d resumes", sentUp, sentDown, st.Resumes)
}
