package handoff

// This file is the hand-over of a live flow between two nodes: the Claim
// RPC (the claimer's call and the owner's answer) and Release.
//
// The owner's side of a claim (handOver), in this order:
//
//  1. fence: the flow's entry goes to esHold, so the fence hook (outside
//     the flow tracker) drops every packet of it both ways from now on,
//     silently: no RST, no FIN (pitfall 4);
//  2. snapshot: the tracker's state now is exactly what the client saw
//     (every packet that can still reach it was recorded before the fence
//     could drop it; see takeover_hook.go);
//  3. ask the service whether that state can be continued (CanResume); if
//     not, lift the fence (the few dropped packets are retransmitted) and
//     refuse with cannot_resume: the flow stays here and the claimer
//     tunnels its packets instead;
//  4. forget the flow in the tracker, keep it as esMoved (outbound
//     dropped by the inner hook, client packets intercepted) for a while,
//     and grant with the new epoch; the local connection is aborted on
//     its own goroutine meanwhile (its RST, like anything it still sends,
//     is dropped as esMoved): Abort waits for the endpoint's lock, which
//     a connection sending at full speed holds for long stretches
//     (measured: 0.1-4 ms, tails of 100 ms on a loaded machine), and the
//     claimer need not wait for it. A restore of the flow on this node
//     waits for it (waitAborted), or its SYN would meet the old endpoint.
//
// No two nodes send data for one flow after a claim completes: the owner
// stopped before it answered.
//
// A node that does not own the flow answers not_owner with what it knows
// (hint), except the designated replica of a dead owner's flow, which
// restores the flow first (a push) and then hands it over: that way only
// one node ever restores a dead owner's flow.

import (
	"context"
	"errors"
	"net/netip"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// claimFrom asks peer to hand k over at (at least) epoch.
func (e *Engine) claimFrom(ctx context.Context, peer string, k FlowKey, epoch uint64) (*batonv1.ClaimResponse, error) {
	c := e.r.peerClient(peer)
	if c == nil {
		return nil, errors.New("peer " + peer + " is down")
	}
	ctx, cancel := context.WithTimeout(ctx, claimTimeout)
	defer cancel()
	e.trace(k, PhaseClaimSent, peer)
	resp, err := c.Claim(ctx, &batonv1.ClaimRequest{Key: k.Proto(), Claimer: e.self, Epoch: epoch})
	if err == nil && e.tracer.Load() != nil {
		d := "granted"
		if !resp.Granted {
			d = resp.Reason
		}
		e.trace(k, PhaseClaimDone, d)
	}
	return resp, err
}

func refuse(reason string) *batonv1.ClaimResponse { return &batonv1.ClaimResponse{Reason: reason} }

// handleClaim answers a peer's Claim (caller is its authenticated name).
func (e *Engine) handleClaim(ctx context.Context, caller string, req *batonv1.ClaimRequest) (*batonv1.ClaimResponse, error) {
	k, err := KeyFromProto(req.GetKey())
	if err != nil {
		return nil, err
	}
	if !prefixesContain(e.prefixes, k.Anycast.Addr()) {
		return nil, reject(RejectNotAnycast, "%s is outside the anycast prefixes", k.Anycast.Addr())
	}
	e.trace(k, PhaseClaimReceived, caller)
	if e.closed.Load() {
		return refuse(claimNoTakeover), nil
	}
	if f := e.lookup(k); f != nil {
		f.mu.Lock()
		st, run, owner, epoch, reason := f.get(), f.run, f.owner, f.epoch, f.reason
		f.mu.Unlock()
		switch st {
		case esRestoring:
			if run != nil {
				wctx, cancel := context.WithTimeout(ctx, waitRestoreBound)
				select {
				case <-run.done:
				case <-wctx.Done():
				}
				cancel()
			}
		case esDeciding, esHold:
			return refuse(claimBusy), nil
		case esMoved, esForward:
			r := refuse(claimNotOwner)
			r.OwnerHint, r.OwnerEpoch = owner, epoch
			return r, nil
		case esReset:
			if reason == reasonCannotResume {
				return refuse(claimCannotResume), nil
			}
			return refuse(claimReset), nil
		}
	}
	epoch, owned := e.tr.Epoch(k)
	if !owned && e.restoreForClaim(ctx, k) {
		epoch, owned = e.tr.Epoch(k)
	}
	if !owned {
		if f := e.lookup(k); f != nil && f.get() == esReset {
			return refuse(claimReset), nil
		}
		r := refuse(claimNotOwner)
		if st, ok := e.r.store.Lookup(k); ok && st.Owner != e.self {
			r.OwnerHint, r.OwnerEpoch = st.Owner, st.Epoch
		}
		return r, nil
	}
	return e.handOver(k, caller, max(req.Epoch, epoch+1)), nil
}

// restoreForClaim restores k first when this node is the designated
// replica of its dead owner, and reports whether it did.
func (e *Engine) restoreForClaim(ctx context.Context, k FlowKey) bool {
	st, ok := e.designatedState(ctx, k) // takeover_designated.go
	if !ok {
		return false
	}
	run := e.startPush(k, st)
	if run == nil {
		_, owned := e.tr.Epoch(k)
		return owned
	}
	select {
	case <-run.done:
	case <-ctx.Done():
		return false
	}
	_, owned := e.tr.Epoch(k)
	return owned
}

// handOver fences k, snapshots it and aborts it here (see the file
// comment); the claimer owns it at epoch.
func (e *Engine) handOver(k FlowKey, claimer string, epoch uint64) *batonv1.ClaimResponse {
	f, created := e.entry(k, esHold)
	f.mu.Lock()
	prev := f.get()
	if !created {
		switch prev {
		case esHold, esDeciding, esRestoring:
			f.mu.Unlock()
			return refuse(claimBusy)
		}
		f.prevHold = prev
		e.setStateLocked(f, esHold)
	}
	f.mu.Unlock()
	unhold := func() {
		if created {
			e.drop(f)
			return
		}
		f.mu.Lock()
		if f.get() == esHold {
			e.setStateLocked(f, f.prevHold)
		}
		f.mu.Unlock()
	}

	st, ok := e.tr.Lookup(k)
	if !ok {
		unhold()
		return refuse(claimNotOwner)
	}
	e.resMu.Lock()
	_, pending := e.resumes[k]
	e.resMu.Unlock()
	if pending {
		// Restored here but not yet taken by the accept loop (a loaded
		// node): its service has not started and its endpoint may still
		// sit in the listener's queue, where an abort would leave the
		// 4-tuple taken and reset this node's next synthetic SYN for it.
		// The claimer tries again shortly.
		unhold()
		return refuse(claimBusy)
	}
	if sy := e.r.repl.sync.Load(); sy != nil {
		sy.attachOutput(k, st) // sync mode: the output the client lacks (sync.go)
	}
	if err := e.canResume(k, resumeOf(st, true, nil)); err != nil {
		unhold()
		e.log.Info("takeover: claim refused: the service cannot hand the stream over", "flow", k.String(), "claimer", claimer, "err", err)
		return refuse(claimCannotResume)
	}
	ep := e.findEndpoint(k)
	e.resMu.Lock()
	delete(e.resumes, k) // a restored connection not yet accepted must not start
	e.resMu.Unlock()
	e.tr.Remove(k)
	f.mu.Lock()
	e.setStateLocked(f, esMoved)
	if ep != nil && abortInline {
		ep.Abort()
	} else if ep != nil {
		done := make(chan struct{})
		f.aborted = done
		go func() { // not in e.wg: a claim may still arrive as Close waits
			ep.Abort()
			close(done)
		}()
	}
	f.owner, f.epoch = claimer, epoch
	f.until = time.Now().Add(movedLinger)
	e.clearQueueLocked(f)
	f.mu.Unlock()
	st.Epoch = epoch
	e.trace(k, PhaseHandedOver, claimer)
	e.log.Debug("takeover: flow handed over", "flow", k.String(), "to", claimer, "epoch", epoch,
		"client_acked", st.ClientAckedBytes, "server_acked", st.ServerAckedBytes)
	return &batonv1.ClaimResponse{Granted: true, State: st}
}

// abortInline makes handOver abort the connection before it grants, as
// it once did (for the latency benchmark's comparison).
var abortInline = false

// waitAborted waits until the connection f's flow had on this node before
// it was handed over is aborted (handOver), if it is not yet.
func (e *Engine) waitAborted(ctx context.Context, f *flowEntry) error {
	f.mu.Lock()
	done := f.aborted
	f.mu.Unlock()
	if done == nil {
		return nil
	}
	t := time.NewTimer(restoreTimeout)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
		return fail(reasonRestoreFailed, "the connection handed over before is not aborted yet")
	case <-ctx.Done():
		return fail(reasonTimeout, "waiting for the abort of the connection handed over before: %v", ctx.Err())
	}
}

// handleRelease answers a peer's Release: if it owns k at a higher epoch
// than this node, this node loses the flow.
func (e *Engine) handleRelease(caller string, req *batonv1.ReleaseRequest) (*batonv1.ReleaseResponse, error) {
	k, err := KeyFromProto(req.GetKey())
	if err != nil {
		return nil, err
	}
	if epoch, owned := e.tr.Epoch(k); owned && req.Epoch > epoch {
		e.loseFlow(k, caller, req.Epoch)
	}
	return &batonv1.ReleaseResponse{Ok: true}, nil
}

func prefixesContain(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
