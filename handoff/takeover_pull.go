package handoff

// This file decides what to do with a misrouted flow (a "pull": one of its
// packets reached this node, whose stack does not have it):
//
//  1. find its state: this node's replicas first, then every live peer
//     (Lookup RPCs in parallel; the copy with the highest epoch wins, the
//     owner's own copy on a tie);
//  2. unknown everywhere: the stack gets the packets and resets the flow,
//     as it always did (counted as "unknown");
//  3. owner alive: policy "migrate" claims the flow (claim.go: the owner
//     fences it and returns its exact state) and restores it here with
//     epoch+1 ("pull-migrate"); policy "forward", or an owner whose
//     service cannot hand the stream over exactly, keeps the flow where it
//     is and tunnels its packets there (forward.go, GLB/Beamer's second
//     chance);
//  4. owner dead: the designated replica restores it. If that is this
//     node, it restores from the replicated state ("pull-restore");
//     otherwise it claims the flow from the designated replica, which
//     restores it first if needed, so that two nodes never restore the
//     same flow.
//
// Refusals carry hints (who owns the flow now, at which epoch) and the
// loop follows them, bounded by the takeover window. Anything that ends
// without a live connection here or a forward ends with a reset.

import (
	"context"
	"sync"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// maxPullRounds bounds the decision loop (each round is a lookup and at
// most one claim).
const maxPullRounds = 24

// Retry pacing of the decision loop. A refusal with a hint (not_owner:
// the flow moved on, the refuser says where) is new information and is
// followed at once, up to pullPace.hints times in a row (two nodes
// pointing at each other must not burn the rounds). Any other failed
// round (busy, stale epoch, an RPC error, a stale copy) waits before the
// next: 1 ms, doubling, up to 20 ms x round (at most 200 ms; it was
// 20 ms x round from the first retry), so that a short-lived condition (a
// claim or restore under way elsewhere, a replica lagging by a coalesce
// window) costs about a millisecond, while the rounds still span seconds
// in all, time for the membership to notice a dying owner.
type pullPacing struct {
	hints             int // hints followed at once in a row
	first, step, most time.Duration
	movedHint         bool // a flow handed over from here asks its new owner first
}

// pullPace is the decision loop's pacing (a variable for the latency
// benchmark, which compares it with the former fixed 20 ms x round and
// no hint from a hand-over).
var pullPace = pullPacing{hints: 2, first: time.Millisecond, step: 20 * time.Millisecond, most: 200 * time.Millisecond, movedHint: true}

// retryDelay is the wait before round (> 0) after a failed round.
func (p pullPacing) retryDelay(round int) time.Duration {
	d := p.first << min(round-1, 16)
	return min(d, p.step*time.Duration(round), p.most)
}

// startPull starts the takeover of an intercepted flow.
func (e *Engine) startPull(f *flowEntry) {
	run := e.startRun(f, func(ctx context.Context) error { return e.pullRun(ctx, f) })
	if run == nil {
		// At MaxTakeovers or closing: forget the flow; its next packet
		// tries again.
		e.drop(f)
	}
}

// pullRun is the takeover goroutine of an intercepted flow.
func (e *Engine) pullRun(ctx context.Context, f *flowEntry) error {
	f.resetPhases()
	if e.tracer.Load() != nil {
		f.mu.Lock()
		at := f.trigger
		f.mu.Unlock()
		e.traceAt(f.key, PhaseIntercepted, at, "")
	}
	e.trace(f.key, PhaseDecide, "")
	s, err := e.pull(ctx, f)
	switch {
	case err == nil:
		return nil
	case errorsIsUnknown(err):
		e.deliverUnknown(f)
		return nil
	case err == errAwaitGone:
		// No verdict: the packets are dropped, the next one decides
		// again (takeover_lease.go).
		f.mu.Lock()
		n := len(f.queue)
		f.mu.Unlock()
		e.m.packets[pktAwaitGone].Add(uint64(max(n, 1)))
		e.drop(f)
		return nil
	}
	if e.ctx.Err() != nil {
		// Shutting down: no verdict on the flow (a stopping node resets
		// nothing it did not own).
		e.drop(f)
		return err
	}
	reason := failReason(err)
	e.m.failure(reason)
	e.log.Info("takeover: flow reset", "flow", f.key.String(), "reason", reason, "err", err)
	e.resetFlow(f, s, reason)
	return err
}

// errUnknown ends a pull of a flow nobody knows.
var errUnknown = &takeoverError{reason: reasonUnknown, err: errorString("flow unknown everywhere")}

type errorString string

func (s errorString) Error() string { return string(s) }

func errorsIsUnknown(err error) bool { return err == errUnknown }

// pull runs the decision loop. It returns the last state it knew (to place
// a reset) and nil once the flow is restored here or forwarded.
func (e *Engine) pull(ctx context.Context, f *flowEntry) (*batonv1.FlowState, error) {
	k := f.key
	var (
		known *batonv1.FlowState // the last full state seen
		hint  *batonv1.FlowState // owner/epoch only, from a refusal
		hints int                // rounds in a row that ended with a hint
	)
	// A flow this node handed over (esMoved) knows where it went: ask
	// there first, unless a newer replica says where it went since.
	// While the new owner restores it, its state is nowhere else to be
	// found (this node's replication closed it, the new owner's has not
	// started), so a locate would answer "unknown" and reset a live flow
	// (a late packet of its client, measured in the latency benchmark).
	f.mu.Lock()
	owner, epoch := f.owner, f.epoch
	f.mu.Unlock()
	if owner != "" && owner != e.self && pullPace.movedHint {
		if st, ok := e.r.store.Lookup(k); !ok || st.Epoch <= epoch {
			hint = &batonv1.FlowState{Key: k.Proto(), Owner: owner, Epoch: epoch}
		}
	}
	for round := 0; round < maxPullRounds; round++ {
		if hint != nil && hints < pullPace.hints {
			hints++ // follow it at once
		} else if round > 0 {
			hints = 0
			if err := sleepCtx(ctx, pullPace.retryDelay(round)); err != nil {
				return known, fail(reasonTimeout, "deciding: %v", err)
			}
		}
		s := hint
		hint = nil
		if s == nil {
			s = e.locate(ctx, k, round > 0)
			e.trace(k, PhaseLocated, "")
			if s == nil {
				if known == nil {
					return nil, errUnknown
				}
				s = known
			} else {
				known = s
			}
		}
		owner := s.Owner
		switch {
		case owner == e.self:
			if e.tr.Has(k) {
				// The stack has it after all (a race with its own close
				// or restore): give it the packets.
				e.replayToStack(f)
				return known, nil
			}
			if round < 2 {
				e.trace(k, PhaseRetry, "stale local copy owned by self")
				continue // our copy is stale: look again, wider
			}
			return known, fail(reasonNoState, "flow owned by this node at epoch %d but gone from its stack", s.Epoch)

		case e.alive(owner):
			if e.policy(k) == PolicyForward {
				e.startForward(f, owner, s.Epoch)
				return known, nil
			}
			resp, err := e.claimFrom(ctx, owner, k, s.Epoch+1)
			if err != nil {
				e.trace(k, PhaseRetry, "claim error: "+err.Error())
				continue // the owner may be dying: liveness decides next round
			}
			if resp.Granted {
				return resp.State, e.restoreGranted(ctx, f, resp)
			}
			switch resp.Reason {
			case claimCannotResume:
				// The owner keeps serving it: tunnel the packets there.
				e.startForward(f, owner, s.Epoch)
				return known, nil
			case claimNotOwner:
				hint = hintFrom(k, resp)
				e.trace(k, PhaseRetry, "not_owner, hint "+resp.OwnerHint)
			case claimBusy, claimStaleEpoch, claimNoTakeover:
				e.trace(k, PhaseRetry, resp.Reason)
			default:
				return known, fail(reasonClaimRefused, "owner %s refused: %s", owner, resp.Reason)
			}

		default: // the owner is down
			if !e.ownerGone(owner) {
				// Maybe alive behind a partition (lease.go): nobody
				// takes its flows over yet.
				return known, errAwaitGone
			}
			d := e.designated(k, owner)
			if d == e.self || d == "" {
				if s.ClientSyn == nil { // a hint: fetch the state
					if st := e.locate(ctx, k, true); st != nil && st.Owner == owner {
						s, known = st, st
					} else {
						return known, fail(reasonNoState, "no replica of the dead owner %s's state", owner)
					}
				}
				return known, e.restore(ctx, f, withEpoch(s, s.Epoch+1), HowPullRestore, false, nil)
			}
			resp, err := e.claimFrom(ctx, d, k, s.Epoch+1)
			if err != nil {
				continue
			}
			if resp.Granted {
				return resp.State, e.restoreGranted(ctx, f, resp)
			}
			switch resp.Reason {
			case claimNotOwner:
				hint = hintFrom(k, resp)
			case claimBusy, claimStaleEpoch, claimNoTakeover:
			default:
				// The designated replica could not restore it either
				// (cannot_resume, reset): the owner is gone, so nobody
				// can continue the stream.
				return known, fail(reasonOf(resp.Reason), "designated replica %s: %s", d, resp.Reason)
			}
		}
	}
	return known, fail(reasonTimeout, "no decision after %d rounds", maxPullRounds)
}

// reasonOf maps a claim refusal to a failure reason.
func reasonOf(refusal string) string {
	if refusal == claimCannotResume {
		return reasonCannotResume
	}
	return reasonClaimRefused
}

// hintFrom turns a not_owner refusal into a hint (nil without one).
func hintFrom(k FlowKey, resp *batonv1.ClaimResponse) *batonv1.FlowState {
	if resp.OwnerHint == "" {
		return nil
	}
	return &batonv1.FlowState{Key: k.Proto(), Owner: resp.OwnerHint, Epoch: resp.OwnerEpoch}
}

// restoreGranted restores a flow its owner handed over.
func (e *Engine) restoreGranted(ctx context.Context, f *flowEntry, resp *batonv1.ClaimResponse) error {
	k, err := ValidateState(resp.State, e.prefixes)
	if err != nil || k != f.key {
		return fail(reasonNoState, "claim granted with a bad state (%v)", err)
	}
	return e.restore(ctx, f, resp.State, HowPullMigrate, true, resp.Pending)
}

// replayToStack gives f's queued packets to the stack as they are and
// forgets f.
func (e *Engine) replayToStack(f *flowEntry) {
	f.mu.Lock()
	q := e.takeQueueLocked(f)
	f.mu.Unlock()
	e.drop(f)
	for _, pkt := range q {
		_ = e.inj.InjectInbound(pkt)
	}
}

// locate finds k's state: this node's replica, else (or with wide) the
// freshest copy among the live peers. nil when nobody has it.
func (e *Engine) locate(ctx context.Context, k FlowKey, wide bool) *batonv1.FlowState {
	local, ok := e.r.store.Lookup(k)
	if ok && !wide {
		return local
	}
	best := e.lookupPeers(ctx, k)
	if ok && (best == nil || local.Epoch > best.Epoch) {
		return local
	}
	return best
}

// lookupPeers asks every live peer for k (in parallel, bounded) and
// returns the copy with the highest epoch (the owner's copy on a tie).
func (e *Engine) lookupPeers(ctx context.Context, k FlowKey) *batonv1.FlowState {
	ctx, cancel := context.WithTimeout(ctx, lookupTimeout)
	defer cancel()
	var (
		mu        sync.Mutex
		wg        sync.WaitGroup
		best      *batonv1.FlowState
		bestOwned bool
	)
	req := &batonv1.LookupRequest{Key: k.Proto()}
	for _, l := range e.r.links {
		c := e.r.clientFor(l)
		if c == nil {
			continue
		}
		wg.Go(func() {
			resp, err := c.Lookup(ctx, req)
			if err != nil || !resp.Found || resp.State == nil {
				return
			}
			if _, err := ValidateState(resp.State, e.prefixes); err != nil {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if best == nil || resp.State.Epoch > best.Epoch || (resp.State.Epoch == best.Epoch && resp.Owned && !bestOwned) {
				best, bestOwned = resp.State, resp.Owned
			}
		})
	}
	wg.Wait()
	return best
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
