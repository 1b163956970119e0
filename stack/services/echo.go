// This file is the TCP "echo" service: it sends back every byte the client
// sends, in order, and when the client half-closes it finishes sending and
// closes too. Its output is its input, so it is trivially deterministic.

package services

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// Echo is the TCP echo service. Set its fields before serving.
type Echo struct {
	// IdleTimeout bounds each wait for the client to send or to accept
	// bytes; <= 0 means no limit. NewEcho sets DefaultIdleTimeout.
	IdleTimeout time.Duration
}

// NewEcho returns an echo service with the default idle timeout.
func NewEcho() *Echo {
	return &Echo{IdleTimeout: DefaultIdleTimeout}
}

// Name returns "echo".
func (e *Echo) Name() string { return "echo" }

// ServeConn copies conn's input back to it until the client half-closes
// (then it half-closes too and returns nil), an error, the idle timeout or
// ctx's end. Each chunk read is written whole before the next read.
func (e *Echo) ServeConn(ctx context.Context, conn net.Conn) error {
	return e.serve(ctx, conn, nil)
}

// serve echoes, first writing pending (output owed from before a move).
func (e *Echo) serve(ctx context.Context, conn net.Conn, pending []byte) error {
	g := newGuard(ctx, conn)
	defer g.release()

	bp := getBuf()
	defer putBuf(bp)
	buf := *bp
	var total int64
	if len(pending) > 0 {
		if err := g.write(pending, e.IdleTimeout); err != nil {
			return fmt.Errorf("echo: writing %d pending bytes: %w", len(pending), err)
		}
		total += int64(len(pending))
	}
	for {
		if err := g.readDeadline(e.IdleTimeout); err != nil {
			return err
		}
		n, rerr := conn.Read(buf)
		if n > 0 {
			if err := g.write(buf[:n], e.IdleTimeout); err != nil {
				return fmt.Errorf("echo: writing after %d bytes: %w", total, err)
			}
			total += int64(n)
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				// Everything read has been written: the client's
				// half-close is mirrored and the caller closes.
				if cw, ok := conn.(closeWriter); ok {
					_ = cw.CloseWrite()
				}
				return g.err(nil)
			}
			return fmt.Errorf("echo: reading after %d bytes: %w", total, g.err(rerr))
		}
	}
}

// CanResume implements Resumable. Echo's output is its input, so the
// client is owed input bytes OutputOffset..InputOffset that the previous
// node received: they must come with the move (Pending, from a live
// migration); after a crash echo resumes only when nothing was owed.
func (e *Echo) CanResume(r Resume) error {
	if r.OutputOffset > r.InputOffset {
		return fmt.Errorf("echo: %w: output offset %d past input offset %d", ErrCannotResume, r.OutputOffset, r.InputOffset)
	}
	if owed := r.InputOffset - r.OutputOffset; owed != uint64(len(r.Pending)) {
		return fmt.Errorf("echo: %w: client is owed %d bytes, %d handed over", ErrCannotResume, owed, len(r.Pending))
	}
	return nil
}

// ResumeConn implements Resumable: it writes what the client is owed and
// echoes on.
func (e *Echo) ResumeConn(ctx context.Context, conn net.Conn, r Resume) error {
	if err := e.CanResume(r); err != nil {
		return err
	}
	return e.serve(ctx, conn, r.Pending)
}
