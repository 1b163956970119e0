package handoff

import (
	"bytes"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
)

func trkSignalled(tr *Tracker) bool {
	select {
	case <-tr.Changes():
		return true
	default:
		return false
	}
}

func TestTrackerTakeChanges(t *testing.T) {
	tr, clk := newTrkTracker(TrackerConfig{})
	if cap(tr.Changes()) != 1 {
		t.Fatalf("Changes capacity %d", cap(tr.Changes()))
	}
	a := trkConn4(t, tr, 40001, 100, 200)
	a.syn(trkNoOpts)
	a.synAck(trkNoOpts)
	if trkSignalled(tr) || len(trkTake(t, tr)) != 0 {
		t.Fatal("handshake reported")
	}

	// OPEN once, with the newest state even after more changes.
	a.ack()
	a.clientData(10)
	a.serverData(20)
	clk.Advance(5)
	a.ack()
	if !trkSignalled(tr) {
		t.Fatal("no signal")
	}
	ch := trkTake(t, tr)
	got := ch[a.key().String()]
	if len(ch) != 1 || got.Kind != trkOpen || got.State.ClientAck != 221 || got.State.ServerAck != 111 ||
		got.State.UpdatedUnixNano != trkTestEpoch.UnixNano()+5 {
		t.Fatalf("open: %v", ch)
	}
	if len(trkTake(t, tr)) != 0 || trkSignalled(tr) {
		t.Fatal("nothing changed but something reported")
	}
	// A packet that changes nothing reports nothing.
	a.in(trkSeg{seq: a.cNext, ack: a.sNext, flags: header.TCPFlagAck})
	if len(trkTake(t, tr)) != 0 {
		t.Fatal("duplicate ack reported")
	}

	// Then UPDATEs, coalesced.
	a.serverData(5)
	a.serverData(5)
	a.ack()
	ch = trkTake(t, tr)
	if got := ch[a.key().String()]; len(ch) != 1 || got.Kind != trkUpdate || got.State.ServerNextSeq != 231 {
		t.Fatalf("update: %v", ch)
	}

	// Handshake-only flows never appear, whatever happens to them.
	for p := uint16(50000); p < 50100; p++ {
		f := trkConn4(t, tr, p, 1, 2)
		f.syn(trkNoOpts)
		if p%2 == 0 {
			f.synAck(trkNoOpts)
		}
		if p%3 == 0 {
			f.in(trkSeg{seq: 2, flags: header.TCPFlagRst})
		}
	}
	if len(trkTake(t, tr)) != 0 {
		t.Fatal("SYN flood reached the changes")
	}

	// A flow opened and closed between two takes is never reported.
	b := trkConn4(t, tr, 40002, 100, 200)
	b.handshake(trkNoOpts, trkNoOpts)
	b.out(trkSeg{seq: b.sNext, flags: header.TCPFlagRst})
	if ch := trkTake(t, tr); len(ch) != 0 {
		t.Fatalf("flow closed before its open was taken reported: %v", ch)
	}

	// OPEN, then a close before the next take: one CLOSE.
	c := trkConn4(t, tr, 40003, 100, 200)
	c.handshake(trkNoOpts, trkNoOpts)
	if ch := trkTake(t, tr); ch[c.key().String()].Kind != trkOpen {
		t.Fatalf("no open: %v", ch)
	}
	c.serverData(10)
	c.clientFin()
	c.serverFin()
	c.ack()
	ch = trkTake(t, tr)
	if got := ch[c.key().String()]; len(ch) != 1 || got.Kind != trkClose || got.State.Phase != trkPhClosed ||
		got.State.Owner != "n1" || got.State.Epoch != 1 {
		t.Fatalf("close: %v", ch)
	}
	if len(trkTake(t, tr)) != 0 {
		t.Fatal("close reported twice")
	}

	// The same 4-tuple closed and reopened between takes: the old flow's
	// CLOSE comes before the new flow's OPEN.
	d := trkConn4(t, tr, 40004, 100, 200)
	d.handshake(trkNoOpts, trkNoOpts)
	trkTake(t, tr)
	d.out(trkSeg{seq: d.sNext, flags: header.TCPFlagRst})
	d2 := trkConn4(t, tr, 40004, 7000, 8000)
	d2.handshake(trkNoOpts, trkNoOpts)
	list := tr.TakeChanges(nil)
	if len(list) != 2 || list[0].Kind != trkClose || list[0].State.ClientIsn != 100 ||
		list[1].Kind != trkOpen || list[1].State.ClientIsn != 7000 {
		t.Fatalf("reopen: %v", list)
	}
	// dst is appended to.
	a.serverData(1)
	pre := []Change{{Kind: trkUpdate}}
	if got := tr.TakeChanges(pre); len(got) != 2 || got[0].State != nil {
		t.Fatalf("TakeChanges did not append: %v", got)
	}
	trkCheckInvariants(t, tr)
}

func TestTrackerCheckpoint(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := trkConn4(t, tr, 40000, 1000, 0xfffffff0)
	// Unknown flow, flow without a SYN-ACK: refused.
	tr.SetCheckpoint(c.key(), 0, []byte("a"))
	c.syn(trkNoOpts)
	tr.SetCheckpoint(c.key(), 0, []byte("a"))
	if st := tr.Stats(); st.CheckpointRejected.UnknownFlow != 2 {
		t.Fatalf("stats %+v", st)
	}
	c.synAck(trkNoOpts)
	// A checkpoint before the open is carried by the OPEN.
	data := []byte("state-1")
	tr.SetCheckpoint(c.key(), 0, data)
	data[0] = 'X' // the tracker keeps a copy
	if len(trkTake(t, tr)) != 0 {
		t.Fatal("checkpoint of a flow in handshake reported")
	}
	c.ack()
	ch := trkTake(t, tr)
	if got := ch[c.key().String()]; got.Kind != trkOpen || string(got.State.Checkpoint) != "state-1" || got.State.CheckpointSeq != 0xfffffff1 {
		t.Fatalf("open with checkpoint: %v", ch)
	}

	// Only the checkpoint changed: KIND_CHECKPOINT; seq wraps.
	tr.SetCheckpoint(c.key(), 100, []byte("state-2"))
	ch = trkTake(t, tr)
	if got := ch[c.key().String()]; got.Kind != trkCheckpoint || string(got.State.Checkpoint) != "state-2" || got.State.CheckpointSeq != 0x55 {
		t.Fatalf("checkpoint: %v", ch)
	}
	// written beyond 2^32 wraps mod 2^32.
	tr.SetCheckpoint(c.key(), 1<<32+1, nil)
	if s := c.state(); s.CheckpointSeq != 0xfffffff2 || len(s.Checkpoint) != 0 {
		t.Fatalf("checkpoint_seq %#x", s.CheckpointSeq)
	}
	// Checkpoint and position changes: one UPDATE carrying both.
	tr.SetCheckpoint(c.key(), 10, []byte("state-3"))
	c.serverData(10)
	ch = trkTake(t, tr)
	if got := ch[c.key().String()]; len(ch) != 1 || got.Kind != trkUpdate || string(got.State.Checkpoint) != "state-3" {
		t.Fatalf("update with checkpoint: %v", ch)
	}
	// Too large: refused and counted, the old one stays.
	tr.SetCheckpoint(c.key(), 20, bytes.Repeat([]byte{1}, MaxCheckpointBytes+1))
	tr.SetCheckpoint(c.key(), 20, bytes.Repeat([]byte{1}, MaxCheckpointBytes))
	if st := tr.Stats(); st.CheckpointRejected.TooLarge != 1 || st.CheckpointRejected.Total() != 3 {
		t.Fatalf("stats %+v", st)
	}
	if s := c.state(); len(s.Checkpoint) != MaxCheckpointBytes {
		t.Fatalf("checkpoint of %d bytes", len(s.Checkpoint))
	}
	// Through the stack's sink signature.
	tr.CheckpointSink()(c.client, c.anycast, 5, []byte("sink"))
	if s := c.state(); string(s.Checkpoint) != "sink" || s.CheckpointSeq != 0xfffffff6 {
		t.Fatalf("sink: %q %#x", s.Checkpoint, s.CheckpointSeq)
	}
}

func TestTrackerEpochOwnedLookup(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	var conns []*trkConn
	for i := 0; i < 10; i++ {
		c := trkConn4(t, tr, uint16(41000+i), uint32(i), uint32(1000*i))
		if i < 7 {
			c.handshake(trkNoOpts, trkNoOpts)
		} else {
			c.syn(trkNoOpts)
		}
		conns = append(conns, c)
	}
	conns[6].clientFin()
	trkTake(t, tr)
	if tr.SetEpoch(FlowKey{Client: netip.MustParseAddrPort("198.51.100.9:1"), Anycast: trkAnycast4}, 5) {
		t.Fatal("SetEpoch on an unknown flow")
	}
	if !tr.SetEpoch(conns[3].key(), 7) || !tr.SetEpoch(conns[8].key(), 9) {
		t.Fatal("SetEpoch failed")
	}
	ch := trkTake(t, tr)
	if got := ch[conns[3].key().String()]; len(ch) != 1 || got.Kind != trkUpdate || got.State.Epoch != 7 {
		t.Fatalf("epoch change: %v", ch)
	}
	seen := map[string]*batonv1.FlowState{}
	tr.Owned(func(s *batonv1.FlowState) bool {
		k, _ := KeyFromProto(s.Key)
		seen[k.String()] = s
		return true
	})
	if len(seen) != 7 {
		t.Fatalf("Owned gave %d flows, want 7", len(seen))
	}
	if seen[conns[6].key().String()].Phase != trkPhClosing || seen[conns[3].key().String()].Epoch != 7 {
		t.Fatal("Owned snapshots wrong")
	}
	n := 0
	tr.Owned(func(*batonv1.FlowState) bool { n++; return n < 3 })
	if n != 3 {
		t.Fatalf("Owned did not stop: %d calls", n)
	}
	if _, ok := tr.Lookup(conns[8].key()); ok {
		t.Fatal("Lookup returned a flow in handshake")
	}
	// Completing the handshake keeps the epoch set earlier.
	conns[8].synAck(trkNoOpts)
	conns[8].ack()
	if s := conns[8].state(); s.Epoch != 9 {
		t.Fatalf("epoch %d", s.Epoch)
	}
	// Snapshots are independent of the tracker.
	s := conns[0].state()
	s.ClientAck = 0
	if conns[0].state().ClientAck == 0 {
		t.Fatal("snapshot aliases the tracker")
	}
}

// TestTrackerConcurrent feeds many flows from many goroutines while another
// goroutine takes changes; run with -race.
func TestTrackerConcurrent(t *testing.T) {
	const workers, flowsPer, rounds = 8, 32, 20
	tr, _ := newTrkTracker(TrackerConfig{MaxFlows: workers * flowsPer})
	var stop atomic.Bool
	var mu sync.Mutex
	events := map[string][]batonv1.FlowEvent_Kind{}
	collect := func() {
		for _, ch := range tr.TakeChanges(nil) {
			k, _ := KeyFromProto(ch.State.Key)
			events[k.String()] = append(events[k.String()], ch.Kind)
		}
	}
	taken := make(chan struct{})
	go func() {
		defer close(taken)
		for !stop.Load() {
			<-tr.Changes()
			mu.Lock()
			collect()
			mu.Unlock()
			tr.Owned(func(*batonv1.FlowState) bool { return true })
			tr.Sweep()
		}
	}()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < flowsPer; i++ {
				port := uint16(10000 + w*flowsPer + i)
				c := newTrkConn(t, tr, netip.AddrPortFrom(trkClient4, port), trkAnycast4, uint32(port)<<16, ^uint32(port))
				if w%2 == 1 {
					c = newTrkConn(t, tr, netip.AddrPortFrom(trkClient6, port), trkAnycast6, uint32(port)<<16, ^uint32(port))
				}
				c.handshake(trkOpts{ts: true, sackPerm: true}, trkOpts{ts: true, sackPerm: true})
				for r := 0; r < rounds; r++ {
					c.clientData(10)
					c.serverData(1000)
					c.ack()
					c.serverAck()
					if r%5 == 0 {
						tr.SetCheckpoint(c.key(), uint64(r), []byte{byte(r)})
						tr.SetEpoch(c.key(), uint64(r+1))
					}
				}
				if i%3 == 0 {
					c.out(trkSeg{seq: c.sNext, flags: header.TCPFlagRst})
				} else {
					c.clientFin()
					c.serverFin()
					c.ack()
				}
			}
		}(w)
	}
	wg.Wait()
	stop.Store(true)
	select {
	case tr.changes <- struct{}{}:
	default:
	}
	<-taken
	collect()
	if tr.Len() != 0 {
		t.Fatalf("%d flows left", tr.Len())
	}
	if st := tr.Stats(); st.Opened != workers*flowsPer || st.Closed.Total() != workers*flowsPer || st.Untracked != 0 {
		t.Fatalf("stats %+v", st)
	}
	for k, ev := range events {
		if ev[0] != trkOpen || ev[len(ev)-1] != trkClose {
			t.Fatalf("%s: events %v", k, ev)
		}
		for _, e := range ev[1 : len(ev)-1] {
			if e == trkOpen || e == trkClose {
				t.Fatalf("%s: events %v", k, ev)
			}
		}
	}
	trkCheckInvariants(t, tr)
}

// TestTrackerNoAllocs checks that packets of existing flows do not
// allocate, whether they change the flow or not.
func TestTrackerNoAllocs(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		t.Run(fmt.Sprintf("v6=%v", v6), func(t *testing.T) {
			tr, _ := newTrkTracker(TrackerConfig{})
			c := trkConn4(t, tr, 40000, 1000, 5000)
			if v6 {
				c = newTrkConn(t, tr, netip.AddrPortFrom(trkClient6, 40000), trkAnycast6, 1000, 5000)
			}
			c.handshake(trkOpts{ts: true, sackPerm: true, hasWS: true, ws: 7}, trkOpts{ts: true, sackPerm: true, hasWS: true, ws: 5})
			trkTake(t, tr)
			// Pre-built packets: server data and client acks (with SACK
			// blocks) that move the positions on every packet.
			const n = 400
			var pkts []stack.Packet
			for i := 0; i < n; i++ {
				c.sTS++
				pkts = append(pkts, stack.Packet{Dir: stack.Outbound, Data: trkSeg{src: c.anycast, dst: c.client,
					seq: c.sNext, ack: c.cNext, flags: header.TCPFlagAck, payload: make([]byte, 1400),
					opts: trkOpts{ts: true, tsval: c.sTS, tsec: c.cTS}}.bytes()})
				c.sNext += 1400
				c.cTS++
				pkts = append(pkts, stack.Packet{Dir: stack.Inbound, Data: trkSeg{src: c.client, dst: c.anycast,
					seq: c.cNext, ack: c.sNext - 1400, flags: header.TCPFlagAck,
					opts: trkOpts{ts: true, tsval: c.cTS, tsec: c.sTS, sack: []header.SACKBlock{{Start: 1, End: 2}}}}.bytes()})
			}
			i := 0
			allocs := testing.AllocsPerRun(n-1, func() {
				for j := 0; j < 2; j++ {
					p := &pkts[i%len(pkts)]
					if p.Dir == stack.Inbound {
						tr.Inbound(p)
					} else {
						tr.Outbound(p)
					}
					i++
				}
			})
			if allocs != 0 {
				t.Fatalf("%.1f allocations per packet pair", allocs)
			}
			if s := c.state(); s.ClientAck != c.sNext-1400 {
				t.Fatalf("client_ack %d, want %d", s.ClientAck, c.sNext-1400)
			}
			// And replaying them (no change) does not allocate either.
			trkTake(t, tr)
			i = 0
			if allocs := testing.AllocsPerRun(n/2-1, func() {
				p := &pkts[i%len(pkts)]
				if p.Dir == stack.Inbound {
					tr.Inbound(p)
				} else {
					tr.Outbound(p)
				}
				i++
			}); allocs != 0 {
				t.Fatalf("%.1f allocations per replayed packet", allocs)
			}
		})
	}
}
