package handoff

// This file is the tracker's handshake bound. A flow enters the table with
// the client's SYN and stays in the handshake until the client acks the
// SYN-ACK; a SYN flood (or any client that never completes its handshakes)
// creates nothing else. Without a bound of their own, such half-open flows
// filled the whole table (MaxFlows) and held it for HandshakeTimeout, so
// that every real connection opened meanwhile was served but untracked:
// neither replicated nor protected by takeover.
//
// So at most MaxHandshaking flows of the table are in the handshake. They
// are kept in one list, oldest first. A client SYN that finds the list
// full evicts its oldest flow (removed from the table, counted as
// Closed.Idle and HandshakeStats().Evicted: the stack still serves it, and
// if its client ever completes the handshake, the flow is served untracked)
// and takes its place. Evicting rather than refusing the newcomer matters:
// the half-open flows of a flood never leave on their own before
// HandshakeTimeout, so refusing newcomers would leave every real connection
// untracked for as long as the flood's flows last, whereas a real client
// completes its handshake within a round trip and is evicted only if
// MaxHandshaking newer SYNs arrive within that round trip. What the bound
// guarantees either way: half-open flows never hold more than
// MaxHandshaking of the MaxFlows slots (nor the tracker's memory of more), and
// established flows are never evicted. A SYN is refused (counted in
// HandshakeStats().Untracked) only when it finds the list full after trying
// to evict (another goroutine's SYN took the slot), or when it replaces an
// established connection on the same 4-tuple (no eviction is tried there:
// the shard lock is held).
//
// Locking: the list and its nodes' links are guarded by hsMu. A flow's hs
// field is guarded by its shard's lock. hsMu is taken with a shard lock held
// (never the other way round): the eviction reads the oldest node under
// hsMu, releases it, then locks the victim's shard and checks that the
// victim still holds that node.

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// DefaultMaxHandshaking is the default bound for flows in the handshake: a
// quarter of maxFlows (at least 1). Half-open flows then never take more
// than a quarter of the table; three quarters stay for established flows.
// With the default MaxFlows (65 536) that is 16 384 handshakes in flight:
// a real client's handshake survives a flood of up to 16 384 SYNs per round
// trip (164 000 SYNs/s at a 100 ms round trip), while the memory of the
// flood's flows stays bounded.
func DefaultMaxHandshaking(maxFlows int) int {
	if maxFlows <= 0 {
		maxFlows = DefaultMaxFlows
	}
	return max(maxFlows/4, 1)
}

// HandshakeStats are the handshake bound's counters.
type HandshakeStats struct {
	// Handshaking is the number of flows in the handshake now; Max their
	// bound (MaxHandshaking).
	Handshaking, Max int
	// Evicted counts flows in the handshake removed from the table to
	// make room for a newer one (also counted in Stats().Closed.Idle).
	Evicted uint64
	// Untracked counts client SYNs not tracked because MaxHandshaking
	// flows were in the handshake even after an eviction (a concurrent
	// SYN took the slot, or the 4-tuple's old connection was replaced).
	// The stack serves them; they are not replicated.
	Untracked uint64
}

// HandshakeStats returns the handshake bound's counters.
func (t *Tracker) HandshakeStats() HandshakeStats {
	return HandshakeStats{
		Handshaking: int(t.hsLen.Load()),
		Max:         int(t.maxHS),
		Evicted:     t.hsEvicted.Load(),
		Untracked:   t.hsUntracked.Load(),
	}
}

// trkHSNode is a flow's place in the handshake list. f and hk are set
// before the node is linked and never change; prev and next are guarded by
// hsMu.
type trkHSNode struct {
	f          *trkFlow
	hk         trkKey
	prev, next *trkHSNode
}

// trkClientSYN reports whether seg is a client's connection request (SYN
// without ACK or RST).
func trkClientSYN(seg *tcpSegment) bool {
	return seg.flags&(header.TCPFlagSyn|header.TCPFlagAck|header.TCPFlagRst) == header.TCPFlagSyn
}

// enterHandshakeLocked gives f (new, in f's shard, whose lock is held) a
// handshake slot at the end of the list. It reports false, leaving f
// alone, when MaxHandshaking flows hold one.
func (t *Tracker) enterHandshakeLocked(f *trkFlow) bool {
	n := &trkHSNode{f: f, hk: f.hk}
	t.hsMu.Lock()
	if t.hsLen.Load() >= t.maxHS {
		t.hsMu.Unlock()
		return false
	}
	n.prev = t.hsTail
	if t.hsTail != nil {
		t.hsTail.next = n
	} else {
		t.hsHead = n
	}
	t.hsTail = n
	t.hsLen.Add(1)
	t.hsMu.Unlock()
	f.hs = n
	return true
}

// leaveHandshakeLocked releases f's handshake slot, if it holds one (f's
// shard lock is held): f completed the handshake or leaves the table.
func (t *Tracker) leaveHandshakeLocked(f *trkFlow) {
	n := f.hs
	if n == nil {
		return
	}
	f.hs = nil
	t.hsMu.Lock()
	if n.prev != nil {
		n.prev.next = n.next
	} else {
		t.hsHead = n.next
	}
	if n.next != nil {
		n.next.prev = n.prev
	} else {
		t.hsTail = n.prev
	}
	n.prev, n.next = nil, nil
	t.hsLen.Add(-1)
	t.hsMu.Unlock()
}

// makeHandshakeRoom evicts the oldest flow in the handshake for the SYN of
// client c on hk (in shard sh, whose lock is not held), unless that SYN
// would not start a new flow: its 4-tuple is tracked, or c is not a client
// address (see clientSYNLocked).
func (t *Tracker) makeHandshakeRoom(sh *trkShard, hk *trkKey, c netip.Addr, now int64) {
	if c.IsUnspecified() || c.IsMulticast() {
		return
	}
	sh.mu.Lock()
	_, tracked := sh.flows[*hk]
	sh.mu.Unlock()
	if tracked {
		return
	}
	t.hsMu.Lock()
	n := t.hsHead
	t.hsMu.Unlock()
	if n == nil {
		return
	}
	vs := t.shardFor(&n.hk)
	vs.mu.Lock()
	if f := vs.flows[n.hk]; f != nil && f.hs == n {
		t.hsEvicted.Add(1)
		t.removeLocked(vs, f, &t.closedIdle, now)
	}
	vs.mu.Unlock()
}
