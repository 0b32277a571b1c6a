package vgo

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vgonet/vgo/vgotest"
)

// The throughput of sessions is measured by the "sessions" variant of
// BenchmarkOneWay; this file holds how it depends on the size of the
// client's log, what sessions cost at rest and how long a resume takes.
// BENCHMARKS.md gives the commands and the figures.

// BenchmarkSessionLog is BenchmarkOneWay for 64-byte messages with
// sessions and client logs of several sizes, beside the same without
// sessions: the log also bounds what waits on the connection, so its size
// decides how large the connection's buffers grow.
func BenchmarkSessionLog(b *testing.B) {
	payload := make([]byte, 64)
	b.Run("vgo/64B", func(b *testing.B) { benchOneWay(b, payload, nil) })
	for _, size := range []int{64 << 10, 128 << 10, 256 << 10, DefaultSessionBuffer} {
		b.Run("log="+sizeName(size)+"/64B", func(b *testing.B) {
			benchOneWay(b, payload, []ClientOption{WithResume(size)}, WithSessions(Sessions{}))
		})
	}
}

// heapProfiles, if set, is a directory where BenchmarkSessionMemory
// writes a heap profile of each variant at the moment it measures, as
// plain.heap, attached.heap and suspended.heap. Run it with
// -test.memprofilerate 1 so that the profiles count every allocation.
var heapProfiles = flag.String("memory.heapprofiles", "", "directory for BenchmarkSessionMemory's heap profiles")

// memoryClients is how many idle clients BenchmarkSessionMemory holds.
// The server and the process that holds the clients each need a
// descriptor per client.
const memoryClients = 10_000

// idleClientsEnv, set in the environment of the test binary, makes it
// hold idle clients for BenchmarkSessionMemory instead of running tests:
// the clients live in a process of their own so that the benchmark's heap
// holds the server alone. Its value is "address count resume", resume
// being 0 or 1.
const idleClientsEnv = "VGO_BENCH_IDLE_CLIENTS"

func init() {
	// Before TestMain: this process holds clients and runs no tests.
	if spec := os.Getenv(idleClientsEnv); spec != "" {
		if err := holdIdleClients(spec, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

// holdIdleClients connects the clients spec asks for, with the library's
// defaults (heartbeats every 5 s), writes "ready" to out once all are
// connected, and closes them when in ends.
func holdIdleClients(spec string, in io.Reader, out io.Writer) error {
	var (
		addr   string
		n      int
		resume int
	)
	if _, err := fmt.Sscanf(spec, "%s %d %d", &addr, &n, &resume); err != nil {
		return fmt.Errorf("%s=%q: %w", idleClientsEnv, spec, err)
	}
	opts := []ClientOption{WithLogger(quietLogger())}
	if resume == 1 {
		opts = append(opts, WithResume(0))
	}
	clients := make([]*Client, 0, n)
	defer func() {
		var wg sync.WaitGroup
		for _, c := range clients {
			wg.Go(func() { c.Close() })
		}
		wg.Wait()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// In steps, so that the dials do not overflow the listen queue and
	// wait for SYN retransmits.
	const step = 500
	for len(clients) < n {
		first := len(clients)
		for range min(step, n-first) {
			c, err := NewClient(addr, opts...)
			if err != nil {
				return err
			}
			c.Start()
			clients = append(clients, c)
		}
		for _, c := range clients[first:] {
			if err := c.WaitConnected(ctx); err != nil {
				return fmt.Errorf("client %d of %d: %w", len(clients), n, err)
			}
		}
	}
	if _, err := fmt.Fprintln(out, "ready"); err != nil {
		return err
	}
	_, err := io.Copy(io.Discard, in)
	return err
}

// idleClients is a process holding idle clients, started by
// startIdleClients.
type idleClients struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// startIdleClients starts a process that connects n clients to addr,
// with sessions if resume is set, and returns once they are connected.
func startIdleClients(b *testing.B, addr string, n int, resume bool) *idleClients {
	b.Helper()
	exe, err := os.Executable()
	require.NoError(b, err)
	r := 0
	if resume {
		r = 1
	}
	cmd := exec.Command(exe, "-test.run=^$", "-test.bench=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %d", idleClientsEnv, addr, n, r))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	require.NoError(b, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(b, err)
	require.NoError(b, cmd.Start())
	p := &idleClients{cmd: cmd, stdin: stdin}
	b.Cleanup(p.kill)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(b, err, "the process holding the clients failed")
	require.Equal(b, "ready\n", line)
	return p
}

// close makes the process close its clients, each with a close frame, and
// waits for it to exit.
func (p *idleClients) close(b *testing.B) {
	p.stdin.Close()
	require.NoError(b, p.cmd.Wait())
}

// kill ends the process at once: its connections end without a close
// frame, as when a client's host goes away.
func (p *idleClients) kill() {
	if p.cmd.ProcessState == nil {
		p.cmd.Process.Kill()
		p.cmd.Wait()
	}
}

// heapInUse returns the live heap and the goroutine stacks in use, in
// bytes, after collecting garbage.
func heapInUse() (heap, stack uint64) {
	var ms runtime.MemStats
	// Twice: the first cycle may leave finalized or pooled objects for
	// the second.
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc, ms.StackInuse
}

// writeHeapProfile writes the heap profile named for the benchmark's last
// element into the directory -memory.heapprofiles names, if it does.
func writeHeapProfile(b *testing.B) {
	if *heapProfiles == "" {
		return
	}
	name := b.Name()
	name = name[strings.LastIndex(name, "/")+1:]
	if i := strings.LastIndex(name, "-"); i > 0 {
		name = name[:i] // the GOMAXPROCS suffix
	}
	f, err := os.Create(filepath.Join(*heapProfiles, name+".heap"))
	require.NoError(b, err)
	defer f.Close()
	require.NoError(b, pprof.Lookup("heap").WriteTo(f, 0))
}

// waitServer polls s until cond holds; servers report suspensions by
// counter only.
func waitServer(b *testing.B, s *Server, what string, cond func(ServerStats) bool) {
	b.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond(s.Stats()) {
		if time.Now().After(deadline) {
			b.Fatalf("%s: not within 2m: %+v", what, s.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// BenchmarkSessionMemory measures the server's memory per idle client:
// plain connections; connections that carry a session, both heartbeating
// at the default interval; and sessions suspended after their clients
// went away without a word. The clients run in a process of their own.
// Each run measures once, whatever b.N. Run each variant in a process of
// its own: the runtime keeps the descriptors of goroutines that have
// exited, and reuses them, so only the first variant in a process counts
// them.
func BenchmarkSessionMemory(b *testing.B) {
	const n = memoryClients
	perClient := func(after, before uint64) float64 {
		return (float64(after) - float64(before)) / n
	}
	// idle connects the clients and returns the server's heap and stacks
	// per client once it has received as many pings as there are clients:
	// about one from each, at one every 5 s.
	idle := func(b *testing.B, resume bool, opts ...ServerOption) (*Server, *idleClients, float64, float64) {
		var pings atomic.Int64
		s, addr := benchServer(b, append(opts, WithOnPing(func(*Conn) { pings.Add(1) }))...)
		heap0, stack0 := heapInUse()
		p := startIdleClients(b, addr, n, resume)
		waitServer(b, s, "clients open", func(st ServerStats) bool { return st.Live == n })
		pings.Store(0)
		waitServer(b, s, "a ping per client", func(ServerStats) bool { return pings.Load() >= n })
		heap, stack := heapInUse()
		writeHeapProfile(b)
		return s, p, perClient(heap, heap0), perClient(stack, stack0)
	}

	b.Run("plain", func(b *testing.B) {
		_, p, heap, stack := idle(b, false)
		p.close(b)
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(heap, "heap-B/conn")
		b.ReportMetric(stack, "stack-B/conn")
	})
	b.Run("attached", func(b *testing.B) {
		_, p, heap, stack := idle(b, true, WithSessions(Sessions{}))
		p.close(b)
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(heap, "heap-B/conn")
		b.ReportMetric(stack, "stack-B/conn")
	})
	b.Run("suspended", func(b *testing.B) {
		var ended atomic.Int64
		s, p, _, _ := idle(b, true, WithSessions(Sessions{}), WithOnConnClose(func(*Conn, error) { ended.Add(1) }))
		p.kill()
		waitServer(b, s, "sessions suspended", func(st ServerStats) bool { return st.Suspended == n })
		heap, stack := heapInUse()
		writeHeapProfile(b) // over the one of the sessions attached
		// Closing the server ends the sessions; the server itself, its
		// maps among it, stays reachable, so the difference is what the
		// sessions alone held.
		require.NoError(b, s.Close())
		require.EqualValues(b, n, ended.Load())
		heap0, stack0 := heapInUse()
		runtime.KeepAlive(s)
		b.ReportMetric(0, "ns/op")
		b.ReportMetric(perClient(heap, heap0), "heap-B/session")
		b.ReportMetric(perClient(stack, stack0), "stack-B/session")
	})
}

// resumeClients is how many clients BenchmarkSessionResume cuts off at
// once.
const resumeClients = 1000

// BenchmarkSessionResume cuts the links of 1,000 clients with sessions at
// once, with a TCP reset through a fault proxy, and measures how long
// each takes to resume its session: from the cut of its link to the
// client's OnConnect on the new connection. An op is one cut; each
// client's time is a sample, and the percentiles are over all of them.
// wait is the backoff delay the client drew, setup the rest: noticing
// the reset, dialing through the proxy, the hellos and the resume.
func BenchmarkSessionResume(b *testing.B) {
	b.Run("backoff=default", func(b *testing.B) { benchResume(b, Backoff{}) })
	b.Run("backoff=10ms", func(b *testing.B) { benchResume(b, Backoff{BaseDelay: 10 * time.Millisecond}) })
}

// resumeClient is one client of benchResume and what it last reported.
type resumeClient struct {
	c         *Client
	local     atomic.Pointer[string] // the local address of the last dial
	delay     atomic.Int64           // the backoff delay before the last dial, ns
	connected atomic.Int64           // when OnConnect last ran, Unix ns
	ponged    atomic.Bool            // a pong came on the current connection
}

func benchResume(b *testing.B, backoff Backoff) {
	const n = resumeClients
	var resumes atomic.Int64
	_, addr := benchServer(b, WithSessions(Sessions{}), WithOnConnResume(func(*Conn) { resumes.Add(1) }))
	proxy, err := vgotest.NewProxy(addr)
	require.NoError(b, err)
	b.Cleanup(func() { proxy.Close() })

	// Each connection announces itself once on connected and once, with
	// its first pong, on ponged: a client whose connection has been heard
	// from after its hello starts its backoff afresh when it is lost.
	connected := make(chan struct{}, n)
	ponged := make(chan struct{}, n)
	clients := make([]*resumeClient, n)
	for i := range clients {
		rc := &resumeClient{}
		var dialer net.Dialer
		c, err := NewClient(proxy.Addr(),
			WithLogger(quietLogger()),
			WithResume(0),
			WithBackoff(backoff),
			// The default dialer, noting the address, by which the
			// client's link in the proxy is known.
			WithDialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
				nc, err := dialer.DialContext(ctx, network, addr)
				if err == nil {
					local := nc.LocalAddr().String()
					rc.local.Store(&local)
				}
				return nc, err
			}),
			WithOnReconnect(func(_ int, d time.Duration) { rc.delay.Store(int64(d)) }),
			WithOnConnect(func(net.Addr) {
				rc.connected.Store(time.Now().UnixNano())
				rc.ponged.Store(false)
				connected <- struct{}{}
			}),
			WithOnPong(func(time.Duration) {
				if rc.ponged.CompareAndSwap(false, true) {
					ponged <- struct{}{}
				}
			}),
		)
		require.NoError(b, err)
		rc.c = c
		clients[i] = rc
	}
	b.Cleanup(func() {
		var wg sync.WaitGroup
		for _, rc := range clients {
			wg.Go(func() { rc.c.Close() })
		}
		wg.Wait()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	await := func(ch <-chan struct{}, what string) {
		for i := range n {
			select {
			case <-ch:
			case <-ctx.Done():
				b.Fatalf("%s: %d of %d", what, i, n)
			}
		}
	}
	for _, rc := range clients {
		rc.c.Start()
	}
	await(connected, "connected")

	var total, waits, setups []time.Duration
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		await(ponged, "ponged")
		b.StartTimer()
		// Proxy.Cut does the same, without noting when it reached each
		// link: the last is cut a while after the first.
		locals := make([]string, n)
		for i, rc := range clients {
			locals[i] = *rc.local.Load()
		}
		cut := make(map[string]int64, n)
		for _, l := range proxy.Links() {
			cut[l.ClientAddr().String()] = time.Now().UnixNano()
			l.Cut()
		}
		await(connected, "resumed")
		for i, rc := range clients {
			at, ok := cut[locals[i]]
			require.True(b, ok, "a client's link was not cut")
			d := time.Duration(rc.connected.Load() - at)
			w := time.Duration(rc.delay.Load())
			total = append(total, d)
			waits = append(waits, w)
			setups = append(setups, d-w)
		}
	}
	b.StopTimer()
	// Every reconnect must have been a resume of the same session.
	for _, rc := range clients {
		st := rc.c.Stats()
		require.EqualValues(b, b.N, st.Resumes)
		require.Zero(b, st.SessionsLost)
	}
	require.EqualValues(b, n*b.N, resumes.Load())

	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(percentile(total, 50)), "p50-ms")
	b.ReportMetric(ms(percentile(total, 99)), "p99-ms")
	b.ReportMetric(ms(slices.Max(total)), "max-ms")
	b.ReportMetric(ms(percentile(waits, 50)), "wait-p50-ms")
	b.ReportMetric(ms(percentile(setups, 50)), "setup-p50-ms")
	b.ReportMetric(ms(percentile(setups, 99)), "setup-p99-ms")
}

// percentile returns the p-th percentile of ds by nearest rank; it sorts
// ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	slices.Sort(ds)
	i := int(math.Ceil(p/100*float64(len(ds)))) - 1
	return ds[max(i, 0)]
}
