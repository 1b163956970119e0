package handoff

// This file detects a client that is ahead of a flow restored from
// replicated state, and resets it instead of letting it hang.
//
// A crash restore (pull-restore, push) starts from a replica's state, which
// may lag behind what the dead owner told the client: the owner may have
// acknowledged client input (and, for echo, sent its echo) after the last
// state the replicas got. The restored stack then expects input at the
// replica's server_acked position (rin, client space), but the client
// considers everything up to its snd_una acknowledged and never sends it
// again: the stack waits for the gap forever, its acks (= rin) are old acks
// the client ignores, and the connection hangs silently. A live claim's
// state is exact, so only crash restores are watched.
//
// The rule (aheadWatch.verdict), per restored flow, until the stack's
// receive position passes rin:
//
//   - Observed on the packet path (no allocation, a few atomics, and only
//     for flows that have a watch): every client segment whose sequence
//     number is beyond rin ("beyond"), and among those the data segments
//     that repeat bytes the client already sent to this node
//     (retransmissions). The stack's outbound ack is its rcv.nxt: once it
//     passes rin the client did send byte rin again, so it was not ahead,
//     and the watch is dropped for good.
//   - Strong evidence: aheadRepeats retransmissions beyond rin. A TCP
//     sender's retransmission timeout always resends from snd_una (RFC
//     6298 5.4; Linux and gVisor both restart at the head of their
//     retransmission queue, whatever SACK said), so a repeated segment
//     starting beyond rin means snd_una > rin, i.e. the client holds an
//     acknowledgement the restored state does not know. One repeat is not
//     enough (a tail loss probe resends the last segment, and reordering
//     makes an early segment look repeated), hence two, and the stack must
//     still be at rin after w.wait since the first beyond segment.
//   - Weak evidence: aheadSegments beyond segments of any kind (pure acks
//     carry seq = snd_nxt, which is beyond rin also when the client merely
//     has unacknowledged data there) with no fill for aheadWeakFactor
//     times as long: a client whose snd_una is rin resends it on its own
//     retransmission timeout well within that.
//   - w.wait is aheadWait plus twice the restored state's age at restore,
//     capped: a client whose data went unacknowledged while its owner was
//     dying may be in retransmission backoff, whose next interval is about
//     the time it has been backing off, which is at most that age.
//
// A flow found ahead is then re-checked with its service's CanResume at
// the corrected input offset (the lowest beyond sequence number seen: the
// client's snd_una or above it). Echo (output = input) cannot resume and
// nor can HTTP with input past the request its checkpoint answers; the
// flow is reset (resetFlow: a RST at the client's newest ack, probes, a
// tombstone), counted as failures_total and rst_sent_total with reason
// client_ahead. A service that can continue at the corrected offset (a
// stream download whose request is checkpointed: it ignores later input)
// keeps the flow: its output continues exactly, only client bytes beyond
// the gap (none, for such a service) could not reach it; the watch stays,
// and a later episode (the client sending data) is judged again. Without
// data beyond rin, the last sequence slot is not counted as input: it may
// be a FIN the owner acknowledged.
//
// Not covered: a client that sends nothing at all (a receive-only client
// whose request the owner acknowledged but the replicas never saw, and
// whose service waits for it) shows nothing to be ahead of; it is as
// silent as pitfall 1's.

import (
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

// reasonClientAhead: a flow restored from replicated state whose client
// had input acknowledged by the dead owner beyond that state, and whose
// service cannot continue at the client's position (takeover_ahead.go).
const reasonClientAhead = "client_ahead"

// The rule's parameters (see the file comment).
const (
	aheadRepeats    = 2
	aheadSegments   = 3
	aheadWait       = time.Second
	aheadWeakFactor = 3
	aheadMaxAge     = 10 * time.Second
)

// aheadWatch watches one restored flow. The packet path only updates
// atomics; the janitor decides (checkAhead).
type aheadWatch struct {
	s    *batonv1.FlowState // the restored state (places the reset)
	r    services.Resume    // the resume it was restored with
	rin  uint32             // client space: the stack's first rcv.nxt
	wait int64              // ns: see the file comment

	high    atomic.Uint32 // end of the client's data seen here (starts at rin)
	minSeq  atomic.Uint32 // lowest beyond seq (valid once first != 0)
	lastAck atomic.Uint32 // the client's latest ack (client space)
	haveAck atomic.Bool
	beyond  atomic.Uint32 // client segments beyond rin
	data    atomic.Bool   // one of them carried data
	fin     atomic.Bool   // one of them carried a FIN
	repeats atomic.Uint32 // data segments beyond rin repeating sent bytes
	first   atomic.Int64  // ns: the first beyond segment (0: none yet)
	okInput atomic.Uint64 // the highest corrected input offset the service accepted
}

func newAheadWatch(s *batonv1.FlowState, r services.Resume, rin uint32, now time.Time) *aheadWatch {
	age := now.Sub(time.Unix(0, s.UpdatedUnixNano))
	age = min(max(age, 0), aheadMaxAge)
	w := &aheadWatch{s: s, r: r, rin: rin, wait: int64(aheadWait + 2*age)}
	w.high.Store(rin)
	return w
}

// note records one client segment (client space, before translation).
// Concurrent calls may race on the order of their updates; the counts
// stay conservative enough for the rule (which needs several segments
// over a second or more).
func (w *aheadWatch) note(seq, ack uint32, flags header.TCPFlags, seqLen uint32, now int64) {
	if flags&header.TCPFlagRst != 0 {
		return
	}
	if flags&header.TCPFlagAck != 0 {
		w.lastAck.Store(ack)
		if !w.haveAck.Load() {
			w.haveAck.Store(true)
		}
	}
	high := w.high.Load()
	if seqLen > 0 {
		if end := seq + seqLen; tcpSeqAfter(end, high) {
			for !w.high.CompareAndSwap(high, end) {
				if high = w.high.Load(); !tcpSeqAfter(end, high) {
					break
				}
			}
		}
	}
	if !tcpSeqAfter(seq, w.rin) {
		return // at or below rin: the client can still fill the gap
	}
	if seqLen > 0 && tcpSeqAfter(high, seq) {
		w.repeats.Add(1) // bytes it sent here before: a retransmission
	}
	if flags&header.TCPFlagFin != 0 && !w.fin.Load() {
		w.fin.Store(true)
	}
	if seqLen > 1 || (seqLen == 1 && flags&header.TCPFlagFin == 0) {
		if !w.data.Load() {
			w.data.Store(true)
		}
	}
	w.beyond.Add(1)
	if w.first.Load() == 0 && w.first.CompareAndSwap(0, now) {
		w.minSeq.Store(seq) // the episode's first beyond segment
		return
	}
	for cur := w.minSeq.Load(); tcpSeqAfter(cur, seq); cur = w.minSeq.Load() {
		if w.minSeq.CompareAndSwap(cur, seq) {
			break
		}
	}
}

// verdict reports whether the client is ahead of the restored state.
func (w *aheadWatch) verdict(now int64) bool {
	first := w.first.Load()
	if first == 0 {
		return false
	}
	since := now - first
	if w.repeats.Load() >= aheadRepeats && since >= w.wait {
		return true
	}
	return w.beyond.Load() >= aheadSegments && since >= aheadWeakFactor*w.wait
}

// corrected is the resume at the client's input position: the lowest
// beyond sequence number seen. Without data beyond rin the last sequence
// slot may be a FIN the owner acknowledged (a half-closed client sends
// pure acks after it), not an input byte: it is not counted.
func (w *aheadWatch) corrected() services.Resume {
	d := uint64(w.minSeq.Load() - w.rin)
	if !w.data.Load() && !w.fin.Load() && d > 0 {
		d--
	}
	r := w.r
	r.InputOffset += d
	return r
}

// restart forgets the evidence: the next episode is judged afresh.
func (w *aheadWatch) restart() {
	w.first.Store(0)
	w.beyond.Store(0)
	w.repeats.Store(0)
	w.data.Store(false)
	w.fin.Store(false)
}

// needsAhead reports whether a restore from s must be watched: every
// crash restore, and a live claim of a flow that went through one (its
// owner's stack may still be waiting for input the client considers
// acknowledged: the claim hands over that stack's state, exact only
// relative to it). A watch on a flow whose client is not ahead costs a
// few atomics per client packet and never fires: the client's
// retransmissions start at or below rin.
func needsAhead(s *batonv1.FlowState, live bool) bool {
	if !live {
		return true
	}
	for _, h := range s.History {
		if h.How == HowPush || h.How == HowPullRestore {
			return true
		}
	}
	return false
}

// armAhead starts or clears ent's watch (needsAhead); rin is the restored
// input position (client space). Called before ent is active.
func (e *Engine) armAhead(ent *flowEntry, s *batonv1.FlowState, r services.Resume, rin uint32) {
	if !needsAhead(s, r.Live) {
		ent.ahead.Store(nil)
		return
	}
	ent.ahead.Store(newAheadWatch(s, r, rin, time.Now()))
}

// noteAheadPacket records a queued client packet replayed at restore.
func (e *Engine) noteAheadPacket(ent *flowEntry, pkt []byte) {
	w := ent.ahead.Load()
	if w == nil {
		return
	}
	if seg, res := parseTCPSegment(pkt, true, e.prefixes); res == tcpOK {
		w.note(seg.seq, seg.ack, seg.flags, seg.seqLen(), time.Now().UnixNano())
	}
}

// aheadInbound records a client packet of an active flow (packet path).
func aheadInbound(f *flowEntry, seg *tcpSegment) {
	if w := f.ahead.Load(); w != nil {
		w.note(seg.seq, seg.ack, seg.flags, seg.seqLen(), time.Now().UnixNano())
	}
}

// aheadOutbound drops f's watch once the stack acknowledges input beyond
// rin (packet path, before translation: client sequence numbers are the
// same in both spaces).
func aheadOutbound(f *flowEntry, seg *tcpSegment) {
	if w := f.ahead.Load(); w != nil && seg.flags&header.TCPFlagAck != 0 && tcpSeqAfter(seg.ack, w.rin) {
		f.ahead.CompareAndSwap(w, nil)
	}
}

// checkAhead applies the rule to an active flow (janitor).
func (e *Engine) checkAhead(f *flowEntry, now time.Time) {
	w := f.ahead.Load()
	if w == nil || f.get() != esActive || !w.verdict(now.UnixNano()) {
		return
	}
	r := w.corrected()
	k := f.key
	err := e.canResume(k, r)
	if err == nil {
		// The service does not need the missing input. Keep watching: if
		// the client later shows more input ahead (it sends data), judge
		// again with that evidence.
		w.restart()
		if r.InputOffset > w.okInput.Load() {
			w.okInput.Store(r.InputOffset)
			e.log.Info("takeover: client ahead of the restored state, the service continues",
				"flow", k.String(), "input_offset", w.r.InputOffset, "client_input_offset", r.InputOffset)
		}
		return
	}
	if !f.ahead.CompareAndSwap(w, nil) {
		return
	}
	e.log.Info("takeover: client ahead of the restored state, flow reset", "flow", k.String(),
		"input_offset", w.r.InputOffset, "client_input_offset", r.InputOffset,
		"beyond", w.beyond.Load(), "repeats", w.repeats.Load(), "err", err)
	e.m.failure(reasonClientAhead)
	if w.haveAck.Load() {
		// The reset goes at the client's latest ack: exact, or it draws a
		// challenge ACK the tombstone answers exactly (answerReset).
		ack := w.lastAck.Load()
		f.mu.Lock()
		if !f.haveAck || tcpSeqAfter(ack, f.lastAck) {
			f.lastAck, f.haveAck = ack, true
		}
		f.mu.Unlock()
	}
	e.resetFlow(f, w.s, reasonClientAhead)
}
