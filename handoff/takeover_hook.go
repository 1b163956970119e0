package handoff

// This file holds the engine's two hooks on the packet path. Neither
// blocks on the network or on a takeover: packets of a flow in transit are
// copied into a bounded queue, tunnelled, translated, dropped or answered
// in place, and the takeover itself runs on its own goroutine.
//
// "handoff" (innerHook) is the innermost hook. For a packet of a flow in
// the table it applies the flow's state (translate, queue, forward, reset,
// drop). For any other inbound non-SYN TCP packet to a served port it asks,
// cheapest first, whether the stack knows the flow: the flow tracker's
// table, then gVisor's demuxer for an endpoint of exactly that 4-tuple
// (pitfall 7: without this check the stack's listener answers a mid-flow
// packet of an unknown flow with RST). If neither does, the packet is
// consumed and a takeover starts. The stack's SYN-ACK to a synthetic SYN
// is captured and consumed here: it must never reach the client.
//
// "handoff-fence" (fenceHook) sits outside the flow tracker and drops every
// packet of a flow in esHold, i.e. while this node hands the flow over
// (pitfall 4). Being outside the tracker is what makes the hand-over
// exact: an outbound packet reaches the fence only after the tracker
// recorded it, so once a flow is held, everything that can still reach the
// client is already in the tracker's state, and everything else is
// dropped. It also drops the outbound packets of this node's flows while
// it holds no lease (lease.go). Its fast path is two atomic loads (no flow
// held, lease held: pass).

import (
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/baton-anycast/baton/stack"
)

type fenceHook struct{ e *Engine }

func (*fenceHook) Name() string { return "handoff-fence" }

func (h *fenceHook) verdict(p *stack.Packet, inbound bool) stack.Verdict {
	e := h.e
	if e.nHold.Load() == 0 && e.leaseFence.Load() == 0 {
		return stack.Pass
	}
	seg, res := parseTCPSegment(p.Data, inbound, e.prefixes)
	if res != tcpOK {
		return stack.Pass
	}
	if f := e.lookup(seg.key); f != nil && f.get() == esHold {
		e.m.packet(pktFenced)
		return stack.Drop
	}
	if !inbound {
		return e.leaseVerdict(&seg) // takeover_lease.go
	}
	return stack.Pass
}

func (h *fenceHook) Inbound(p *stack.Packet) stack.Verdict  { return h.verdict(p, true) }
func (h *fenceHook) Outbound(p *stack.Packet) stack.Verdict { return h.verdict(p, false) }

type innerHook struct{ e *Engine }

func (*innerHook) Name() string { return "handoff" }

// Inbound implements stack.Hook.Inbound.
func (h *innerHook) Inbound(p *stack.Packet) stack.Verdict {
	seg, res := parseTCPSegment(p.Data, true, h.e.prefixes)
	if res != tcpOK {
		return stack.Pass
	}
	return h.inbound(p, &seg, true)
}

// inbound handles a client packet; intercept is false for packets a peer
// forwarded (this node owns their flow or drops them).
func (h *innerHook) inbound(p *stack.Packet, seg *tcpSegment, intercept bool) stack.Verdict {
	e := h.e
	if f := e.lookup(seg.key); f != nil {
		if v, handled := h.inboundEntry(f, p, seg, intercept); handled {
			return v
		}
	}
	if seg.flags&header.TCPFlagRst != 0 {
		return stack.Pass // the stack ignores a reset of a flow it does not know
	}
	if seg.flags&header.TCPFlagSyn != 0 && seg.flags&header.TCPFlagAck == 0 {
		return stack.Pass // a new connection
	}
	if e.service(seg.key.Anycast.Port()) == nil {
		return stack.Pass // no service: the stack resets, as always
	}
	if e.tr.Has(seg.key) || e.findEndpoint(seg.key) != nil {
		return stack.Pass // the stack has the flow
	}
	if !intercept {
		e.m.packet(pktForwardUnknown)
		return stack.Drop
	}
	if e.closed.Load() {
		return stack.Pass
	}
	if ig := e.tr.cfg.IgnoreClient; ig != nil && ig(seg.key.Client.Addr()) {
		// This node's own client (a health probe): its flows live and
		// die here, so a late packet of one is no takeover (no lookup in
		// the cluster, no "unknown" RST counted): the stack answers it.
		return stack.Pass
	}
	f, _ := e.entry(seg.key, esDeciding)
	return h.inboundEntryOrPass(f, p, seg)
}

func (h *innerHook) inboundEntryOrPass(f *flowEntry, p *stack.Packet, seg *tcpSegment) stack.Verdict {
	if v, handled := h.inboundEntry(f, p, seg, true); handled {
		return v
	}
	return stack.Pass
}

// inboundEntry applies f's state to a client packet. handled is false when
// the entry no longer applies (it expired) and the packet goes on as if
// there were none.
func (h *innerHook) inboundEntry(f *flowEntry, p *stack.Packet, seg *tcpSegment, intercept bool) (stack.Verdict, bool) {
	e := h.e
	switch s := f.get(); s {
	case esActive:
		aheadInbound(f, seg) // crash restores only (takeover_ahead.go)
		if tr := f.tr.Load(); tr != nil {
			c := f.clamp()
			tr.Inbound(p.Data, &c)
		}
		return stack.Pass, true
	case esHold:
		return stack.Drop, true
	case esForward:
		f.lastUsed.Store(time.Now().UnixNano())
		f.mu.Lock()
		fw := f.fwd
		f.mu.Unlock()
		if fw != nil && f.get() == esForward {
			fw.send(p.Data, false)
			return stack.Consume, true
		}
		return stack.Drop, true
	case esReset:
		h.answerReset(f, seg)
		return stack.Consume, true
	case esUnknown:
		f.mu.Lock()
		live := time.Now().Before(f.until)
		f.mu.Unlock()
		return stack.Pass, live
	case esMoved:
		if !intercept || e.closed.Load() {
			return stack.Drop, true
		}
		if h.forwardLate(f, p) {
			return stack.Consume, true
		}
		// The flow left this node and now comes back: take it over again.
		f.mu.Lock()
		if f.get() == esMoved {
			e.setStateLocked(f, esDeciding)
			f.trigger = time.Now()
			f.run = nil
		}
		f.mu.Unlock()
		fallthrough
	case esDeciding, esRestoring:
		if !intercept {
			return stack.Drop, true
		}
		h.enqueue(f, p, seg)
		return stack.Consume, true
	}
	return stack.Pass, false
}

// forwardLate tunnels a client packet of a flow this node handed over
// less than MovedSettle ago to the flow's new owner, and reports whether
// it did. Such a packet is most likely late: routed here before the route
// change that moved the flow, judged after the new owner's claim. Taking
// the flow back for it would start a claim the next packet (routed to the
// new owner) undoes: two needless moves, each a stall, seen under load as
// histories n1 n2 n1 n2 n1 for one route change back. The new owner runs
// the packet through its own chain like any forwarded one (forwardIn): an
// old segment there is what TCP handles anyway. It goes as a late packet,
// so the new owner records no forward in the flow's history. A new owner
// that is down is no place to send it: the packet takes the flow back as
// before.
func (h *innerHook) forwardLate(f *flowEntry, p *stack.Packet) bool {
	e := h.e
	f.mu.Lock()
	owner, at := f.owner, f.movedAt
	f.mu.Unlock()
	if e.cfg.MovedSettle < 0 || owner == "" || owner == e.self ||
		time.Since(at) >= e.cfg.MovedSettle || !e.r.members.Up(owner) {
		return false
	}
	fw := e.forwarderFor(owner)
	if fw == nil {
		return false
	}
	fw.send(p.Data, true)
	e.m.packet(pktLateForward)
	return true
}

// enqueue copies a client packet into f's queue (bounded per flow and in
// all) and makes sure a takeover runs for f.
func (h *innerHook) enqueue(f *flowEntry, p *stack.Packet, seg *tcpSegment) {
	e := h.e
	f.mu.Lock()
	st := f.get()
	if st != esDeciding && st != esRestoring {
		f.mu.Unlock()
		e.m.packet(pktQueueDropped)
		return
	}
	if len(f.queue) >= e.cfg.QueuePackets || e.nQueued.Load() >= int64(e.cfg.MaxQueued) ||
		e.qBytes.Load()+int64(len(p.Data)) > int64(e.cfg.MaxQueuedBytes) {
		f.mu.Unlock()
		e.m.packet(pktQueueDropped)
		return
	}
	f.queue = append(f.queue, append([]byte(nil), p.Data...))
	e.nQueued.Add(1)
	e.qBytes.Add(int64(len(p.Data)))
	if seg.flags&header.TCPFlagAck != 0 && (!f.haveAck || tcpSeqAfter(seg.ack, f.lastAck)) {
		f.lastAck, f.haveAck = seg.ack, true
		f.lastWnd = seg.window
	}
	if ts, ok := tcpTSval(seg.opts); ok {
		if !f.haveTS || tcpSeqAfter(ts, f.lastTS) {
			f.lastTS, f.haveTS = ts, true
		}
	}
	needRun := f.run == nil && st == esDeciding
	f.mu.Unlock()
	e.m.packet(pktQueued)
	if needRun {
		e.startPull(f)
	}
}

// answerReset resets the client again for a flow this node reset, at the
// newest ack the client sent (acks never go back, and a stale one would
// place the reset below the client's window, where it is ignored).
// Rate-limited. A reset from the client means it is gone: probing stops.
func (h *innerHook) answerReset(f *flowEntry, seg *tcpSegment) {
	if seg.flags&header.TCPFlagRst != 0 {
		f.mu.Lock()
		f.probe = nil
		f.mu.Unlock()
		return
	}
	if seg.flags&header.TCPFlagAck == 0 {
		return
	}
	now := time.Now()
	f.mu.Lock()
	if !f.haveAck || tcpSeqAfter(seg.ack, f.lastAck) {
		f.lastAck, f.haveAck = seg.ack, true
	}
	ack := f.lastAck
	if now.Sub(f.lastRST) < rstEvery {
		f.mu.Unlock()
		return
	}
	f.lastRST = now
	reason := f.reason
	f.mu.Unlock()
	h.e.sendRST(f.key, ack, 0, true, reason)
}

// Outbound implements stack.Hook.Outbound.
func (h *innerHook) Outbound(p *stack.Packet) stack.Verdict {
	e := h.e
	if e.nEntries.Load() == 0 {
		return stack.Pass
	}
	seg, res := parseTCPSegment(p.Data, false, e.prefixes)
	if res != tcpOK {
		return stack.Pass
	}
	f := e.lookup(seg.key)
	if f == nil {
		return stack.Pass
	}
	switch f.get() {
	case esActive:
		if seg.flags&header.TCPFlagSyn != 0 {
			return stack.Consume // a retransmitted SYN-ACK: never to the client
		}
		h.outboundActive(f, p, &seg)
		return stack.Pass
	case esRestoring:
		if sa, ok := parseSynAck(p.Data); ok {
			f.mu.Lock()
			if (sa.rst || sa.ack == f.synSeq+1) && f.synCh != nil {
				select {
				case f.synCh <- sa:
				default:
				}
			}
			f.mu.Unlock()
		}
		return stack.Consume
	case esUnknown:
		return stack.Pass // the stack's reset: today's answer to an unknown flow
	}
	e.m.packet(pktFenced)
	return stack.Drop
}

// outboundActive translates a packet of a restored flow to the client's
// space, noting the highest sequence number sent (for the ack cap), the
// first TSval (for the TSecr floor) and the first data byte (latency).
func (h *innerHook) outboundActive(f *flowEntry, p *stack.Packet, seg *tcpSegment) {
	tr := f.tr.Load()
	if tr == nil {
		return
	}
	aheadOutbound(f, seg)
	end := seg.seq + seg.seqLen()
	for {
		cur := f.maxSent.Load()
		if !tcpSeqAfter(end, cur) || f.maxSent.CompareAndSwap(cur, end) {
			break
		}
	}
	if !tr.Outbound(p.Data, p.GSO.PartialChecksum) {
		return
	}
	if tr.TS && !f.haveFloor.Load() {
		if ts, ok := tcpTSval(seg.opts); ok { // seg.opts aliases p.Data: translated
			f.tsFloor.Store(ts)
			f.haveFloor.Store(true)
		}
	}
	if seg.payloadLen > 0 && !f.firstByte.Swap(true) {
		lat := time.Since(f.trigger)
		h.e.m.latency(f.how, lat)
		h.e.traceFirstByte(f, lat)
	}
}

// clamp returns the clamps for f's next client packet.
func (f *flowEntry) clamp() InboundClamp {
	c := InboundClamp{AckCap: f.maxSent.Load(), CapAck: true}
	if f.haveFloor.Load() {
		c.TSecrFloor, c.HaveFloor = f.tsFloor.Load(), true
	}
	return c
}
