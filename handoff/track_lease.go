package handoff

import batonv1 "github.com/baton-anycast/baton/proto/baton/v1"

// leaseFenced reports whether this node owns flow k past its handshake
// and the flow was established before unix nanosecond before (restored
// flows count as established before anything): the flows a node without
// its lease must not send for (lease.go).
func (t *Tracker) leaseFenced(k FlowKey, before int64) bool {
	hk := trkKeyOf(k)
	sh := t.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flows[hk]
	if f == nil || !trkOwned(f) || f.st.phase == batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE {
		return false
	}
	return f.st.opened < before
}
