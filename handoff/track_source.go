package handoff

// This file is the tracker's side facing replication and the stack's
// services: FlowSource (changes, snapshots), checkpoints, epochs, the idle
// sweep and the counters.

import (
	"context"
	"net/netip"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
)

// Sweep interval bounds for Run.
const (
	trkMinSweep = 100 * time.Millisecond
	trkMaxSweep = 30 * time.Second
)

// Changes implements FlowSource.Changes: a capacity-1 channel signalled
// (without blocking) whenever a flow becomes dirty.
func (t *Tracker) Changes() <-chan struct{} { return t.changes }

// trkPending is a change copied out under a shard lock.
type trkPending struct {
	kind batonv1.FlowEvent_Kind
	st   trkState
}

// TakeChanges implements FlowSource.TakeChanges. It costs O(changed flows +
// shards): it drains each shard's dirty list. A flow is reported as
// KIND_OPEN the first time (with its newest state, whatever happened
// since), then KIND_UPDATE for any change but the checkpoint,
// KIND_CHECKPOINT when only the checkpoint changed, and KIND_CLOSE once
// when it closed after its open was reported; a flow that closed before
// its open was taken is never reported.
//
// The snapshots share their Checkpoint bytes and History entries with the
// tracker; they are never modified (a new checkpoint or history replaces
// the slice), and receivers must not modify them either.
func (t *Tracker) TakeChanges(dst []Change) []Change {
	var pending []trkPending
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		for _, f := range sh.dirty {
			var kind batonv1.FlowEvent_Kind
			switch {
			case !f.reported && f.closed:
				// Opened and closed between two takes: never seen.
			case !f.reported:
				kind = batonv1.FlowEvent_KIND_OPEN
				f.reported = true
			case f.closed:
				kind = batonv1.FlowEvent_KIND_CLOSE
			case f.changed&^trkChgCheckpoint != 0:
				kind = batonv1.FlowEvent_KIND_UPDATE
			case f.changed != 0:
				kind = batonv1.FlowEvent_KIND_CHECKPOINT
			}
			f.dirty, f.changed = false, 0
			if kind != batonv1.FlowEvent_KIND_UNSPECIFIED {
				pending = append(pending, trkPending{kind: kind, st: f.st})
			}
		}
		clear(sh.dirty) // drop the pointers: closed flows must be collectable
		if cap(sh.dirty) > 4096 && len(sh.dirty) < cap(sh.dirty)/4 {
			sh.dirty = nil // a burst grew it: let it go
		} else {
			sh.dirty = sh.dirty[:0]
		}
		sh.mu.Unlock()
	}
	for i := range pending {
		dst = append(dst, Change{Kind: pending[i].kind, State: t.snapshot(&pending[i].st)})
	}
	return dst
}

// Owned implements FlowSource.Owned: every flow past the handshake and not
// closed, each shard copied under its lock and fn called outside it.
func (t *Tracker) Owned(fn func(*batonv1.FlowState) bool) {
	var states []trkState
	for i := range t.shards {
		sh := &t.shards[i]
		states = states[:0]
		sh.mu.Lock()
		for _, f := range sh.flows {
			if trkOwned(f) {
				states = append(states, f.st)
			}
		}
		sh.mu.Unlock()
		for j := range states {
			if !fn(t.snapshot(&states[j])) {
				return
			}
		}
	}
}

// Lookup implements FlowSource.Lookup: a snapshot of k if it is tracked and
// past the handshake.
func (t *Tracker) Lookup(k FlowKey) (*batonv1.FlowState, bool) {
	hk := trkKeyOf(k)
	sh := t.shardFor(&hk)
	sh.mu.Lock()
	f := sh.flows[hk]
	if f == nil || !trkOwned(f) {
		sh.mu.Unlock()
		return nil, false
	}
	st := f.st
	sh.mu.Unlock()
	return t.snapshot(&st), true
}

func trkOwned(f *trkFlow) bool {
	return f.st.phase == batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED || f.st.phase == batonv1.FlowPhase_FLOW_PHASE_CLOSING
}

// SetEpoch sets the ownership epoch of flow k (1 when the tracker created
// it) and reports whether k is tracked. The change is reported as an
// update once the flow is past the handshake.
func (t *Tracker) SetEpoch(k FlowKey, epoch uint64) bool {
	now := t.now()
	hk := trkKeyOf(k)
	sh := t.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flows[hk]
	if f == nil {
		return false
	}
	if f.st.epoch != epoch {
		f.st.epoch = epoch
		f.st.updated = max(f.st.updated, now)
		t.touchLocked(sh, f, trkChgState)
	}
	return true
}

// SetCheckpoint stores a copy of data as flow k's checkpoint, valid at
// server sequence number server_isn + 1 + written (mod 2^32): written is
// the service's output offset, the bytes it had written since the start of
// the connection (on any node: a restored connection's service starts at
// its resume offset), and is reported as checkpoint_offset. A checkpoint
// larger than MaxCheckpointBytes, or for a flow not tracked past the
// SYN-ACK, is refused and counted (Stats().CheckpointRejected).
func (t *Tracker) SetCheckpoint(k FlowKey, written uint64, data []byte) {
	if len(data) > MaxCheckpointBytes {
		t.ckptTooLarge.Add(1)
		t.log.Debug("flow tracker: checkpoint too large", "flow", k.String(), "bytes", len(data), "max", MaxCheckpointBytes)
		return
	}
	cp := append([]byte(nil), data...)
	now := t.now()
	hk := trkKeyOf(k)
	sh := t.shardFor(&hk)
	sh.mu.Lock()
	f := sh.flows[hk]
	if f == nil || !f.haveSynAck {
		sh.mu.Unlock()
		t.ckptUnknown.Add(1)
		return
	}
	f.st.checkpoint = cp
	f.st.checkpointSeq = f.st.serverISN + 1 + uint32(written)
	f.st.checkpointOffset = written
	f.st.updated = max(f.st.updated, now)
	t.touchLocked(sh, f, trkChgCheckpoint)
	sh.mu.Unlock()
}

// CheckpointSink adapts SetCheckpoint to stack.SetCheckpointSink.
func (t *Tracker) CheckpointSink() stack.CheckpointSink {
	return func(client, anycast netip.AddrPort, written uint64, data []byte) {
		t.SetCheckpoint(FlowKey{Client: client, Anycast: anycast}, written, data)
	}
}

// snapshot converts a copied state to its wire form.
func (t *Tracker) snapshot(st *trkState) *batonv1.FlowState {
	var service string
	if t.cfg.ServiceFor != nil {
		service = t.cfg.ServiceFor(st.key.Anycast.Port())
	}
	return &batonv1.FlowState{
		Key:     st.key.Proto(),
		Owner:   t.cfg.Node,
		Epoch:   st.epoch,
		Service: service,
		Phase:   st.phase,

		ClientIsn: st.clientISN,
		ServerIsn: st.serverISN,
		ClientSyn: &batonv1.SynOptions{
			Mss:           uint32(st.clientMSS),
			WindowScale:   int32(st.clientWS),
			SackPermitted: st.clientSACK,
			Timestamps:    st.clientTS,
		},
		ClientWindowScale: int32(trkScale(st.clientWS, st.serverWS)),
		ServerWindowScale: int32(trkScale(st.serverWS, st.clientWS)),
		ServerMss:         uint32(st.serverMSS),
		Sack:              st.clientSACK && st.serverSACK,
		Timestamps:        st.clientTS && st.serverTS,
		ClientTsval:       st.clientTSval,
		ServerTsval:       st.serverTSval,

		ServerNextSeq: st.serverNext,
		ClientAck:     st.clientAck,
		ServerAck:     st.serverAck,
		ClientFin:     st.clientFin,
		ServerFin:     st.serverFin,

		Checkpoint:    st.checkpoint,
		CheckpointSeq: st.checkpointSeq,

		OpenedUnixNano:  st.opened,
		UpdatedUnixNano: st.updated,

		ServerSentBytes:  st.sent.pos,
		ClientAckedBytes: min(st.cliAcked.pos, st.sent.pos),
		ServerAckedBytes: st.srvAcked.pos,
		CheckpointOffset: st.checkpointOffset,
		History:          st.history,
	}
}

// Sweep removes the flows that saw no packet for IdleTimeout (flows still
// in the handshake: HandshakeTimeout) and returns how many it removed. The
// owner calls it periodically, or runs Run.
func (t *Tracker) Sweep() int {
	now := t.now()
	var slack int64
	if t.ticking.Load() > 0 {
		slack = int64(trkClockTick) // packets are stamped with the coarse clock
	}
	n := 0
	for i := range t.shards {
		sh := &t.shards[i]
		sh.mu.Lock()
		for _, f := range sh.flows {
			limit := t.idle
			if f.st.phase == batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE {
				limit = t.handshake
			}
			if now-f.lastSeen >= limit+slack {
				t.removeLocked(sh, f, &t.closedIdle, now)
				n++
			}
		}
		sh.mu.Unlock()
	}
	if n > 0 {
		t.log.Debug("flow tracker: idle flows removed", "flows", n)
	}
	return n
}

// SweepInterval is how often Run sweeps: a tenth of the shorter timeout,
// within [100ms, 30s].
func (t *Tracker) SweepInterval() time.Duration {
	return min(max(t.cfg.HandshakeTimeout/10, trkMinSweep), trkMaxSweep)
}

// Run sweeps every SweepInterval until ctx is done. While it runs, it also
// keeps the coarse clock packets are stamped with (see packetNow).
func (t *Tracker) Run(ctx context.Context) {
	t.coarse.Store(t.now())
	t.ticking.Add(1)
	defer t.ticking.Add(-1)
	clock := time.NewTicker(trkClockTick)
	defer clock.Stop()
	sweep := time.NewTicker(t.SweepInterval())
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-clock.C:
			t.coarse.Store(t.now())
		case <-sweep.C:
			t.coarse.Store(t.now())
			t.Sweep()
		}
	}
}

// Stats returns the tracker's counters.
func (t *Tracker) Stats() TrackerStats {
	return TrackerStats{
		Tracked:  t.Len(),
		Created:  t.created.Load(),
		Opened:   t.opened.Load(),
		Restored: t.restored.Load(),
		Closed: ClosedStats{
			FIN:      t.closedFIN.Load(),
			RST:      t.closedRST.Load(),
			Idle:     t.closedIdle.Load(),
			Replaced: t.closedReplaced.Load(),
			Moved:    t.closedMoved.Load(),
		},
		Untracked:   t.untracked.Load(),
		Malformed:   t.malformed.Load(),
		BadChecksum: t.badChecksum.Load(),
		Fragments:   t.fragments.Load(),
		Ignored:     t.ignored.Load(),
		IgnoredSYN:  t.ignoredSYN.Load(),
		CheckpointRejected: CheckpointRejectStats{
			TooLarge:    t.ckptTooLarge.Load(),
			UnknownFlow: t.ckptUnknown.Load(),
		},
	}
}
