// This file holds the connection plumbing the TCP services share: context
// cancellation through deadlines, idle timeouts, half-close and lingering
// close. None of it changes the bytes a service sends.

package services

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"time"
)

const (
	// DefaultIdleTimeout is how long a TCP service waits for the client to
	// send or accept bytes before giving up on the connection.
	DefaultIdleTimeout = 60 * time.Second
	// DefaultLinger is how long a TCP service, after half-closing, keeps
	// reading (and discarding) what the client still sends, so that closing
	// with unread input does not reset the connection and destroy the tail
	// of the response before the client reads it.
	DefaultLinger = 2 * time.Second

	// lingerMaxBytes bounds how much a lingering close discards.
	lingerMaxBytes = 256 << 10
)

// aLongTimeAgo is a deadline in the past: setting it makes blocked and
// future reads and writes fail at once.
var aLongTimeAgo = time.Unix(1, 0)

// closeWriter is implemented by connections that can half-close
// (*net.TCPConn, gVisor's *gonet.TCPConn).
type closeWriter interface {
	CloseWrite() error
}

// guard ties a connection to a context: when ctx is done, the connection's
// deadlines are moved into the past so blocked I/O returns.
type guard struct {
	ctx  context.Context
	conn net.Conn
	stop func() bool
}

func newGuard(ctx context.Context, conn net.Conn) *guard {
	g := &guard{ctx: ctx, conn: conn}
	g.stop = context.AfterFunc(ctx, func() { _ = conn.SetDeadline(aLongTimeAgo) })
	return g
}

// release stops watching ctx. It does not reset the deadlines.
func (g *guard) release() { g.stop() }

// readDeadline sets the read deadline d from now (none if d <= 0). It
// returns ctx's error if ctx is done, since setting a deadline may have
// undone the cancellation's.
func (g *guard) readDeadline(d time.Duration) error {
	if d > 0 {
		_ = g.conn.SetReadDeadline(time.Now().Add(d))
	}
	return g.ctx.Err()
}

// writeDeadline is readDeadline for writes.
func (g *guard) writeDeadline(d time.Duration) error {
	if d > 0 {
		_ = g.conn.SetWriteDeadline(time.Now().Add(d))
	}
	return g.ctx.Err()
}

// err returns ctx's error if ctx is done (the I/O error is then only its
// consequence), else err.
func (g *guard) err(err error) error {
	if cerr := g.ctx.Err(); cerr != nil {
		return cerr
	}
	return err
}

// write writes p whole, refreshing the write deadline first.
func (g *guard) write(p []byte, idle time.Duration) error {
	if err := g.writeDeadline(idle); err != nil {
		return err
	}
	_, err := g.conn.Write(p)
	return g.err(err)
}

// writePattern writes prefix and then bytes off..end-1 of the pattern of
// seed, in chunks of len(buf). prefix must fit in buf; it is sent in the
// same write as the first pattern bytes.
func (g *guard) writePattern(buf, prefix []byte, seed, off, end uint64, idle time.Duration) error {
	n := copy(buf, prefix)
	for {
		chunk := buf[n:]
		if left := end - off; left < uint64(len(chunk)) {
			chunk = chunk[:left]
		}
		FillPattern(seed, off, chunk)
		off += uint64(len(chunk))
		if out := buf[:n+len(chunk)]; len(out) > 0 {
			if err := g.write(out, idle); err != nil {
				return err
			}
		}
		if off >= end {
			return nil
		}
		n = 0
	}
}

// isTimeout reports whether err is a deadline expiry.
func isTimeout(err error) bool {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// finish half-closes conn, if it can, and then discards what the client
// still sends (from r, which reads conn) until EOF, an error, linger or
// lingerMaxBytes. The client thus reads the whole response and EOF before
// the caller's Close; without half-close there is nothing to wait for, and
// with linger <= 0 it only half-closes.
func (g *guard) finish(r io.Reader, linger time.Duration) {
	cw, ok := g.conn.(closeWriter)
	if !ok {
		return
	}
	if cw.CloseWrite() != nil || g.ctx.Err() != nil {
		return
	}
	if linger <= 0 {
		return
	}
	_ = g.conn.SetReadDeadline(time.Now().Add(linger))
	if g.ctx.Err() != nil {
		return
	}
	_, _ = io.CopyN(io.Discard, r, lingerMaxBytes)
}
