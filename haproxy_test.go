package vgo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	logtest "github.com/sirupsen/logrus/hooks/test"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The tests in this file put a fleet of clients behind a real HAProxy in
// TCP mode, which sends the PROXY protocol (version 2) to the backends and
// checks their health, as in the configuration DEPLOYING.md describes.

// haproxySource is the address HAProxy connects to the backends from. The
// clients dial from 127.0.0.1, so no address a server reports can be
// HAProxy's by a coincidence of port numbers.
const haproxySource = "127.0.0.2"

// haproxyTrusted is the network the backends take PROXY headers from.
var haproxyTrusted = netip.MustParsePrefix("127.0.0.0/8")

func TestHAProxyFleet(t *testing.T) {
	// 60 clients reach 3 servers through HAProxy. The servers must see the
	// clients' own addresses, count HAProxy's health checks as probes
	// without a warning, keep an idle fleet alive through HAProxy's idle
	// timeouts, and when one server dies its clients must come back
	// through HAProxy while the others notice nothing.
	bin := haproxyBinary(t)
	const (
		clients = 60
		// HAProxy's idle timeouts, scaled down from the usual 30s so
		// that the fleet can be shown to outlive them within seconds.
		idle = 3 * time.Second
	)
	f := startHAProxyFleet(t, bin, 3, idle,
		// With the default heartbeat timeout the servers would let the
		// clients ping every 5s, past the scaled idle timeout; the cap
		// plays the part DefaultMaxPingInterval plays against 30s.
		WithPingIntervalRange(0, time.Second))
	for range clients {
		f.addClient(t) // library defaults: a 5s ping interval, which the servers lower
	}
	f.waitConnected(t)
	f.requireRealAddresses(t)

	f.idleThroughTimeouts(t)

	for i, b := range f.backends {
		f.hp.waitUntil(t, fmt.Sprintf("server %d has counted a health check and logged it at debug level", i), func() bool {
			return b.Stats().Probes > 0 && len(linesWith(b.logs, "health probe: closed before its hello")) > 0
		})
	}
	f.requireNoWarnings(t)

	// Server 0 dies abruptly. Close drops its listener and its
	// connections without close frames, and the kernel then does for each
	// socket what it does for a killed process (FIN, or RST over unread
	// data), so HAProxy and the clients see what they would see after a
	// SIGKILL. Kept in this process, the server needs no separate build,
	// and the test reads every server's connections directly.
	dead := f.backends[0]
	victims := f.clientsOf(dead)
	require.NotEmpty(t, victims, "round robin gave server 0 no client")
	before := make(map[*lbClient]ClientStats, len(victims))
	for _, c := range victims {
		before[c] = c.Stats()
	}
	killed := time.Now()
	require.NoError(t, dead.Close())
	f.hp.waitUntil(t, "every client of the dead server is back", func() bool {
		for _, c := range victims {
			if !c.lastConnect().After(killed) {
				return false
			}
		}
		return true
	})
	var back []time.Duration
	redialed := 0
	for _, c := range victims {
		back = append(back, c.lastConnect().Sub(killed))
		if c.Stats().Dials-before[c].Dials > 1 {
			redialed++
		}
	}
	slices.Sort(back)
	t.Logf("server 0 killed with %d clients: back through HAProxy after %v (median), %v (max); %d needed more than one dial",
		len(victims), back[len(back)/2].Round(time.Millisecond), back[len(back)-1].Round(time.Millisecond), redialed)

	f.requireRealAddresses(t)
	for _, c := range f.clients {
		connects, disconnects := c.counts()
		if slices.Contains(victims, c) {
			assert.Equal(t, 1, disconnects, "a client of the dead server should lose exactly its one connection")
			assert.Equal(t, 2, connects)
			continue
		}
		assert.Zero(t, disconnects, "a client of a surviving server was disturbed")
	}
	f.requireNoWarnings(t)
}

func TestHAProxyIdleDefaults(t *testing.T) {
	// The full-size version of the idle part of TestHAProxyFleet, against
	// the 30s timeouts common in HAProxy configurations. The servers have
	// a long heartbeat timeout, so the ping interval they accept is capped
	// by DefaultMaxPingInterval (25s) alone; a third of the clients keep
	// the default interval, a third ask for a minute and a third for no
	// heartbeats at all, and the servers move both to 25s.
	if *soakFor < 30*time.Second {
		t.Skip("idles behind HAProxy for over 30s; runs with -soak 30s or longer")
	}
	bin := haproxyBinary(t)
	const clients = 60
	f := startHAProxyFleet(t, bin, 3, 30*time.Second, WithHeartbeatTimeout(90*time.Second))
	for i := range clients {
		switch i % 3 {
		case 0:
			f.addClient(t)
		case 1:
			f.addClient(t, WithPingInterval(time.Minute))
		case 2:
			f.addClient(t, WithPingInterval(-1))
		}
	}
	f.waitConnected(t)
	f.requireRealAddresses(t)
	f.idleThroughTimeouts(t)
	f.requireNoWarnings(t)
}

// haproxyBinary returns the path of the haproxy program. Without one the
// test is skipped, except under CI, which installs HAProxy and where its
// absence means the setup is broken. Off Linux the test is skipped.
func haproxyBinary(t *testing.T) string {
	t.Helper()
	if runtime.GOOS != "linux" {
		// Elsewhere 127.0.0.2, which HAProxy connects from, is not
		// routed without setting up an alias first.
		t.Skip("runs on Linux")
	}
	// Debian installs it in /usr/sbin, which is often not on a user's PATH.
	for _, name := range []string{"haproxy", "/usr/sbin/haproxy"} {
		if path, err := exec.LookPath(name); err == nil {
			return path
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("HAProxy is neither on PATH nor at /usr/sbin/haproxy, and CI must install it")
	}
	t.Skip("HAProxy not installed (apt-get install haproxy)")
	return ""
}

// haproxyConfig returns the configuration of an HAProxy that balances
// connections over backends in TCP mode, closes connections idle for idle,
// and listens on the socket it inherits as file descriptor 3.
func haproxyConfig(backends []string, idle time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, `global
	maxconn 256

defaults
	mode tcp
	timeout connect 1s
	timeout client %[1]dms
	timeout server %[1]dms
	# A connection refused by a dead server that health checks have not
	# yet marked down is tried again on another server.
	retries 3
	option redispatch 1

frontend vgo
	bind fd@3
	default_backend vgo

backend vgo
	balance roundrobin
	source %[2]s
	default-server send-proxy-v2 check inter 200ms fall 2 rise 1
`, idle.Milliseconds(), haproxySource)
	for i, addr := range backends {
		fmt.Fprintf(&b, "\tserver s%d %s\n", i, addr)
	}
	return b.String()
}

// haproxy is a running HAProxy process.
type haproxy struct {
	addr   string        // the frontend's address
	out    string        // the file its output goes to
	exited chan struct{} // closed once the process has exited
	err    error         // what Wait returned, set before exited is closed
}

// startHAProxy runs HAProxy in the foreground with cfg, which must bind
// its frontend to fd@3, and kills it with the test.
func startHAProxy(t *testing.T, bin, cfg string) *haproxy {
	t.Helper()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	require.NoError(t, os.WriteFile(cfgPath, []byte(cfg), 0o600))
	out, err := os.Create(filepath.Join(dir, "haproxy.out"))
	require.NoError(t, err)
	defer out.Close()

	// HAProxy inherits a socket bound here, so no other process can take
	// the frontend's port between choosing it and listening on it.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	front, err := l.(*net.TCPListener).File()
	l.Close()
	require.NoError(t, err)
	defer front.Close()

	cmd := exec.Command(bin, "-db", "-f", cfgPath)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.ExtraFiles = []*os.File{front}
	require.NoError(t, cmd.Start())
	h := &haproxy{addr: l.Addr().String(), out: out.Name(), exited: make(chan struct{})}
	go func() {
		h.err = cmd.Wait()
		close(h.exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		select {
		case <-h.exited:
		case <-time.After(waitFor):
			t.Errorf("HAProxy did not exit within %v of SIGKILL", waitFor)
		}
	})
	return h
}

// output returns what HAProxy has printed so far.
func (h *haproxy) output() string {
	b, err := os.ReadFile(h.out)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// waitUntil polls cond on the test's goroutine until it holds. It fails
// the test after waitFor, and at once, with HAProxy's output, if HAProxy
// exits meanwhile.
func (h *haproxy) waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		select {
		case <-h.exited:
			t.Fatalf("HAProxy exited (%v) before %s; its output:\n%s", h.err, what, h.output())
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", waitFor, what)
		}
	}
}

// lbFleet is a set of servers behind HAProxy and the clients that reach
// them through it.
type lbFleet struct {
	hp       *haproxy
	idle     time.Duration // HAProxy's client and server timeouts
	backends []*lbBackend
	clients  []*lbClient
}

// startHAProxyFleet starts n servers with opts, which take PROXY headers
// from the loopback network, and an HAProxy in front of them.
func startHAProxyFleet(t *testing.T, bin string, n int, idle time.Duration, opts ...ServerOption) *lbFleet {
	t.Helper()
	f := &lbFleet{idle: idle}
	var addrs []string
	for range n {
		b := startBackend(t, opts...)
		f.backends = append(f.backends, b)
		addrs = append(addrs, b.l.Addr().String())
	}
	f.hp = startHAProxy(t, bin, haproxyConfig(addrs, idle))
	return f
}

// lbBackend is a server behind HAProxy, with what it logged and the
// peers its sockets had, HAProxy's side of each connection.
type lbBackend struct {
	*Server
	l    *peerListener
	logs *logtest.Hook
}

func startBackend(t *testing.T, opts ...ServerOption) *lbBackend {
	t.Helper()
	b := &lbBackend{l: &peerListener{Listener: listen(t), peers: make(map[string]bool)}}
	// At debug level, so that the test sees how probes are logged.
	log, hook := capturedLogger()
	b.logs = hook
	srv, err := NewServer(append([]ServerOption{WithLogger(log), WithProxyProtocol(haproxyTrusted)}, opts...)...)
	require.NoError(t, err)
	b.Server = srv
	served := make(chan error, 1)
	go func() { served <- srv.Serve(b.l) }()
	t.Cleanup(func() {
		require.NoError(t, srv.Close())
		require.ErrorIs(t, recv(t, served), ErrServerClosed)
	})
	return b
}

// remotes returns the addresses the server reports for its open
// connections.
func (b *lbBackend) remotes() []string {
	var addrs []string
	b.Range(func(c *Conn) bool {
		addrs = append(addrs, c.RemoteAddr().String())
		return true
	})
	return addrs
}

// peerListener records the peer address of every connection it accepts.
type peerListener struct {
	net.Listener
	mu    sync.Mutex
	peers map[string]bool
}

func (l *peerListener) Accept() (net.Conn, error) {
	nc, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.peers[nc.RemoteAddr().String()] = true
		l.mu.Unlock()
	}
	return nc, err
}

func (l *peerListener) snapshot() map[string]bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return maps.Clone(l.peers)
}

// lbClient is a client behind HAProxy that remembers the local address of
// its last dial, which the server should report as its remote address.
type lbClient struct {
	*Client
	mu          sync.Mutex
	local       string
	connects    int
	disconnects int
	connectedAt time.Time
}

// addClient starts a client that dials HAProxy's frontend, with the
// library's defaults unless opts say otherwise, and closes it with the
// test.
func (f *lbFleet) addClient(t *testing.T, opts ...ClientOption) {
	t.Helper()
	lc := &lbClient{}
	var d net.Dialer
	base := []ClientOption{
		WithLogger(quietLogger()),
		WithDialFunc(func(ctx context.Context, network, addr string) (net.Conn, error) {
			nc, err := d.DialContext(ctx, network, addr)
			if err == nil {
				lc.mu.Lock()
				lc.local = nc.LocalAddr().String()
				lc.mu.Unlock()
			}
			return nc, err
		}),
		WithOnConnect(func(net.Addr) {
			lc.mu.Lock()
			lc.connects++
			lc.connectedAt = time.Now()
			lc.mu.Unlock()
		}),
		WithOnDisconnect(func(error) {
			lc.mu.Lock()
			lc.disconnects++
			lc.mu.Unlock()
		}),
	}
	c, err := NewClient(f.hp.addr, append(base, opts...)...)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	lc.Client = c
	f.clients = append(f.clients, lc)
	c.Start()
}

func (c *lbClient) localAddr() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.local
}

// lastConnect returns when the client's last connection opened.
func (c *lbClient) lastConnect() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connectedAt
}

func (c *lbClient) counts() (connects, disconnects int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connects, c.disconnects
}

// waitConnected waits until every client is connected.
func (f *lbFleet) waitConnected(t *testing.T) {
	t.Helper()
	f.hp.waitUntil(t, "every client is connected through HAProxy", func() bool {
		for _, c := range f.clients {
			if c.State() != StateConnected {
				return false
			}
		}
		return true
	})
}

// live returns the servers that have not been closed.
func (f *lbFleet) live() []*lbBackend {
	return slices.DeleteFunc(slices.Clone(f.backends), func(b *lbBackend) bool { return b.isClosing() })
}

// requireRealAddresses checks that the live servers' connections report,
// between them, exactly the clients' own addresses, and none of HAProxy's,
// while HAProxy was the peer of every socket they accepted.
func (f *lbFleet) requireRealAddresses(t *testing.T) {
	t.Helper()
	f.hp.waitUntil(t, "the servers see exactly the clients' addresses", func() bool {
		var want, got []string
		for _, c := range f.clients {
			want = append(want, c.localAddr())
		}
		slices.Sort(want)
		for _, b := range f.live() {
			got = append(got, b.remotes()...)
		}
		slices.Sort(got)
		return slices.Equal(got, want)
	})
	for i, b := range f.backends {
		peers := b.l.snapshot()
		require.NotEmpty(t, peers)
		for peer := range peers {
			host, _, err := net.SplitHostPort(peer)
			require.NoError(t, err)
			require.Equal(t, haproxySource, host, "server %d accepted a connection that did not come through HAProxy", i)
		}
		for _, remote := range b.remotes() {
			require.False(t, peers[remote], "server %d reports HAProxy's own address %s", i, remote)
		}
	}
}

// clientsOf returns the clients whose connection b serves.
func (f *lbFleet) clientsOf(b *lbBackend) []*lbClient {
	remotes := b.remotes()
	var cs []*lbClient
	for _, c := range f.clients {
		if slices.Contains(remotes, c.localAddr()) {
			cs = append(cs, c)
		}
	}
	return cs
}

// idleThroughTimeouts shows that the idle fleet outlives HAProxy's idle
// timeouts. A control connection, which completes its hello and then
// stays silent, is opened after every client has connected; when HAProxy
// cuts it, every client has been idle for longer than the timeout, and
// only its heartbeats can have kept it connected.
func (f *lbFleet) idleThroughTimeouts(t *testing.T) {
	t.Helper()
	control := dialHello(t, f.hp.addr)
	opened := time.Now()
	require.NoError(t, control.nc.SetReadDeadline(opened.Add(f.idle+waitFor)))
	_, _, err := control.fr.next()
	require.True(t, errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET),
		"the silent control connection should have been cut by HAProxy, got %v", err)
	cut := time.Since(opened)
	for _, c := range f.clients {
		_, disconnects := c.counts()
		require.Zero(t, disconnects, "a client lost its connection while idle")
		require.Equal(t, StateConnected, c.State())
	}
	t.Logf("HAProxy cut a silent connection after %v; all %d clients stayed connected through that",
		cut.Round(10*time.Millisecond), len(f.clients))
}

// requireNoWarnings checks that no server logged anything at warn level
// or above: neither health checks nor the clients' comings and goings
// deserve a warning.
func (f *lbFleet) requireNoWarnings(t *testing.T) {
	t.Helper()
	for i, b := range f.backends {
		require.Empty(t, warnings(b.logs), "server %d logged warnings", i)
	}
}
