// This file lets the http service continue a connection another node
// started. Before each response the service publishes a checkpoint: where
// the response starts in the output stream, where the request ends in the
// input stream, and the response itself (its header bytes, and its body as
// text or as a pattern range). A node taking over can then finish the
// response from any byte of it and serve the next requests; responses are
// regenerated from the checkpoint, never recomputed, so even /whoami's
// answer is the one the first node started to send.

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
	"strings"
)

// httpCheckpoint describes the response in progress.
type httpCheckpoint struct {
	respStart uint64 // output offset of the response's first byte
	reqEnd    uint64 // input offset just after the request (and its body)
	close     bool   // the server closes after this response
	kind      byte   // 'p' pattern body, 't' text body, 'h' HEAD (no body)
	seed, n   uint64 // pattern body: bytes 0..n-1 of seed
	header    []byte
	body      []byte // text body
}

const httpCheckpointMagic = "http1"

func (c *httpCheckpoint) bodyLen() uint64 {
	switch c.kind {
	case 'p':
		return c.n
	case 't':
		return uint64(len(c.body))
	}
	return 0
}

func (c *httpCheckpoint) respLen() uint64 { return uint64(len(c.header)) + c.bodyLen() }

// encode: "http1 respStart reqEnd close kind seed n hdrLen bodyLen\n",
// then the header bytes, then the text body.
func (c *httpCheckpoint) encode() []byte {
	cl := 0
	if c.close {
		cl = 1
	}
	b := fmt.Appendf(nil, "%s %d %d %d %c %d %d %d %d\n", httpCheckpointMagic,
		c.respStart, c.reqEnd, cl, c.kind, c.seed, c.n, len(c.header), len(c.body))
	b = append(b, c.header...)
	return append(b, c.body...)
}

func decodeHTTPCheckpoint(b []byte) (*httpCheckpoint, error) {
	line, rest, ok := bytes.Cut(b, []byte("\n"))
	if !ok {
		return nil, errors.New("no header line")
	}
	f := strings.Fields(string(line))
	if len(f) != 9 || f[0] != httpCheckpointMagic || len(f[4]) != 1 {
		return nil, fmt.Errorf("bad header line %q", line)
	}
	var nums [7]uint64
	for i, idx := range []int{1, 2, 3, 5, 6, 7, 8} {
		v, err := strconv.ParseUint(f[idx], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("bad field %d: %v", idx, err)
		}
		nums[i] = v
	}
	if nums[2] > 1 {
		return nil, errors.New("bad close flag")
	}
	c := &httpCheckpoint{respStart: nums[0], reqEnd: nums[1], close: nums[2] == 1, kind: f[4][0], seed: nums[3], n: nums[4]}
	hl, bl := nums[5], nums[6]
	if hl+bl != uint64(len(rest)) || hl == 0 {
		return nil, fmt.Errorf("lengths %d+%d do not match %d bytes", hl, bl, len(rest))
	}
	c.header, c.body = rest[:hl], rest[hl:]
	switch c.kind {
	case 'p', 'h':
		if bl != 0 {
			return nil, errors.New("body bytes with a pattern or HEAD response")
		}
	case 't':
	default:
		return nil, fmt.Errorf("bad kind %q", c.kind)
	}
	if c.n > MaxStreamSize {
		return nil, errors.New("pattern length too large")
	}
	return c, nil
}

// httpResume is a checked resume point.
type httpResume struct {
	cp      *httpCheckpoint
	skipIn  uint64 // input bytes the client sends again (already consumed)
	fromOut uint64 // offset within the response to continue at
}

func (r *httpResume) respEnd() uint64 { return r.cp.respStart + r.cp.respLen() }

// plan checks r and returns how to continue.
func (h *HTTP) plan(r Resume) (*httpResume, error) {
	if r.Checkpoint == nil {
		if r.InputOffset == 0 && r.OutputOffset == 0 {
			return nil, nil // nothing happened yet: serve from the start
		}
		return nil, fmt.Errorf("http: %w: %d input bytes acknowledged but no checkpoint", ErrCannotResume, r.InputOffset)
	}
	cp, err := decodeHTTPCheckpoint(r.Checkpoint)
	if err != nil {
		return nil, fmt.Errorf("http: %w: checkpoint: %v", ErrCannotResume, err)
	}
	switch {
	case r.InputOffset > cp.reqEnd:
		// Input after the request was acknowledged by the previous node
		// but never reached its service: it is lost.
		return nil, fmt.Errorf("http: %w: %d input bytes past the last request were acknowledged and lost",
			ErrCannotResume, r.InputOffset-cp.reqEnd)
	case r.OutputOffset < cp.respStart:
		return nil, fmt.Errorf("http: %w: client lacks %d bytes of an earlier response",
			ErrCannotResume, cp.respStart-r.OutputOffset)
	case r.OutputOffset > cp.respStart+cp.respLen():
		return nil, fmt.Errorf("http: %w: output offset %d past the response end %d",
			ErrCannotResume, r.OutputOffset, cp.respStart+cp.respLen())
	}
	return &httpResume{cp: cp, skipIn: cp.reqEnd - r.InputOffset, fromOut: r.OutputOffset - cp.respStart}, nil
}

// CanResume implements Resumable: the checkpoint must describe the
// response the client is in (or just finished), and no acknowledged input
// may lie beyond the request it answers.
func (h *HTTP) CanResume(r Resume) error {
	_, err := h.plan(r)
	return err
}

// ResumeConn implements Resumable.
func (h *HTTP) ResumeConn(ctx context.Context, conn net.Conn, r Resume) error {
	rs, err := h.plan(r)
	if err != nil {
		return err
	}
	if rs == nil {
		return h.ServeConn(ctx, conn)
	}
	Checkpoint(ctx, r.Checkpoint)
	return h.serve(ctx, conn, httpPos{}, rs)
}

// finishResumed skips the input the client sends again and writes the rest
// of the response in progress. done is true when the connection ends with
// it (Connection: close).
func (h *HTTP) finishResumed(g *guard, br *bufio.Reader, buf []byte, rs *httpResume) (done bool, err error) {
	if rs.skipIn > 0 {
		if err := g.readDeadline(h.IdleTimeout); err != nil {
			return true, err
		}
		if _, err := io.CopyN(io.Discard, br, int64(rs.skipIn)); err != nil {
			return true, fmt.Errorf("http: skipping %d resent input bytes: %w", rs.skipIn, g.err(err))
		}
	}
	cp := rs.cp
	from := rs.fromOut
	if hl := uint64(len(cp.header)); from < hl {
		prefix := cp.header[from:]
		switch cp.kind {
		case 'p':
			err = g.writePattern(buf, prefix, cp.seed, 0, cp.n, h.IdleTimeout)
		case 't':
			err = g.write(append(append([]byte(nil), prefix...), cp.body...), h.IdleTimeout)
		default:
			err = g.write(prefix, h.IdleTimeout)
		}
	} else {
		off := from - hl
		switch cp.kind {
		case 'p':
			err = g.writePattern(buf, nil, cp.seed, off, cp.n, h.IdleTimeout)
		case 't':
			if off < uint64(len(cp.body)) {
				err = g.write(cp.body[off:], h.IdleTimeout)
			}
		}
	}
	if err != nil {
		return true, fmt.Errorf("http: finishing a resumed response: %w", err)
	}
	if cp.close {
		g.finish(br, h.Linger)
		return true, g.err(nil)
	}
	return false, nil
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n uint64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += uint64(n)
	return n, err
}
