package handoff

// The replica store: flow state this node holds for other owners, so that
// it can take their flows over. Only the peer server writes to it.

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"google.golang.org/protobuf/proto"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// DefaultMaxReplicaFlows bounds the replica store by default.
const DefaultMaxReplicaFlows = 262144

// Reject reasons of the replication layer, beside those of flow.go.
const (
	// RejectTableFull: the replica store is at MaxReplicaFlows.
	RejectTableFull = "table_full"
	// RejectNotMember: the batch's sender is not a configured peer.
	RejectNotMember = "not_member"
	// RejectIdentityMismatch: the batch's sender is not the name in the
	// peer's certificate (or changed within a stream).
	RejectIdentityMismatch = "identity_mismatch"
	// RejectTLSHandshake: a connection failed the mutual TLS handshake
	// (unknown CA, no client certificate, expired...).
	RejectTLSHandshake = "tls_handshake"
	// RejectMalformed: a message on a peer stream did not decode.
	RejectMalformed = "malformed"
)

// ReplicaStore holds flows replicated from other owners: owner -> key ->
// state, bounded. Safe for concurrent use.
type ReplicaStore struct {
	max      int
	prefixes []netip.Prefix

	mu      sync.RWMutex
	flows   map[FlowKey]*batonv1.FlowState
	byOwner map[string]map[FlowKey]struct{}

	onApply atomic.Pointer[func(FlowKey)] // test hook: called (under the lock) for each flow stored
}

// NewReplicaStore makes a store holding at most max flows (<= 0: the
// default) that accepts only flows inside prefixes.
func NewReplicaStore(max int, prefixes []netip.Prefix) *ReplicaStore {
	if max <= 0 {
		max = DefaultMaxReplicaFlows
	}
	return &ReplicaStore{
		max:      max,
		prefixes: append([]netip.Prefix(nil), prefixes...),
		flows:    make(map[FlowKey]*batonv1.FlowState),
		byOwner:  make(map[string]map[FlowKey]struct{}),
	}
}

// ApplyResult says what an accepted event did.
type ApplyResult struct {
	Key FlowKey
	// Held is true when the store holds the flow after the event (false
	// after a close).
	Held bool
}

// Apply validates one event sent by sender and applies it. The state must
// be owned by the sender (only an owner replicates its flows), and fenced
// by epoch: an event with a lower epoch than the stored one for its key is
// stale, as is one from a different owner with the same epoch; a higher
// epoch from a different owner moves the flow to that owner. Errors are
// *RejectError. The store keeps ev.State (the caller must not modify it).
func (s *ReplicaStore) Apply(sender string, ev *batonv1.FlowEvent) (ApplyResult, error) {
	if ev == nil {
		return ApplyResult{}, reject(RejectBadKind, "empty event")
	}
	st := ev.State
	var (
		k   FlowKey
		err error
	)
	switch ev.Kind {
	case batonv1.FlowEvent_KIND_OPEN, batonv1.FlowEvent_KIND_UPDATE, batonv1.FlowEvent_KIND_CHECKPOINT:
		k, err = ValidateState(st, s.prefixes)
	case batonv1.FlowEvent_KIND_CLOSE:
		// A close needs only key, owner and epoch.
		if st != nil && st.Phase == batonv1.FlowPhase_FLOW_PHASE_UNSPECIFIED {
			bare := &batonv1.FlowState{Key: st.Key, Owner: st.Owner, Epoch: st.Epoch, Phase: batonv1.FlowPhase_FLOW_PHASE_CLOSED}
			k, err = ValidateState(bare, s.prefixes)
		} else {
			k, err = ValidateState(st, s.prefixes)
		}
	default:
		return ApplyResult{}, reject(RejectBadKind, "event kind %d", ev.Kind)
	}
	if err != nil {
		return ApplyResult{}, err
	}
	if st.Owner != sender {
		return ApplyResult{}, reject(RejectOwnerMismatch, "flow %s owned by %q sent by %q", k, st.Owner, sender)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	cur, held := s.flows[k]
	if held {
		if st.Epoch < cur.Epoch || (st.Epoch == cur.Epoch && st.Owner != cur.Owner) {
			return ApplyResult{}, reject(RejectStaleEpoch, "flow %s epoch %d from %q, holding epoch %d from %q",
				k, st.Epoch, st.Owner, cur.Epoch, cur.Owner)
		}
	}
	if ev.Kind == batonv1.FlowEvent_KIND_CLOSE {
		if held {
			s.remove(k, cur.Owner)
		}
		return ApplyResult{Key: k}, nil
	}
	if !held && len(s.flows) >= s.max {
		return ApplyResult{}, reject(RejectTableFull, "replica store full (%d flows)", s.max)
	}
	if held && cur.Owner != st.Owner {
		s.remove(k, cur.Owner)
	}
	s.flows[k] = st
	m := s.byOwner[st.Owner]
	if m == nil {
		m = make(map[FlowKey]struct{})
		s.byOwner[st.Owner] = m
	}
	m[k] = struct{}{}
	if fn := s.onApply.Load(); fn != nil {
		(*fn)(k)
	}
	return ApplyResult{Key: k, Held: true}, nil
}

func (s *ReplicaStore) remove(k FlowKey, owner string) {
	delete(s.flows, k)
	if m := s.byOwner[owner]; m != nil {
		delete(m, k)
		if len(m) == 0 {
			delete(s.byOwner, owner)
		}
	}
}

// Replace ends a resync from owner: every flow held from owner whose key
// is not in keep is dropped. It returns how many were dropped.
func (s *ReplicaStore) Replace(owner string, keep map[FlowKey]struct{}) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k := range s.byOwner[owner] {
		if _, ok := keep[k]; !ok {
			s.remove(k, owner)
			n++
		}
	}
	return n
}

// Lookup returns a copy of the replica held for k.
func (s *ReplicaStore) Lookup(k FlowKey) (*batonv1.FlowState, bool) {
	s.mu.RLock()
	st, ok := s.flows[k]
	s.mu.RUnlock()
	if !ok {
		return nil, false
	}
	return proto.Clone(st).(*batonv1.FlowState), true
}

// Range calls fn with every replica held until fn returns false. The
// states are the store's own: fn must not modify them or call the store.
func (s *ReplicaStore) Range(fn func(*batonv1.FlowState) bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, st := range s.flows {
		if !fn(st) {
			return
		}
	}
}

// Len is the number of replicas held.
func (s *ReplicaStore) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.flows)
}

// Count is the number of replicas held for owner.
func (s *ReplicaStore) Count(owner string) int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.byOwner[owner])
}

// Counts returns the number of replicas held per owner.
func (s *ReplicaStore) Counts() map[string]int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make(map[string]int, len(s.byOwner))
	for o, m := range s.byOwner {
		out[o] = len(m)
	}
	return out
}
