package vgo

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Every vgo benchmark has a twin over a plain net.Conn with the same
// framing, a bufio reader and writer and one goroutine per side, so the
// figure to read is the ratio of the two in the same run: see
// BENCHMARKS.md.

var benchSizes = []int{64, 1 << 10, 64 << 10}

func sizeName(n int) string {
	if n >= 1<<10 {
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}

// benchServer serves a server built from opts on a loopback listener
// until the benchmark ends, and returns it and its address.
func benchServer(b *testing.B, opts ...ServerOption) (*Server, string) {
	b.Helper()
	s, err := NewServer(append([]ServerOption{WithLogger(quietLogger())}, opts...)...)
	require.NoError(b, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	b.Cleanup(func() {
		s.Close()
		<-served
	})
	return s, l.Addr().String()
}

// benchClient connects a client, with heartbeats off so that only the
// measured traffic moves, to a server built from opts.
func benchClient(b *testing.B, clientOpts []ClientOption, serverOpts ...ServerOption) *Client {
	b.Helper()
	_, addr := benchServer(b, append([]ServerOption{WithHeartbeatTimeout(-1)}, serverOpts...)...)
	c, err := NewClient(addr, append([]ClientOption{WithLogger(quietLogger()), WithPingInterval(-1)}, clientOpts...)...)
	require.NoError(b, err)
	b.Cleanup(func() { c.Close() })
	c.Start()
	require.NoError(b, c.WaitConnected(context.Background()))
	return c
}

// rawPair returns both ends of a loopback TCP connection.
func rawPair(b *testing.B) (client, server net.Conn) {
	b.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		nc, _ := l.Accept()
		accepted <- nc
	}()
	client, err = net.Dial("tcp", l.Addr().String())
	require.NoError(b, err)
	server = <-accepted
	require.NotNil(b, server)
	b.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return client, server
}

// writeRawFrame is the baseline's framing: the same header as vgo's.
func writeRawFrame(w *bufio.Writer, payload []byte) error {
	hdr := append(w.AvailableBuffer(), byte(frameData))
	hdr = binary.BigEndian.AppendUint32(hdr, uint32(len(payload)))
	if _, err := w.Write(hdr); err != nil {
		return err
	}
	_, err := w.Write(payload)
	return err
}

// readRawFrame reads one baseline frame into buf, which it may grow.
func readRawFrame(r *bufio.Reader, buf []byte) ([]byte, error) {
	hdr, err := r.Peek(headerSize)
	if err != nil {
		return buf, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if _, err := r.Discard(headerSize); err != nil {
		return buf, err
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	_, err = io.ReadFull(r, buf)
	return buf, err
}

// BenchmarkOneWay sends b.N data frames from a client to a server that
// counts them; an op is one message delivered.
func BenchmarkOneWay(b *testing.B) {
	for _, size := range benchSizes {
		payload := make([]byte, size)
		b.Run("vgo/"+sizeName(size), func(b *testing.B) { benchOneWay(b, payload, nil) })
		b.Run("sessions/"+sizeName(size), func(b *testing.B) {
			benchOneWay(b, payload, []ClientOption{WithResume(0)}, WithSessions(Sessions{}))
		})
		b.Run("baseline/"+sizeName(size), func(b *testing.B) {
			cc, sc := rawPair(b)
			done := make(chan error, 1)
			go func() {
				r := bufio.NewReader(sc)
				var buf []byte
				var err error
				for range b.N {
					if buf, err = readRawFrame(r, buf); err != nil {
						break
					}
				}
				done <- err
			}()
			w := bufio.NewWriter(cc)
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if err := writeRawFrame(w, payload); err != nil {
					b.Fatal(err)
				}
			}
			require.NoError(b, w.Flush())
			require.NoError(b, <-done)
		})
	}
}

// benchOneWay sends b.N copies of payload from a client to a server that
// counts them. Besides allocs/op, which is rounded down to a whole number,
// it reports allocs/1000op: a buffer allocated now and then shows there.
func benchOneWay(b *testing.B, payload []byte, clientOpts []ClientOption, serverOpts ...ServerOption) {
	var got atomic.Int64
	done := make(chan struct{})
	var want int64
	c := benchClient(b, clientOpts, append([]ServerOption{WithHandler(func(_ *Conn, _ []byte) {
		if got.Add(1) == atomic.LoadInt64(&want) {
			close(done)
		}
	})}, serverOpts...)...)
	atomic.StoreInt64(&want, int64(b.N))
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	b.ResetTimer()
	ctx := context.Background()
	for range b.N {
		if err := c.Send(ctx, payload); err != nil {
			b.Fatal(err)
		}
	}
	<-done
	b.StopTimer()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)*1000/float64(b.N), "allocs/1000op")
}

// BenchmarkEcho measures round trips through an echoing server with a
// window of requests in flight; an op is one request answered.
func BenchmarkEcho(b *testing.B) {
	payload := make([]byte, 64)
	for _, window := range []int{1, 64} {
		b.Run(fmt.Sprintf("vgo/inflight=%d", window), func(b *testing.B) {
			replies := make(chan struct{}, window)
			c := benchClient(b, []ClientOption{WithOnMessage(func([]byte) { replies <- struct{}{} })},
				WithHandler(func(c *Conn, msg []byte) { _ = c.Send(context.Background(), msg) }))
			b.ReportAllocs()
			b.ResetTimer()
			benchWindow(b, window, func() error { return c.Send(context.Background(), payload) }, func() { <-replies })
		})
		b.Run(fmt.Sprintf("baseline/inflight=%d", window), func(b *testing.B) {
			cc, sc := rawPair(b)
			go func() {
				r, w := bufio.NewReader(sc), bufio.NewWriter(sc)
				var buf []byte
				var err error
				for {
					if buf, err = readRawFrame(r, buf); err != nil {
						return
					}
					if writeRawFrame(w, buf) != nil {
						return
					}
					if r.Buffered() == 0 && w.Flush() != nil {
						return
					}
				}
			}()
			replies := make(chan struct{}, window)
			go func() {
				r := bufio.NewReader(cc)
				var buf []byte
				var err error
				for {
					if buf, err = readRawFrame(r, buf); err != nil {
						return
					}
					replies <- struct{}{}
				}
			}()
			w := bufio.NewWriter(cc)
			b.ReportAllocs()
			b.ResetTimer()
			benchWindow(b, window, func() error {
				if err := writeRawFrame(w, payload); err != nil {
					return err
				}
				return w.Flush()
			}, func() { <-replies })
		})
	}
}

// benchWindow issues b.N requests with at most window unanswered.
func benchWindow(b *testing.B, window int, send func() error, await func()) {
	inflight := 0
	for range b.N {
		if inflight == window {
			await()
			inflight--
		}
		if err := send(); err != nil {
			b.Fatal(err)
		}
		inflight++
	}
	for ; inflight > 0; inflight-- {
		await()
	}
}

// BenchmarkPingPong measures the heartbeat's round trip: a ping written on
// the client's connection and the server's pong read back.
func BenchmarkPingPong(b *testing.B) {
	b.Run("vgo", func(b *testing.B) {
		pongs := make(chan time.Duration, 1)
		c := benchClient(b, []ClientOption{WithOnPong(func(rtt time.Duration) { pongs <- rtt })})
		c.mu.Lock()
		l := c.link
		c.mu.Unlock()
		payload := make([]byte, 8) // a send time of 0 is a valid ping
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			if err := l.beat(framePing, payload); err != nil {
				b.Fatal(err)
			}
			<-pongs
		}
	})
}
