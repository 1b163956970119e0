package handoff

// This file restores a flow on this node's stack from a state in the
// client's sequence space (the old owner's exact state from a claim, or a
// replica): the synthetic handshake of synth.go, the translation
// parameters, the tracker's registration, the replay of the client packets
// queued meanwhile, and the service's resume information. It also holds
// the takeover's endings other than success: the reset (the honest answer
// when the stream cannot continue exactly) and "unknown" (the stack
// answers, as it always did).

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
)

// takeoverError is a failed takeover with its metric reason.
type takeoverError struct {
	reason string
	err    error
}

func (e *takeoverError) Error() string { return e.reason + ": " + e.err.Error() }
func (e *takeoverError) Unwrap() error { return e.err }

func fail(reason, format string, args ...any) error {
	return &takeoverError{reason: reason, err: fmt.Errorf(format, args...)}
}

// failReason returns the metric reason of a takeover error.
func failReason(err error) string {
	var te *takeoverError
	if errors.As(err, &te) {
		return te.reason
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return reasonTimeout
	}
	return reasonRestoreFailed
}

// resumeOf is the services.Resume a state gives: the client has the output
// up to its last ack (OutputOffset), and the previous node acknowledged
// the input up to its last ack (InputOffset). The state of a sync-mode
// flow carries the output the client had not acknowledged (sync.go): it is
// the Pending output, after a crash as after a hand-over.
func resumeOf(s *batonv1.FlowState, live bool, pending []byte) services.Resume {
	if pending == nil && len(s.UnackedOutput) > 0 && s.ServerSentBytes >= s.ClientAckedBytes &&
		uint64(len(s.UnackedOutput)) == s.ServerSentBytes-s.ClientAckedBytes {
		pending = s.UnackedOutput
	}
	return services.Resume{
		OutputOffset:     s.ClientAckedBytes,
		InputOffset:      s.ServerAckedBytes,
		Checkpoint:       s.Checkpoint,
		CheckpointOffset: s.CheckpointOffset,
		Pending:          pending,
		Live:             live,
	}
}

// canResume asks the flow's service whether s allows continuing exactly.
func (e *Engine) canResume(k FlowKey, r services.Resume) error {
	svc := e.service(k.Anycast.Port())
	if svc == nil {
		return fail(reasonCannotResume, "no service on port %d", k.Anycast.Port())
	}
	rs, ok := svc.(services.Resumable)
	if !ok {
		return fail(reasonCannotResume, "service %s cannot resume connections", svc.Name())
	}
	if err := rs.CanResume(r); err != nil {
		return &takeoverError{reason: reasonCannotResume, err: err}
	}
	return nil
}

// defaultAckWindow is the client window (bytes) the completing ACK
// advertises when no client packet was queued: the client's real window
// comes with its first packet.
const defaultAckWindow = 256 << 10

// tsMargin is added to the old owner's latest TSval when choosing the new
// stack's timestamp offset, on top of the time since that TSval was
// recorded: the client must never see a TSval go backwards (PAWS, pitfall
// 5), and a jump forward is harmless.
const tsMargin = 1000 // ms: gVisor's TSval clock ticks in milliseconds

// restore restores ent's flow from s (client space; s.Epoch is the epoch
// this node owns it at), recording how. live and pending go to the
// service's Resume. On success the flow is active: translated, tracked,
// and its service resumes when the stack's accept loop takes it.
func (e *Engine) restore(ctx context.Context, ent *flowEntry, s *batonv1.FlowState, how string, live bool, pending []byte) error {
	k := ent.key
	if s.Phase != batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED && s.Phase != batonv1.FlowPhase_FLOW_PHASE_CLOSING {
		return fail(reasonNoState, "flow in phase %s", s.Phase)
	}
	r := resumeOf(s, live, pending)
	if err := e.canResume(k, r); err != nil {
		return err
	}
	if err := e.waitAborted(ctx, ent); err != nil { // a hand-over from here (claim.go)
		return err
	}
	start := time.Now()

	// The synthetic SYN (synth.go). Its ISN makes the new stack expect the
	// first client byte the old owner did not acknowledge (pitfall 8).
	o := s.ClientSyn
	if o == nil {
		o = &batonv1.SynOptions{Mss: 536, WindowScale: -1}
	}
	ent.mu.Lock()
	syn := synSpec{
		client:        k.Client,
		anycast:       k.Anycast,
		seq:           s.ClientIsn + uint32(s.ServerAckedBytes),
		mss:           uint16(min(max(o.Mss, MinMSS), MaxMSS)),
		ws:            int(s.ClientWindowScale),
		sackPermitted: s.Sack,
		ts:            s.Timestamps,
		tsval:         s.ClientTsval,
		window:        65535,
	}
	if ent.haveTS && tcpSeqAfter(ent.lastTS, syn.tsval) {
		syn.tsval = ent.lastTS
	}
	ackWnd := uint16(min(defaultAckWindow>>max(syn.ws, 0), 65535))
	if ent.haveAck {
		ackWnd = ent.lastWnd
	}
	ent.synSeq = syn.seq
	ent.synCh = make(chan synAck, 1)
	synCh := ent.synCh
	e.setStateLocked(ent, esRestoring)
	ent.mu.Unlock()

	// The accept loop may take the connection as soon as the completing
	// ACK is in, so its resume information goes first.
	pr := e.putResume(k, r)
	cleanup := func() {
		e.dropResume(k, pr)
		ent.mu.Lock()
		e.setStateLocked(ent, esReset) // the stack's answers to what follows are dropped
		ent.synCh = nil
		ent.mu.Unlock()
		if ep := e.findEndpoint(k); ep != nil {
			ep.Abort()
		}
	}
	if err := e.inj.InjectInbound(buildSYN(syn)); err != nil {
		cleanup()
		return fail(reasonRestoreFailed, "injecting the SYN: %v", err)
	}
	e.trace(k, PhaseSynInjected, "")
	var sa synAck
	t := time.NewTimer(restoreTimeout)
	select {
	case sa = <-synCh:
		t.Stop()
	case <-t.C:
		cleanup()
		return fail(reasonTimeout, "no SYN-ACK from the stack within %s", restoreTimeout)
	case <-ctx.Done():
		t.Stop()
		cleanup()
		return fail(reasonTimeout, "no SYN-ACK from the stack: %v", ctx.Err())
	}
	e.trace(k, PhaseSynAck, "")
	if sa.rst {
		cleanup()
		return fail(reasonRestoreFailed, "the stack reset the synthetic SYN")
	}
	if s.Timestamps && !sa.opts.TS {
		// SYN cookies (pitfall 6) or a configuration mismatch: the client
		// expects timestamps the new stack will not send.
		cleanup()
		return fail(reasonRestoreFailed, "the stack's SYN-ACK has no timestamps")
	}

	// Translation: the new stack's first data byte (ISS+1) is the
	// client's output offset OutputOffset (pitfall 2: fixed here, acks
	// beyond are capped at what the new stack sent).
	tr := &Translator{SeqDelta: s.ServerIsn + uint32(r.OutputOffset) - sa.iss}
	if s.Timestamps {
		elapsed := time.Since(time.Unix(0, s.UpdatedUnixNano)).Milliseconds()
		elapsed = min(max(elapsed, 0), int64(10*time.Minute/time.Millisecond))
		tr.TS = true
		tr.TSDelta = s.ServerTsval + uint32(elapsed) + tsMargin - sa.opts.TSVal
	}
	if syn.ws >= 0 && sa.opts.WS >= 0 {
		tr.OutStack, tr.InStack = uint8(sa.opts.WS), uint8(syn.ws)
	}
	if s.ServerWindowScale >= 0 {
		tr.OutClient = uint8(s.ServerWindowScale)
	}
	if s.ClientWindowScale >= 0 {
		tr.InClient = uint8(s.ClientWindowScale)
	}

	// The tracker registers the flow before the stack can send anything
	// for it (and before the service publishes its first checkpoint).
	// Its state is stamped now, so its server TSval must be the new
	// stack's clock now (client space), not the old owner's at the
	// replica's time: a node claiming the flow before this stack sent a
	// segment derives its own clock from the pair, and if it fell behind
	// TSvals the client already holds (the dead owner's newest, which the
	// replica may never have got), a Linux client would drop everything
	// it sends (PAWS) until its clock caught up.
	ts := s
	if tr.TS {
		ts = proto.Clone(s).(*batonv1.FlowState)
		ts.ServerTsval = sa.opts.TSVal + tr.TSDelta
	}
	if err := e.tr.Restore(ts, how, r.OutputOffset); err != nil {
		cleanup()
		return fail(reasonNoState, "tracker: %v", err)
	}
	if sy := e.r.repl.sync.Load(); sy != nil {
		sy.seedLog(k, s, r.OutputOffset, r.Pending) // sync mode (sync.go)
	}

	ent.mu.Lock()
	ent.maxSent.Store(sa.iss + 1)
	ent.haveFloor.Store(false)
	ent.firstByte.Store(false)
	ent.how = how
	ent.tr.Store(tr)
	ent.synCh = nil
	q := e.takeQueueLocked(ent)
	e.armAhead(ent, s, r, syn.seq+1) // a crash restore's client may be ahead (takeover_ahead.go)
	e.setStateLocked(ent, esActive)
	ent.mu.Unlock()

	ack := buildClientSegment(k.Client, k.Anycast, syn.seq+1, sa.iss+1, header.TCPFlagAck, ackWnd, s.Timestamps, syn.tsval, sa.opts.TSVal)
	if err := e.inj.InjectInbound(ack); err != nil {
		e.tr.Remove(k)
		cleanup()
		return fail(reasonRestoreFailed, "injecting the ACK: %v", err)
	}
	// A client FIN the old owner acknowledged is not sent again: the new
	// stack gets it here.
	if s.ClientFin && s.ServerAck == s.ClientIsn+1+uint32(s.ServerAckedBytes)+1 {
		fin := buildClientSegment(k.Client, k.Anycast, syn.seq+1, sa.iss+1, header.TCPFlagAck|header.TCPFlagFin, ackWnd, s.Timestamps, syn.tsval, sa.opts.TSVal)
		_ = e.inj.InjectInbound(fin)
	}
	for _, pkt := range q {
		// The tracker did not know the flow when these arrived.
		p := stack.Packet{Dir: stack.Inbound, Data: pkt}
		e.tr.Inbound(&p)
		e.noteAheadPacket(ent, pkt)
		c := ent.clamp()
		tr.Inbound(pkt, &c)
		if e.inj.InjectInbound(pkt) == nil {
			e.m.packet(pktReplayed)
		}
	}
	e.trace(k, PhaseAckInjected, "")
	e.forgetReplica(k, s.Epoch)
	select {
	case <-pr.taken:
		e.m.restored(time.Since(start))
	case <-time.After(restoreTimeout):
		e.log.Warn("takeover: restored connection not accepted yet", "flow", k.String())
	case <-ctx.Done():
	}
	e.m.takeover(how)
	e.log.Debug("takeover: flow restored", "flow", k.String(), "how", how, "epoch", s.Epoch,
		"output_offset", r.OutputOffset, "input_offset", r.InputOffset, "live", live)
	return nil
}

// forgetReplica drops this node's replica of k held for another owner at
// an older epoch: this node owns the flow now (its own replication
// supersedes it elsewhere).
func (e *Engine) forgetReplica(k FlowKey, epoch uint64) {
	cur, ok := e.r.store.Lookup(k)
	if !ok || cur.Owner == e.self || cur.Epoch >= epoch {
		return
	}
	_, _ = e.r.store.Apply(cur.Owner, &batonv1.FlowEvent{
		Kind:  batonv1.FlowEvent_KIND_CLOSE,
		State: closeState(cur.Key, cur.Owner, cur.Epoch),
	})
}

// withEpoch returns a copy of s owned at epoch.
func withEpoch(s *batonv1.FlowState, epoch uint64) *batonv1.FlowState {
	c := proto.Clone(s).(*batonv1.FlowState)
	c.Epoch = epoch
	return c
}

// sendRST sends a reset to the client of k (see buildRST) and counts it.
func (e *Engine) sendRST(k FlowKey, seq, ack uint32, ackOf bool, reason string) {
	if err := e.inj.InjectOutbound(buildRST(k.Anycast, k.Client, seq, ack, ackOf)); err == nil {
		e.m.rst(reason)
	}
}

// resetFlow ends a takeover that cannot continue the exact stream: the
// client gets a reset (the honest answer), the flow becomes a tombstone
// that resets the client again if it sends more, and the stack's own
// connection for it, if the handshake got that far, is aborted silently.
//
// A reset is only accepted at exactly the client's next expected sequence
// number (older ones are dropped silently, newer ones in the window get a
// challenge ACK). With a client packet queued, its ack is that number.
// Without one (a push: the client only receives), s places a RST at the
// old owner's send position, which a caught-up client accepts, plus a
// probe (probeReset). The probe is repeated by the janitor (backing off)
// until the client resets the probe, i.e. it is gone: like pitfall 1, a
// receive-only client says nothing unless asked, its answer may land on a
// node the router no longer (or not yet) sends it to, and the ack of a
// queued packet may be stale by the time the reset arrives.
func (e *Engine) resetFlow(ent *flowEntry, s *batonv1.FlowState, reason string) {
	k := ent.key
	ent.mu.Lock()
	e.setStateLocked(ent, esReset)
	ent.reason = reason
	ent.until = time.Now().Add(resetLinger)
	ent.lastRST = time.Time{}
	e.clearQueueLocked(ent)
	lastAck, haveAck := ent.lastAck, ent.haveAck
	if s != nil && s.Key != nil {
		ent.probe = s
		ent.probes = 1
		ent.nextProbe = time.Now().Add(probeEvery)
	}
	ent.mu.Unlock()
	e.tr.Remove(k)
	if ep := e.findEndpoint(k); ep != nil {
		ep.Abort()
	}
	if haveAck {
		e.sendRST(k, lastAck, 0, true, reason)
		return
	}
	if s != nil && s.Key != nil {
		sent := s.ServerIsn + 1 + uint32(s.ServerSentBytes)
		e.sendRST(k, sent, s.ClientIsn+1+uint32(s.ServerAckedBytes), false, reason)
		e.probeReset(k, s)
	}
}

// probeEvery is the first interval between reset probes (doubling up to
// 8 times, within resetLinger).
const probeEvery = 250 * time.Millisecond

// probeReset sends a probe to the client of a reset flow: one byte below
// the client's last ack, like a keepalive. A client answers such an old
// segment with an ACK carrying its next expected sequence number (gVisor
// and Linux rate-limit answers to out-of-window segments, except for
// segments with data), and that ACK, wherever it lands, gets an exact
// reset (the tombstone here, or a takeover elsewhere that learns the flow
// is reset).
func (e *Engine) probeReset(k FlowKey, s *batonv1.FlowState) {
	probe := tcpPacket{src: k.Anycast, dst: k.Client, seq: s.ServerIsn + uint32(s.ClientAckedBytes),
		ack: s.ClientIsn + 1 + uint32(s.ServerAckedBytes), flags: header.TCPFlagAck, payload: []byte{0}}
	if s.Timestamps {
		probe.opts = tsOption(s.ServerTsval+tsMargin, s.ClientTsval)
	}
	_ = e.inj.InjectOutbound(probe.build())
}

// reprobe repeats the probe of a reset flow whose client did not answer
// yet (janitor).
func (e *Engine) reprobe(f *flowEntry, now time.Time) {
	f.mu.Lock()
	s := f.probe
	if s == nil || f.get() != esReset || now.Before(f.nextProbe) || f.probes > 8 {
		f.mu.Unlock()
		return
	}
	f.nextProbe = now.Add(probeEvery << f.probes)
	f.probes++
	f.mu.Unlock()
	e.probeReset(f.key, s)
}

// deliverUnknown hands ent's queued packets to the stack, which resets the
// flow as it always did, and keeps delivering the flow's packets for a
// while without asking the peers again.
func (e *Engine) deliverUnknown(ent *flowEntry) {
	ent.mu.Lock()
	e.setStateLocked(ent, esUnknown)
	ent.until = time.Now().Add(unknownLinger)
	q := e.takeQueueLocked(ent)
	ent.mu.Unlock()
	e.m.unknown.Add(1)
	e.m.rst(reasonUnknown)
	for _, pkt := range q {
		_ = e.inj.InjectInbound(pkt)
	}
}
