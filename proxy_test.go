package vgo

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pires/go-proxyproto"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Tests of the PROXY protocol (WithProxyProtocol) and of health probes,
// over loopback sockets. The tests dial from 127.0.0.1, so a server that
// trusts 127.0.0.0/8 believes their headers and one that trusts only
// TEST-NET-1 must refuse them.

var (
	loopbackNet  = netip.MustParsePrefix("127.0.0.0/8")
	elsewhereNet = netip.MustParsePrefix("192.0.2.0/24")
)

// The addresses a balancer reports in the tests' headers: a client and the
// balancer's own front end, none of them the test's sockets.
const (
	clientV4   = "203.0.113.7:40001"
	frontendV4 = "198.51.100.1:443"
	clientV6   = "[2001:db8::7]:40001"
	frontendV6 = "[2001:db8::1]:443"
)

// proxyHeader returns a PROXY header of the given version for a TCP
// connection from src to dst, both "host:port".
func proxyHeader(t testing.TB, version byte, src, dst string) []byte {
	t.Helper()
	s := net.TCPAddrFromAddrPort(netip.MustParseAddrPort(src))
	d := net.TCPAddrFromAddrPort(netip.MustParseAddrPort(dst))
	proto := proxyproto.TCPv4
	if s.IP.To4() == nil {
		proto = proxyproto.TCPv6
	}
	return formatHeader(t, &proxyproto.Header{
		Version: version, Command: proxyproto.PROXY, TransportProtocol: proto,
		SourceAddr: s, DestinationAddr: d,
	})
}

// localHeader returns a v2 header with the LOCAL command and no addresses,
// which a balancer sends on its own health checks.
func localHeader(t testing.TB) []byte {
	t.Helper()
	return formatHeader(t, &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC})
}

func formatHeader(t testing.TB, h *proxyproto.Header) []byte {
	t.Helper()
	var b bytes.Buffer
	_, err := h.WriteTo(&b)
	require.NoError(t, err)
	return b.Bytes()
}

// v2Prefix is the fixed start of a v2 header: the signature, the version
// and command byte, the family byte and the length of what follows.
func v2Prefix(verCmd, family byte, length uint16) []byte {
	return append(append([]byte{}, proxyproto.SIGV2...), verCmd, family, byte(length>>8), byte(length))
}

// dialWithHeader returns a dial function that writes header on each TCP
// connection before the client uses it, as a balancer does, and reports
// the connection's own address on locals.
func dialWithHeader(header []byte, locals chan<- string) func(context.Context, string, string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		nc, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		if len(header) > 0 {
			// In one write, so it reaches the server in one piece: the v1
			// parser refuses a line that arrives split.
			if _, err := nc.Write(header); err != nil {
				nc.Close()
				return nil, err
			}
		}
		if locals != nil {
			locals <- nc.LocalAddr().String()
		}
		return nc, nil
	}
}

// capturedLogger returns a logger at debug level whose lines the test can
// read back.
func capturedLogger() (*logrus.Logger, *logtest.Hook) {
	log, hook := logtest.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	return log, hook
}

// linesWith returns the lines hook has seen with the message msg.
func linesWith(hook *logtest.Hook, msg string) []*logrus.Entry {
	var lines []*logrus.Entry
	for _, e := range hook.AllEntries() {
		if e.Message == msg {
			lines = append(lines, e)
		}
	}
	return lines
}

// warnings returns the lines hook has seen at warn level or above, as
// text.
func warnings(hook *logtest.Hook) []string {
	var lines []string
	for _, e := range hook.AllEntries() {
		if e.Level <= logrus.WarnLevel {
			text, _ := e.String()
			lines = append(lines, text)
		}
	}
	return lines
}

// addrs is what a server connection says about its ends.
type addrs struct{ remote, local string }

func addrsOf(c *Conn) addrs { return addrs{c.RemoteAddr().String(), c.LocalAddr().String()} }

// reportOpen returns an option that reports each opened connection's
// addresses on the returned channel.
func reportOpen() (ServerOption, <-chan addrs) {
	ch := make(chan addrs, 16)
	return WithOnConnOpen(func(c *Conn) { ch <- addrsOf(c) }), ch
}

// requireNoneOpened checks that no connection was reported opened.
func requireNoneOpened(t *testing.T, opened <-chan addrs) {
	t.Helper()
	select {
	case a := <-opened:
		t.Fatalf("a connection opened, from %s", a.remote)
	default:
	}
}

// errConnected is how oneAttempt reports a client that was not refused.
var errConnected = errors.New("the client connected")

// oneAttempt starts a client that dials once, and returns how it ended, or
// errConnected.
func oneAttempt(t *testing.T, addr string, opts ...ClientOption) error {
	t.Helper()
	ended := make(chan error, 2)
	newTestClient(t, addr, append([]ClientOption{WithMaxAttempts(1),
		WithOnConnect(func(net.Addr) { ended <- errConnected }),
		WithOnClose(func(err error) { ended <- err }),
	}, opts...)...)
	return recv(t, ended)
}

func TestProxyHeaderGivesClientAddress(t *testing.T) {
	for _, tc := range []struct {
		name     string
		version  byte
		src, dst string
	}{
		{"v1 IPv4", 1, clientV4, frontendV4},
		{"v2 IPv4", 2, clientV4, frontendV4},
		{"v1 IPv6", 1, clientV6, frontendV6},
		{"v2 IPv6", 2, clientV6, frontendV6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log, hook := capturedLogger()
			openOpt, opened := reportOpen()
			handled := make(chan addrs, 16)
			_, addr := startServer(t, WithLogger(log), WithProxyProtocol(loopbackNet), openOpt,
				WithHandler(func(c *Conn, msg []byte) {
					handled <- addrsOf(c)
					echo(c, msg)
				}))
			locals := make(chan string, 16)
			c := connectClient(t, addr, WithDialFunc(dialWithHeader(proxyHeader(t, tc.version, tc.src, tc.dst), locals)))
			balancer := recv(t, locals)

			want := addrs{remote: tc.src, local: tc.dst}
			require.Equal(t, want, recv(t, opened), "addresses seen by OnConnOpen")
			c.roundTrip(t, "through the balancer")
			require.Equal(t, want, recv(t, handled), "addresses seen by the handler")

			// OnConnOpen runs after the line is logged.
			lines := linesWith(hook, "client connected")
			require.Len(t, lines, 1)
			assert.Equal(t, tc.src, lines[0].Data["remote"])
			assert.Equal(t, balancer, lines[0].Data["proxy"], "the balancer's own address")
			assert.Empty(t, warnings(hook))
		})
	}
}

func TestProxyHeaderOptionalFromTrustedSource(t *testing.T) {
	// A trusted network may hold clients that dial directly, and a header
	// that carries no client address leaves the socket's in place.
	for _, tc := range []struct {
		name   string
		header []byte
	}{
		{"no header", nil},
		{"v2 LOCAL", localHeader(t)},
		{"v2 LOCAL with addresses", formatHeader(t, &proxyproto.Header{
			Version: 2, Command: proxyproto.LOCAL, TransportProtocol: proxyproto.TCPv4,
			SourceAddr:      net.TCPAddrFromAddrPort(netip.MustParseAddrPort(clientV4)),
			DestinationAddr: net.TCPAddrFromAddrPort(netip.MustParseAddrPort(frontendV4)),
		})},
		{"v1 UNKNOWN", []byte("PROXY UNKNOWN\r\n")},
		// The receiver ignores whatever follows UNKNOWN on the line.
		{"v1 UNKNOWN with addresses", []byte("PROXY UNKNOWN 2001:db8::7 2001:db8::1 40001 443\r\n")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log, hook := capturedLogger()
			openOpt, opened := reportOpen()
			srv, addr := startServer(t, WithLogger(log), WithProxyProtocol(loopbackNet), openOpt, WithHandler(echo))
			locals := make(chan string, 16)
			c := connectClient(t, addr, WithDialFunc(dialWithHeader(tc.header, locals)))

			require.Equal(t, addrs{remote: recv(t, locals), local: addr}, recv(t, opened))
			c.roundTrip(t, "direct")
			lines := linesWith(hook, "client connected")
			require.Len(t, lines, 1)
			assert.NotContains(t, lines[0].Data, "proxy")
			assert.Empty(t, warnings(hook))
			assert.Zero(t, srv.Stats().ProtocolErrors)
		})
	}
}

func TestProxyHeaderFromUntrustedSourceRefused(t *testing.T) {
	// No client may claim another's address: a header is believed only
	// from a trusted network, and the connection that sends one from
	// anywhere else is refused, while the others carry on.
	for name, opt := range map[string]ServerOption{
		"untrusted source":   WithProxyProtocol(elsewhereNet),
		"PROXY protocol off": nil,
	} {
		t.Run(name, func(t *testing.T) {
			log, hook := capturedLogger()
			openOpt, opened := reportOpen()
			srv, addr := startServer(t, WithLogger(log), opt, openOpt, WithHandler(echo))
			good := connectClient(t, addr)
			goodAddrs := recv(t, opened)

			err := oneAttempt(t, addr, WithDialFunc(dialWithHeader(proxyHeader(t, 1, clientV4, frontendV4), nil)))
			require.ErrorIs(t, err, ErrGaveUp)
			ce := closeErr(t, err)
			assert.Equal(t, CloseProtocolError, ce.Code)
			assert.Contains(t, ce.Reason, "PROXY")

			r := dialRaw(t, addr)
			r.write(slices.Concat(proxyHeader(t, 2, clientV6, frontendV6), rawHello(ProtocolVersion)))
			r.expectClose(CloseProtocolError)
			r.expectEOF()

			require.EqualValues(t, 2, srv.Stats().ProtocolErrors)
			requireNoneOpened(t, opened)
			good.roundTrip(t, "unaffected")
			good.requireStillConnected(t)
			require.Equal(t, 1, srv.Len())
			srv.Range(func(c *Conn) bool {
				assert.Equal(t, goodAddrs, addrsOf(c))
				return true
			})

			// The refusals are logged at the socket's address: the claimed
			// one appears nowhere.
			refusals := linesWith(hook, "handshake failed")
			require.Len(t, refusals, 2)
			assert.Equal(t, r.local(), refusals[1].Data["remote"])
			for _, e := range hook.AllEntries() {
				text, err := e.String()
				require.NoError(t, err)
				assert.NotContains(t, text, "203.0.113.7")
				assert.NotContains(t, text, "2001:db8::7")
			}
		})
	}
}

func TestProxyMalformedHeaderFromTrustedSource(t *testing.T) {
	srv, addr := startServer(t, WithProxyProtocol(loopbackNet), WithHandler(echo))
	good := connectClient(t, addr, WithDialFunc(dialWithHeader(proxyHeader(t, 2, clientV4, frontendV4), nil)))

	var errs uint64
	for _, tc := range []struct {
		name   string
		header []byte
	}{
		{"v1 bad address", []byte("PROXY TCP4 203.0.113.300 198.51.100.1 40001 443\r\n")},
		{"v1 IPv4 in a TCP6 line", []byte("PROXY TCP6 203.0.113.7 198.51.100.1 40001 443\r\n")},
		{"v1 bad port", []byte("PROXY TCP4 203.0.113.7 198.51.100.1 040001 443\r\n")},
		{"v1 missing port", []byte("PROXY TCP4 203.0.113.7 198.51.100.1 40001\r\n")},
		{"v1 unknown family", []byte("PROXY UDP4 203.0.113.7 198.51.100.1 40001 443\r\n")},
		{"v1 without CR", []byte("PROXY TCP4 203.0.113.7 198.51.100.1 40001 443\n")},
		{"v1 cut short", []byte("PROXY TCP4 203.0.113.7 198.51")},
		{"v1 too long", []byte("PROXY UNKNOWN " + strings.Repeat("f", 120) + "\r\n")},
		{"v1 garbage after the signature", []byte("PROXYPROXY\r\n")},
		{"v2 length short of its addresses", append(v2Prefix(0x21, 0x11, 4), 1, 2, 3, 4)},
		{"v2 length over the limit", v2Prefix(0x21, 0x11, 0xffff)},
		{"v2 version 3", append(v2Prefix(0x31, 0x11, 12), make([]byte, 12)...)},
		{"v2 unknown command", append(v2Prefix(0x2f, 0x11, 12), make([]byte, 12)...)},
		{"v2 unknown family", append(v2Prefix(0x21, 0x41, 12), make([]byte, 12)...)},
		{"v2 PROXY without addresses", v2Prefix(0x21, 0x00, 0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, addr)
			r.write(slices.Concat(tc.header, rawHello(ProtocolVersion)))
			r.expectClose(CloseProtocolError)
			r.expectEOF()
			errs++
			require.Equal(t, errs, srv.Stats().ProtocolErrors)

			good.roundTrip(t, "still here")
			good.requireStillConnected(t)
			require.Equal(t, 1, srv.Len())
		})
	}
}

func TestProxyHeaderCutShort(t *testing.T) {
	// A peer that stops inside its header is a failed handshake, like one
	// that stops inside its hello: not a protocol error, since nothing it
	// sent was wrong, and not a probe, since it sent something.
	past := map[string][]byte{ // cut once the header is recognised
		"v2 length":    v2Prefix(0x21, 0x11, 12)[:15],
		"v2 addresses": append(v2Prefix(0x21, 0x11, 12), 203, 0, 113),
		"v2 TLVs":      append(v2Prefix(0x21, 0x11, 12+8), make([]byte, 12+3)...),
	}

	t.Run("peer waits", func(t *testing.T) {
		// With admission control the wait for the first bytes sets a
		// deadline of its own; without it the handshake's must hold.
		const timeout = 150 * time.Millisecond
		cuts := [][]byte{[]byte("PROX"), proxyproto.SIGV2[:7]}
		for _, cut := range past {
			cuts = append(cuts, cut)
		}
		type server struct {
			srv  *Server
			hook *logtest.Hook
		}
		var (
			servers []server
			peers   []*rawConn
		)
		start := time.Now() // before any handshake begins
		for _, admission := range []ServerOption{nil, WithAdmission(-1, 0)} {
			log, hook := capturedLogger()
			srv, addr := startServer(t, WithLogger(log), WithProxyProtocol(loopbackNet), WithHandshakeTimeout(timeout), admission)
			servers = append(servers, server{srv, hook})
			for _, cut := range cuts {
				r := dialRaw(t, addr)
				r.write(cut)
				peers = append(peers, r)
			}
		}
		for _, r := range peers {
			r.expectEOF()
		}
		assert.GreaterOrEqual(t, time.Since(start), timeout, "dropped before the handshake timeout")
		for _, s := range servers {
			require.Eventually(t, func() bool { return len(linesWith(s.hook, "handshake failed")) == len(cuts) },
				waitFor, time.Millisecond)
			for _, e := range linesWith(s.hook, "handshake failed") {
				assert.ErrorIs(t, e.Data["err"].(error), ErrHandshakeTimeout)
			}
			st := s.srv.Stats()
			assert.Zero(t, st.ProtocolErrors)
			assert.Zero(t, st.Probes)
		}
	})

	t.Run("peer leaves", func(t *testing.T) {
		// A signature cut short is not one: those bytes are judged as
		// the start of a frame.
		log, hook := capturedLogger()
		srv, addr := startServer(t, WithLogger(log), WithProxyProtocol(loopbackNet))
		for _, cut := range past {
			r := dialRaw(t, addr)
			r.write(cut)
			require.NoError(t, r.nc.(*net.TCPConn).CloseWrite())
			r.expectEOF()
		}
		require.Eventually(t, func() bool { return len(linesWith(hook, "handshake failed")) == len(past) },
			waitFor, time.Millisecond)
		st := srv.Stats()
		assert.Zero(t, st.Probes)
		assert.Zero(t, st.ProtocolErrors)
	})
}

// A probe is one way a health check connects and goes without a hello.
type probe struct {
	name   string
	header []byte // sent first, if any
	reset  bool   // leave with a reset rather than a close
	remote string // the address the server should log, if not the socket's
}

// run makes the probe against addr and returns the socket's own address.
func (p probe) run(t *testing.T, addr string) string {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, waitFor)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	local := nc.LocalAddr().String()
	if p.header != nil {
		_, err := nc.Write(p.header)
		require.NoError(t, err)
	}
	if p.reset {
		require.NoError(t, nc.(*net.TCPConn).SetLinger(0))
	}
	require.NoError(t, nc.Close())
	return local
}

func TestHealthProbes(t *testing.T) {
	serverTLS, _ := testTLS(t)
	bare := []probe{
		{name: "close"},
		{name: "reset", reset: true},
	}
	headed := []probe{
		{name: "v2 LOCAL, close", header: localHeader(t)},
		{name: "v1 UNKNOWN, close", header: []byte("PROXY UNKNOWN\r\n")},
		{name: "v1 PROXY, close", header: proxyHeader(t, 1, clientV4, frontendV4), remote: clientV4},
		{name: "v2 PROXY, close", header: proxyHeader(t, 2, clientV6, frontendV6), remote: clientV6},
	}
	for _, transport := range []string{"TCP", "TLS"} {
		for _, admission := range []string{"admission on", "admission off"} {
			for _, proxy := range []string{"PROXY protocol off", "PROXY protocol on"} {
				probes := bare
				// An authenticator that would reject anyone: a probe
				// never reaches it.
				opts := []ServerOption{tokenAuth("s3cret")}
				if transport == "TLS" {
					opts = append(opts, WithTLSConfig(serverTLS))
				}
				if admission == "admission off" {
					opts = append(opts, WithAdmission(-1, 0))
				}
				if proxy == "PROXY protocol on" {
					opts = append(opts, WithProxyProtocol(loopbackNet))
					probes = slices.Concat(bare, headed)
				}
				for _, p := range probes {
					t.Run(strings.Join([]string{transport, admission, proxy, p.name}, "/"), func(t *testing.T) {
						log, hook := capturedLogger()
						srv, addr := startServer(t, slices.Concat(opts, []ServerOption{WithLogger(log)})...)
						local := p.run(t, addr)

						var line *logrus.Entry
						require.Eventually(t, func() bool {
							lines := linesWith(hook, "health probe: closed before its hello")
							if len(lines) > 0 {
								line = lines[0]
							}
							return line != nil || len(warnings(hook)) > 0
						}, waitFor, time.Millisecond)
						require.Empty(t, warnings(hook))
						require.NotNil(t, line)
						assert.Equal(t, logrus.DebugLevel, line.Level)
						want := p.remote
						if want == "" {
							want = local
						}
						assert.Equal(t, want, line.Data["remote"])
						st := srv.Stats()
						assert.EqualValues(t, 1, st.Probes)
						assert.Zero(t, st.ProtocolErrors)
						assert.Zero(t, st.AuthFailures)
					})
				}
			}
		}
	}
}

// clientHelloRecord returns the first flight of a TLS client: one record
// holding a complete ClientHello.
func clientHelloRecord(t *testing.T) []byte {
	t.Helper()
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = tls.Client(client, &tls.Config{ServerName: "vgo.test"}).Handshake()
	}()
	defer func() {
		server.Close()
		client.Close()
		<-done
	}()
	header := make([]byte, 5)
	_, err := io.ReadFull(server, header)
	require.NoError(t, err)
	body := make([]byte, binary.BigEndian.Uint16(header[3:]))
	_, err = io.ReadFull(server, body)
	require.NoError(t, err)
	return append(header, body...)
}

func TestHalfHelloIsNotAProbe(t *testing.T) {
	// A peer that sent part of a hello, or of a TLS ClientHello, was no
	// health check: its failure is worth a warning.
	serverTLS, _ := testTLS(t)
	hello := rawHello(ProtocolVersion)
	for _, tc := range []struct {
		name  string
		opts  []ServerOption
		bytes []byte
	}{
		{"TCP", nil, hello[:3]},
		{"TCP after a PROXY header", []ServerOption{WithProxyProtocol(loopbackNet)},
			slices.Concat(proxyHeader(t, 2, clientV4, frontendV4), hello[:len(hello)-1])},
		{"TLS", []ServerOption{WithTLSConfig(serverTLS)}, []byte{0x16, 0x03, 0x01, 0x00}},
		{"TLS after a PROXY header", []ServerOption{WithTLSConfig(serverTLS), WithProxyProtocol(loopbackNet)},
			slices.Concat(proxyHeader(t, 1, clientV4, frontendV4), []byte{0x16, 0x03})},
		// A whole ClientHello: the server answers it and then finds the
		// connection closed, as when a client rejects the certificate
		// without a word.
		{"TLS, a whole ClientHello", []ServerOption{WithTLSConfig(serverTLS)}, clientHelloRecord(t)},
		{"TLS after a PROXY header, a whole ClientHello", []ServerOption{WithTLSConfig(serverTLS), WithProxyProtocol(loopbackNet)},
			slices.Concat(proxyHeader(t, 2, clientV4, frontendV4), clientHelloRecord(t))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log, hook := capturedLogger()
			srv, addr := startServer(t, slices.Concat(tc.opts, []ServerOption{WithLogger(log)})...)
			r := dialRaw(t, addr)
			r.write(tc.bytes)
			require.NoError(t, r.nc.Close())
			require.Eventually(t, func() bool { return len(linesWith(hook, "handshake failed")) == 1 },
				waitFor, time.Millisecond)
			assert.Zero(t, srv.Stats().Probes)
			assert.Empty(t, linesWith(hook, "health probe: closed before its hello"))
		})
	}
}

func TestProxyHeaderUnderTLS(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	type opened struct {
		addrs
		tls bool
	}

	t.Run("trusted", func(t *testing.T) {
		for _, tc := range []struct {
			name     string
			header   []byte
			src, dst string // the addresses the header gives, if any
		}{
			{"v1", proxyHeader(t, 1, clientV4, frontendV4), clientV4, frontendV4},
			{"v2", proxyHeader(t, 2, clientV6, frontendV6), clientV6, frontendV6},
			{"no header", nil, "", ""},
		} {
			t.Run(tc.name, func(t *testing.T) {
				log, hook := capturedLogger()
				opens := make(chan opened, 16)
				_, addr := startServer(t, WithLogger(log), WithTLSConfig(serverTLS), WithProxyProtocol(loopbackNet),
					WithHandler(echo), WithOnConnOpen(func(c *Conn) { opens <- opened{addrsOf(c), c.TLS() != nil} }))
				locals := make(chan string, 16)
				c := connectClient(t, addr, WithTLSConfig(clientTLS), WithDialFunc(dialWithHeader(tc.header, locals)))
				socket := recv(t, locals)
				want := opened{addrs{remote: tc.src, local: tc.dst}, true}
				if tc.header == nil {
					want.addrs = addrs{remote: socket, local: addr}
				}
				require.Equal(t, want, recv(t, opens))
				c.roundTrip(t, "sealed")

				lines := linesWith(hook, "client connected")
				require.Len(t, lines, 1)
				assert.Equal(t, want.remote, lines[0].Data["remote"])
				if tc.header != nil {
					assert.Equal(t, socket, lines[0].Data["proxy"])
				} else {
					assert.NotContains(t, lines[0].Data, "proxy")
				}
			})
		}
	})

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct {
			name   string
			opt    ServerOption
			header []byte
		}{
			// Where no header is expected, it fails the TLS handshake,
			// and the server tells it from other garbage.
			{"untrusted source", WithProxyProtocol(elsewhereNet), proxyHeader(t, 2, clientV4, frontendV4)},
			{"PROXY protocol off, v1", nil, proxyHeader(t, 1, clientV4, frontendV4)},
			{"PROXY protocol off, v2", nil, proxyHeader(t, 2, clientV4, frontendV4)},
			{"malformed from trusted", WithProxyProtocol(loopbackNet), append(v2Prefix(0x21, 0x11, 4), 1, 2, 3, 4)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				openOpt, opens := reportOpen()
				srv, addr := startServer(t, WithTLSConfig(serverTLS), tc.opt, openOpt, WithHandler(echo))
				good := connectClient(t, addr, WithTLSConfig(clientTLS))
				recv(t, opens)

				err := oneAttempt(t, addr, WithTLSConfig(clientTLS), WithDialFunc(dialWithHeader(tc.header, nil)))
				require.ErrorIs(t, err, ErrGaveUp)
				requireNoneOpened(t, opens)
				require.Eventually(t, func() bool { return srv.Stats().ProtocolErrors == 1 }, waitFor, time.Millisecond)
				good.roundTrip(t, "unaffected")
				good.requireStillConnected(t)
				require.Equal(t, 1, srv.Len())
			})
		}
	})
}

func TestProxyShutdownDuringTLSHandshake(t *testing.T) {
	// Shutdown sends nothing on a connection still in its TLS handshake:
	// a write there would run the handshake on the link's writer, beside
	// the connection's own goroutine reading the PROXY header. The race
	// detector sees the difference; the client sees the end either way.
	serverTLS, clientTLS := testTLS(t)
	l := listen(t)
	srv, sv := serveOn(t, l, WithTLSConfig(serverTLS), WithProxyProtocol(loopbackNet))
	nc, err := net.DialTimeout("tcp", l.Addr().String(), waitFor)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	require.Eventually(t, func() bool {
		srv.mu.Lock()
		defer srv.mu.Unlock()
		return len(srv.conns) == 1
	}, waitFor, time.Millisecond)

	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(testContext(t)) }()
	require.Eventually(t, srv.isClosing, waitFor, time.Millisecond)
	// The header and the TLS handshake arrive while Shutdown runs.
	_, _ = nc.Write(proxyHeader(t, 2, clientV4, frontendV4))
	tc := tls.Client(nc, clientTLS)
	require.NoError(t, tc.SetDeadline(time.Now().Add(waitFor)))
	if tc.Handshake() == nil {
		// The server finished its handshake before Shutdown got to the
		// connection, which may then be told why it ends.
		ft, p, err := newFrameReader(tc, DefaultMaxFrameSize).next()
		if err == nil {
			require.Equal(t, frameClose, ft)
			require.Equal(t, CloseGoingAway, parseClose(p).Code)
		}
	}
	require.NoError(t, recv(t, shut))
	require.ErrorIs(t, sv.wait(t), ErrServerClosed)
}

func TestWithProxyProtocolValidation(t *testing.T) {
	for name, opt := range map[string]ServerOption{
		"no network":        WithProxyProtocol(),
		"zero prefix":       WithProxyProtocol(netip.Prefix{}),
		"one zero prefix":   WithProxyProtocol(loopbackNet, netip.Prefix{}),
		"empty slice":       WithProxyProtocol([]netip.Prefix{}...),
		"prefix length 33":  WithProxyProtocol(netip.PrefixFrom(netip.MustParseAddr("10.0.0.0"), 33)),
		"prefix without IP": WithProxyProtocol(netip.PrefixFrom(netip.Addr{}, 8)),
		"mapped and wider":  WithProxyProtocol(netip.MustParsePrefix("::ffff:0.0.0.0/64")),
	} {
		t.Run(name, func(t *testing.T) {
			s, err := NewServer(WithLogger(quietLogger()), opt)
			require.ErrorIs(t, err, ErrInvalidOption)
			require.Nil(t, s)
		})
	}

	// Host bits are ignored; an IPv4 peer reached over IPv6 is still the
	// IPv4 address it is, and so is a network written IPv4-mapped; a
	// link-local peer's zone only names the interface it came in on.
	s, err := NewServer(WithLogger(quietLogger()), WithProxyProtocol(netip.MustParsePrefix("10.1.2.3/8"),
		netip.MustParsePrefix("2001:db8::/32"), netip.MustParsePrefix("fe80::/10"),
		netip.MustParsePrefix("::ffff:192.0.2.0/120")))
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	for addr, want := range map[string]bool{
		"10.200.0.1:5000":          true,
		"[::ffff:10.0.0.9]:5000":   true,
		"[2001:db8:1::2]:5000":     true,
		"127.0.0.1:5000":           false,
		"11.0.0.1:5000":            false,
		"[2001:db9::1]:5000":       false,
		"[::ffff:127.0.0.1]:5000":  false,
		"[fe80::1%eth0]:5000":      true,
		"[fe80::1]:5000":           true,
		"[fec0::1%eth0]:5000":      false,
		"10.0.0.1:5000:extra-junk": false,
		"192.0.2.77:5000":          true,
		"192.0.3.1:5000":           false,
	} {
		assert.Equal(t, want, s.trusts(fakeAddr(addr)), addr)
	}

	// Without the option nobody is trusted.
	off, err := NewServer(WithLogger(quietLogger()))
	require.NoError(t, err)
	t.Cleanup(func() { off.Close() })
	assert.False(t, off.trusts(fakeAddr("127.0.0.1:5000")))
}

// fakeAddr is an address given by its text.
type fakeAddr string

func (a fakeAddr) Network() string { return "tcp" }
func (a fakeAddr) String() string  { return string(a) }

// FuzzProxyHeader writes arbitrary bytes at the start of a connection from
// a trusted source, and checks that the server ends that connection, or
// opens it if the bytes make a header and a hello, without harm to anyone
// else: a client connected throughout and a new one both get through.
func FuzzProxyHeader(f *testing.F) {
	hello := rawHello(ProtocolVersion)
	v1 := proxyHeader(f, 1, clientV4, frontendV4)
	v2 := proxyHeader(f, 2, clientV6, frontendV6)
	for _, seed := range [][]byte{
		nil,
		hello,
		slices.Concat(v1, hello),
		slices.Concat(v2, hello),
		slices.Concat(localHeader(f), hello),
		slices.Concat([]byte("PROXY UNKNOWN\r\n"), hello),
		v1[:len(v1)/2],
		v2[:len(v2)-3],
		v2[:14],
		append(v2Prefix(0x21, 0x11, 0xffff), hello...),
		append(v2Prefix(0x21, 0x11, 4), 1, 2, 3, 4),
		[]byte("PROXY "),
		[]byte("PROXY TCP4 \x00\xff garbage \r\n"),
		[]byte("PROXY " + strings.Repeat("9", 200)),
		append([]byte("\r\n\r\n\x00\r\nQUIT\n"), "\x21\x11\x00\x0c garbage garbage"...),
		append([]byte("\r\n\r\n\x00\r\nQUIT\n"), 0x20, 0x00, 0x00, 0x00),
	} {
		f.Add(seed)
	}

	// One server for every input: a connection that escaped its ending
	// would still be there for the next input to trip over.
	const handshakeTimeout = time.Second
	s, err := NewServer(WithLogger(quietLogger()), WithProxyProtocol(loopbackNet), WithHandler(echo),
		WithHandshakeTimeout(handshakeTimeout))
	require.NoError(f, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(f, err)
	served := make(chan error, 1)
	go func() { served <- s.Serve(l) }()
	f.Cleanup(func() {
		assert.NoError(f, s.Close())
		assert.ErrorIs(f, <-served, ErrServerClosed)
	})
	addr := l.Addr().String()

	msgs := make(chan string, 16)
	disconnects := make(chan error, 16)
	steady, err := NewClient(addr, WithLogger(quietLogger()),
		WithOnMessage(func(m []byte) { msgs <- string(m) }),
		WithOnDisconnect(func(err error) { disconnects <- err }))
	require.NoError(f, err)
	f.Cleanup(func() { steady.Close() })
	steady.Start()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	require.NoError(f, steady.WaitConnected(ctx))

	f.Fuzz(func(t *testing.T, in []byte) {
		nc, err := net.DialTimeout("tcp", addr, waitFor)
		require.NoError(t, err)
		defer nc.Close()
		// The server may have refused the bytes and hung up before they
		// were all written; what counts is how the connection ends.
		_ = nc.SetWriteDeadline(time.Now().Add(waitFor))
		_, _ = nc.Write(in)
		// Half-closed, the connection ends as soon as the server has
		// read what it was sent, and does not wait for the handshake
		// timeout: TestProxyHeaderCutShort covers that.
		_ = nc.(*net.TCPConn).CloseWrite()
		require.NoError(t, nc.SetReadDeadline(time.Now().Add(handshakeTimeout)))
		_, err = io.Copy(io.Discard, nc)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the server kept the connection open past its handshake timeout")
		}

		r := dialHello(t, addr)
		r.send(frameData, []byte("newcomer"))
		ft, p := r.next()
		require.Equal(t, frameData, ft)
		require.Equal(t, "echo: newcomer", string(p))
		require.NoError(t, r.nc.Close())

		ctx, cancel := context.WithTimeout(context.Background(), waitFor)
		defer cancel()
		require.NoError(t, steady.Send(ctx, []byte("steady")))
		require.Equal(t, "echo: steady", recv(t, msgs))
		select {
		case err := <-disconnects:
			t.Fatalf("a connected client was dropped: %v", err)
		default:
		}
	})
}

func TestProxyMalformedHeaderUnderTLSGetsNoHandshake(t *testing.T) {
	// A connection refused before its TLS handshake is closed as it is:
	// no frame can reach the client, and the server must not start a TLS
	// handshake to try, whatever the client sends next.
	serverTLS, _ := testTLS(t)
	srv, addr := startServer(t, WithTLSConfig(serverTLS), WithProxyProtocol(loopbackNet))
	r := dialRaw(t, addr)
	r.write(append(v2Prefix(0x21, 0x11, 4), 1, 2, 3, 4))
	require.Eventually(t, func() bool { return srv.Stats().ProtocolErrors == 1 }, waitFor, time.Millisecond)
	_, _ = r.nc.Write(clientHelloRecord(t)) // may find the connection closed
	require.NoError(t, r.nc.SetReadDeadline(time.Now().Add(waitFor)))
	n, err := r.nc.Read(make([]byte, 5))
	assert.Zero(t, n, "the server answered with TLS")
	assert.False(t, errors.Is(err, os.ErrDeadlineExceeded), "the connection stayed open: %v", err)
}
