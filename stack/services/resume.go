// This file is the contract between services and the handoff layer for
// connections that move between nodes: a service that can continue a
// connection another node started implements Resumable.

package services

import (
	"context"
	"errors"
	"net"
)

// Resume says where a moved connection stands. Offsets count payload bytes
// from the start of the connection in each direction (SYN and FIN are not
// counted) and do not wrap.
type Resume struct {
	// OutputOffset is how much of the service's output the client already
	// has: the restored connection's first byte is output byte
	// OutputOffset. The service continues exactly there.
	OutputOffset uint64
	// InputOffset is how much client input the previous node acknowledged:
	// the client does not send it again, and the restored connection's
	// first byte of input is input byte InputOffset.
	InputOffset uint64
	// Checkpoint is the last checkpoint the service published on the
	// previous node (see Checkpoint), or nil.
	Checkpoint []byte
	// CheckpointOffset is the output offset the checkpoint was taken at.
	CheckpointOffset uint64
	// Pending is set by a live migration only: output the previous node's
	// service had produced beyond OutputOffset (written but not yet
	// acknowledged by the client), in order. A service whose output is not
	// a function of its checkpoint (echo) continues from it.
	Pending []byte
	// Live is true for a live migration (the previous node handed the
	// exact state over) and false after a crash (replicated state only).
	Live bool
}

// ErrCannotResume is wrapped by CanResume errors: the connection cannot be
// continued exactly, so the honest answer is a reset.
var ErrCannotResume = errors.New("cannot resume exactly")

// Resumable is a TCP service that can continue connections.
type Resumable interface {
	TCPService
	// CanResume reports whether r allows continuing the exact byte stream
	// (an error wrapping ErrCannotResume says why not). It is called before
	// the connection is restored and must not block.
	CanResume(r Resume) error
	// ResumeConn serves a restored connection from r on, like ServeConn.
	ResumeConn(ctx context.Context, conn net.Conn, r Resume) error
}
