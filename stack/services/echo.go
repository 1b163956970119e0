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
	g := newGuard(ctx, conn)
	defer g.release()

	bp := getBuf()
	defer putBuf(bp)
	buf := *bp
	var total int64
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
