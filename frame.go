package vgo

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"unicode/utf8"
)

// The wire format is documented byte by byte in PROTOCOL.md; keep the two
// in step.

// frameType is the first byte of every frame.
type frameType uint8

const (
	frameHello frameType = 0x01
	frameData  frameType = 0x02
	framePing  frameType = 0x03
	framePong  frameType = 0x04
	frameClose frameType = 0x05
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
	maxHelloSize  = 1024
	maxPingSize   = 64
	maxReasonSize = 256

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
	fr := &frameReader{br: bufio.NewReader(r), maxData: maxData}
	if dr, ok := r.(*deadlineReader); ok {
		fr.count = &dr.frames
	}
	return fr
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

// readLarge reads a payload of n bytes, more than the read buffer holds. The
// buffer grows with the bytes that actually arrive, so a peer that announces
// a large frame and sends little of it costs little memory. A buffer larger
// than keepReadBuffer is not kept for the next frame.
func (r *frameReader) readLarge(n int) ([]byte, error) {
	if cap(r.buf) > keepReadBuffer {
		r.buf = nil
	}
	p := r.buf[:0]
	for len(p) < n {
		if len(p) == cap(p) {
			p = slices.Grow(p, min(n-len(p), max(len(p), 16<<10)))
		}
		m, err := r.br.Read(p[len(p):min(cap(p), n)])
		p = p[:len(p)+m]
		if err != nil {
			r.buf = p
			return nil, err
		}
	}
	r.buf = p
	return p, nil
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
}

func (h hello) marshal() []byte {
	b := make([]byte, 0, len(helloMagic)+1)
	b = append(b, helloMagic[:]...)
	return append(b, h.version)
}

func parseHello(p []byte) (hello, error) {
	if len(p) < len(helloMagic)+1 || [3]byte(p[:3]) != helloMagic {
		return hello{}, fmt.Errorf("%w: hello does not start with %q", ErrProtocol, helloMagic[:])
	}
	h := hello{version: p[3]}
	fields := p[4:]
	for len(fields) > 0 {
		if len(fields) < 3 {
			return hello{}, fmt.Errorf("%w: truncated hello field header", ErrProtocol)
		}
		n := int(binary.BigEndian.Uint16(fields[1:3]))
		if len(fields) < 3+n {
			return hello{}, fmt.Errorf("%w: hello field 0x%02x overruns the frame", ErrProtocol, fields[0])
		}
		// No field is defined in version 1; unknown fields are skipped.
		fields = fields[3+n:]
	}
	return h, nil
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
