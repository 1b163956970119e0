package main

// This file is how a node of a cluster leaves and joins without losing a
// flow:
//
//   - leaving (SIGTERM): after withdrawing, flows whose clients send move
//     to the nodes their packets now reach (pull). The idle ones would
//     stay until the drain timeout and then be lost with the process, so
//     after a short settling time the node hands each flow it still owns
//     over to its successor, exactly (handoff.Engine.Depart), and then
//     waits for the rest of the drain as before.
//   - joining: a node (re)started while its peers serve flows must not be
//     announced before it can reach them: a packet of a flow owned by a
//     peer it cannot ask would look unknown and be reset. The critical
//     "join" check passes once every peer link is up or has failed (a
//     peer that is not running refuses at once), or after joinTimeout,
//     and then stays up: it gates the first announcement only.

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/baton-anycast/baton/health"
)

const (
	checkJoin = "join"
	// joinTimeout caps how long the join check waits for the peer links.
	joinTimeout = 10 * time.Second
	// departSettleMax caps the settling time before the departure
	// handover (a quarter of the drain timeout when that is shorter).
	departSettleMax = time.Second
	// departRounds bounds the departure handover's rounds.
	departRounds = 3
)

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

// joinCheck is the join check (see the file comment); nil without a
// cluster.
func (d *daemon) joinCheck() *health.CheckSpec {
	if d.repl == nil {
		return nil
	}
	repl := d.repl
	start := time.Now()
	var joined atomic.Bool
	return &health.CheckSpec{Name: checkJoin, Kind: "peers", Critical: true,
		Target: fmt.Sprintf("%d peers", len(d.cfg.Cluster.Peers)),
		Probe: func(context.Context) error {
			if joined.Load() {
				return nil
			}
			var waiting []string
			for _, p := range repl.Peers() {
				if !p.Up && p.LastError == "" {
					waiting = append(waiting, p.Name)
				}
			}
			if len(waiting) > 0 && time.Since(start) < joinTimeout {
				return fmt.Errorf("joining: waiting for the links to %s", strings.Join(waiting, ", "))
			}
			joined.Store(true)
			return nil
		}}
}

// departSettle is how long a stopping node lets its flows move by
// themselves before it hands the rest over.
func departSettle(drainTimeout time.Duration) time.Duration {
	return min(departSettleMax, drainTimeout/4)
}

// depart runs the departure handover within ctx (the drain's) after the
// settling time, when the node runs a takeover engine and still owns
// flows.
func (d *daemon) depart(ctx context.Context, settle time.Duration) {
	if d.repl == nil || d.repl.Engine() == nil || d.health == nil {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, settle)
	_, none := d.health.machine.WaitNoFlows(sctx, 20*time.Millisecond)
	cancel()
	if none || ctx.Err() != nil {
		return
	}
	// A few rounds: a flow this node was still taking over when Depart
	// listed its flows becomes owned afterwards, and a flow no successor
	// could take a moment ago may be taken now.
	for round := 0; round < departRounds && d.tracker.Len() > 0 && ctx.Err() == nil; round++ {
		if round > 0 && sleepCtx(ctx, 100*time.Millisecond) != nil {
			return
		}
		d.log.Info("departure handover: handing the flows still owned to their successors", "flows", d.tracker.Len(), "round", round+1)
		d.repl.Engine().Depart(ctx) // it logs what it did
	}
}
