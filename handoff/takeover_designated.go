package handoff

// The designated replica of a dead owner's flow restores it (push, or for
// a claim). Placement counts a peer as live while either replication
// stream between the two nodes is up, so a flow can be placed on a peer
// the owner's outbound stream has not reached yet (it is still dialing, in
// its reconnect backoff): if the owner dies then, its designated replica
// holds no copy while another replica does. Seen end to end: the owner
// killed 3 s after start, its stream to one peer never up, the client's
// packets reaching the other replica, whose claims to the designated one
// were refused as not_owner until the takeover window ran out (a reset).
// The designated replica therefore fetches a missing state from its peers
// before it answers a claim.

import (
	"context"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// designatedState returns k's replicated state when this node must restore
// k: its owner is dead and this node is its designated replica. The state
// is this node's replica or, lacking one, the freshest copy held by a live
// peer. ok is false otherwise.
func (e *Engine) designatedState(ctx context.Context, k FlowKey) (st *batonv1.FlowState, ok bool) {
	st, ok = e.r.store.Lookup(k)
	if !ok {
		st = e.lookupPeers(ctx, k)
		ok = st != nil && st.Owner != e.self
	}
	if !ok || e.alive(st.Owner) || e.designated(k, st.Owner) != e.self || !e.ownerGone(st.Owner) {
		return nil, false
	}
	return st, true
}
