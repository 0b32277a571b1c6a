package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// Frame types and sizes of the wire protocol, PROTOCOL.md.
const (
	frameHello = 0x01
	frameData  = 0x02
	framePing  = 0x03
	framePong  = 0x04
	frameClose = 0x05

	headerSize   = 5
	maxHelloSize = 1024
	maxPingSize  = 64
	maxCloseSize = 261
	maxDataSize  = 1 << 20

	closeProtocolError = 0x02
	closeBadVersion    = 0x03
)

// helloPrefix starts every hello payload: the magic "VGO" and version 1.
var helloPrefix = []byte{'V', 'G', 'O', 1}

// plainHelloFrame is the plain server's hello: like a vgo server's with its
// defaults, it accepts ping intervals up to a third of its heartbeat
// timeout (tag 10) and announces that timeout (tag 11). It leaves out the
// maximum message size (tag 03), whose presence would claim that it
// reassembles fragmented messages.
var plainHelloFrame = func() []byte {
	p := append([]byte(nil), helloPrefix...)
	p = append(p, 0x10, 0, 8)
	p = binary.BigEndian.AppendUint32(p, 0)
	p = binary.BigEndian.AppendUint32(p, uint32((heartbeatTimeout / 3).Milliseconds()))
	p = append(p, 0x11, 0, 4)
	p = binary.BigEndian.AppendUint32(p, uint32(heartbeatTimeout.Milliseconds()))
	return appendFrame(nil, frameHello, p)
}()

// handshakeTimeout bounds the plain server's wait for a client's hello, as
// vgo's default handshake timeout does.
const handshakeTimeout = 5 * time.Second

func appendFrame(dst []byte, t byte, payload []byte) []byte {
	dst = append(dst, t)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
	return append(dst, payload...)
}

// plainServer serves the protocol the way a careful engineer would without
// vgo: one goroutine per connection, a bufio.Reader and a bufio.Writer of
// the default 4 KiB each, and a read deadline so that a silent peer is
// dropped.
type plainServer struct {
	log   *logrus.Entry
	conns atomic.Int64 // connections past their handshake
}

// serve accepts connections until the listener is closed.
func (s *plainServer) serve(ln net.Listener) error {
	for {
		nc, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return err
		}
		go s.handle(nc)
	}
}

// handle serves one connection until it fails or its peer closes it.
func (s *plainServer) handle(nc net.Conn) {
	defer nc.Close()
	r := bufio.NewReader(nc)
	w := bufio.NewWriter(nc)
	if err := s.handshake(nc, r, w); err != nil {
		return
	}
	s.conns.Add(1)
	defer s.conns.Add(-1)
	var big []byte // payloads that do not fit in the read buffer
	for {
		if r.Buffered() == 0 {
			// Any complete frame counts as a sign of life; bytes of an
			// unfinished one do not push the deadline forward.
			if err := nc.SetReadDeadline(time.Now().Add(heartbeatTimeout)); err != nil {
				return
			}
		}
		hdr, err := r.Peek(headerSize)
		if err != nil {
			return
		}
		t, n := hdr[0], binary.BigEndian.Uint32(hdr[1:])
		var limit uint32
		switch t {
		case frameData:
			limit = maxDataSize
		case framePing, framePong:
			limit = maxPingSize
		case frameClose:
			return
		default:
			s.refuse(nc, w, closeProtocolError, fmt.Sprintf("unexpected frame type 0x%02x", t))
			return
		}
		if n > limit {
			s.refuse(nc, w, closeProtocolError, fmt.Sprintf("frame of %d bytes, limit %d", n, limit))
			return
		}
		var p []byte
		inPlace := headerSize+int(n) <= r.Size()
		if inPlace {
			b, err := r.Peek(headerSize + int(n))
			if err != nil {
				return
			}
			p = b[headerSize:]
		} else {
			_, _ = r.Discard(headerSize)
			if cap(big) < int(n) {
				big = make([]byte, n)
			}
			p = big[:n]
			if _, err := io.ReadFull(r, p); err != nil {
				return
			}
		}
		switch t {
		case frameData:
			err = writeFrame(w, frameData, p)
		case framePing:
			err = writeFrame(w, framePong, p)
		}
		if err != nil {
			return
		}
		if inPlace {
			_, _ = r.Discard(headerSize + int(n))
		}
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return
			}
		}
	}
}

// handshake reads the client's hello and answers it with the server's.
func (s *plainServer) handshake(nc net.Conn, r *bufio.Reader, w *bufio.Writer) error {
	if err := nc.SetReadDeadline(time.Now().Add(handshakeTimeout)); err != nil {
		return err
	}
	hdr, err := r.Peek(headerSize)
	if err != nil {
		return err
	}
	n := binary.BigEndian.Uint32(hdr[1:])
	if hdr[0] != frameHello || n < uint32(len(helloPrefix)) || n > maxHelloSize {
		s.refuse(nc, w, closeProtocolError, "expected a hello")
		return errors.New("no hello")
	}
	b, err := r.Peek(headerSize + int(n))
	if err != nil {
		return err
	}
	p := b[headerSize:]
	if string(p[:3]) != string(helloPrefix[:3]) {
		s.refuse(nc, w, closeProtocolError, "hello does not start with \"VGO\"")
		return errors.New("bad hello")
	}
	if p[3] != helloPrefix[3] {
		s.refuse(nc, w, closeBadVersion, "server speaks version 1")
		return errors.New("bad version")
	}
	_, _ = r.Discard(headerSize + int(n))
	if _, err := w.Write(plainHelloFrame); err != nil {
		return err
	}
	return w.Flush()
}

// refuse sends a close frame, best effort, before the connection is closed.
func (s *plainServer) refuse(nc net.Conn, w *bufio.Writer, code byte, reason string) {
	s.log.WithFields(logrus.Fields{"peer": nc.RemoteAddr().String(), "code": code, "reason": reason}).Warn("protocol error")
	_ = nc.SetWriteDeadline(time.Now().Add(250 * time.Millisecond))
	_ = writeFrame(w, frameClose, append([]byte{code}, reason...))
	_ = w.Flush()
}

// writeFrame writes one frame to w without flushing it.
func writeFrame(w *bufio.Writer, t byte, p []byte) error {
	var hdr [headerSize]byte
	hdr[0] = t
	binary.BigEndian.PutUint32(hdr[1:], uint32(len(p)))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := w.Write(p)
	return err
}
