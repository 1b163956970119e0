package handoff

import (
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// Change is one flow change the tracker hands to replication: the kind of
// event and the flow's full state after it (a snapshot the receiver owns).
type Change struct {
	Kind  batonv1.FlowEvent_Kind
	State *batonv1.FlowState
}

// FlowSource is what replication needs from the flow tracker. The tracker
// implements it; replication tests use fakes.
type FlowSource interface {
	// Changes is signalled (never closed) whenever TakeChanges has
	// something new. The signal is level-triggered and coalesced: one
	// wake-up may cover many changes.
	Changes() <-chan struct{}
	// TakeChanges appends the changes since the previous call to dst and
	// returns it. Each flow appears at most once per call, with its newest
	// state; an open followed by updates is reported as one KIND_OPEN, and
	// a flow closed before it was taken is reported as KIND_CLOSE only if
	// its open was reported before.
	TakeChanges(dst []Change) []Change
	// Owned calls fn with a snapshot of every flow this node owns, until
	// fn returns false (for resyncs and re-replication).
	Owned(fn func(*batonv1.FlowState) bool)
	// Lookup returns a snapshot of an owned flow.
	Lookup(k FlowKey) (*batonv1.FlowState, bool)
}
