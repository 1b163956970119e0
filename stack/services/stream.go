// This file is the TCP "stream" service, which sends a requested amount of
// the deterministic pattern (pattern.go), and the client helpers that request
// and verify such a stream.
//
// Protocol. The client sends one request line:
//
//	<size> <seed>\n
//	<size> <seed> <offset>\n
//
// Fields are unsigned decimal integers separated by spaces or tabs; a "\r"
// before the "\n" is ignored, as is anything the client sends after the
// line. size is at most 1<<40 (MaxStreamSize), seed is any uint64, offset
// (default 0) is at most size. The line, newline included, is at most 256
// bytes; a client may also end it by half-closing instead of sending "\n".
//
// The server answers with bytes offset..size-1 of the pattern of seed, that
// is size-offset bytes, and then half-closes (or closes) so the client sees
// EOF right after the last byte. A client that lost the connection after
// receiving m bytes resumes by sending the same size and seed with offset m.
//
// A malformed request gets one line "ERR <reason>\n" and EOF; reasons are
// fixed strings (see ParseStreamRequest). A connection closed before any
// request byte gets no answer.

package services

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

const (
	// MaxStreamSize is the largest size a stream or /bytes request may ask for.
	MaxStreamSize = 1 << 40
	// maxStreamLine is the longest stream request line, newline included.
	maxStreamLine = 256
)

// The reasons a stream request is refused; they follow "ERR " on the wire.
var (
	errStreamTooLong   = errors.New("request line too long")
	errStreamFields    = errors.New("want <size> <seed> [<offset>]")
	errStreamSize      = errors.New("bad size")
	errStreamSizeLarge = errors.New("size exceeds " + strconv.Itoa(MaxStreamSize))
	errStreamSeed      = errors.New("bad seed")
	errStreamOffset    = errors.New("bad offset")
	errStreamOffsetBig = errors.New("offset exceeds size")
)

// Stream is the TCP stream service. Set its fields before serving.
type Stream struct {
	// IdleTimeout bounds the wait for the request line and for each chunk
	// write; <= 0 means no limit. NewStream sets DefaultIdleTimeout.
	IdleTimeout time.Duration
	// Linger bounds the wait for the client's EOF after the answer (see
	// DefaultLinger); <= 0 means half-close and return at once.
	Linger time.Duration
}

// NewStream returns a stream service with the default timeouts.
func NewStream() *Stream {
	return &Stream{IdleTimeout: DefaultIdleTimeout, Linger: DefaultLinger}
}

// Name returns "stream".
func (s *Stream) Name() string { return "stream" }

// ServeConn reads one request line and answers it (see the file comment).
func (s *Stream) ServeConn(ctx context.Context, conn net.Conn) error {
	g := newGuard(ctx, conn)
	defer g.release()

	if err := g.readDeadline(s.IdleTimeout); err != nil {
		return err
	}
	br := bufio.NewReaderSize(conn, maxStreamLine)
	line, err := br.ReadSlice('\n')
	switch {
	case err == nil:
	case errors.Is(err, bufio.ErrBufferFull):
		return s.refuse(g, br, errStreamTooLong)
	case errors.Is(err, io.EOF):
		if len(line) == 0 {
			return g.err(nil)
		}
	default:
		return fmt.Errorf("stream: reading request: %w", g.err(err))
	}

	size, seed, offset, perr := ParseStreamRequest(string(line))
	if perr != nil {
		return s.refuse(g, br, perr)
	}
	// The request line is all another node needs to continue the answer
	// from any output offset.
	Checkpoint(ctx, line)
	return s.send(g, br, size, seed, offset, offset)
}

// send writes pattern bytes from..size of seed (the answer to a request
// starting at offset) and finishes the connection.
func (s *Stream) send(g *guard, br *bufio.Reader, size, seed, offset, from uint64) error {
	bp := getBuf()
	defer putBuf(bp)
	if err := g.writePattern(*bp, nil, seed, from, size, s.IdleTimeout); err != nil {
		return fmt.Errorf("stream: sending %d %d %d: %w", size, seed, offset, err)
	}
	g.finish(br, s.Linger)
	return g.err(nil)
}

// refuse sends "ERR <reason>\n" and ends the connection.
func (s *Stream) refuse(g *guard, br *bufio.Reader, reason error) error {
	msg := "ERR " + reason.Error() + "\n"
	if err := g.write([]byte(msg), s.IdleTimeout); err != nil {
		return fmt.Errorf("stream: sending %q: %w", msg, err)
	}
	g.finish(br, s.Linger)
	if err := g.err(nil); err != nil {
		return err
	}
	return fmt.Errorf("stream: refused request: %w", reason)
}

// ParseStreamRequest parses a stream request line (with or without its
// "\n"). On error, err.Error() is the reason the server sends after "ERR ".
func ParseStreamRequest(line string) (size, seed, offset uint64, err error) {
	line = trimEOL(line)
	if len(line) >= maxStreamLine {
		return 0, 0, 0, errStreamTooLong
	}
	var f [3]string
	nf := 0
	for i := 0; i < len(line); {
		if line[i] == ' ' || line[i] == '\t' {
			i++
			continue
		}
		j := i
		for j < len(line) && line[j] != ' ' && line[j] != '\t' {
			j++
		}
		if nf == len(f) {
			return 0, 0, 0, errStreamFields
		}
		f[nf] = line[i:j]
		nf++
		i = j
	}
	if nf < 2 {
		return 0, 0, 0, errStreamFields
	}
	if size, err = parseDecimal(f[0]); err != nil {
		return 0, 0, 0, errStreamSize
	}
	if size > MaxStreamSize {
		return 0, 0, 0, errStreamSizeLarge
	}
	if seed, err = parseDecimal(f[1]); err != nil {
		return 0, 0, 0, errStreamSeed
	}
	if nf == 3 {
		if offset, err = parseDecimal(f[2]); err != nil {
			return 0, 0, 0, errStreamOffset
		}
		if offset > size {
			return 0, 0, 0, errStreamOffsetBig
		}
	}
	return size, seed, offset, nil
}

// trimEOL removes one trailing "\n" and then one "\r".
func trimEOL(s string) string {
	if n := len(s); n > 0 && s[n-1] == '\n' {
		s = s[:n-1]
	}
	if n := len(s); n > 0 && s[n-1] == '\r' {
		s = s[:n-1]
	}
	return s
}

// parseDecimal parses an unsigned decimal uint64: digits only, no sign.
func parseDecimal(s string) (uint64, error) {
	if s == "" || s[0] < '0' || s[0] > '9' {
		return 0, strconv.ErrSyntax
	}
	return strconv.ParseUint(s, 10, 64)
}

// StreamRequest returns the request line for size bytes of seed's pattern.
func StreamRequest(size, seed uint64) string {
	return strconv.FormatUint(size, 10) + " " + strconv.FormatUint(seed, 10) + "\n"
}

// StreamRequestAt returns the request line that resumes the stream of size
// bytes of seed's pattern at byte offset.
func StreamRequestAt(size, seed, offset uint64) string {
	return strconv.FormatUint(size, 10) + " " + strconv.FormatUint(seed, 10) + " " +
		strconv.FormatUint(offset, 10) + "\n"
}

// ReadStream reads the answer to StreamRequest(size, seed) from r and checks
// every byte against the pattern as it arrives. See ReadStreamAt.
func ReadStream(r io.Reader, size, seed uint64) (n int64, ok bool, err error) {
	return ReadStreamAt(r, size, seed, 0)
}

// ReadStreamAt reads the answer to StreamRequestAt(size, seed, offset): it
// expects bytes offset..size-1 of seed's pattern and then EOF, and checks
// each chunk as it arrives, holding at most 128 KiB. n counts the bytes
// received that matched, up to the first bad one. ok is true, and err nil,
// only if exactly the expected bytes arrived followed by EOF; otherwise err
// says what went wrong: the offset of the first mismatching byte, a short
// stream, data after the end, the server's ERR line or a read error.
func ReadStreamAt(r io.Reader, size, seed, offset uint64) (n int64, ok bool, err error) {
	if offset > size {
		return 0, false, fmt.Errorf("stream: offset %d exceeds size %d", offset, size)
	}
	gotp, wantp := getBuf(), getBuf()
	defer putBuf(gotp)
	defer putBuf(wantp)
	got, want := *gotp, *wantp

	pos, end := offset, size
	empty := 0
	for {
		p := got
		if left := end - pos; left < uint64(len(p)) {
			p = p[:left]
		}
		if len(p) == 0 {
			p = got[:1] // probe for EOF
		}
		m, rerr := r.Read(p)
		if m > 0 {
			empty = 0
			if pos == end {
				return n, false, fmt.Errorf("stream: data after the expected %d bytes", end-offset)
			}
			FillPattern(seed, pos, want[:m])
			if !bytes.Equal(got[:m], want[:m]) {
				i := 0
				for got[i] == want[i] {
					i++
				}
				n += int64(i)
				if pos == offset && i == 0 {
					if msg, isErr := readErrLine(got[:m], r); isErr {
						return n, false, fmt.Errorf("stream: server refused: %s", msg)
					}
				}
				return n, false, fmt.Errorf("stream: mismatch at byte %d (stream offset %d): got 0x%02x, want 0x%02x",
					n, pos+uint64(i), got[i], want[i])
			}
			n += int64(m)
			pos += uint64(m)
		}
		switch {
		case rerr == nil:
			if m == 0 {
				if empty++; empty > 100 {
					return n, false, fmt.Errorf("stream: %w", io.ErrNoProgress)
				}
			}
		case errors.Is(rerr, io.EOF):
			if pos == end {
				return n, true, nil
			}
			return n, false, fmt.Errorf("stream: EOF after %d of %d bytes: %w", n, end-offset, io.ErrUnexpectedEOF)
		default:
			return n, false, fmt.Errorf("stream: after %d of %d bytes: %w", n, end-offset, rerr)
		}
	}
}

// readErrLine reports whether first (the first bytes of an answer) starts
// an "ERR <reason>\n" line and if so returns the reason, reading the rest of
// the line from r if needed.
func readErrLine(first []byte, r io.Reader) (string, bool) {
	const prefix = "ERR "
	if len(first) < len(prefix) {
		if !bytes.HasPrefix([]byte(prefix), first) {
			return "", false
		}
	} else if !bytes.HasPrefix(first, []byte(prefix)) {
		return "", false
	}
	line := append([]byte(nil), first...)
	if len(line) > maxStreamLine {
		line = line[:maxStreamLine]
	}
	var b [1]byte
	for tries := 0; !bytes.ContainsRune(line, '\n') && len(line) < maxStreamLine && tries < 2*maxStreamLine; tries++ {
		m, err := r.Read(b[:])
		if m == 1 {
			line = append(line, b[0])
		}
		if err != nil {
			break
		}
	}
	s, _, found := bytes.Cut(line, []byte("\n"))
	if !found || !bytes.HasPrefix(s, []byte(prefix)) {
		return "", false
	}
	return string(s[len(prefix):]), true
}

// CanResume implements Resumable: the request line (the checkpoint) fixes
// the whole answer, so any output offset within it can be continued. With
// no checkpoint, only a connection whose request the previous node never
// acknowledged can start over (the client sends the request again).
func (s *Stream) CanResume(r Resume) error {
	if r.Checkpoint == nil {
		if r.InputOffset == 0 && r.OutputOffset == 0 {
			return nil
		}
		return fmt.Errorf("stream: %w: request acknowledged (%d bytes) but not checkpointed", ErrCannotResume, r.InputOffset)
	}
	size, _, offset, err := ParseStreamRequest(string(r.Checkpoint))
	if err != nil {
		return fmt.Errorf("stream: %w: bad checkpoint: %v", ErrCannotResume, err)
	}
	if r.InputOffset < uint64(len(r.Checkpoint)) {
		return fmt.Errorf("stream: %w: input offset %d inside the %d-byte request", ErrCannotResume, r.InputOffset, len(r.Checkpoint))
	}
	if r.OutputOffset > size-offset {
		return fmt.Errorf("stream: %w: output offset %d past the %d-byte answer", ErrCannotResume, r.OutputOffset, size-offset)
	}
	return nil
}

// ResumeConn implements Resumable: it sends the rest of the answer.
func (s *Stream) ResumeConn(ctx context.Context, conn net.Conn, r Resume) error {
	if err := s.CanResume(r); err != nil {
		return err
	}
	if r.Checkpoint == nil {
		return s.ServeConn(ctx, conn)
	}
	g := newGuard(ctx, conn)
	defer g.release()
	Checkpoint(ctx, r.Checkpoint)
	size, seed, offset, _ := ParseStreamRequest(string(r.Checkpoint))
	br := bufio.NewReaderSize(conn, maxStreamLine)
	return s.send(g, br, size, seed, offset, offset+r.OutputOffset)
}
