package handoff

// This file reacts to the cluster changing under the flows:
//
//   - push (pitfall 1): a receive-only client whose server vanished has
//     nothing to acknowledge, so no packet of its flow ever reaches
//     another node, and a probe from a new owner would be rate-limited
//     away by gVisor. So when a peer goes down, every flow held as a
//     replica from it is restored at once by its designated replica (the
//     first live member by rendezvous weight, designated(), which every
//     node computes alike), whose service starts sending from the
//     client's last acknowledged position. Other nodes leave those flows
//     alone: a misrouted packet there claims the flow from the designated
//     replica.
//   - losing a flow (fencing by epoch): a node that learns, through
//     replication or a Release, that another node owns one of its flows
//     at a higher epoch stops emitting for it at once and aborts its
//     connection silently (loseFlow).
//
// Liveness comes from the replication streams (members.go). A peer killed
// with SIGKILL closes its sockets, which ends both replication streams at
// once, so the push starts within milliseconds, not after a keepalive.

import (
	"context"
	"time"

	"google.golang.org/protobuf/proto"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// watchMembers starts a push for every peer that goes down.
func (e *Engine) watchMembers() {
	live, ch := e.r.members.Watch()
	prev := make(map[string]bool, len(live))
	for _, n := range live {
		prev[n] = true
	}
	for {
		select {
		case <-e.ctx.Done():
			return
		case <-ch:
		}
		live, ch = e.r.members.Watch()
		cur := make(map[string]bool, len(live))
		for _, n := range live {
			cur[n] = true
		}
		for n := range prev {
			if !cur[n] {
				e.peerDown(n)
			}
		}
		for n := range cur {
			if !prev[n] {
				e.peerUp(n)
			}
		}
		prev = cur
	}
}

// peerDown handles the death of peer: its forwarded flows are forgotten
// (their next packet decides again), and the flows held from it for which
// this node is the designated replica are pushed.
func (e *Engine) peerDown(peer string) {
	e.stopForwarder(peer)
	if gone, why := e.r.members.Gone(peer, time.Now()); !gone {
		// Unreachable but maybe alive, and then maybe still sending for
		// its flows (lease.go): wait until it is certainly gone.
		e.log.Info("takeover: peer down, waiting until it is certainly gone", "peer", peer, "why", why)
		e.awaitGone(peer)
		return
	}
	e.pushFlowsOf(peer)
}

// pushFlowsOf pushes the flows held from peer, which is certainly gone,
// for which this node is the designated replica.
func (e *Engine) pushFlowsOf(peer string) {
	var states []*batonv1.FlowState
	e.r.store.Range(func(st *batonv1.FlowState) bool {
		if st.Owner == peer {
			states = append(states, proto.Clone(st).(*batonv1.FlowState))
		}
		return true
	})
	n := 0
	for _, st := range states {
		k, err := KeyFromProto(st.Key)
		if err != nil || e.designated(k, peer) != e.self {
			continue
		}
		if cur, ok := e.r.store.Lookup(k); !ok || cur.Owner != peer || cur.Epoch != st.Epoch {
			continue // restored, moved or closed since the snapshot above
		}
		if st.Phase != batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED && st.Phase != batonv1.FlowPhase_FLOW_PHASE_CLOSING {
			continue
		}
		e.startPush(k, st)
		n++
	}
	e.log.Info("takeover: peer down", "peer", peer, "replicas_held", len(states), "pushed", n)
}

// startPush restores k from st now (push). It returns the run (nil if it
// could not start). A takeover already under way for k (a pull deciding)
// is joined instead: it reaches the same decision.
func (e *Engine) startPush(k FlowKey, st *batonv1.FlowState) *takeoverRun {
	if _, owned := e.tr.Epoch(k); owned {
		return nil
	}
	f, _ := e.entry(k, esDeciding)
	f.mu.Lock()
	switch f.get() {
	case esRestoring, esActive, esForward, esHold:
		run := f.run
		f.mu.Unlock()
		return run
	case esDeciding:
	case esMoved:
		if st.Epoch < f.epoch {
			// Handed over (or lost) at a newer epoch than st's: st
			// is stale, and restoring from it would make this node
			// send for a flow another node owns (seen in the lab: a
			// claim restored the flow here and handed it over between
			// peerDown reading the replicas and this push). A state
			// of the new owner (it died too) is pushed as usual.
			f.mu.Unlock()
			return nil
		}
		fallthrough
	default:
		e.setStateLocked(f, esDeciding)
		f.trigger = time.Now()
	}
	f.mu.Unlock()
	return e.startRun(f, func(ctx context.Context) error {
		f.resetPhases()
		err := e.restore(ctx, f, withEpoch(st, st.Epoch+1), HowPush, false, nil)
		if err != nil && e.ctx.Err() != nil {
			e.drop(f)
			return err
		}
		if err != nil {
			reason := failReason(err)
			e.m.failure(reason)
			e.log.Info("takeover: push failed, flow reset", "flow", k.String(), "reason", reason, "err", err)
			e.resetFlow(f, st, reason)
		}
		return err
	})
}

// peerUp tells a peer that comes back which of its former flows this node
// took over while it was away (Release): if it was only cut off, not dead,
// it must stop emitting for them before its retransmissions or resets
// reach their clients.
func (e *Engine) peerUp(peer string) {
	type rel struct {
		k     FlowKey
		epoch uint64
	}
	var rels []rel
	e.tr.Owned(func(st *batonv1.FlowState) bool {
		h := st.History
		if len(h) >= 2 && h[len(h)-2].Node == peer && h[len(h)-1].Node == e.self {
			if k, err := KeyFromProto(st.Key); err == nil {
				rels = append(rels, rel{k, st.Epoch})
			}
		}
		return true
	})
	if len(rels) == 0 {
		return
	}
	e.spawn(func() {
		for _, r := range rels {
			e.releaseOldOwner(e.ctx, peer, r.k, r.epoch)
		}
	})
}

// foreignState is called by replication for every flow state a peer
// replicates to this node: a higher epoch for a flow this node owns means
// another node took it over (after a partition, or a claim this node did
// not see end): this node loses it.
func (e *Engine) foreignState(st *batonv1.FlowState) {
	if st == nil || st.Owner == e.self {
		return
	}
	k, err := KeyFromProto(st.Key)
	if err != nil {
		return
	}
	if epoch, owned := e.tr.Epoch(k); owned && st.Epoch > epoch {
		e.loseFlow(k, st.Owner, st.Epoch)
	}
}

// loseFlow makes this node stop emitting for k at once (the fence drops
// the flow's packets, then the tracker forgets it and its connection is
// aborted silently: the abort's RST is dropped too), because owner owns it
// at epoch.
func (e *Engine) loseFlow(k FlowKey, owner string, epoch uint64) {
	f, _ := e.entry(k, esHold)
	f.mu.Lock()
	e.setStateLocked(f, esHold)
	f.mu.Unlock()
	if ep := e.findEndpoint(k); ep != nil {
		ep.Abort()
	}
	e.tr.Remove(k)
	f.mu.Lock()
	e.setStateLocked(f, esMoved)
	f.owner, f.epoch = owner, epoch
	f.until = time.Now().Add(movedLinger)
	e.clearQueueLocked(f)
	f.mu.Unlock()
	e.log.Info("takeover: flow lost to a higher epoch", "flow", k.String(), "owner", owner, "epoch", epoch)
}

// releaseOldOwner tells a node that may still believe it owns k (it was
// thought dead) that this node owns it now, best effort.
func (e *Engine) releaseOldOwner(ctx context.Context, old string, k FlowKey, epoch uint64) {
	c := e.r.peerClient(old)
	if c == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, claimTimeout)
	defer cancel()
	_, _ = c.Release(ctx, &batonv1.ReleaseRequest{Key: k.Proto(), NewOwner: e.self, Epoch: epoch})
}
