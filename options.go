package vgo

import (
	"context"
	"crypto/tls"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"

	"github.com/sirupsen/logrus"
)

// Defaults. A zero value passed to an option selects the default; a negative
// duration, where the option says so, turns the feature off.
const (
	DefaultPingInterval     = 5 * time.Second
	DefaultPongTimeout      = 3 * time.Second
	DefaultHeartbeatTimeout = 15 * time.Second
	DefaultDialTimeout      = 5 * time.Second
	DefaultWriteTimeout     = 10 * time.Second
	DefaultHandshakeTimeout = 5 * time.Second
	DefaultMaxFrameSize     = 1 << 20
	DefaultDrainWindow      = 5 * time.Second
	DefaultMaxPingInterval  = 25 * time.Second
	DefaultMaxHandshakes    = 1024
	DefaultRetryAfter       = time.Second
	DefaultResumeWindow     = 2 * time.Minute
	DefaultSessionBuffer    = 1 << 20
	DefaultMaxSuspended     = 100_000
	DefaultSessionMemory    = 256 << 20
)

// maxRetryAfter bounds WithAdmission's retry-after, which a close frame
// carries in milliseconds.
const maxRetryAfter = time.Hour

// A ClientOption configures a Client. Options that also make sense for a
// Server have type Option.
type ClientOption interface {
	applyClient(*clientOptions)
}

// A ServerOption configures a Server. Options that also make sense for a
// Client have type Option.
type ServerOption interface {
	applyServer(*serverOptions)
}

// An Option configures both a Client and a Server.
type Option interface {
	ClientOption
	ServerOption
}

// commonOptions are the settings both sides have.
type commonOptions struct {
	logger           logrus.FieldLogger
	tlsConfig        *tls.Config
	maxFrameSize     int
	writeTimeout     time.Duration
	handshakeTimeout time.Duration
}

type clientOptions struct {
	commonOptions
	pingInterval  time.Duration
	pongTimeout   time.Duration
	dialTimeout   time.Duration
	backoff       Backoff
	maxAttempts   int
	dial          func(ctx context.Context, network, addr string) (net.Conn, error)
	credentials   func(ctx context.Context) ([]byte, error)
	fallbacks     []string
	tlsConfigFunc func(addr string) (*tls.Config, error)
	retryAuth     bool
	sendBuffer    sendBuffer
	// resume is the session log's bound in bytes, with resumeOn.
	resume   int
	resumeOn bool

	onSessionLost func(unacked [][]byte)

	onConnect    func(remote net.Addr)
	onDisconnect func(err error)
	onMessage    func(msg []byte)
	onReconnect  func(attempt int, delay time.Duration)
	onPong       func(rtt time.Duration)
	onClose      func(err error)

	// rand returns a value in [0, 1) for backoff jitter; tests replace it.
	rand func() float64
}

type serverOptions struct {
	commonOptions
	heartbeatTimeout time.Duration
	maxConns         int
	minPing, maxPing time.Duration
	drainWindow      time.Duration
	maxHandshakes    int
	retryAfter       time.Duration
	authenticate     func(c *Conn, credentials []byte) (identity any, err error)
	// trustedProxies are the networks whose PROXY protocol headers are
	// believed; nil turns the PROXY protocol off.
	trustedProxies []netip.Prefix
	// sessions is the session configuration, with sessionsOn.
	sessions   Sessions
	sessionsOn bool

	handler      func(c *Conn, msg []byte)
	onConnOpen   func(c *Conn)
	onConnResume func(c *Conn)
	onConnClose  func(c *Conn, err error)
	onPing       func(c *Conn)
}

type commonOption func(*commonOptions)

func (f commonOption) applyClient(o *clientOptions) { f(&o.commonOptions) }
func (f commonOption) applyServer(o *serverOptions) { f(&o.commonOptions) }

type clientOption func(*clientOptions)

func (f clientOption) applyClient(o *clientOptions) { f(o) }

type serverOption func(*serverOptions)

func (f serverOption) applyServer(o *serverOptions) { f(o) }

// WithLogger sets where log lines go. The default is logrus.StandardLogger().
// Connects and disconnects are logged at info, retries at warn, protocol
// errors at warn, heartbeats at debug.
func WithLogger(l logrus.FieldLogger) Option {
	return commonOption(func(o *commonOptions) { o.logger = l })
}

// WithTLSConfig turns on TLS. A Client uses cfg to dial (its ServerName
// defaults to the host of the dialed address); a Server uses it to accept
// and needs at least one certificate in it. The default is plain TCP.
func WithTLSConfig(cfg *tls.Config) Option {
	return commonOption(func(o *commonOptions) { o.tlsConfig = cfg })
}

// WithMaxFrameSize sets the longest message, in bytes, that may be sent or
// received. Each side announces its own in the hello, and Send refuses a
// message longer than either side accepts with ErrFrameTooLarge. A peer
// that announces a longer message is disconnected before anything is
// allocated for it. The default is DefaultMaxFrameSize (1 MiB); the value
// must not exceed 4 GiB - 1.
func WithMaxFrameSize(n int) Option {
	return commonOption(func(o *commonOptions) { o.maxFrameSize = n })
}

// WithWriteTimeout sets how long a peer may leave a write to its socket
// unfinished before the connection is torn down as a slow consumer
// (ErrSlowConsumer); a half-written frame cannot be taken back. Each write
// carries at most 64 KiB of messages, so a peer that takes less than that
// per write timeout is dropped, and a send queue cannot stay full for
// longer. The default is
// DefaultWriteTimeout (10s); negative means no limit.
func WithWriteTimeout(d time.Duration) Option {
	return commonOption(func(o *commonOptions) { o.writeTimeout = d })
}

// WithHandshakeTimeout bounds the TLS handshake and the hello exchange that
// open each connection. The default is DefaultHandshakeTimeout (5s);
// negative means no limit.
func WithHandshakeTimeout(d time.Duration) Option {
	return commonOption(func(o *commonOptions) { o.handshakeTimeout = d })
}

// WithPingInterval sets how often a connected client pings the server. The
// default is DefaultPingInterval (5s); negative turns heartbeats off, and
// with them dead-peer detection, unless the server asks for pings: a vgo
// server announces the longest interval it accepts, and the client then
// pings at that interval (see WithPingIntervalRange).
func WithPingInterval(d time.Duration) ClientOption {
	return clientOption(func(o *clientOptions) { o.pingInterval = d })
}

// WithPongTimeout sets how long a client waits, after a ping, for any frame
// from the server before it declares the link dead. A dead link is
// therefore detected within ping interval + pong timeout. The default is
// DefaultPongTimeout (3s); it must be positive while heartbeats are on.
func WithPongTimeout(d time.Duration) ClientOption {
	return clientOption(func(o *clientOptions) { o.pongTimeout = d })
}

// WithDialTimeout bounds each TCP dial. The default is DefaultDialTimeout
// (5s); negative means no limit beyond the operating system's.
func WithDialTimeout(d time.Duration) ClientOption {
	return clientOption(func(o *clientOptions) { o.dialTimeout = d })
}

// WithBackoff sets the delays between dial attempts. Zero fields take the
// defaults documented on Backoff: 250ms, ×1.4, ±50%, at most 5s.
func WithBackoff(b Backoff) ClientOption {
	return clientOption(func(o *clientOptions) { o.backoff = b })
}

// WithMaxAttempts makes a client give up after n dial attempts in a row
// have failed; it then closes itself with an error wrapping ErrGaveUp. An
// attempt fails unless its connection completes the hello and receives a
// frame after it; one that a busy server refused with a retry hint does
// not count. The default, 0, retries forever.
func WithMaxAttempts(n int) ClientOption {
	return clientOption(func(o *clientOptions) { o.maxAttempts = n })
}

// WithDialFunc replaces the TCP dialer, for proxies, in-memory transports
// and tests. The function must honour ctx. The default is a net.Dialer with
// the dial timeout.
func WithDialFunc(dial func(ctx context.Context, network, addr string) (net.Conn, error)) ClientOption {
	return clientOption(func(o *clientOptions) { o.dial = dial })
}

// WithSendBuffer makes Send keep messages while the client is
// disconnected, up to maxMessages messages and maxBytes bytes, instead of
// failing with ErrNotConnected. On the next connection the buffered
// messages are written first, in order, before any sent after them. policy
// says what happens to a message that does not fit. Buffered messages are
// lost if the client is closed or gives up. By default there is no buffer.
func WithSendBuffer(maxMessages, maxBytes int, policy BufferPolicy) ClientOption {
	return clientOption(func(o *clientOptions) {
		o.sendBuffer = sendBuffer{maxMessages: maxMessages, maxBytes: maxBytes, policy: policy}
	})
}

// WithResume makes the client ask a server for a session and resume it
// after every reconnect, so that each message reaches the other side
// exactly once and in order, within the server's resume window (see
// Sessions). Send keeps each message until the server acknowledges it, in
// a log of at most bufferBytes bytes (0 means DefaultSessionBuffer, 1 MiB),
// and waits for room when the log is full: that is the only bound on
// Send, and TrySend fails with ErrQueueFull instead. From the client's
// callbacks, which run where the connection's reader does, Send waits for
// the writer instead (see Sessions.BufferBytes). The log also keeps the
// messages sent while disconnected, so WithSendBuffer cannot be combined
// with it; the credentials then have 27 bytes less room. A server without
// sessions is served as if the option were not set, except that Send
// keeps the messages sent while disconnected for the next connection. Off
// by default.
func WithResume(bufferBytes int) ClientOption {
	return clientOption(func(o *clientOptions) { o.resume, o.resumeOn = bufferBytes, true })
}

// WithOnSessionLost registers a callback run when a client with
// WithResume could not resume its session and started a new one: the
// server restarted, or ended the session (Shutdown, Conn.Close), or the
// resume window had passed. unacked holds the messages sent in the old
// session that went out and were never acknowledged, oldest first: the
// server may or may not have received them, and they are not sent again.
// Messages the server sent in the old session and the client did not
// receive are lost as well. The application should resynchronise with its
// source of truth. It runs on the client's goroutine before the new
// connection's OnConnect.
func WithOnSessionLost(fn func(unacked [][]byte)) ClientOption {
	return clientOption(func(o *clientOptions) { o.onSessionLost = fn })
}

// WithFallbackAddrs adds servers to fail over to. The client dials the
// address given to NewClient first and, on each failure, moves to the next
// address in the list, wrapping around; names are resolved again on every
// dial. The backoff applies per round: a failed dial is followed at once by
// the next address, and the wait comes after every address has failed once.
// By default there is no fallback.
func WithFallbackAddrs(addrs ...string) ClientOption {
	return clientOption(func(o *clientOptions) { o.fallbacks = append(o.fallbacks, addrs...) })
}

// WithTLSConfigFunc sets a function that returns the TLS configuration for
// each dial, with the address being dialed, so that a rotated client
// certificate or root pool is used from the next reconnect on. It takes
// precedence over WithTLSConfig; a nil config means plain TCP. An error
// from it fails that attempt.
func WithTLSConfigFunc(fn func(addr string) (*tls.Config, error)) ClientOption {
	return clientOption(func(o *clientOptions) { o.tlsConfigFunc = fn })
}

// WithCredentials sets the function that supplies the credentials a client
// presents in its hello, such as a token, of at most MaxCredentialsSize
// bytes, 27 fewer with WithResume. It runs before every dial, so a
// refreshed token is used on the next reconnect; an error from it fails
// that attempt. By default no credentials are sent.
func WithCredentials(fn func(ctx context.Context) ([]byte, error)) ClientOption {
	return clientOption(func(o *clientOptions) { o.credentials = fn })
}

// WithRetryOnAuthFailure makes a client keep dialing with backoff after the
// server rejected its credentials. By default it stops at once with an
// error wrapping ErrUnauthorized, since retrying the same credentials
// rarely helps.
func WithRetryOnAuthFailure(retry bool) ClientOption {
	return clientOption(func(o *clientOptions) { o.retryAuth = retry })
}

// WithOnConnect registers a callback run each time the client completes a
// connection, with the server's address.
func WithOnConnect(fn func(remote net.Addr)) ClientOption {
	return clientOption(func(o *clientOptions) { o.onConnect = fn })
}

// WithOnDisconnect registers a callback run once for each lost connection,
// with the cause.
func WithOnDisconnect(fn func(err error)) ClientOption {
	return clientOption(func(o *clientOptions) { o.onDisconnect = fn })
}

// WithOnMessage registers a callback run for each data frame the client
// receives. msg is only valid until the callback returns: copy it to keep
// it. The callback runs on the connection's reader, so while it runs no
// further frames are read.
func WithOnMessage(fn func(msg []byte)) ClientOption {
	return clientOption(func(o *clientOptions) { o.onMessage = fn })
}

// WithOnReconnect registers a callback run before each wait between dial
// attempts, with the number of the attempt about to be made, counted since
// the last healthy connection (1 after losing one, 2 after a first dial
// failed), and the delay before it. A refusal with a retry hint is not a
// failed attempt, so the number after it is the same as before it.
func WithOnReconnect(fn func(attempt int, delay time.Duration)) ClientOption {
	return clientOption(func(o *clientOptions) { o.onReconnect = fn })
}

// WithOnPong registers a callback run for each pong, with the round-trip
// time it measured.
func WithOnPong(fn func(rtt time.Duration)) ClientOption {
	return clientOption(func(o *clientOptions) { o.onPong = fn })
}

// WithOnClose registers a callback run once when the client stops for good:
// with nil after Close, or with an error wrapping ErrGaveUp or
// ErrUnauthorized.
func WithOnClose(fn func(err error)) ClientOption {
	return clientOption(func(o *clientOptions) { o.onClose = fn })
}

// WithHeartbeatTimeout sets how long a server lets a connection stay silent
// before it closes it as stale. Any complete frame counts, each fragment of
// a long message included, so it must exceed the clients' ping interval;
// allow for two or three missed pings. The server announces it in its
// hello. The default is DefaultHeartbeatTimeout (15s); negative turns stale
// detection off.
func WithHeartbeatTimeout(d time.Duration) ServerOption {
	return serverOption(func(o *serverOptions) { o.heartbeatTimeout = d })
}

// WithPingIntervalRange sets the ping intervals a server accepts, which it
// announces in its hello. A client set to ping less often than max pings
// every max instead (and a client with heartbeats off starts pinging); one
// set to ping more often than min pings every min. Either logs a warning.
// The default max is a third of the heartbeat timeout, so a client can miss
// two pings before it is closed as stale, and at most
// DefaultMaxPingInterval (25s), also with the heartbeat timeout off: load
// balancers and NATs drop a TCP connection idle for 30 s to a few minutes,
// and each ping resets their timer. There is no min. max must not exceed
// half the heartbeat timeout; 0 keeps the default.
func WithPingIntervalRange(min, max time.Duration) ServerOption {
	return serverOption(func(o *serverOptions) { o.minPing, o.maxPing = min, max })
}

// WithDrainWindow sets the window over which Shutdown asks clients to
// spread their reconnects: each waits a random part of it before dialing
// again, so a fleet does not return all at once. The default is
// DefaultDrainWindow (5s); negative sends no such request.
func WithDrainWindow(d time.Duration) ServerOption {
	return serverOption(func(o *serverOptions) { o.drainWindow = d })
}

// WithAdmission bounds how many connections a server lets work on their
// handshake (TLS and hello) at once, so that a fleet dialing back after a
// restart cannot pile up more work than the server finishes within the
// handshake timeout. A connection counts from its first bytes until it is
// open or closed: one that sends nothing costs no work and takes no place,
// so silent connections cannot keep others out (on Linux; elsewhere a
// connection counts from when it is accepted). A connection accepted
// beyond the bound is answered at once, without reading its hello, with a
// close frame of code CloseTryLater and a retry-after hint drawn at random
// between half and one and a half times retryAfter; a vgo client waits
// that long instead of taking a step of its backoff. Over TLS the
// connection is closed without the frame, which the client cannot read
// before a TLS handshake, and the client takes its backoff step. The
// defaults are DefaultMaxHandshakes (1024) and DefaultRetryAfter (1s), at
// most an hour; a negative maxHandshakes turns the bound off.
func WithAdmission(maxHandshakes int, retryAfter time.Duration) ServerOption {
	return serverOption(func(o *serverOptions) { o.maxHandshakes, o.retryAfter = maxHandshakes, retryAfter })
}

// WithAuthenticator sets the function that accepts or rejects each
// connection's credentials during the hello, before the connection opens.
// A non-nil error rejects: the client is sent a close frame with
// CloseUnauthorized and the error's text. On success, identity (a user, a
// tenant, whatever the credentials proved; it may be nil) is kept on the
// connection for Conn.Identity. The function may read the connection's
// addresses and TLS state; anything it sets up for the connection should
// be released when Conn.Context ends, which happens also when the
// connection fails after authentication and before it opens. By default
// every client is accepted, with a nil identity.
func WithAuthenticator(fn func(c *Conn, credentials []byte) (identity any, err error)) ServerOption {
	return serverOption(func(o *serverOptions) { o.authenticate = fn })
}

// WithProxyProtocol makes a server read a PROXY protocol header (version 1
// or 2, as HAProxy, nginx and cloud load balancers send it) from
// connections whose source address is in one of the trusted networks, so
// that Conn.RemoteAddr, the logs and the callbacks show the client's own
// address rather than the balancer's. A trusted source may also connect
// without a header, and is then taken at its own address: a network can
// hold both a balancer and clients that dial directly. A header from any
// other source is refused with a protocol error, so only a trusted source
// can say where a connection comes from; since any of them can, list only
// the balancers' own addresses. A header with the LOCAL command, which a
// balancer sends for its own health checks, keeps the connection's own
// addresses. By default the PROXY protocol is off and every header is
// refused.
func WithProxyProtocol(trusted ...netip.Prefix) ServerOption {
	return serverOption(func(o *serverOptions) {
		o.trustedProxies = append([]netip.Prefix{}, trusted...)
	})
}

// Sessions configures the resumable sessions of a server (WithSessions).
// A zero field takes its default.
//
// A client that asks for a session (WithResume) gets one with its first
// connection. When that connection fails without a close frame (a reset,
// a silent link, a heartbeat timeout, a slow consumer), the session is
// suspended: it keeps its Conn, its ID and the messages not yet
// acknowledged, and Conn.Send keeps adding to them. A connection from the
// same client within Window resumes it: each side sends again exactly the
// messages the other lacks, and neither application sees a message twice
// or out of order. A session ends, and WithOnConnClose runs, when a close
// frame is sent or received (Conn.Close, Client.Close, a protocol error),
// at Shutdown or Close, when its window passes (ErrSessionExpired) or when
// the bounds below push it out (ErrSessionEvicted).
type Sessions struct {
	// Window is how long a suspended session waits for its client. The
	// default is DefaultResumeWindow (2m).
	Window time.Duration
	// BufferBytes bounds a session's log of unacknowledged messages to
	// its client: Conn.Send waits for room, and TrySend fails with
	// ErrQueueFull, while it is full. A Send from the application's code
	// that runs on the session's reader (the handler, OnConnOpen,
	// OnConnResume), which reads no acknowledgements while it runs, waits
	// for the connection's writer instead, and a client that lets the log
	// grow by four times its bound (at least 8 MiB) is dropped as a slow
	// consumer; the session resumes. The default is DefaultSessionBuffer
	// (1 MiB).
	BufferBytes int
	// MaxSuspended is how many sessions may be suspended at once: beyond
	// it the one suspended longest ends. The default is
	// DefaultMaxSuspended (100,000).
	MaxSuspended int
	// MaxBytes bounds the logs of the suspended sessions together, as
	// they stand when a session is suspended: beyond it the sessions
	// suspended longest end. The default is DefaultSessionMemory
	// (256 MiB).
	MaxBytes int
}

// WithSessions turns on resumable sessions (see Sessions), for the
// clients that ask for them with WithResume; other clients are served as
// before. Off by default.
func WithSessions(cfg Sessions) ServerOption {
	return serverOption(func(o *serverOptions) { o.sessions, o.sessionsOn = cfg, true })
}

// WithOnConnResume registers a callback run each time a client resumes
// its session on a new connection: the Conn is the session's, the same
// value WithOnConnOpen saw, and its RemoteAddr is the new connection's.
func WithOnConnResume(fn func(c *Conn)) ServerOption {
	return serverOption(func(o *serverOptions) { o.onConnResume = fn })
}

// WithMaxConnections caps the number of live connections. A connection
// accepted past the cap is sent a close frame and closed; existing ones are
// unaffected. The default, 0, means no cap.
func WithMaxConnections(n int) ServerOption {
	return serverOption(func(o *serverOptions) { o.maxConns = n })
}

// WithHandler sets the function run for each data frame a server receives.
// It runs on the connection's reader goroutine, so frames from one
// connection are handled in order and one at a time; msg is only valid
// until it returns. Reply with c.Send. By default data frames are dropped.
func WithHandler(fn func(c *Conn, msg []byte)) ServerOption {
	return serverOption(func(o *serverOptions) { o.handler = fn })
}

// WithOnConnOpen registers a callback run when a connection completes its
// hello, before any of its frames reach the handler.
func WithOnConnOpen(fn func(c *Conn)) ServerOption {
	return serverOption(func(o *serverOptions) { o.onConnOpen = fn })
}

// WithOnConnClose registers a callback run once when an open connection
// ends, with the cause, after its last frame was handled.
func WithOnConnClose(fn func(c *Conn, err error)) ServerOption {
	return serverOption(func(o *serverOptions) { o.onConnClose = fn })
}

// WithOnPing registers a callback run for each ping a server receives.
func WithOnPing(fn func(c *Conn)) ServerOption {
	return serverOption(func(o *serverOptions) { o.onPing = fn })
}

// withRand replaces the source of backoff jitter.
func withRand(fn func() float64) ClientOption {
	return clientOption(func(o *clientOptions) { o.rand = fn })
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidOption, fmt.Sprintf(format, args...))
}

// orDefault returns def for zero, 0 for negative ("off"), and d otherwise.
func orDefault(d, def time.Duration) time.Duration {
	switch {
	case d == 0:
		return def
	case d < 0:
		return 0
	}
	return d
}

func (o *commonOptions) resolve() error {
	if o.logger == nil {
		o.logger = logrus.StandardLogger()
	}
	switch {
	case o.maxFrameSize == 0:
		o.maxFrameSize = DefaultMaxFrameSize
	case o.maxFrameSize < 0 || int64(o.maxFrameSize) > math.MaxUint32:
		return invalid("max frame size %d is outside 1..%d", o.maxFrameSize, uint32(math.MaxUint32))
	}
	o.writeTimeout = orDefault(o.writeTimeout, DefaultWriteTimeout)
	o.handshakeTimeout = orDefault(o.handshakeTimeout, DefaultHandshakeTimeout)
	return nil
}

func newClientOptions(opts []ClientOption) (clientOptions, error) {
	var o clientOptions
	for _, opt := range opts {
		if opt != nil {
			opt.applyClient(&o)
		}
	}
	if err := o.commonOptions.resolve(); err != nil {
		return o, err
	}
	if o.pongTimeout < 0 && o.pingInterval >= 0 {
		return o, invalid("pong timeout %v must be positive while heartbeats are on", o.pongTimeout)
	}
	o.pingInterval = orDefault(o.pingInterval, DefaultPingInterval)
	if o.pongTimeout <= 0 {
		// Also with heartbeats off: a server may turn them on (see
		// WithPingIntervalRange), and then the timeout applies.
		o.pongTimeout = DefaultPongTimeout
	}
	o.dialTimeout = orDefault(o.dialTimeout, DefaultDialTimeout)
	if o.maxAttempts < 0 {
		return o, invalid("max attempts %d is negative", o.maxAttempts)
	}
	if o.resumeOn {
		switch {
		case o.resume < 0:
			return o, invalid("session buffer of %d bytes is negative", o.resume)
		case o.sendBuffer.maxMessages != 0 || o.sendBuffer.maxBytes != 0:
			return o, invalid("a send buffer cannot be combined with sessions, whose log keeps the messages sent while disconnected")
		case o.resume == 0:
			o.resume = DefaultSessionBuffer
		}
	}
	if b := o.sendBuffer; b.maxMessages != 0 || b.maxBytes != 0 {
		if b.maxMessages <= 0 || b.maxBytes <= 0 {
			return o, invalid("send buffer of %d messages and %d bytes is empty", b.maxMessages, b.maxBytes)
		}
		if b.policy < BufferFailNew || b.policy > BufferBlock {
			return o, invalid("unknown send buffer policy %d", b.policy)
		}
	}
	for _, addr := range o.fallbacks {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			return o, invalid("fallback address %q: %v", addr, err)
		}
	}
	b, err := o.backoff.resolve()
	if err != nil {
		return o, err
	}
	o.backoff = b
	if o.dial == nil {
		d := &net.Dialer{}
		o.dial = d.DialContext
	}
	if o.rand == nil {
		o.rand = rand.Float64
	}
	return o, nil
}

func newServerOptions(opts []ServerOption) (serverOptions, error) {
	var o serverOptions
	for _, opt := range opts {
		if opt != nil {
			opt.applyServer(&o)
		}
	}
	if err := o.commonOptions.resolve(); err != nil {
		return o, err
	}
	if o.tlsConfig != nil && len(o.tlsConfig.Certificates) == 0 &&
		o.tlsConfig.GetCertificate == nil && o.tlsConfig.GetConfigForClient == nil {
		return o, invalid("server TLS config has no certificate")
	}
	if o.maxConns < 0 {
		return o, invalid("max connections %d is negative", o.maxConns)
	}
	if o.trustedProxies != nil && len(o.trustedProxies) == 0 {
		return o, invalid("PROXY protocol on with no trusted network")
	}
	for i, p := range o.trustedProxies {
		if !p.IsValid() {
			return o, invalid("trusted proxy network %d is not valid", i+1)
		}
		if p.Addr().Is4In6() {
			// Peers are matched by their IPv4 address, unmapped.
			if p.Bits() < 96 {
				return o, invalid("trusted proxy network %v mixes IPv4 and IPv6", p)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		o.trustedProxies[i] = p.Masked()
	}
	o.heartbeatTimeout = orDefault(o.heartbeatTimeout, DefaultHeartbeatTimeout)
	o.drainWindow = orDefault(o.drainWindow, DefaultDrainWindow)
	switch {
	case o.maxHandshakes == 0:
		o.maxHandshakes = DefaultMaxHandshakes
	case o.maxHandshakes < 0:
		o.maxHandshakes = 0
	}
	switch {
	case o.retryAfter == 0:
		o.retryAfter = DefaultRetryAfter
	case o.retryAfter < 0 || o.retryAfter > maxRetryAfter:
		return o, invalid("retry-after %v is outside 0..%v", o.retryAfter, maxRetryAfter)
	}
	if o.sessionsOn {
		if err := o.sessions.resolve(); err != nil {
			return o, err
		}
	}
	if o.minPing < 0 || o.maxPing < 0 {
		return o, invalid("ping interval range %v..%v is negative", o.minPing, o.maxPing)
	}
	if o.maxPing == 0 {
		o.maxPing = DefaultMaxPingInterval
		if o.heartbeatTimeout > 0 {
			o.maxPing = min(o.heartbeatTimeout/3, o.maxPing)
		}
		// A min set above the default max wins over it.
		o.maxPing = max(o.maxPing, o.minPing)
	}
	if o.heartbeatTimeout > 0 {
		if o.maxPing > o.heartbeatTimeout/2 {
			return o, invalid("max ping interval %v must be at most half the heartbeat timeout %v", o.maxPing, o.heartbeatTimeout)
		}
	}
	if o.maxPing > 0 && o.minPing > o.maxPing {
		return o, invalid("ping interval range %v..%v is empty", o.minPing, o.maxPing)
	}
	return o, nil
}

// resolve fills in the defaults and refuses negative bounds.
func (c *Sessions) resolve() error {
	if c.Window < 0 || c.BufferBytes < 0 || c.MaxSuspended < 0 || c.MaxBytes < 0 {
		return invalid("sessions %+v have a negative field", *c)
	}
	if c.Window == 0 {
		c.Window = DefaultResumeWindow
	}
	if c.BufferBytes == 0 {
		c.BufferBytes = DefaultSessionBuffer
	}
	if c.MaxSuspended == 0 {
		c.MaxSuspended = DefaultMaxSuspended
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultSessionMemory
	}
	return nil
}

// debugEnabled reports whether log would print a debug line, so that the
// fields of per-frame debug lines are only built when they are printed.
func debugEnabled(log logrus.FieldLogger) bool {
	switch l := log.(type) {
	case *logrus.Entry:
		return l.Logger.IsLevelEnabled(logrus.DebugLevel)
	case *logrus.Logger:
		return l.IsLevelEnabled(logrus.DebugLevel)
	}
	return true
}
