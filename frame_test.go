package vgo

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func header(t frameType, n uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte{byte(t)}, n)
}

func TestFrameReader(t *testing.T) {
	const max = 16
	tests := []struct {
		name    string
		in      []byte
		typ     frameType
		payload []byte
		err     error
	}{
		{"zero-length data", header(frameData, 0), frameData, []byte{}, nil},
		{"max-length data", appendFrame(nil, frameData, bytes.Repeat([]byte{7}, max)), frameData, bytes.Repeat([]byte{7}, max), nil},
		{"max+1 data", header(frameData, max+1), 0, nil, ErrFrameTooLarge},
		{"4 GiB data", header(frameData, 0xFFFFFFFF), 0, nil, ErrFrameTooLarge},
		{"ping", appendFrame(nil, framePing, []byte("12345678")), framePing, []byte("12345678"), nil},
		{"oversized ping", header(framePing, maxPingSize+1), 0, nil, ErrProtocol},
		{"oversized hello", header(frameHello, maxHelloSize+1), 0, nil, ErrProtocol},
		{"unknown type", header(0x7f, 0), 0, nil, ErrProtocol},
		{"type zero", header(0, 0), 0, nil, ErrProtocol},
		{"empty stream", nil, 0, nil, io.EOF},
		{"truncated header", []byte{byte(frameData), 0, 0}, 0, nil, io.ErrUnexpectedEOF},
		{"truncated payload", append(header(frameData, 4), 1, 2), 0, nil, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newFrameReader(bytes.NewReader(tt.in), max)
			typ, p, err := r.next()
			if tt.err != nil {
				require.ErrorIs(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.typ, typ)
			assert.Equal(t, string(tt.payload), string(p))
		})
	}
}

func TestFrameReaderSplitAndMergedReads(t *testing.T) {
	// TCP may deliver several frames in one read or one frame across many:
	// the reader must see the same frames either way.
	var stream []byte
	for i := range 50 {
		stream = appendFrame(stream, frameData, bytes.Repeat([]byte{byte(i)}, i))
	}
	for _, chunk := range []int{1, 3, 7, len(stream)} {
		r := newFrameReader(&chunkReader{data: stream, n: chunk}, 64)
		for i := range 50 {
			typ, p, err := r.next()
			require.NoError(t, err, "chunk %d frame %d", chunk, i)
			assert.Equal(t, frameData, typ)
			assert.Equal(t, string(bytes.Repeat([]byte{byte(i)}, i)), string(p))
		}
		_, _, err := r.next()
		assert.ErrorIs(t, err, io.EOF)
	}
}

// chunkReader returns at most n bytes per Read.
type chunkReader struct {
	data []byte
	n    int
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), r.n)], r.data)
	r.data = r.data[n:]
	return n, nil
}

func TestParseHello(t *testing.T) {
	h, err := parseHello(hello{version: ProtocolVersion}.marshal(), false)
	require.NoError(t, err)
	assert.Equal(t, uint8(ProtocolVersion), h.version)

	// Fields a later version may add are skipped.
	withFields := append(hello{version: 3}.marshal(), 0x70, 0, 2, 'h', 'i', 0x71, 0, 0)
	h, err = parseHello(withFields, false)
	require.NoError(t, err)
	assert.Equal(t, uint8(3), h.version)

	// Another version's fields are not judged by this version's rules: the
	// version is rejected as such.
	h, err = parseHello(append(hello{version: 2}.marshal(), tagPingInterval, 0, 3, 1, 2, 3), false)
	require.NoError(t, err)
	assert.Equal(t, uint8(2), h.version)

	for name, p := range map[string][]byte{
		"empty":           nil,
		"magic only":      []byte("VGO"),
		"wrong magic":     []byte("HTTP/1.1"),
		"truncated field": append(hello{version: 1}.marshal(), 0x10, 0),
		"field overruns":  append(hello{version: 1}.marshal(), 0x10, 0, 9, 'x'),
	} {
		_, err := parseHello(p, true)
		assert.ErrorIs(t, err, ErrProtocol, name)
	}

	// The session fields: a client asks with tag 04, empty or naming a
	// session; a server grants with tag 12, always naming one.
	resume := hello{version: 1, resume: true, sessionID: sessionID{7}, received: 3}.marshal()
	h, err = parseHello(resume, false)
	require.NoError(t, err)
	assert.Equal(t, hello{version: 1, resume: true, sessionID: sessionID{7}, received: 3}, h)
	for name, tc := range map[string]struct {
		p          []byte
		fromServer bool
	}{
		"resume from a server":  {resume, true},
		"session from a client": {hello{version: 1, session: true, sessionID: sessionID{7}}.marshal(), false},
		"resume of 5 bytes":     {appendField(hello{version: 1}.marshal(), tagResume, make([]byte, 5)), false},
		"empty session":         {appendField(hello{version: 1}.marshal(), tagSession, nil), true},
		"the zero session":      {appendField(hello{version: 1}.marshal(), tagResume, make([]byte, sessionFieldSize)), false},
	} {
		_, err := parseHello(tc.p, tc.fromServer)
		assert.ErrorIs(t, err, ErrProtocol, name)
	}
}

func TestGoodbyeFlags(t *testing.T) {
	window, ends := parseGoodbye([]byte{0, 0, 0x13, 0x88})
	assert.Equal(t, 5*time.Second, window)
	assert.False(t, ends)
	window, ends = parseGoodbye([]byte{0, 0, 0, 0, goodbyeEndsSession})
	assert.Zero(t, window)
	assert.True(t, ends)
}

func TestCloseFrame(t *testing.T) {
	ce := parseClose(marshalClose(CloseServerFull, "full"))
	assert.Equal(t, &CloseError{Code: CloseServerFull, Reason: "full"}, ce)
	assert.Equal(t, &CloseError{Code: CloseNormal}, parseClose(nil))
	assert.Equal(t, "vgo: closed by peer: normal", parseClose(nil).Error())

	long := marshalClose(CloseNormal, string(bytes.Repeat([]byte("x"), 2*maxReasonSize)))
	assert.Len(t, long, 1+maxReasonSize, "a long reason is cut to fit the frame limit")
	wide := marshalClose(CloseNormal, "x"+string(bytes.Repeat([]byte("é"), maxReasonSize)))
	assert.True(t, utf8.Valid(wide[1:]), "the cut does not split a character")
	assert.Len(t, wide, maxReasonSize, "one byte short, to end on a character boundary")

	assert.Equal(t, "code 99", CloseCode(99).String())
	assert.Equal(t, "0x7f", frameType(0x7f).String())
}

// FuzzFrameReader feeds arbitrary streams to the decoder: it must never
// panic, never return a payload over its type's limit, and fail only with a
// protocol error or an end of stream.
func FuzzFrameReader(f *testing.F) {
	f.Add(rawHello(ProtocolVersion))
	f.Add(appendFrame(appendFrame(nil, framePing, []byte("12345678")), frameData, []byte("payload")))
	f.Add(appendFrame(nil, frameClose, marshalClose(CloseGoingAway, "bye")))
	f.Add(header(frameData, 0xFFFFFFFF))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add(append(appendFrame(appendFrame(nil, frameFirst, []byte{0, 0, 0, 6, 'a', 'b'}), framePing, nil),
		appendFrame(nil, frameFragment, []byte("cdef"))...))
	f.Add(appendFrame(nil, frameFirst, []byte{0xff, 0xff, 0xff, 0xff}))
	f.Add(appendFrame(appendFrame(nil, frameAck, []byte{0, 0, 0, 0, 0, 0, 1, 0}), frameGoodbye, []byte{0, 0, 0x13, 0x88, goodbyeEndsSession}))
	f.Add(header(frameAck, 9))
	const max = 1024
	f.Fuzz(func(t *testing.T, in []byte) {
		r := newFrameReader(bytes.NewReader(in), max)
		for {
			typ, p, err := r.next()
			if err != nil {
				if !errors.Is(err, ErrProtocol) && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("unexpected error %v", err)
				}
				return
			}
			if len(p) > maxPayload(typ, max) {
				t.Fatalf("%s payload of %d bytes over its limit", typ, len(p))
			}
		}
	})
}

// FuzzParseHello checks that any hello payload parses or fails with a
// protocol error, and that a valid one round-trips.
func FuzzParseHello(f *testing.F) {
	f.Add(hello{version: ProtocolVersion}.marshal())
	f.Add(append(hello{version: 2}.marshal(), 0x10, 0, 2, 'h', 'i'))
	f.Add([]byte("VGO"))
	f.Add(hello{version: 1, credentials: []byte("token"), pingInterval: time.Second, minPing: time.Millisecond, maxPing: time.Minute}.marshal())
	f.Add(hello{version: 1, maxMessage: 1 << 20, heartbeatTimeout: 15 * time.Second, maxPing: 5 * time.Second}.marshal())
	f.Add(hello{version: 1, resume: true}.marshal())
	f.Add(hello{version: 1, resume: true, sessionID: sessionID{1, 2, 3}, received: 1 << 40, credentials: []byte("t")}.marshal())
	f.Add(hello{version: 1, session: true, sessionID: sessionID{15: 9}, received: 7}.marshal())
	f.Fuzz(func(t *testing.T, p []byte) {
		for _, fromServer := range []bool{false, true} {
			h, err := parseHello(p, fromServer)
			if err != nil {
				if !errors.Is(err, ErrProtocol) {
					t.Fatalf("unexpected error %v", err)
				}
				continue
			}
			again, err := parseHello(h.marshal(), fromServer)
			if err != nil || again.version != h.version || !bytes.Equal(again.credentials, h.credentials) ||
				again.pingInterval != h.pingInterval || again.maxMessage != h.maxMessage ||
				again.minPing != h.minPing || again.maxPing != h.maxPing || again.heartbeatTimeout != h.heartbeatTimeout ||
				again.resume != h.resume || again.session != h.session || again.sessionID != h.sessionID || again.received != h.received {
				t.Fatalf("round trip of %+v gave %+v, %v", h, again, err)
			}
		}
	})
}

func TestFrameReaderLargeFrames(t *testing.T) {
	// A frame larger than the read buffer is read whole, and the buffer
	// for it grows with the bytes that arrive, not with the bytes announced.
	big := bytes.Repeat([]byte("0123456789abcdef"), 200<<10/16)
	stream := appendFrame(appendFrame(nil, frameData, big), frameData, []byte("small"))
	r := newFrameReader(&chunkReader{data: stream, n: 1500}, 1<<20)
	typ, p, err := r.next()
	require.NoError(t, err)
	assert.Equal(t, frameData, typ)
	assert.True(t, bytes.Equal(big, p))
	_, p, err = r.next()
	require.NoError(t, err)
	assert.Equal(t, "small", string(p))

	r = newFrameReader(bytes.NewReader(append(header(frameData, 1<<20), make([]byte, 10)...)), 1<<20)
	_, _, err = r.next()
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	assert.Less(t, cap(r.held.b), 1<<20, "a frame announced but not sent cost its full size")
}

func TestFrameReaderRejectsDataBeforeHello(t *testing.T) {
	// A link starts with no room for data frames: the first frame must be
	// a hello, and a data frame is refused by its header, before any read,
	// for what it is rather than for its size.
	r := newFrameReader(bytes.NewReader(header(frameData, 1<<20)), 0)
	r.handshake = true
	_, _, err := r.next()
	require.ErrorIs(t, err, ErrProtocol)
	assert.NotErrorIs(t, err, ErrFrameTooLarge)
	assert.Equal(t, "vgo: protocol error: expected hello, got data frame", err.Error())
}

func TestFragmentEncoding(t *testing.T) {
	// The 40,000-byte example of PROTOCOL.md, "Fragments".
	l := &link{fragments: true, stream: getBuffer()}
	l.writing = true // keep the writer from starting
	l.appendMessageLocked(bytes.Repeat([]byte("m"), 40_000))
	b := l.stream.b
	var headers []string
	for len(b) > 0 {
		n := headerSize + int(binary.BigEndian.Uint32(b[1:]))
		headers = append(headers, fmt.Sprintf("% x", b[:headerSize]))
		b = b[n:]
	}
	assert.Equal(t, []string{"07 00 00 40 04", "08 00 00 40 00", "08 00 00 1c 40"}, headers)
	assert.Equal(t, []byte{0, 0, 0x9c, 0x40}, l.stream.b[headerSize:headerSize+4])

	r := newFrameReader(bytes.NewReader(l.stream.b), 40_000)
	typ, p, err := r.next()
	require.NoError(t, err)
	assert.Equal(t, frameData, typ)
	assert.Equal(t, bytes.Repeat([]byte("m"), 40_000), p)
	assert.EqualValues(t, 3, r.frames.Load(), "every fragment counts as a frame")
}
