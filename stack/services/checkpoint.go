// This file lets a service publish a checkpoint for the connection it
// serves: the opaque bytes it would need to continue the connection on
// another node. The handoff layer replicates the latest checkpoint with the
// flow's state; what a service puts in it is the service's business.

package services

import "context"

// CheckpointFunc receives a connection's checkpoints.
type CheckpointFunc func(data []byte)

type checkpointKey struct{}

// WithCheckpoint returns a context whose Checkpoint calls go to f. The stack
// installs one per connection.
func WithCheckpoint(ctx context.Context, f CheckpointFunc) context.Context {
	return context.WithValue(ctx, checkpointKey{}, f)
}

// Checkpoint publishes data as the checkpoint of the connection ctx belongs
// to, replacing the previous one. It does not block and does not keep data
// (it is copied). Without a publisher in ctx it does nothing.
func Checkpoint(ctx context.Context, data []byte) {
	if f, ok := ctx.Value(checkpointKey{}).(CheckpointFunc); ok && f != nil {
		f(append([]byte(nil), data...))
	}
}
