package handoff

// The engine's side of the lease rules (lease.go): fencing this node's
// own flows while it holds no lease, and waiting, before taking over a
// peer's flows, until that peer is certainly gone.

import (
	"time"

	"github.com/baton-anycast/baton/stack"
)

// leaseTick is how often the engine re-reads its lease and re-checks the
// peers it waits for.
const leaseTick = 50 * time.Millisecond

// watchLease keeps e.leaseFence current: the unix nanosecond the lease ran
// out while it is lost (flows established before then are fenced), and
// for leaseReconcile after it came back; 0 otherwise.
func (e *Engine) watchLease() {
	t := time.NewTicker(leaseTick)
	defer t.Stop()
	var back time.Time // when the lease came back (zero: held, or still lost)
	had := false       // the lease was held once (a starting node has none yet)
	lost := false      // a held lease was lost (logged)
	for {
		select {
		case <-e.ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		until := e.r.members.LeaseUntil()
		held := now.Before(until)
		if held && !had {
			had = true
			e.log.Debug("takeover: lease held")
		}
		fence := e.leaseFence.Load()
		switch {
		case !held && fence == 0:
			at := until
			if at.IsZero() {
				at = now
			}
			e.leaseFence.Store(at.UnixNano())
			back = time.Time{}
			e.m.leaseHeld.Store(0)
			if lost = had; lost {
				e.log.Warn("takeover: lease lost, fencing the flows owned before it ran out",
					"lease", e.r.members.Lease(), "ran_out", at)
			}
		case !held:
			back = time.Time{}
		case fence != 0 && back.IsZero():
			back = now
			if lost {
				e.log.Info("takeover: lease back, flows stay fenced while peers reconcile", "for", leaseReconcile)
			}
		case fence != 0 && now.Sub(back) >= leaseReconcile:
			e.leaseFence.Store(0)
			e.m.leaseHeld.Store(1)
			if lost {
				e.log.Info("takeover: lease held, fenced flows resume")
			}
			lost = false
		}
	}
}

// leaseVerdict is the fence hook's lease rule for one outbound packet.
func (e *Engine) leaseVerdict(seg *tcpSegment) stack.Verdict {
	fence := e.leaseFence.Load()
	if fence == 0 || !e.tr.leaseFenced(seg.key, fence) {
		return stack.Pass
	}
	e.m.packet(pktLeaseFenced)
	return stack.Drop
}

// ownerGone reports whether the flows of owner may be taken over now
// (lease.go: dead or proven fenced).
func (e *Engine) ownerGone(owner string) bool {
	ok, _ := e.r.members.Gone(owner, time.Now())
	return ok
}

// awaitGone waits until peer is certainly gone and then pushes its flows
// (peerDown), or gives up when it comes back. One waiter per peer.
func (e *Engine) awaitGone(peer string) {
	e.goneMu.Lock()
	if e.awaiting[peer] {
		e.goneMu.Unlock()
		return
	}
	e.awaiting[peer] = true
	e.goneMu.Unlock()
	// Closing: no waiter; the entry is moot with the engine.
	e.spawn(func() {
		defer func() {
			e.goneMu.Lock()
			delete(e.awaiting, peer)
			e.goneMu.Unlock()
		}()
		start := time.Now()
		t := time.NewTicker(leaseTick)
		defer t.Stop()
		for {
			_, ch := e.r.members.Watch()
			gone, why := e.r.members.Gone(peer, time.Now())
			switch {
			case gone:
				e.log.Info("takeover: peer certainly gone, taking its flows over", "peer", peer, "why", why, "waited", time.Since(start))
				e.pushFlowsOf(peer)
				return
			case why == "up":
				e.log.Info("takeover: peer back before it was proven gone; nothing taken over", "peer", peer, "waited", time.Since(start))
				return
			}
			select {
			case <-e.ctx.Done():
				return
			case <-ch:
			case <-t.C:
			}
		}
	})
}

// errAwaitGone ends a pull whose owner is unreachable but not certainly
// gone: the flow's packets are dropped (no reset) and its next packet
// decides again.
var errAwaitGone = &takeoverError{reason: "await_gone", err: errorString("owner unreachable, not proven gone")}
