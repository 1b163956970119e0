package handoff

// This file is the tracker's side facing the takeover: flows restored on
// this node from another node's state (Restore), flows another node took
// over (Remove), the ownership history, and the cheap per-packet questions
// the interception hook asks (Has, Epoch).

import (
	"fmt"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// How a node came to own a flow: OwnershipChange.how values.
const (
	// HowOpen: the client opened the connection to this node.
	HowOpen = "open"
	// HowPullMigrate: the node claimed the flow from its live owner.
	HowPullMigrate = "pull-migrate"
	// HowPullRestore: the node restored the flow of a dead owner from
	// replicated state because one of its packets reached it.
	HowPullRestore = "pull-restore"
	// HowPush: the flow's designated replica restored it as soon as its
	// owner was known dead.
	HowPush = "push"
	// HowForward: the node tunnels the flow's packets to its owner (the
	// owner records it; ownership does not change).
	HowForward = "forward"
)

// Restore registers a flow this node restored from st, another node's state
// in the client's sequence space: the flow is ESTABLISHED (CLOSING if a FIN
// was seen) with the original ISNs, options and positions, st.Epoch as its
// epoch and a history entry (this node, st.Epoch, how, now, atOffset: the
// output offset the restored connection starts at). From now on it is
// tracked and replicated like a flow opened here (its first report is a
// KIND_OPEN). A flow already tracked under the key is replaced.
func (t *Tracker) Restore(s *batonv1.FlowState, how string, atOffset uint64) error {
	k, err := ValidateState(s, t.prefixes)
	if err != nil {
		return err
	}
	if s.Phase != batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED && s.Phase != batonv1.FlowPhase_FLOW_PHASE_CLOSING {
		return fmt.Errorf("flow %s: restore in phase %s", k, s.Phase)
	}
	now := t.now()
	f := &trkFlow{hk: trkKeyOf(k)}
	st := &f.st
	st.key = k
	st.phase = batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED
	if s.ClientFin || s.ServerFin {
		st.phase = batonv1.FlowPhase_FLOW_PHASE_CLOSING
	}
	st.epoch = s.Epoch
	st.clientISN, st.serverISN = s.ClientIsn, s.ServerIsn
	st.clientWS = -1
	if o := s.ClientSyn; o != nil {
		st.clientMSS = trkClampMSS(uint16(min(o.Mss, 65535)))
		st.clientWS = int8(o.WindowScale)
		st.clientSACK = o.SackPermitted
		st.clientTS = o.Timestamps
	} else {
		st.clientMSS = trkClampMSS(536)
	}
	// The negotiated values stand for what the server offered: the
	// snapshot derives the negotiated ones from both sides again.
	st.serverMSS = trkClampMSS(uint16(min(s.ServerMss, 65535)))
	st.serverWS = int8(s.ServerWindowScale)
	st.serverSACK = s.Sack
	st.serverTS = s.Timestamps
	st.clientTSval, st.serverTSval = s.ClientTsval, s.ServerTsval
	st.clientAck, st.serverAck = s.ClientAck, s.ServerAck
	st.clientFin, st.serverFin = s.ClientFin, s.ServerFin
	sent := max(s.ServerSentBytes, atOffset)
	st.sent = trkPosAt(s.ServerIsn+1, sent)
	st.cliAcked = trkPosAt(s.ServerIsn+1, min(s.ClientAckedBytes, sent))
	st.srvAcked = trkPosAt(s.ClientIsn+1, s.ServerAckedBytes)
	st.serverNext = s.ServerNextSeq
	if end := st.sent.at; tcpSeqAfter(end, st.serverNext) {
		st.serverNext = end
	}
	if st.clientFin {
		f.clientFinSeq = st.srvAcked.at
	}
	if st.serverFin {
		f.serverFinSeq = st.sent.at
	}
	st.checkpoint = s.Checkpoint
	st.checkpointSeq = s.CheckpointSeq
	st.checkpointOffset = s.CheckpointOffset
	st.history = appendHistory(s.History, &batonv1.OwnershipChange{
		Node: t.cfg.Node, Epoch: s.Epoch, How: how, UnixNano: now, AtOffset: atOffset,
	})
	st.opened = s.OpenedUnixNano
	st.updated = now
	f.haveSynAck = true
	f.lastSeen = now
	f.serverWnd = 65535 << max(trkScale(st.serverWS, st.clientWS), 0)

	sh := t.shardFor(&f.hk)
	sh.mu.Lock()
	if old := sh.flows[f.hk]; old != nil {
		t.closeLocked(sh, old, &t.closedReplaced, now)
	} else {
		t.count.Add(1) // restored flows are tracked even beyond MaxFlows
	}
	sh.flows[f.hk] = f
	t.restored.Add(1)
	t.touchLocked(sh, f, trkChgState)
	sh.mu.Unlock()
	return nil
}

// appendHistory returns a new slice: old's newest entries and e, at most
// trkMaxHistory in all.
func appendHistory(old []*batonv1.OwnershipChange, e *batonv1.OwnershipChange) []*batonv1.OwnershipChange {
	if len(old) >= trkMaxHistory {
		old = old[len(old)-trkMaxHistory+1:]
	}
	out := make([]*batonv1.OwnershipChange, 0, len(old)+1)
	return append(append(out, old...), e)
}

// Remove takes flow k out of the table because another node owns it now
// (counted as Closed.Moved; its close is reported with its old epoch, which
// replicas holding the new owner's higher epoch ignore). It reports whether
// k was tracked.
func (t *Tracker) Remove(k FlowKey) bool {
	now := t.now()
	hk := trkKeyOf(k)
	sh := t.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flows[hk]
	if f == nil {
		return false
	}
	t.removeLocked(sh, f, &t.closedMoved, now)
	return true
}

// Has reports whether k is in the table (any phase). It is the
// interception hook's first question for a packet of a flow it does not
// translate, so it only takes the shard lock for a map lookup.
func (t *Tracker) Has(k FlowKey) bool {
	hk := trkKeyOf(k)
	sh := t.shardFor(&hk)
	sh.mu.Lock()
	_, ok := sh.flows[hk]
	sh.mu.Unlock()
	return ok
}

// Epoch returns the epoch of flow k if it is tracked past the handshake.
func (t *Tracker) Epoch(k FlowKey) (uint64, bool) {
	hk := trkKeyOf(k)
	sh := t.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flows[hk]
	if f == nil || !trkOwned(f) {
		return 0, false
	}
	return f.st.epoch, true
}

// AddHistory appends (node, how) at the flow's current epoch to flow k's
// ownership history, unless it is already the newest entry. It reports
// whether k is tracked past the handshake.
func (t *Tracker) AddHistory(k FlowKey, node, how string) bool {
	now := t.now()
	hk := trkKeyOf(k)
	sh := t.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flows[hk]
	if f == nil || !trkOwned(f) {
		return false
	}
	if n := len(f.st.history); n > 0 {
		if last := f.st.history[n-1]; last.Node == node && last.How == how && last.Epoch == f.st.epoch {
			return true
		}
	}
	f.st.history = appendHistory(f.st.history, &batonv1.OwnershipChange{
		Node: node, Epoch: f.st.epoch, How: how, UnixNano: now, AtOffset: min(f.st.cliAcked.pos, f.st.sent.pos),
	})
	f.st.updated = max(f.st.updated, now)
	t.touchLocked(sh, f, trkChgState)
	return true
}
