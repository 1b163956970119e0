package handoff

// The sync mode's hold queue (see sync.go): the outer hook that holds
// packets, the replicas' acknowledgements that release them, and the
// sweeper that releases what waited too long.

import (
	"math/bits"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/tun"
)

// Degraded-release and drop reasons.
const (
	syncDegradedTimeout   = "timeout"    // held longer than HoldTimeout
	syncDegradedNoReplica = "no_replica" // no live replica to wait for
	syncDropFull          = "full"       // hold queue full: TCP retransmits
	syncDropFenced        = "fenced"     // the node no longer owns the flow
	syncDropClosed        = "closed"     // the node stops
	syncDropReset         = "reset"      // the stack reset the connection
)

type syncHoldHook struct{ s *Sync }

func (*syncHoldHook) Name() string                        { return "sync-hold" }
func (*syncHoldHook) Inbound(*stack.Packet) stack.Verdict { return stack.Pass }

// Outbound passes a covered packet and holds the others.
func (h *syncHoldHook) Outbound(p *stack.Packet) stack.Verdict {
	s := h.s
	seg, res := parseTCPSegment(p.Data, false, s.prefixes)
	if res != tcpOK || !s.cfg.Sync(seg.key.Anycast.Port()) || seg.flags&header.TCPFlagSyn != 0 {
		return stack.Pass // SYN-ACKs reveal nothing replicated
	}
	hk := trkKeyOf(seg.key)
	sh := s.shardFor(&hk)
	now := mono()
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flows[hk]
	if seg.flags&header.TCPFlagRst != 0 {
		if f != nil {
			s.dropQueueLocked(f, syncDropReset)
		}
		return stack.Pass
	}
	if f == nil || (len(f.q) == 0 && !f.releasing) {
		if !s.has(seg.key) {
			// Not tracked (an ignored client, a full table, a flow
			// that ended): nothing replicated to wait for.
			return stack.Pass
		}
		if f == nil {
			f = sh.flowLocked(&hk, seg.key)
		}
	}
	f.lastUsed = now
	pk := heldPkt{end: seg.seq + seg.seqLen(), ack: seg.ack, hasAck: seg.flags&header.TCPFlagAck != 0}
	if len(f.q) == 0 && !f.releasing {
		switch s.coveredLocked(f, &pk) {
		case covYes:
			return stack.Pass
		case covNoReplica:
			s.m.degraded(syncDegradedNoReplica, 1)
			return stack.Pass
		}
	}
	if len(f.q) >= s.cfg.MaxFlowPackets || s.heldBytes.Load()+int64(len(p.Data)) > int64(s.cfg.MaxHeldBytes) {
		s.m.dropped(syncDropFull, 1)
		return stack.Drop
	}
	pool := &s.small
	if len(p.Data) > s.cfg.MTU {
		pool = &s.large
	}
	bp := pool.Get().(*[]byte)
	if len(*bp) < len(p.Data) {
		b := make([]byte, len(p.Data))
		bp = &b
	}
	pk.buf, pk.n, pk.gso, pk.at = bp, copy(*bp, p.Data), p.GSO, now
	f.q = append(f.q, pk)
	s.heldPkts.Add(1)
	s.heldBytes.Add(int64(pk.n))
	s.m.held.Add(1)
	if !s.coalesceHolds.Load() {
		// The state that covers it is in the tracker's changes: send
		// it now rather than at the end of the coalesce window (an
		// exchange waits for it). Safety is the same either way: the
		// packet leaves only once a replica acknowledged its state.
		s.r.repl.kick()
	}
	return stack.Consume
}

type covResult uint8

const (
	covNo covResult = iota
	covYes
	covNoReplica
)

// required returns the flow's replica set (the replicator's placement
// over its current view, restricted to members that are up).
func (s *Sync) requiredLocked(f *syncFlow) peerSet {
	rp := s.r.repl
	v := rp.view.Load()
	if v == nil {
		return 0
	}
	if f.reqView != v {
		f.reqView = v
		f.req = rp.placer.top(f.key, rp.self, v.mask, rp.k)
	}
	return f.req
}

// coveredLocked says whether every required replica acknowledged a state
// covering pk.
func (s *Sync) coveredLocked(f *syncFlow, pk *heldPkt) covResult {
	if f.closed {
		return covYes
	}
	req := s.requiredLocked(f)
	if req == 0 {
		return covNoReplica
	}
	if req&^f.covered != 0 {
		return covNo
	}
	for r := req; r != 0; r &= r - 1 {
		c := &f.cov[bits.TrailingZeros64(uint64(r))]
		if !tcpSeqAtLeast(c.next, pk.end) || (pk.hasAck && !tcpSeqAtLeast(c.ack, pk.ack)) {
			return covNo
		}
	}
	return covYes
}

// acked records that replica idx acknowledged states (sent in one batch,
// in order) and releases what they cover. It runs on the link's ack
// reader.
func (s *Sync) acked(idx int, states []*batonv1.FlowState) {
	for _, st := range states {
		k, err := KeyFromProto(st.Key)
		if err != nil {
			continue
		}
		hk := trkKeyOf(k)
		sh := s.shardFor(&hk)
		sh.mu.Lock()
		f := sh.flows[hk]
		if f == nil {
			sh.mu.Unlock()
			continue
		}
		if st.Phase == batonv1.FlowPhase_FLOW_PHASE_CLOSED {
			f.closed = true
		} else {
			c := &f.cov[idx]
			if !f.covered.has(idx) {
				f.covered |= 1 << uint(idx)
				c.ack, c.next = st.ServerAck, st.ServerNextSeq
			} else {
				if tcpSeqAfter(st.ServerAck, c.ack) {
					c.ack = st.ServerAck
				}
				if tcpSeqAfter(st.ServerNextSeq, c.next) {
					c.next = st.ServerNextSeq
				}
			}
		}
		s.releaseLocked(sh, f, false)
		sh.mu.Unlock()
	}
}

// releaseLocked writes, in order, the held packets of f that are covered
// (all of them when force). It drops the shard lock while writing; while
// it writes, the hook queues f's new packets behind them.
func (s *Sync) releaseLocked(sh *syncShard, f *syncFlow, force bool) {
	if f.releasing {
		return // the writer in progress picks them up
	}
	var batch [16]heldPkt
	for len(f.q) > 0 {
		n := 0
		for n < len(f.q) && n < len(batch) {
			if !force {
				switch s.coveredLocked(f, &f.q[n]) {
				case covNo:
					goto stop
				case covNoReplica:
					s.m.degraded(syncDegradedNoReplica, 1)
				}
			}
			batch[n] = f.q[n]
			n++
		}
	stop:
		if n == 0 {
			return
		}
		rest := copy(f.q, f.q[n:])
		clear(f.q[rest:])
		f.q = f.q[:rest]
		f.releasing = true
		sh.mu.Unlock()
		fenced := s.cfg.Fenced != nil && s.cfg.Fenced(f.key)
		now := mono()
		for i := range batch[:n] {
			pk := &batch[i]
			if fenced {
				s.m.dropped(syncDropFenced, 1)
			} else {
				s.write(pk)
				s.m.observeHold(time.Duration(now - pk.at))
			}
			s.free(pk)
		}
		clear(batch[:n])
		sh.mu.Lock()
		f.releasing = false
		if fenced {
			s.dropQueueLocked(f, syncDropFenced)
			return
		}
	}
}

// write puts a released packet on the device.
func (s *Sync) write(pk *heldPkt) {
	data := (*pk.buf)[:pk.n]
	if pk.gso == (stack.GSOInfo{}) {
		_ = s.cfg.Injector.InjectOutbound(data)
		return
	}
	hdr, ok := gsoHeader(data, pk.gso)
	if !ok {
		return // lost like on a wire; TCP retransmits
	}
	segs, err := tun.SegmentGSO(hdr, data, max(s.cfg.MTU, int(hdr.HdrLen)+int(hdr.GSOSize)))
	if err != nil {
		return
	}
	for _, b := range segs {
		_ = s.cfg.Injector.InjectOutbound(b)
	}
}

// gsoHeader is the virtio_net_hdr the link endpoint would write pk with
// (stack/link.go virtioHdr).
func gsoHeader(data []byte, g stack.GSOInfo) (h tun.VirtioNetHdr, ok bool) {
	p := stack.Packet{Data: data}
	var l4 int
	switch {
	case g.Type == stack.GSOTCPv4 && p.Version() == 4:
		l4, h.GSOType = int(header.IPv4(data).HeaderLength()), tun.VirtioNetHdrGSOTCPv4
	case g.Type == stack.GSOTCPv6 && p.Version() == 6:
		l4, h.GSOType = header.IPv6MinimumSize, tun.VirtioNetHdrGSOTCPv6
	default:
		return h, false
	}
	if len(data) < l4+header.TCPMinimumSize {
		return h, false
	}
	thl := int(header.TCP(data[l4:]).DataOffset())
	if thl < header.TCPMinimumSize || l4+thl > len(data) {
		return h, false
	}
	h.HdrLen = uint16(l4 + thl)
	if g.PartialChecksum {
		h.Flags = tun.VirtioNetHdrFNeedsCsum
		h.CsumStart = uint16(l4)
		h.CsumOffset = header.TCPChecksumOffset
	}
	if g.MSS > 0 && len(data)-l4-thl > int(g.MSS) {
		h.GSOSize = g.MSS
	} else {
		h.GSOType = tun.VirtioNetHdrGSONone
	}
	return h, true
}

func (s *Sync) free(pk *heldPkt) {
	s.heldPkts.Add(-1)
	s.heldBytes.Add(-int64(pk.n))
	if len(*pk.buf) > s.cfg.MTU {
		s.large.Put(pk.buf)
	} else {
		s.small.Put(pk.buf)
	}
	pk.buf = nil
}

func (s *Sync) dropQueueLocked(f *syncFlow, reason string) {
	if len(f.q) == 0 {
		return
	}
	s.m.dropped(reason, len(f.q))
	for i := range f.q {
		s.free(&f.q[i])
	}
	clear(f.q)
	f.q = f.q[:0]
}

// syncForget is how long a flow with nothing held stays known after its
// last packet or state (its log and coverage).
const syncForget = 2 * time.Minute

// sweep releases (degraded) queues whose oldest packet waited longer than
// HoldTimeout and forgets idle flows.
func (s *Sync) sweep() {
	tick := max(s.cfg.HoldTimeout/4, 5*time.Millisecond)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		now := mono()
		for i := range s.shards {
			sh := &s.shards[i]
			sh.mu.Lock()
			for hk, f := range sh.flows {
				if len(f.q) > 0 && !f.releasing && time.Duration(now-f.q[0].at) > s.cfg.HoldTimeout {
					n := len(f.q)
					s.m.degraded(syncDegradedTimeout, n)
					s.releaseLocked(sh, f, true)
					if sh.flows[hk] != f {
						continue
					}
				}
				if len(f.q) == 0 && !f.releasing && time.Duration(now-f.lastUsed) > syncForget {
					delete(sh.flows, hk)
				}
			}
			sh.mu.Unlock()
		}
	}
}

// SyncStats are the sync mode's counters.
type SyncStats struct {
	Held      uint64            // packets held at least once
	HeldNow   int64             // packets held now
	Degraded  map[string]uint64 // packets released unreplicated, by reason
	Dropped   map[string]uint64 // held packets dropped, by reason
	HoldCount uint64            // packets released after a hold
	HoldSum   time.Duration     // their total hold time
}

// Stats returns the counters.
func (s *Sync) Stats() SyncStats { return s.m.stats(s.heldPkts.Load()) }
