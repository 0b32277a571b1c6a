package vgo

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// The wire format is documented byte by byte in PROTOCOL.md; keep the two
// in step.

// frameType is the first byte of every frame.
type frameType uint8

const (
	frameHello    frameType = 0x01
	frameData     frameType = 0x02
	framePing     frameType = 0x03
	framePong     frameType = 0x04
	frameClose    frameType = 0x05
	frameGoodbye  frameType = 0x06
	frameFirst    frameType = 0x07 // the first fragment of a long message
	frameFragment frameType = 0x08 // a further fragment
	frameAck      frameType = 0x09 // how many of a session's messages were received
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
	case frameFirst:
		return "first fragment"
	case frameFragment:
		return "fragment"
	case frameAck:
		return "ack"
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
	// next to the magic, the version, the ping interval and the maximum
	// message size. A client with WithResume has 27 bytes less, the room
	// of the session it resumes.
	MaxCredentialsSize   = maxHelloSize - len("VGO") - 1 - 3 - 2*(3+4)
	maxResumeCredentials = MaxCredentialsSize - (3 + sessionFieldSize)
	maxPingSize          = 64
	maxReasonSize        = 256
)

// helloMagic opens every hello payload, so a peer that speaks another
// protocol is told apart from one that speaks another version of this one.
var helloMagic = [3]byte{'V', 'G', 'O'}

// maxPayload returns the largest payload a frame of type t may carry, or -1
// for a type this version does not know.
func maxPayload(t frameType, maxData int) int {
	switch t {
	case frameData, frameFragment:
		return maxData
	case frameFirst:
		return 4 + maxData
	case frameHello:
		return maxHelloSize
	case framePing, framePong:
		return maxPingSize
	case frameClose:
		return 1 + 4 + maxReasonSize // a try-later hint has 4 bytes more
	case frameGoodbye:
		return 4 + 1 // the flags byte goes only to a client with a session
	case frameAck:
		return 8
	}
	return -1
}

// protocolError is a peer's breach of the protocol. detail, without the
// "vgo: protocol error" prefix, becomes the reason of the close frame that
// answers it.
type protocolError struct {
	detail string
	err    error // a further sentinel it wraps, such as ErrFrameTooLarge
}

func protocolErrorf(format string, args ...any) error {
	return &protocolError{detail: fmt.Sprintf(format, args...)}
}

func (e *protocolError) Error() string        { return "vgo: protocol error: " + e.detail }
func (e *protocolError) Is(target error) bool { return target == ErrProtocol }
func (e *protocolError) Unwrap() error        { return e.err }

// frameReader decodes frames from a buffered stream and puts fragmented
// messages back together. The payload it returns aliases a buffer that the
// next call reuses or gives back to the pool.
type frameReader struct {
	// src is the stream: a link's deadlineReader, or in tests any reader.
	src io.Reader
	// buf holds bytes read from src, of which r:w are not yet decoded.
	// It comes from the pool (read.go).
	buf        []byte
	bufp       *[]byte
	r, w       int
	readIdleFn func(fd uintptr) bool
	readErr    error

	maxData int
	// handshake allows only a hello, or a close refusing one.
	handshake bool
	// frames counts the frames decoded, fragments included; the read
	// deadline and the client's heartbeat watch it from other goroutines.
	frames atomic.Uint64
	// more says the next frame is already buffered whole: replies to
	// what has been decoded are better gathered than written one by one.
	more atomic.Bool

	held *buffer // the pooled buffer of a payload handed out or a message being reassembled
	want int     // the length of the message being reassembled, -1 when there is none
}

func newFrameReader(r io.Reader, maxData int) *frameReader {
	return &frameReader{src: r, maxData: maxData, want: -1}
}

// newLinkReader returns the frame reader of a link, which reads from d.
func newLinkReader(d *deadlineReader) *frameReader {
	r := &frameReader{src: d, want: -1}
	d.frames = &r.frames
	return r
}

// next returns the next message or control frame. Fragments are not
// returned: their message is, once whole, as a data frame. It checks every
// type and length before it allocates anything, so a hostile length costs
// nothing, and grows a long message's buffer only as its bytes arrive. A
// stream that ends cleanly between frames returns io.EOF; one that ends
// inside a frame returns io.ErrUnexpectedEOF.
func (r *frameReader) next() (frameType, []byte, error) {
	if r.want < 0 {
		putBuffer(r.held)
		r.held = nil
	}
	for {
		t, p, err := r.frame()
		if err != nil {
			return 0, nil, err
		}
		switch {
		case t != frameFirst && t != frameFragment:
			return t, p, nil
		case len(r.held.b) < r.want:
			continue
		}
		r.want = -1
		return frameData, r.held.b, nil
	}
}

// frame reads one frame. A fragment's bytes go onto the message being
// reassembled, and p is nil.
func (r *frameReader) frame() (t frameType, p []byte, err error) {
	hdr, err := r.peek(headerSize)
	if err != nil {
		if len(hdr) > 0 && errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	t = frameType(hdr[0])
	n := int(binary.BigEndian.Uint32(hdr[1:]))
	if err := r.check(t, n); err != nil {
		return 0, nil, err
	}
	r.discard(headerSize)
	switch t {
	case frameFirst:
		err = r.first(n)
	case frameFragment:
		r.held.b, err = r.readInto(r.held.b, n)
	default:
		p, err = r.payload(n)
	}
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, nil, err
	}
	// Stores, not an add: the reader is the only writer, and a store
	// costs it no locked instruction per frame.
	r.frames.Store(r.frames.Load() + 1)
	if more := r.frameBuffered(); more != r.more.Load() {
		r.more.Store(more)
	}
	return t, p, nil
}

// check refuses a frame by its header: one that may not come now, or
// that is longer than its type allows.
func (r *frameReader) check(t frameType, n int) error {
	limit := maxPayload(t, r.maxData)
	switch {
	case limit < 0:
		return protocolErrorf("unknown frame type %s", t)
	case r.handshake && t != frameHello && t != frameClose:
		return protocolErrorf("expected hello, got %s frame", t)
	case t == frameData && r.want >= 0:
		return protocolErrorf("data frame inside a fragmented message")
	case t == frameFragment && r.want < 0:
		return protocolErrorf("fragment without a first fragment")
	case t == frameFragment && len(r.held.b)+n > r.want:
		return protocolErrorf("fragments exceed their message of %d bytes", r.want)
	case t == frameFirst && r.want >= 0:
		return protocolErrorf("first fragment inside a fragmented message")
	case t == frameFirst && n < 4:
		return protocolErrorf("first fragment of %d bytes has no message length", n)
	case n > limit:
		err := &protocolError{detail: fmt.Sprintf("%s frame of %d bytes exceeds limit of %d", t, n, limit)}
		if t == frameData || t == frameFirst || t == frameFragment {
			err.err = ErrFrameTooLarge
		}
		return err
	}
	return nil
}

// first starts a fragmented message with the first fragment, n bytes of
// which the header is already read. The message length is checked against
// the maximum before anything is allocated for it.
func (r *frameReader) first(n int) error {
	b, err := r.peek(4)
	if err != nil {
		return err
	}
	want := int(binary.BigEndian.Uint32(b))
	switch {
	case want > r.maxData:
		return &protocolError{
			detail: fmt.Sprintf("message of %d bytes exceeds limit of %d", want, r.maxData),
			err:    ErrFrameTooLarge,
		}
	case n-4 > want:
		return protocolErrorf("first fragment of %d bytes exceeds its message of %d", n-4, want)
	}
	r.discard(4)
	r.want = want
	r.held = getBuffer()
	r.held.b, err = r.readInto(r.held.b, n-4)
	return err
}

// payload reads a frame's n payload bytes. Small ones are handed out
// straight from the read buffer; larger ones are read into a pooled buffer.
func (r *frameReader) payload(n int) ([]byte, error) {
	if n <= readBufferSize {
		p, err := r.peek(n)
		if err != nil {
			return nil, err
		}
		r.discard(n)
		return p, nil
	}
	r.held = getBuffer()
	var err error
	r.held.b, err = r.readInto(r.held.b, n)
	return r.held.b, err
}

// readInto appends n bytes from the stream to p. It grows p as the bytes
// arrive, doubling at most, so that a peer that announces a long frame and
// sends little of it costs little memory.
func (r *frameReader) readInto(p []byte, n int) ([]byte, error) {
	end := len(p) + n
	for len(p) < end {
		if len(p) == cap(p) {
			p = slices.Grow(p, min(end-len(p), max(cap(p), readBufferSize)))
		}
		m, err := r.Read(p[len(p):min(cap(p), end)])
		p = p[:len(p)+m]
		if err != nil {
			return p, err
		}
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
	// maxMessage is the longest message the sender accepts. Its presence
	// also says that the sender reassembles fragmented messages; 0 when
	// absent.
	maxMessage int
	// minPing and maxPing bound the ping interval a server accepts; 0 for
	// no bound.
	minPing, maxPing time.Duration
	// heartbeatTimeout is how long a server lets a connection stay
	// silent; 0 when it never closes silent connections.
	heartbeatTimeout time.Duration
	// resume says a client asks for a session: to resume sessionID, or
	// a new one when that is zero. session says a server grants one,
	// sessionID. received is how many of the peer's messages in it the
	// sender has received.
	resume, session bool
	sessionID       sessionID
	received        uint64
}

// Hello field tags. PROTOCOL.md lists them.
const (
	tagCredentials      = 0x01 // client: opaque bytes
	tagPingInterval     = 0x02 // client: uint32 milliseconds
	tagMaxMessage       = 0x03 // both: uint32 bytes
	tagResume           = 0x04 // client: nothing, or a session id and a uint64 count
	tagPingRange        = 0x10 // server: two uint32 milliseconds, min and max
	tagHeartbeatTimeout = 0x11 // server: uint32 milliseconds
	tagSession          = 0x12 // server: a session id and a uint64 count
)

// sessionFieldSize is the size of a hello field that names a session and
// counts the messages received in it.
const sessionFieldSize = sessionIDSize + 8

func (h hello) marshal() []byte {
	b := make([]byte, 0, 48+len(h.credentials))
	b = append(b, helloMagic[:]...)
	b = append(b, h.version)
	if h.credentials != nil {
		b = appendField(b, tagCredentials, h.credentials)
	}
	if h.pingInterval > 0 {
		b = appendField(b, tagPingInterval, binary.BigEndian.AppendUint32(nil, millis(h.pingInterval)))
	}
	if h.maxMessage > 0 {
		b = appendField(b, tagMaxMessage, binary.BigEndian.AppendUint32(nil, uint32(h.maxMessage)))
	}
	if h.minPing > 0 || h.maxPing > 0 {
		r := binary.BigEndian.AppendUint32(nil, millis(h.minPing))
		b = appendField(b, tagPingRange, binary.BigEndian.AppendUint32(r, millis(h.maxPing)))
	}
	if h.heartbeatTimeout > 0 {
		b = appendField(b, tagHeartbeatTimeout, binary.BigEndian.AppendUint32(nil, millis(h.heartbeatTimeout)))
	}
	switch {
	case h.resume && h.sessionID == (sessionID{}):
		b = appendField(b, tagResume, nil)
	case h.resume:
		b = appendField(b, tagResume, h.sessionField())
	case h.session:
		b = appendField(b, tagSession, h.sessionField())
	}
	return b
}

func (h hello) sessionField() []byte {
	return binary.BigEndian.AppendUint64(append([]byte(nil), h.sessionID[:]...), h.received)
}

func appendField(b []byte, tag byte, value []byte) []byte {
	b = append(b, tag)
	b = binary.BigEndian.AppendUint16(b, uint16(len(value)))
	return append(b, value...)
}

// millis converts d to whole milliseconds for the wire, rounding up so that
// a positive duration never becomes 0, and saturating at the largest
// uint32.
func millis(d time.Duration) uint32 {
	ms := d / time.Millisecond
	if d%time.Millisecond > 0 {
		ms++
	}
	return uint32(min(ms, math.MaxUint32))
}

// helloField describes a known hello field: who may send it and how long
// its value is (-1 for any length).
type helloField struct {
	fromClient, fromServer bool
	size                   int
}

var helloFields = map[byte]helloField{
	tagCredentials:      {fromClient: true, size: -1},
	tagPingInterval:     {fromClient: true, size: 4},
	tagMaxMessage:       {fromClient: true, fromServer: true, size: 4},
	tagPingRange:        {fromServer: true, size: 8},
	tagHeartbeatTimeout: {fromServer: true, size: 4},
	tagResume:           {fromClient: true, size: -1},
	tagSession:          {fromServer: true, size: sessionFieldSize},
}

// parseHello decodes a hello sent by a server (fromServer) or a client.
// A known field sent twice, sent by the wrong side, of the wrong size, or
// with a zero where only a positive value means anything is a protocol
// error; unknown fields are skipped.
func parseHello(p []byte, fromServer bool) (hello, error) {
	if len(p) < len(helloMagic)+1 || [3]byte(p[:3]) != helloMagic {
		return hello{}, protocolErrorf("hello does not start with %q", helloMagic[:])
	}
	h := hello{version: p[3]}
	if h.version != ProtocolVersion {
		// The fields of another version are that version's business:
		// the caller rejects the version itself.
		return h, nil
	}
	var seen [256]bool
	fields := p[4:]
	for len(fields) > 0 {
		if len(fields) < 3 {
			return hello{}, protocolErrorf("truncated hello field header")
		}
		tag, n := fields[0], int(binary.BigEndian.Uint16(fields[1:3]))
		if len(fields) < 3+n {
			return hello{}, protocolErrorf("hello field 0x%02x overruns the frame", tag)
		}
		v := fields[3 : 3+n]
		fields = fields[3+n:]
		f, known := helloFields[tag]
		switch {
		case !known:
			continue
		case seen[tag]:
			return hello{}, protocolErrorf("hello field 0x%02x sent twice", tag)
		case fromServer && !f.fromServer, !fromServer && !f.fromClient:
			return hello{}, protocolErrorf("hello field 0x%02x may not be sent by a %s", tag, side(fromServer))
		case f.size >= 0 && n != f.size:
			return hello{}, protocolErrorf("hello field 0x%02x has %d bytes, want %d", tag, n, f.size)
		}
		seen[tag] = true
		switch tag {
		case tagCredentials:
			h.credentials = append([]byte{}, v...)
			continue
		case tagPingRange:
			h.minPing = time.Duration(binary.BigEndian.Uint32(v)) * time.Millisecond
			h.maxPing = time.Duration(binary.BigEndian.Uint32(v[4:])) * time.Millisecond
			continue
		case tagResume, tagSession:
			if n != 0 && n != sessionFieldSize {
				return hello{}, protocolErrorf("hello field 0x%02x has %d bytes, want 0 or %d", tag, n, sessionFieldSize)
			}
			h.resume, h.session = tag == tagResume, tag == tagSession
			if n > 0 {
				h.sessionID = sessionID(v[:sessionIDSize])
				h.received = binary.BigEndian.Uint64(v[sessionIDSize:])
				if h.sessionID == (sessionID{}) {
					return hello{}, protocolErrorf("hello field 0x%02x names the zero session", tag)
				}
			}
			continue
		}
		u := binary.BigEndian.Uint32(v)
		if u == 0 {
			return hello{}, protocolErrorf("hello field 0x%02x is zero", tag)
		}
		switch tag {
		case tagPingInterval:
			h.pingInterval = time.Duration(u) * time.Millisecond
		case tagMaxMessage:
			h.maxMessage = int(min(uint64(u), math.MaxInt))
		case tagHeartbeatTimeout:
			h.heartbeatTimeout = time.Duration(u) * time.Millisecond
		}
	}
	return h, nil
}

func side(server bool) string {
	if server {
		return "server"
	}
	return "client"
}

// goodbyeEndsSession is the flag of a goodbye that tells a client with a
// session that the session ends with the server.
const goodbyeEndsSession = 0x01

// parseGoodbye returns the window over which a departing server asks its
// clients to spread their reconnects, and whether it ends their sessions.
func parseGoodbye(p []byte) (window time.Duration, endsSession bool) {
	if len(p) < 4 {
		return 0, false
	}
	window = time.Duration(binary.BigEndian.Uint32(p)) * time.Millisecond
	return window, len(p) > 4 && p[4]&goodbyeEndsSession != 0
}

// marshalClose encodes a close frame's payload.
func marshalClose(code CloseCode, reason string) []byte {
	return appendReason([]byte{byte(code)}, reason)
}

// marshalTryLater encodes the payload of a close frame that asks the client
// to dial again after retryAfter: the code, the wait in milliseconds as a
// uint32, then the reason.
func marshalTryLater(retryAfter time.Duration, reason string) []byte {
	return appendReason(binary.BigEndian.AppendUint32([]byte{byte(CloseTryLater)}, millis(retryAfter)), reason)
}

// appendReason appends a close frame's reason to b, made valid UTF-8 and
// cut, at a character boundary, to the room the frame has.
func appendReason(b []byte, reason string) []byte {
	reason = strings.ToValidUTF8(reason, "\uFFFD")
	if len(reason) > maxReasonSize {
		cut := maxReasonSize
		for cut > 0 && !utf8.RuneStart(reason[cut]) {
			cut--
		}
		reason = reason[:cut]
	}
	return append(b, reason...)
}

// parseClose decodes a close frame's payload. A reason that is not valid
// UTF-8 has its bad bytes replaced with U+FFFD rather than failing: the
// connection is ending either way.
func parseClose(p []byte) *CloseError {
	if len(p) == 0 {
		return &CloseError{Code: CloseNormal}
	}
	e := &CloseError{Code: CloseCode(p[0])}
	p = p[1:]
	if e.Code == CloseTryLater && len(p) >= 4 {
		e.RetryAfter = time.Duration(binary.BigEndian.Uint32(p)) * time.Millisecond
		p = p[4:]
	}
	e.Reason = strings.ToValidUTF8(string(p), "\uFFFD")
	return e
}
