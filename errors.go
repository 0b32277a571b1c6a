package vgo

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Sentinel errors. Match them with errors.Is: the errors vgo returns and
// reports to callbacks usually wrap one of these with more context.
var (
	// ErrInvalidOption is wrapped by the error NewClient and NewServer
	// return for a configuration they reject.
	ErrInvalidOption = errors.New("vgo: invalid option")

	// ErrClosed is returned by operations on a Client or Conn after Close.
	ErrClosed = errors.New("vgo: closed")

	// ErrNotConnected is returned by Client.Send while the client has no
	// live connection, and by Conn.Send before the connection is open (from
	// the authenticator).
	ErrNotConnected = errors.New("vgo: not connected")

	// ErrNotStarted is returned by Client.WaitConnected when Start has not
	// been called, since the client would never connect.
	ErrNotStarted = errors.New("vgo: client not started")

	// ErrGaveUp is reported when a client configured with WithMaxAttempts
	// has used up its dial attempts. It wraps the last dial error.
	ErrGaveUp = errors.New("vgo: gave up reconnecting")

	// ErrServerClosed is returned by Server.Serve and ListenAndServe after
	// Shutdown or Close.
	ErrServerClosed = errors.New("vgo: server closed")

	// ErrProtocol is wrapped by every error caused by a peer that broke the
	// wire protocol: an unknown frame type, a bad length, a bad hello.
	ErrProtocol = errors.New("vgo: protocol error")

	// ErrFrameTooLarge is returned by Send for a payload over the maximum
	// frame size, and wrapped when a peer announces such a frame.
	ErrFrameTooLarge = errors.New("vgo: frame too large")

	// ErrQueueFull is returned by TrySend when the connection's send queue
	// has no room, and counted by Broadcast as a connection not reached.
	ErrQueueFull = errors.New("vgo: send queue full")

	// ErrSlowConsumer is the cause of a disconnect when the peer did not
	// take what was sent to it: a write did not complete within the write
	// timeout, or the peer kept pinging without reading its pongs. It satisfies net.Error with
	// Timeout() == true.
	ErrSlowConsumer error = &timeoutError{"vgo: slow consumer"}

	// ErrBufferFull is returned by Client.Send while disconnected when the
	// send buffer has no room and its policy is BufferFailNew.
	ErrBufferFull = errors.New("vgo: send buffer full")

	// ErrUnauthorized is reported when the server's authenticator rejected
	// the client's credentials. The client stops, unless configured with
	// WithRetryOnAuthFailure; the error wraps the server's *CloseError.
	ErrUnauthorized = errors.New("vgo: unauthorized")

	// ErrHeartbeatTimeout reports a peer that stopped answering: a client
	// saw no frame within the pong timeout after a ping, or a server saw no
	// frame within its heartbeat timeout. It satisfies net.Error with
	// Timeout() == true.
	ErrHeartbeatTimeout error = &timeoutError{"vgo: heartbeat timeout"}

	// ErrSessionExpired ends a suspended session whose client did not
	// come back within the resume window (Sessions.Window).
	ErrSessionExpired = errors.New("vgo: session expired")

	// ErrSessionEvicted ends a suspended session pushed out by the bounds
	// on suspended sessions (Sessions.MaxSuspended, Sessions.MaxBytes).
	ErrSessionEvicted = errors.New("vgo: session evicted")

	// ErrHandshakeTimeout reports a hello exchange that did not complete
	// within the handshake timeout. It satisfies net.Error with
	// Timeout() == true.
	ErrHandshakeTimeout error = &timeoutError{"vgo: handshake timeout"}
)

// timeoutError is a sentinel that also satisfies net.Error, so code that
// checks for network timeouts treats vgo's timeouts the same way.
type timeoutError struct{ msg string }

func (e *timeoutError) Error() string   { return e.msg }
func (e *timeoutError) Timeout() bool   { return true }
func (e *timeoutError) Temporary() bool { return true }

// CloseCode says why a peer closed a connection with a close frame.
type CloseCode uint8

// Close codes carried by a close frame. PROTOCOL.md lists them on the wire.
const (
	CloseNormal        CloseCode = 0 // the peer is closing on purpose
	CloseGoingAway     CloseCode = 1 // the server is shutting down
	CloseProtocolError CloseCode = 2 // the peer broke the protocol
	CloseBadVersion    CloseCode = 3 // the protocol versions do not match
	CloseServerFull    CloseCode = 4 // the server is at its connection limit
	CloseUnauthorized  CloseCode = 5 // the server rejected the credentials
	CloseTryLater      CloseCode = 6 // the server is busy; the frame says when to retry
)

// String returns the code's name.
func (c CloseCode) String() string {
	switch c {
	case CloseNormal:
		return "normal"
	case CloseGoingAway:
		return "going away"
	case CloseProtocolError:
		return "protocol error"
	case CloseBadVersion:
		return "unsupported version"
	case CloseServerFull:
		return "server full"
	case CloseUnauthorized:
		return "unauthorized"
	case CloseTryLater:
		return "try later"
	}
	return fmt.Sprintf("code %d", uint8(c))
}

// CloseError is the cause of a disconnect when the peer sent a close frame
// before closing. Retrieve it with errors.As.
type CloseError struct {
	// Code says why, in a form programs can act on.
	Code CloseCode
	// Reason is the peer's explanation for people; it may be empty.
	Reason string
	// RetryAfter is how long a busy server asked the client to wait
	// before dialing again; it is set only with CloseTryLater.
	RetryAfter time.Duration
}

// Error returns the code and the reason in one line.
func (e *CloseError) Error() string {
	msg := "vgo: closed by peer: " + e.Code.String()
	if e.Reason != "" {
		msg += ": " + e.Reason
	}
	if e.RetryAfter > 0 {
		msg += " (retry after " + e.RetryAfter.String() + ")"
	}
	return msg
}

// chainError puts what happened in front of its cause, with the package
// prefix once however many the cause has: "vgo: read hello: connection
// closed by peer: EOF". It matches the cause and, if set, the sentinel is.
type chainError struct {
	what string
	is   error
	err  error
}

func (e *chainError) Error() string {
	return "vgo: " + e.what + ": " + strings.TrimPrefix(e.err.Error(), "vgo: ")
}

func (e *chainError) Unwrap() []error {
	if e.is == nil {
		return []error{e.err}
	}
	return []error{e.is, e.err}
}
