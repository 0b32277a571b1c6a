package vgotest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// waitFor bounds every wait on an event in the tests. It is generous on
// purpose: the tests must pass on a loaded two-core machine.
const waitFor = 10 * time.Second

// silence is how long a read must stay unanswered to count as "nothing
// arrived". A longer value only slows the tests: a proxy that wrongly
// forwards does so within microseconds on loopback.
const silence = 50 * time.Millisecond

// testContext returns a context that ends after waitFor or with the test.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	t.Cleanup(cancel)
	return ctx
}

// startServer runs a TCP server on a free loopback port that hands each
// connection to handle on its own goroutine. The listener and every
// connection are closed with the test, which waits for the handlers.
func startServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  []net.Conn
		closed bool
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				c.Close()
				return
			}
			conns = append(conns, c)
			wg.Add(1)
			mu.Unlock()
			go func() {
				defer wg.Done()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// startEcho runs a server that writes back whatever it reads and closes the
// connection at the end of the stream.
func startEcho(t *testing.T) string {
	return startServer(t, func(c net.Conn) {
		defer c.Close()
		buf := make([]byte, 16<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, err := c.Write(buf[:n]); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	})
}

// startSink runs a server that hands the server side of each connection to
// the test, which reads and writes it by hand.
func startSink(t *testing.T) (string, <-chan net.Conn) {
	conns := make(chan net.Conn, 64)
	addr := startServer(t, func(c net.Conn) { conns <- c })
	return addr, conns
}

// newProxy returns a proxy to target, closed with the test.
func newProxy(t *testing.T, target string) *Proxy {
	t.Helper()
	p, err := NewProxy(target)
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, p.Close()) })
	return p
}

// dial connects to addr; the connection is closed with the test.
func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitFor)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// accepted returns the next connection a sink server accepted.
func accepted(t *testing.T, conns <-chan net.Conn) net.Conn {
	t.Helper()
	select {
	case c := <-conns:
		return c
	case <-time.After(waitFor):
		t.Fatalf("no connection accepted within %v", waitFor)
		return nil
	}
}

// linkOf waits for the link that carries the client connection c.
func linkOf(t *testing.T, p *Proxy, c net.Conn) *Link {
	t.Helper()
	var found *Link
	err := p.Wait(testContext(t), func(Stats) bool {
		for _, l := range p.Links() {
			if l.ClientAddr().String() == c.LocalAddr().String() {
				found = l
				return true
			}
		}
		return false
	})
	require.NoError(t, err)
	return found
}

// send writes msg to c within waitFor.
func send(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	require.NoError(t, c.SetWriteDeadline(time.Now().Add(waitFor)))
	_, err := io.WriteString(c, msg)
	require.NoError(t, err)
}

// expect reads exactly len(want) bytes from c within waitFor.
func expect(t *testing.T, c net.Conn, want string) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(waitFor)))
	got := make([]byte, len(want))
	_, err := io.ReadFull(c, got)
	require.NoError(t, err)
	require.Equal(t, want, string(got))
}

// roundTrip sends msg through an echo server and reads it back.
func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	send(t, c, msg)
	expect(t, c, msg)
}

// expectSilence checks that nothing arrives on c for a while and that the
// connection is still open: the read times out instead of ending.
func expectSilence(t *testing.T, c net.Conn) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(silence)))
	n, err := c.Read(make([]byte, 1))
	require.Zero(t, n, "bytes arrived")
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
}

// readUntilError reads c until it fails, within waitFor, and returns the
// error and what was read.
func readUntilError(t *testing.T, c net.Conn) ([]byte, error) {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(waitFor)))
	var got bytes.Buffer
	_, err := got.ReadFrom(c)
	if err == nil {
		err = io.EOF
	}
	require.False(t, errors.Is(err, os.ErrDeadlineExceeded), "connection still open after %v", waitFor)
	return got.Bytes(), err
}

// expectReset checks that a connection to addr is reset at once. The
// reset may arrive before the client's dial has returned, failing it.
func expectReset(t *testing.T, addr string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitFor)
	if err == nil {
		defer c.Close()
		_, err = readUntilError(t, c)
	}
	require.ErrorIs(t, err, syscall.ECONNRESET)
}

// waitDone waits for l to end.
func waitDone(t *testing.T, l *Link) {
	t.Helper()
	select {
	case <-l.Done():
	case <-time.After(waitFor):
		t.Fatalf("link %d still open after %v", l.ID(), waitFor)
	}
}

// linked returns a proxy in front of a sink, a connection through it, the
// sink's end of that connection, and the link that joins them.
func linked(t *testing.T) (*Proxy, *net.TCPConn, net.Conn, *Link) {
	t.Helper()
	addr, conns := startSink(t)
	p := newProxy(t, addr)
	c := dial(t, p.Addr())
	s := accepted(t, conns)
	return p, c, s, linkOf(t, p, c)
}
