package handoff

// Leases: at most one node sends data for a flow, also while the peer
// network is partitioned.
//
// A designated replica (or a node receiving a flow's packets) cannot tell
// an owner that died from one it merely cannot reach. Without more, both
// sides of a partition take over each other's flows and two nodes send for
// one flow until the partition heals. The lease rules close that window:
//
//   - A node holds its lease while a majority of the cluster has heard it
//     recently: at least majority-1 peers acknowledged a replication batch
//     this node SENT less than the lease duration ago (a round trip, timed
//     from the send, so no clock agreement is needed, only similar clock
//     rates). A node without its lease fences every flow it owned before
//     the lease ran out: their outbound packets are dropped, silently
//     (fenceHook). It keeps serving connections opened since (nobody else
//     can hold their state) and resumes the fenced flows leaseReconcile
//     after the lease is back, time for a peer that took one over meanwhile
//     to tell it (Release, replication of the higher epoch).
//   - A node takes over the flows of a peer that went down only when the
//     peer is certainly gone: either dead (its replication stream ended
//     and a TCP connection to its peer port was refused: its process is
//     gone), or proven fenced: this node holds its own lease, and enough
//     members (this node included) have heard nothing at all from the peer
//     for longer than the lease plus leaseMargin that the peer cannot have
//     a majority acknowledging it. Each node tells its peers, in its
//     replication batches, how long ago it last heard every member
//     (FlowBatch.heard); a report counts while it is fresh.
//
// A peer that is alive but unreachable is therefore never taken over while
// it may still hold its lease; when no side of a partition has a majority
// (two nodes cut apart), nobody takes over and the flows wait for the heal
// (they are not reset). Not covered: a partition that answers connection
// attempts with refusals (it looks like a death), and two nodes with
// different views of which peers are dead (a node counts only the peers
// it has not found dead when it computes a majority).

import (
	"context"
	"errors"
	"net"
	"syscall"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

const (
	// DefaultLease is how long a node keeps its lease after the last
	// batch a majority acknowledged was sent. Heartbeats go every
	// heartbeatEvery (1 s) on an idle stream, so a lease survives about
	// two seconds of delayed acknowledgements (a loaded peer) before its
	// node fences anything; ackTimeout (2 s) tears such a stream down
	// sooner.
	DefaultLease = 3 * time.Second
	// leaseMargin is added to the lease before silence proves a peer
	// fenced: clock rates differ a little, and the peer's fence hook acts
	// on its next packet.
	leaseMargin = 500 * time.Millisecond
	// leaseReconcile keeps flows fenced after the lease returns.
	leaseReconcile = time.Second
	// reportEvery is how often a batch carries the heard report;
	// reportFresh is how long a received report counts.
	reportEvery = 250 * time.Millisecond
	reportFresh = 2 * time.Second
	// probeTimeout bounds the TCP connection attempt that tells a dead
	// peer (refused) from an unreachable one.
	probeTimeout = 300 * time.Millisecond
)

// heardReport is what a peer last reported hearing from the others.
type heardReport struct {
	at    time.Time            // when this node received it
	heard map[string]time.Time // member -> when the reporter last heard it (this node's clock); zero: never
}

// SetLease sets the lease duration (DefaultLease when d <= 0).
func (m *Members) SetLease(d time.Duration) {
	if d <= 0 {
		d = DefaultLease
	}
	m.mu.Lock()
	m.lease = d
	m.mu.Unlock()
}

// Lease returns the lease duration.
func (m *Members) Lease() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.leaseLocked()
}

func (m *Members) leaseLocked() time.Duration {
	if m.lease <= 0 {
		return DefaultLease
	}
	return m.lease
}

// supported records that peer acknowledged a batch this node sent at sent.
func (m *Members) supported(name string, sent time.Time) {
	m.mu.Lock()
	if s, ok := m.state[name]; ok && sent.After(s.support) {
		s.support = sent
	}
	m.mu.Unlock()
}

// majority of n members.
func majority(n int) int { return n/2 + 1 }

// voters is the number of members not found dead, self included.
func (m *Members) votersLocked() int {
	n := 1
	for _, s := range m.state {
		if !s.dead {
			n++
		}
	}
	return n
}

// LeaseUntil returns when this node's lease runs out as things stand (the
// zero time if it holds none; far in the future for a cluster of one).
func (m *Members) LeaseUntil() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.leaseUntilLocked()
}

func (m *Members) leaseUntilLocked() time.Time {
	need := majority(m.votersLocked()) - 1
	if need <= 0 {
		return time.Unix(1<<40, 0)
	}
	// The need-th newest acknowledged send time among live voters.
	var sends []time.Time
	for _, s := range m.state {
		if !s.dead && !s.support.IsZero() {
			sends = append(sends, s.support)
		}
	}
	if len(sends) < need {
		return time.Time{}
	}
	for i := 1; i < len(sends); i++ { // tiny: insertion sort, newest first
		for j := i; j > 0 && sends[j].After(sends[j-1]); j-- {
			sends[j], sends[j-1] = sends[j-1], sends[j]
		}
	}
	return sends[need-1].Add(m.leaseLocked())
}

// HasLease reports whether this node holds its lease at now.
func (m *Members) HasLease(now time.Time) bool {
	return now.Before(m.LeaseUntil())
}

// markDead records that peer's process is gone (a refused connection after
// its stream ended). Hearing from it again clears it.
func (m *Members) markDead(name string) {
	m.update(name, func(s *memberState) { s.dead = true })
}

// Dead reports whether peer was found dead and has not been heard since.
func (m *Members) Dead(name string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.state[name]
	return ok && s.dead
}

// report records peer's heard report, received at now.
func (m *Members) report(from string, hs []*batonv1.HeardReport, now time.Time) {
	if len(hs) == 0 {
		return
	}
	r := heardReport{at: now, heard: make(map[string]time.Time, len(hs))}
	for _, h := range hs {
		if _, known := m.state[h.GetNode()]; !known && h.GetNode() != m.self {
			continue // not a member: ignored
		}
		if a := h.GetAgeNanos(); a >= 0 {
			r.heard[h.GetNode()] = now.Add(-time.Duration(a))
		} else {
			r.heard[h.GetNode()] = time.Time{}
		}
	}
	m.mu.Lock()
	if s, ok := m.state[from]; ok {
		s.report = r
	}
	m.mu.Unlock()
}

// heardReports builds this node's report for its peers, at now.
func (m *Members) heardReports(now time.Time) []*batonv1.HeardReport {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]*batonv1.HeardReport, 0, len(m.peers))
	for _, p := range m.peers {
		age := int64(-1)
		if t := m.state[p.Name].lastSeen; !t.IsZero() {
			age = int64(max(now.Sub(t), 0))
		}
		out = append(out, &batonv1.HeardReport{Node: p.Name, AgeNanos: age})
	}
	return out
}

// Gone reports whether owner certainly sends nothing any more, so that its
// flows may be taken over, and why (see the file comment): "dead", or
// "fenced" (proven by silence), "not a member", or false with what is
// missing.
func (m *Members) Gone(owner string, now time.Time) (bool, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.state[owner]
	switch {
	case !ok:
		// Named by a peer's state but not in this node's membership (a
		// configuration mismatch): nothing can be proven, nor reached; as
		// before leases, it counts as gone.
		return true, "not a member"
	case s.dead:
		return true, "dead"
	case s.up():
		return false, "up"
	case !now.Before(m.leaseUntilLocked()):
		return false, "this node holds no lease"
	}
	silence := m.leaseLocked() + leaseMargin
	voters := m.votersLocked()
	need := voters - majority(voters) + 1 // silent voters the owner's majority cannot do without
	silent := 0
	if now.Sub(s.lastSeen) > silence {
		silent++ // this node
	}
	for name, x := range m.state {
		if name == owner || x.dead || now.Sub(x.report.at) > reportFresh {
			continue
		}
		if h := x.report.heard[owner]; x.report.at.Sub(h) > silence {
			silent++
		}
	}
	if silent >= need {
		return true, "fenced"
	}
	return false, "not proven silent"
}

// probeDead tries a TCP connection to addr and reports whether it was
// refused (nothing listens: the peer's process is gone).
func probeDead(ctx context.Context, addr string) bool {
	d := net.Dialer{Timeout: probeTimeout}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}
