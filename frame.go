package vgo

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"time"
	"unicode/utf8"
)

// The wire format is documented byte by byte in PROTOCOL.md; keep the two
// in step.

// frameType is the first byte of every frame.
type frameType uint8

const (
	frameHello   frameType = 0x01
	frameData    frameType = 0x02
	framePing    frameType = 0x03
	framePong    frameType = 0x04
	frameClose   frameType = 0x05
	frameGoodbye frameType = 0x06
)

func (t frameType) String() string {
	switch t {
	case frameHello:
		return "hello"
	case frameData:
		return "data"
	case framePing:
		return "ping"
	case framePong:
		return "pong"
	case frameClose:
		return "close"
	case frameGoodbye:
		return "goodbye"
	}
	return fmt.Sprintf("0x%02x", uint8(t))
}

const (
	// headerSize is one type byte and a big-endian uint32 payload length.
	headerSize = 5

	// ProtocolVersion is the wire protocol version this package speaks. It
	// is sent in the hello; a server closes a connection whose hello
	// carries another version.
	ProtocolVersion = 1

	// Control frames have small fixed limits of their own, so that only data
	// frames can make a peer allocate up to the maximum frame size.
	maxHelloSize = 1024

	// MaxCredentialsSize is the most credentials a hello has room for,
	// next to the magic, the version and the ping interval.
	MaxCredentialsSize = maxHelloSize - len("VGO") - 1 - 3 - (3 + 4)
	maxPingSize        = 64
	maxReasonSize      = 256

	// keepReadBuffer is the largest payload buffer a connection keeps
	// between frames.
	keepReadBuffer = 64 << 10
)

// helloMagic opens every hello payload, so a peer that speaks another
// protocol is told apart from one that speaks another version of this one.
var helloMagic = [3]byte{'V', 'G', 'O'}

// maxPayload returns the largest payload a frame of type t may carry, or -1
// for a type this version does not know.
func maxPayload(t frameType, maxData int) int {
	switch t {
	case frameData:
		return maxData
	case frameHello:
		return maxHelloSize
	case framePing, framePong:
		return maxPingSize
	case frameClose:
		return 1 + maxReasonSize
	case frameGoodbye:
		return 4
	}
	return -1
}

// frameReader decodes frames from a buffered stream. The payload it returns
// aliases an internal buffer that the next call overwrites.
type frameReader struct {
	br      *bufio.Reader
	maxData int
	buf     []byte  // for payloads larger than br's buffer
	count   *uint64 // incremented for each frame decoded, if set
}

func newFrameReader(r io.Reader, maxData int) *frameReader {
	return &frameReader{br: bufio.NewReader(r), maxData: maxData}
}

// next reads one frame. It checks the type and the announced length before
// it allocates anything, so a hostile length costs nothing. A stream that
// ends cleanly between frames returns io.EOF; one that ends inside a frame
// returns io.ErrUnexpectedEOF.
func (r *frameReader) next() (frameType, []byte, error) {
	hdr, err := r.br.Peek(headerSize)
	if err != nil {
		if len(hdr) > 0 && errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	t := frameType(hdr[0])
	n := binary.BigEndian.Uint32(hdr[1:])
	limit := maxPayload(t, r.maxData)
	if limit < 0 {
		return 0, nil, fmt.Errorf("%w: unknown frame type %s", ErrProtocol, t)
	}
	if uint64(n) > uint64(limit) {
		err := fmt.Errorf("%w: %s frame of %d bytes exceeds limit of %d", ErrProtocol, t, n, limit)
		if t == frameData {
			err = fmt.Errorf("%w: %w", err, ErrFrameTooLarge)
		}
		return 0, nil, err
	}
	_, _ = r.br.Discard(headerSize) // cannot fail: the bytes are buffered
	var p []byte
	if int(n) <= r.br.Size() {
		// Small frames are handed out straight from the read buffer.
		p, err = r.br.Peek(int(n))
		if err == nil {
			_, _ = r.br.Discard(int(n))
		}
	} else {
		p, err = r.readLarge(int(n))
	}
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	if r.count != nil {
		*r.count++
	}
	return t, p, nil
}

// readLarge reads a payload of n bytes, more than the read buffer holds. A
// new buffer starts at no more than keepReadBuffer and doubles as bytes
// arrive, so a peer that announces a large frame and sends little of it
// costs little memory. Buffers up to keepReadBuffer are kept for the next
// frame; larger ones are left to the collector once the frame is handled.
func (r *frameReader) readLarge(n int) ([]byte, error) {
	p := r.buf[:0]
	if cap(p) < n {
		p = make([]byte, 0, min(n, keepReadBuffer))
	}
	for len(p) < n {
		if len(p) == cap(p) {
			p = slices.Grow(p, min(n, 2*cap(p))-len(p))
		}
		m, err := r.br.Read(p[len(p):min(cap(p), n)])
		p = p[:len(p)+m]
		if err != nil {
			return nil, err
		}
	}
	if cap(p) <= keepReadBuffer {
		r.buf = p
	} else {
		r.buf = nil
	}
	return p, nil
}

// checkPayload refuses a data payload over the sender's own limit, before
// anything is written.
func checkPayload(p []byte, maxData int) error {
	if len(p) > maxData {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, len(p), maxData)
	}
	return nil
}

// appendFrame appends one encoded frame to dst.
func appendFrame(dst []byte, t frameType, payload []byte) []byte {
	dst = append(dst, byte(t))
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
	return append(dst, payload...)
}

// hello is the content of a hello frame. Fields after the version are
// encoded as tag-length-value records; a reader skips tags it does not know,
// so later versions can add fields without breaking older peers.
type hello struct {
	version uint8
	// credentials is what a client presents to the server's authenticator.
	credentials []byte
	// pingInterval is the client's ping interval, 0 when it does not ping.
	pingInterval time.Duration
	// minPing and maxPing bound the ping interval a server accepts; 0 for
	// no bound.
	minPing, maxPing time.Duration
}

// Hello field tags. PROTOCOL.md lists them.
const (
	tagCredentials  = 0x01 // client: opaque bytes
	tagPingInterval = 0x02 // client: uint32 milliseconds
	tagPingRange    = 0x10 // server: two uint32 milliseconds, min and max
)

func (h hello) marshal() []byte {
	b := make([]byte, 0, 16+len(h.credentials))
	b = append(b, helloMagic[:]...)
	b = append(b, h.version)
	if h.credentials != nil {
		b = appendField(b, tagCredentials, h.credentials)
	}
	if h.pingInterval > 0 {
		b = appendField(b, tagPingInterval, binary.BigEndian.AppendUint32(nil, millis(h.pingInterval)))
	}
	if h.minPing > 0 || h.maxPing > 0 {
		r := binary.BigEndian.AppendUint32(nil, millis(h.minPing))
		b = appendField(b, tagPingRange, binary.BigEndian.AppendUint32(r, millis(h.maxPing)))
	}
	return b
}

func appendField(b []byte, tag byte, value []byte) []byte {
	b = append(b, tag)
	b = binary.BigEndian.AppendUint16(b, uint16(len(value)))
	return append(b, value...)
}

// millis converts d to whole milliseconds for the wire, rounding up so that
// a positive duration never becomes 0.
func millis(d time.Duration) uint32 {
	return uint32(min((d+time.Millisecond-1)/time.Millisecond, math.MaxUint32))
}

func parseHello(p []byte) (hello, error) {
	if len(p) < len(helloMagic)+1 || [3]byte(p[:3]) != helloMagic {
		return hello{}, fmt.Errorf("%w: hello does not start with %q", ErrProtocol, helloMagic[:])
	}
	h := hello{version: p[3]}
	if h.version != ProtocolVersion {
		// The fields of another version are that version's business:
		// the caller rejects the version itself.
		return h, nil
	}
	fields := p[4:]
	for len(fields) > 0 {
		if len(fields) < 3 {
			return hello{}, fmt.Errorf("%w: truncated hello field header", ErrProtocol)
		}
		tag, n := fields[0], int(binary.BigEndian.Uint16(fields[1:3]))
		if len(fields) < 3+n {
			return hello{}, fmt.Errorf("%w: hello field 0x%02x overruns the frame", ErrProtocol, tag)
		}
		v := fields[3 : 3+n]
		fields = fields[3+n:]
		switch {
		case tag == tagCredentials:
			h.credentials = append([]byte{}, v...)
		case tag == tagPingInterval && n == 4:
			h.pingInterval = time.Duration(binary.BigEndian.Uint32(v)) * time.Millisecond
		case tag == tagPingRange && n == 8:
			h.minPing = time.Duration(binary.BigEndian.Uint32(v)) * time.Millisecond
			h.maxPing = time.Duration(binary.BigEndian.Uint32(v[4:])) * time.Millisecond
		case tag == tagPingInterval || tag == tagPingRange:
			return hello{}, fmt.Errorf("%w: hello field 0x%02x has %d bytes", ErrProtocol, tag, n)
		}
	}
	return h, nil
}

// parseGoodbye returns the window over which a departing server asks its
// clients to spread their reconnects.
func parseGoodbye(p []byte) time.Duration {
	if len(p) < 4 {
		return 0
	}
	return time.Duration(binary.BigEndian.Uint32(p)) * time.Millisecond
}

func marshalClose(code CloseCode, reason string) []byte {
	if len(reason) > maxReasonSize {
		cut := maxReasonSize
		for cut > 0 && !utf8.RuneStart(reason[cut]) {
			cut--
		}
		reason = reason[:cut]
	}
	return append([]byte{byte(code)}, reason...)
}

func parseClose(p []byte) *CloseError {
	if len(p) == 0 {
		return &CloseError{Code: CloseNormal}
	}
	return &CloseError{Code: CloseCode(p[0]), Reason: string(p[1:])}
}
