package vgo

import (
	"sync/atomic"
	"time"
)

// ClientStats is a snapshot of a client's counters since NewClient.
type ClientStats struct {
	Dials        uint64 // dial attempts, each endpoint tried counting once
	FailedDials  uint64 // attempts that did not give a healthy connection, retry hints aside
	RetryHints   uint64 // attempts a busy server refused with a retry hint
	Reconnects   uint64 // connections made after the first
	Resumes      uint64 // connections that resumed the session (WithResume)
	SessionsLost uint64 // sessions that could not be resumed and were replaced

	MessagesIn  uint64 // data frames received
	MessagesOut uint64 // data frames accepted by Send
	BytesIn     uint64 // data payload bytes received
	BytesOut    uint64 // data payload bytes accepted by Send
	Dropped     uint64 // buffered messages dropped for newer ones (BufferDropOldest)
	Rejected    uint64 // messages the full send buffer refused

	RTTMin, RTTAvg, RTTMax time.Duration // over every pong so far
	RTTLast                time.Duration // of the latest pong

	Backoff        time.Duration // the wait in progress before a dial, or 0
	ConnectedSince time.Time     // when the live connection opened; zero without one
	Endpoint       string        // the address connected to, or being dialed
}

// ServerStats is a snapshot of a server's counters since NewServer.
type ServerStats struct {
	Accepted       uint64 // connections accepted, refused ones included
	Refused        uint64 // connections refused at the connection limit
	StaleClosed    uint64 // connections closed for want of a heartbeat
	ProtocolErrors uint64 // connections closed for breaking the protocol
	SlowConsumers  uint64 // connections closed for not taking what was sent
	Throttled      uint64 // connections refused with a retry hint (see WithAdmission)
	AuthFailures   uint64 // connections whose credentials were rejected
	Probes         uint64 // connections closed before a hello: health checks
	Resumes        uint64 // sessions resumed on a new connection
	Expired        uint64 // suspended sessions ended by their window or the bounds on them
	Suspended      int    // sessions waiting for their client to come back
	Live           int    // open connections and suspended sessions, as Len reports
}

// clientStats holds a client's counters; each is updated atomically, on
// the goroutine where its event happens.
type clientStats struct {
	dials, failedDials, hints, connects atomic.Uint64
	msgsIn, msgsOut, bytesIn, bytesOut  atomic.Uint64
	dropped, rejected                   atomic.Uint64
	resumes, sessionsLost               atomic.Uint64

	rttMin, rttMax, rttSum, rttLast atomic.Int64
	pongs                           atomic.Int64

	backoff        atomic.Int64 // nanoseconds
	connectedSince atomic.Int64 // Unix nanoseconds, 0 while disconnected
}

// rtt records the round trip measured by a pong. Pongs are recorded by one
// reader at a time, so the min and max need no compare-and-swap loop.
func (s *clientStats) rtt(d time.Duration) {
	n := int64(d)
	if s.pongs.Add(1) == 1 || n < s.rttMin.Load() {
		s.rttMin.Store(n)
	}
	if n > s.rttMax.Load() {
		s.rttMax.Store(n)
	}
	s.rttSum.Add(n)
	s.rttLast.Store(n)
}

func (s *clientStats) snapshot() ClientStats {
	st := ClientStats{
		Dials:        s.dials.Load(),
		FailedDials:  s.failedDials.Load(),
		RetryHints:   s.hints.Load(),
		MessagesIn:   s.msgsIn.Load(),
		MessagesOut:  s.msgsOut.Load(),
		BytesIn:      s.bytesIn.Load(),
		BytesOut:     s.bytesOut.Load(),
		Dropped:      s.dropped.Load(),
		Rejected:     s.rejected.Load(),
		Resumes:      s.resumes.Load(),
		SessionsLost: s.sessionsLost.Load(),
		RTTMin:       time.Duration(s.rttMin.Load()),
		RTTMax:       time.Duration(s.rttMax.Load()),
		RTTLast:      time.Duration(s.rttLast.Load()),
		Backoff:      time.Duration(s.backoff.Load()),
	}
	if n := s.connects.Load(); n > 1 {
		st.Reconnects = n - 1
	}
	if n := s.pongs.Load(); n > 0 {
		st.RTTAvg = time.Duration(s.rttSum.Load() / n)
	}
	if t := s.connectedSince.Load(); t != 0 {
		st.ConnectedSince = time.Unix(0, t)
	}
	return st
}

// serverStats holds a server's counters.
type serverStats struct {
	accepted, refused, throttled, stale, protocol, auth, slow, probes atomic.Uint64
	resumes, expired                                                  atomic.Uint64
}
