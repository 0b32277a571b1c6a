package vgo

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Every vgo benchmark that plain Go can do too has a baseline over a plain
// net.Conn, run beside it, and the figure to read is the ratio of the two in
// the same run (BENCHMARKS.md; scripts/benchratio divides vgo/X by
// baseline/X). A baseline is the plain code a careful engineer would write
// for the same job with the buffers vgo has, so that the ratio shows what
// vgo's design costs or saves, not a handicap given to the baseline:
//
//   - The same 5-byte frame header, and one reader goroutine per side.
//   - Writes go through a bufio.Writer of benchWriteBuffer bytes, vgo's
//     writeChunk, so a sender that runs ahead hands the kernel as much per
//     system call as vgo's writer does.
//   - Reads go through a bufio.Reader of benchReadBuffer bytes, the size of
//     the frame reader's buffer. A payload that fits is used in place, as
//     vgo hands it to the handler; a longer one is read into one buffer
//     that is reused, as vgo reads it into a pooled one.
//
// OneWay: the sender writes frames into its buffer, which goes to the
// socket each time it fills, and flushes once at the end; the receiver only
// counts frames, as vgo's counting handler does. What is left is vgo's own
// design: Send copies each message into a queue that another goroutine
// writes, and a 64 KiB message goes as four 16 KiB fragments.
//
// Echo: the server answers each request and flushes once it has read all
// that has arrived, so the replies to a batch go out together, as vgo's
// writer sends whatever has gathered. The client's reader hands each reply
// to the benchmark's goroutine through a channel, as vgo's OnMessage does.
// The client writes requests without flushing while its window has room and
// flushes only when it must wait for a reply: with one in flight that is
// after every request, a plain request and reply; with 64 it sends its
// requests in batches, as vgo's writer does. The one baseline that is not a
// fair match, baseline-flush-each/inflight=64, flushes after every request
// of a window of 64: it is kept to show what batching saves such a client,
// and benchratio pairs it with vgo only when asked (-base).
//
// BenchmarkPingPong and the sessions variants have no plain counterpart.

var benchSizes = []int{64, 1 << 10, 64 << 10}

const (
	// benchWriteBuffer is the size of a baseline's bufio.Writer: as much as
	// vgo's writer takes per write, writeChunk.
	benchWriteBuffer = writeChunk
	// benchReadBuffer is the size of a baseline's bufio.Reader: the frame
	// reader's, readBufferSize.
	benchReadBuffer = readBufferSize
)

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

// readRawFrame reads one baseline frame as the frame reader does. A payload
// that fits in r's buffer is returned in place, valid until the next read
// from r; a longer one is read into buf, which it grows when it must and
// returns for the next call.
func readRawFrame(r *bufio.Reader, buf []byte) (payload, next []byte, err error) {
	hdr, err := r.Peek(headerSize)
	if err != nil {
		return nil, buf, err
	}
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	_, _ = r.Discard(headerSize) // cannot fail: the bytes are buffered
	if n <= r.Size() {
		payload, err = r.Peek(n)
		_, _ = r.Discard(len(payload))
		return payload, buf, err
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	_, err = io.ReadFull(r, buf)
	return buf, buf, err
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
		b.Run("baseline/"+sizeName(size), func(b *testing.B) { benchOneWayBaseline(b, payload) })
	}
}

// benchOneWay sends b.N copies of payload from a client to a server that
// counts them. Besides allocs/op, which is rounded down to a whole number,
// it reports allocs/1000op: a buffer allocated now and then shows there.
func benchOneWay(b *testing.B, payload []byte, clientOpts []ClientOption, serverOpts ...ServerOption) {
	// The handler runs on the connection's one reader, so it counts in
	// a plain variable, as the baseline's receiver does.
	var got int64
	done := make(chan struct{})
	var want int64
	c := benchClient(b, clientOpts, append([]ServerOption{WithHandler(func(_ *Conn, _ []byte) {
		if got++; got == atomic.LoadInt64(&want) {
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

// benchOneWayBaseline is benchOneWay over a plain connection: the sender
// writes b.N frames through a bufio.Writer as large as vgo's writes, and
// the receiver reads them as the frame reader does and counts them.
func benchOneWayBaseline(b *testing.B, payload []byte) {
	cc, sc := rawPair(b)
	done := make(chan error, 1)
	go func() {
		r := bufio.NewReaderSize(sc, benchReadBuffer)
		var buf []byte
		var err error
		for range b.N {
			if _, buf, err = readRawFrame(r, buf); err != nil {
				break
			}
		}
		done <- err
	}()
	w := bufio.NewWriterSize(cc, benchWriteBuffer)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if err := writeRawFrame(w, payload); err != nil {
			b.Fatal(err)
		}
	}
	require.NoError(b, w.Flush())
	require.NoError(b, <-done)
}

// BenchmarkEcho measures round trips through an echoing server with a
// window of requests in flight; an op is one request answered.
func BenchmarkEcho(b *testing.B) {
	payload := make([]byte, 64)
	for _, window := range []int{1, 64} {
		b.Run(fmt.Sprintf("vgo/inflight=%d", window), func(b *testing.B) { benchEcho(b, payload, window, nil) })
		b.Run(fmt.Sprintf("sessions/inflight=%d", window), func(b *testing.B) {
			benchEcho(b, payload, window, []ClientOption{WithResume(0)}, WithSessions(Sessions{}))
		})
		b.Run(fmt.Sprintf("baseline/inflight=%d", window), func(b *testing.B) {
			benchEchoBaseline(b, payload, window, false)
		})
	}
	// A pipelining client that flushes after every request, as code written
	// for one request at a time does, is no fair match for vgo and is named
	// apart: vgo/inflight=64 over it (benchratio -base baseline-flush-each)
	// is what coalescing the window saves such a client.
	b.Run("baseline-flush-each/inflight=64", func(b *testing.B) {
		benchEchoBaseline(b, payload, 64, true)
	})
}

// benchEcho runs BenchmarkEcho's vgo variants: a client built with
// clientOpts and a server that echoes every message.
func benchEcho(b *testing.B, payload []byte, window int, clientOpts []ClientOption, serverOpts ...ServerOption) {
	replies := make(chan struct{}, window)
	c := benchClient(b, append([]ClientOption{WithOnMessage(func([]byte) { replies <- struct{}{} })}, clientOpts...),
		append([]ServerOption{WithHandler(func(c *Conn, msg []byte) { _ = c.Send(context.Background(), msg) })}, serverOpts...)...)
	b.ReportAllocs()
	b.ResetTimer()
	benchWindow(b, window, func() error { return c.Send(context.Background(), payload) }, func() { <-replies })
}

// benchEchoBaseline is BenchmarkEcho over a plain connection. The client
// writes requests without flushing while its window has room and flushes
// only when it must wait for a reply; with flushEach it flushes after every
// request.
func benchEchoBaseline(b *testing.B, payload []byte, window int, flushEach bool) {
	cc, sc := rawPair(b)
	replies := make(chan struct{}, window)
	var wg sync.WaitGroup
	b.Cleanup(func() {
		cc.Close()
		sc.Close()
		wg.Wait()
	})
	wg.Go(func() { echoRaw(sc) })
	wg.Go(func() {
		r := bufio.NewReaderSize(cc, benchReadBuffer)
		var buf []byte
		var err error
		for {
			if _, buf, err = readRawFrame(r, buf); err != nil {
				return
			}
			replies <- struct{}{}
		}
	})
	w := bufio.NewWriterSize(cc, benchWriteBuffer)
	send := func() error {
		if err := writeRawFrame(w, payload); err != nil || !flushEach {
			return err
		}
		return w.Flush()
	}
	await := func() {
		select {
		case <-replies:
			return
		default:
		}
		if err := w.Flush(); err != nil {
			b.Fatal(err)
		}
		<-replies
	}
	b.ReportAllocs()
	b.ResetTimer()
	benchWindow(b, window, send, await)
}

// echoRaw is the baseline's echo server: it answers each frame with its
// payload and flushes once it has read all that has arrived, so that the
// replies to a batch of requests go out together. It returns when nc fails.
func echoRaw(nc net.Conn) {
	r, w := bufio.NewReaderSize(nc, benchReadBuffer), bufio.NewWriterSize(nc, benchWriteBuffer)
	var p, buf []byte
	var err error
	for {
		if p, buf, err = readRawFrame(r, buf); err != nil {
			return
		}
		if writeRawFrame(w, p) != nil {
			return
		}
		if r.Buffered() == 0 && w.Flush() != nil {
			return
		}
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
