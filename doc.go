// Package vgo keeps long-lived TCP connections alive across real network
// failures: servers that die and come back, links that go silent without a
// FIN or RST, peers that send garbage.
//
// A Client dials a Server, exchanges a hello, then pings on an interval.
// When the connection fails, for whatever reason, the client tears it down
// once, reports the cause once, and dials again with exponential backoff
// and jitter until it is closed. A Server accepts connections, answers
// pings, hands data frames to a handler, and closes peers that go silent.
// Every message travels in a length-prefixed frame; PROTOCOL.md describes
// the wire format.
//
// # Heartbeat
//
// A connected client sends a ping every ping interval (WithPingInterval) and
// declares the link dead when no frame at all has arrived within the pong
// timeout (WithPongTimeout) after the oldest unanswered ping. A dead link is
// therefore detected at most interval + timeout after the last frame that
// got through. Each pong also measures the round-trip time (Client.RTT).
//
// The server does not ping. Every read of a connection carries a deadline
// of now + heartbeat timeout (WithHeartbeatTimeout), so a client that sends
// nothing, not even pings, for that long is closed as stale. Set the
// heartbeat timeout to two or three of the clients' ping intervals.
//
// # Reconnect
//
// The client dials at once on Start, and after a failure waits according to
// its Backoff before the next attempt: by default a quarter of a second at
// first, growing to at most five, so a client is back within a few seconds
// of its server. The backoff restarts only after a connection has proven
// healthy by completing its hello and receiving any frame after it, so a
// server that accepts and drops at once does not cause a dial storm. By
// default the client never gives up; WithMaxAttempts makes it stop with
// ErrGaveUp.
//
// A server protects itself from a fleet that returns at once: beyond a bound
// on connections in their handshake (WithAdmission) it answers a dial at
// once with a close frame that says when to come back (CloseTryLater), and
// the client waits that long instead of a step of its backoff. A server that
// shuts down gracefully asks its clients to spread their return over a
// window (WithDrainWindow).
//
// # Connections
//
// On the server each client is a *Conn. It carries what the server knows
// of the client: its ID (Server.Conn finds an open connection by it), its
// address, the real one behind a load balancer that sends the PROXY
// protocol (WithProxyProtocol), its TLS state, the identity the
// authenticator gave it (WithAuthenticator), a slot for the application's
// own value, and a context that ends with the connection, or with the
// session when it has one.
//
// # Sessions
//
// Without a session, the messages a connection carries when it dies are
// lost with it. A server with WithSessions and a client with WithResume
// share a session that outlives their connections: each side keeps the
// messages it sent until the other acknowledges them, and after a
// reconnect sends again exactly those the other lacks, so each application
// receives every message of the other once and in order. A connection that
// fails without a close frame suspends the session on the server for the
// resume window (Sessions); the client resumes it when it reconnects, and
// the session keeps its Conn, ID and context. A close frame, Server.Shutdown
// or Close, the window passing and the bounds on suspended sessions end it.
// Sessions live in the server's memory, so a restart loses them. A client
// that cannot resume starts a new session and hands the messages the
// server may not have to WithOnSessionLost: the application then
// resynchronises with its source of truth.
//
// # Concurrency
//
// Client, Server and Conn methods are safe for concurrent use. Each
// connection has exactly one reader goroutine and one write path: Send,
// the pinger, the reader's pongs and every teardown queue frames, and one
// writer at a time writes them in order. That is a writer goroutine,
// running only while there is something to write, each of its writes
// bounded by the write timeout; or, on a plain TCP connection that is idle
// and has just received something, the sender itself, with one write that
// never waits (what the socket does not take goes to the writer
// goroutine), so that a reply leaves without waking another goroutine.
// Pings, pongs and acks go ahead of queued data and between the fragments
// of a long message, so nothing that keeps time ever waits on the socket.
// An idle connection holds no read buffer on a plain TCP socket, and its
// reader waits with a small stack. Callbacks run on the library's
// goroutines but never under its locks, and those of one client arrive in
// order: connect, then messages and pongs, then disconnect, then reconnect
// attempts. A message callback runs on the reader, so a slow callback slows
// that connection's reads; the bytes it is handed are valid only until it
// returns.
//
// Close on a Client or Server returns only after every goroutine it started
// has exited, so it must not be called from that client's or server's own
// callbacks; Conn.Close may be.
//
// # Errors
//
// Errors wrap the sentinels in this package (ErrNotConnected, ErrGaveUp,
// ErrProtocol, ErrHeartbeatTimeout, ...) with context: match them with
// errors.Is, and a peer's close frame with errors.As and *CloseError. The
// timeout errors satisfy net.Error. A peer that breaks the protocol loses its
// own connection and nothing else.
package vgo
