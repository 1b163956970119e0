package handoff

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
)

const (
	trkPhHandshake   = batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE
	trkPhEstablished = batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED
	trkPhClosing     = batonv1.FlowPhase_FLOW_PHASE_CLOSING
	trkPhClosed      = batonv1.FlowPhase_FLOW_PHASE_CLOSED
	trkOpen          = batonv1.FlowEvent_KIND_OPEN
	trkUpdate        = batonv1.FlowEvent_KIND_UPDATE
	trkCheckpoint    = batonv1.FlowEvent_KIND_CHECKPOINT
	trkClose         = batonv1.FlowEvent_KIND_CLOSE
)

func TestTrackerHandshakeOptions(t *testing.T) {
	type want struct {
		cMSS, sMSS uint32
		cSynWS     int32
		cWS, sWS   int32
		sack, ts   bool
	}
	cases := []struct {
		name       string
		cOpts      trkOpts
		sOpts      trkOpts
		want       want
		cSack, cTS bool
	}{
		{"none", trkNoOpts, trkNoOpts, want{cMSS: 536, sMSS: 536, cSynWS: -1, cWS: -1, sWS: -1}, false, false},
		{"mss", trkOpts{mss: 1460}, trkOpts{mss: 1400}, want{cMSS: 1460, sMSS: 1400, cSynWS: -1, cWS: -1, sWS: -1}, false, false},
		{"ws-both", trkOpts{hasWS: true, ws: 7}, trkOpts{hasWS: true, ws: 5}, want{cMSS: 536, sMSS: 536, cSynWS: 7, cWS: 7, sWS: 5}, false, false},
		{"ws-zero-both", trkOpts{hasWS: true, ws: 0}, trkOpts{hasWS: true, ws: 0}, want{cMSS: 536, sMSS: 536, cSynWS: 0, cWS: 0, sWS: 0}, false, false},
		{"ws-client-only", trkOpts{hasWS: true, ws: 7}, trkNoOpts, want{cMSS: 536, sMSS: 536, cSynWS: 7, cWS: -1, sWS: -1}, false, false},
		{"ws-server-only", trkNoOpts, trkOpts{hasWS: true, ws: 5}, want{cMSS: 536, sMSS: 536, cSynWS: -1, cWS: -1, sWS: -1}, false, false},
		{"ws-over-14", trkOpts{hasWS: true, ws: 20}, trkOpts{hasWS: true, ws: 5}, want{cMSS: 536, sMSS: 536, cSynWS: 14, cWS: 14, sWS: 5}, false, false},
		{"sack-both", trkOpts{sackPerm: true}, trkOpts{sackPerm: true}, want{cMSS: 536, sMSS: 536, cSynWS: -1, cWS: -1, sWS: -1, sack: true}, true, false},
		{"sack-client-only", trkOpts{sackPerm: true}, trkNoOpts, want{cMSS: 536, sMSS: 536, cSynWS: -1, cWS: -1, sWS: -1}, true, false},
		{"ts-both", trkOpts{ts: true, tsval: 77}, trkOpts{ts: true, tsval: 99, tsec: 77}, want{cMSS: 536, sMSS: 536, cSynWS: -1, cWS: -1, sWS: -1, ts: true}, false, true},
		{"ts-client-only", trkOpts{ts: true, tsval: 77}, trkNoOpts, want{cMSS: 536, sMSS: 536, cSynWS: -1, cWS: -1, sWS: -1}, false, true},
		{"tiny-mss", trkOpts{mss: 40}, trkOpts{mss: 65535}, want{cMSS: MinMSS, sMSS: MaxMSS, cSynWS: -1, cWS: -1, sWS: -1}, false, false},
		{"linux-like", trkOpts{mss: 1460, hasWS: true, ws: 7, sackPerm: true, ts: true, tsval: 1},
			trkOpts{mss: 1460, hasWS: true, ws: 5, sackPerm: true, ts: true, tsval: 2, tsec: 1},
			want{cMSS: 1460, sMSS: 1460, cSynWS: 7, cWS: 7, sWS: 5, sack: true, ts: true}, true, true},
	}
	for _, fam := range []struct {
		name            string
		client, anycast netip.AddrPort
	}{
		{"v4", netip.AddrPortFrom(trkClient4, 40000), trkAnycast4},
		{"v6", netip.AddrPortFrom(trkClient6, 40000), trkAnycast6},
	} {
		for _, tc := range cases {
			t.Run(fam.name+"/"+tc.name, func(t *testing.T) {
				tr, clk := newTrkTracker(TrackerConfig{})
				c := newTrkConn(t, tr, fam.client, fam.anycast, 1000, 900000)
				c.syn(tc.cOpts)
				if _, ok := tr.Lookup(c.key()); ok {
					t.Fatal("flow in handshake is owned")
				}
				clk.Advance(time.Millisecond)
				c.synAck(tc.sOpts)
				clk.Advance(time.Millisecond)
				c.ts = tc.want.ts
				c.ack()
				s := c.state()
				w := tc.want
				got := want{
					cMSS: s.ClientSyn.Mss, sMSS: s.ServerMss, cSynWS: s.ClientSyn.WindowScale,
					cWS: s.ClientWindowScale, sWS: s.ServerWindowScale, sack: s.Sack, ts: s.Timestamps,
				}
				if got != w {
					t.Fatalf("got %+v, want %+v", got, w)
				}
				if s.ClientSyn.SackPermitted != tc.cSack || s.ClientSyn.Timestamps != tc.cTS {
					t.Fatalf("client SYN sack/ts %v/%v, want %v/%v", s.ClientSyn.SackPermitted, s.ClientSyn.Timestamps, tc.cSack, tc.cTS)
				}
				if s.ClientIsn != 1000 || s.ServerIsn != 900000 || s.ServerNextSeq != 900001 ||
					s.ClientAck != 900001 || s.ServerAck != 1001 || s.Phase != trkPhEstablished {
					t.Fatalf("positions: %+v", s)
				}
				if tc.cOpts.ts && s.ClientTsval < tc.cOpts.tsval {
					t.Fatalf("client TSval %d", s.ClientTsval)
				}
				if tc.sOpts.ts && s.ServerTsval != tc.sOpts.tsval {
					t.Fatalf("server TSval %d, want %d", s.ServerTsval, tc.sOpts.tsval)
				}
				if s.Owner != "n1" || s.Epoch != 1 || s.Service != "stream" {
					t.Fatalf("owner/epoch/service %q/%d/%q", s.Owner, s.Epoch, s.Service)
				}
				if s.OpenedUnixNano != trkTestEpoch.Add(2*time.Millisecond).UnixNano() {
					t.Fatalf("opened %d", s.OpenedUnixNano)
				}
				k, err := ValidateState(s, trkPrefixes)
				if err != nil || k != c.key() {
					t.Fatalf("ValidateState: %v, %v", k, err)
				}
				ch := trkTake(t, tr)
				if len(ch) != 1 || ch[c.key().String()].Kind != trkOpen {
					t.Fatalf("changes %v", ch)
				}
			})
		}
	}
}

func TestTrackerRetransmittedSYN(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := trkConn4(t, tr, 40000, 1000, 5000)
	opts := trkOpts{mss: 1460, hasWS: true, ws: 7}
	c.syn(opts)
	c.syn(trkOpts{mss: 1200}) // retransmission (same ISN): state stays
	c.synAck(trkOpts{mss: 1460, hasWS: true, ws: 5})
	c.syn(opts)
	c.synAck(trkOpts{mss: 1460, hasWS: true, ws: 5}) // retransmitted SYN-ACK
	c.ack()
	s := c.state()
	if s.ClientSyn.Mss != 1460 || s.ClientWindowScale != 7 || s.ServerWindowScale != 5 || s.ClientIsn != 1000 || s.ServerIsn != 5000 {
		t.Fatalf("state after retransmissions: %+v", s)
	}
	c.serverData(100)
	c.synAck(trkOpts{mss: 1460, hasWS: true, ws: 5}) // late retransmission after data
	c.syn(opts)                                      // late SYN retransmission
	s = c.state()
	if s.ServerNextSeq != 5101 || tr.Stats().IgnoredSYN != 0 {
		t.Fatalf("late retransmissions changed state: %+v, %+v", s, tr.Stats())
	}
	// A SYN with a new ISN for an established flow is ignored and counted.
	c.in(trkSeg{seq: 77777, flags: header.TCPFlagSyn, opts: opts})
	if s2 := c.state(); s2.ClientIsn != 1000 || s2.Phase != trkPhEstablished || tr.Stats().IgnoredSYN != 1 {
		t.Fatalf("new-ISN SYN: %+v, %+v", s2, tr.Stats())
	}
	if tr.Stats().Created != 1 {
		t.Fatalf("created %d", tr.Stats().Created)
	}
}

func TestTrackerSYNRestartBeforeSYNACK(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := trkConn4(t, tr, 40000, 1000, 5000)
	c.syn(trkOpts{mss: 1000})
	// The client gave up and retried with a new ISN before any SYN-ACK.
	c.cISN = 2000
	c.syn(trkOpts{mss: 1300})
	c.synAck(trkNoOpts)
	c.ack()
	s := c.state()
	if s.ClientIsn != 2000 || s.ClientSyn.Mss != 1300 || s.ServerAck != 2001 {
		t.Fatalf("restarted handshake: %+v", s)
	}
	// A SYN-ACK answering the first SYN is ignored.
	tr2, _ := newTrkTracker(TrackerConfig{})
	c2 := trkConn4(t, tr2, 40000, 1000, 5000)
	c2.syn(trkNoOpts)
	c2.out(trkSeg{seq: 5000, ack: 12345, flags: header.TCPFlagSyn | header.TCPFlagAck})
	c2.ack()
	if _, ok := tr2.Lookup(c2.key()); ok {
		t.Fatal("handshake completed on a SYN-ACK for another ISN")
	}
}

func TestTrackerReplacedFlow(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{MaxFlows: 1}) // the new flow takes the old one's slot
	c := trkConn4(t, tr, 40000, 1000, 5000)
	c.handshake(trkNoOpts, trkNoOpts)
	c.serverData(10)
	c.ack()
	trkTake(t, tr)
	// The client reuses the 4-tuple (the tracker missed the close); the
	// stack answers the new SYN with a SYN-ACK: the old flow is gone.
	n := trkConn4(t, tr, 40000, 700000, 800000)
	n.syn(trkOpts{mss: 1400})
	if tr.Stats().IgnoredSYN != 1 || c.state().ClientIsn != 1000 {
		t.Fatal("new SYN not ignored")
	}
	n.synAck(trkNoOpts)
	if tr.Len() != 1 || tr.Stats().Closed.Replaced != 1 {
		t.Fatalf("len %d, stats %+v", tr.Len(), tr.Stats())
	}
	ch := trkTake(t, tr)
	if len(ch) != 1 || ch[c.key().String()].Kind != trkClose {
		t.Fatalf("changes after replacement: %v", ch)
	}
	n.ack()
	s := n.state()
	if s.ClientIsn != 700000 || s.ServerIsn != 800000 || s.ClientSyn.Mss != 1400 {
		t.Fatalf("replacement flow: %+v", s)
	}
	if ch := trkTake(t, tr); ch[c.key().String()].Kind != trkOpen {
		t.Fatalf("replacement not opened: %v", ch)
	}
}

func TestTrackerPositions(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := trkConn4(t, tr, 40000, 1000, 5000)
	c.handshake(trkOpts{ts: true, tsval: 10, hasWS: true, ws: 2}, trkOpts{ts: true, tsval: 20, tsec: 10, hasWS: true, ws: 3})
	c.clientData(100) // request
	c.serverAck()
	c.serverData(1000)
	c.serverData(1000)
	c.ack()
	s := c.state()
	if s.ServerNextSeq != 7001 || s.ClientAck != 7001 || s.ServerAck != 1101 {
		t.Fatalf("positions: next %d client_ack %d server_ack %d", s.ServerNextSeq, s.ClientAck, s.ServerAck)
	}
	if s.ClientTsval != c.cTS || s.ServerTsval != c.sTS {
		t.Fatalf("tsval %d/%d, want %d/%d", s.ClientTsval, s.ServerTsval, c.cTS, c.sTS)
	}

	// Old and out-of-order segments do not move anything backwards.
	c.out(trkSeg{seq: 6001, ack: 1001, flags: header.TCPFlagAck, payload: make([]byte, 500),
		opts: trkOpts{ts: true, tsval: 21}}) // retransmission with an old ack and TSval
	c.in(trkSeg{seq: 1101, ack: 6001, flags: header.TCPFlagAck, opts: trkOpts{ts: true, tsval: 11}}) // old ack
	c.in(trkSeg{seq: 1101, ack: 9999, flags: header.TCPFlagAck})                                     // acks unsent data
	c.in(trkSeg{seq: 1101, ack: 7001 + 0x80000000, flags: header.TCPFlagAck})                        // far behind
	s2 := c.state()
	if s2.ServerNextSeq != 7001 || s2.ClientAck != 7001 || s2.ServerAck != 1101 ||
		s2.ClientTsval != s.ClientTsval || s2.ServerTsval != s.ServerTsval {
		t.Fatalf("moved backwards: %+v", s2)
	}
	// A partial ack moves client_ack forward, not past server_next_seq.
	c.serverData(1000) // 7001..8001
	c.in(trkSeg{seq: 1101, ack: 7501, flags: header.TCPFlagAck})
	if s := c.state(); s.ClientAck != 7501 || s.ServerNextSeq != 8001 {
		t.Fatalf("partial ack: %+v", s)
	}
}

func TestTrackerWraparound(t *testing.T) {
	for _, tc := range []struct {
		name       string
		cISN, sISN uint32
	}{
		{"server-wraps", 1000, 0xffffff00},
		{"client-wraps", 0xfffffff0, 5},
		{"both-wrap", 0xffffffff, 0xfffffffe},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr, _ := newTrkTracker(TrackerConfig{})
			c := trkConn4(t, tr, 40000, tc.cISN, tc.sISN)
			c.handshake(trkOpts{ts: true, tsval: 0xfffffff0}, trkOpts{ts: true, tsval: 0xffffff00})
			prev := c.state()
			var sent uint64
			for i := 0; i < 20; i++ {
				c.clientData(37)
				c.serverData(100)
				c.cTS += 1 << 28 // timestamps wrap too
				c.sTS += 1 << 28
				c.ack()
				c.serverAck()
				sent += 100
				s := c.state()
				for _, p := range []struct {
					name      string
					old, next uint32
				}{
					{"server_next_seq", prev.ServerNextSeq, s.ServerNextSeq},
					{"client_ack", prev.ClientAck, s.ClientAck},
					{"server_ack", prev.ServerAck, s.ServerAck},
					{"client_tsval", prev.ClientTsval, s.ClientTsval},
					{"server_tsval", prev.ServerTsval, s.ServerTsval},
				} {
					if !tcpSeqAfter(p.next, p.old) {
						t.Fatalf("step %d: %s went from %#x to %#x", i, p.name, p.old, p.next)
					}
				}
				prev = s
			}
			if want := tc.sISN + 1 + uint32(sent); prev.ServerNextSeq != want || prev.ClientAck != want {
				t.Fatalf("server_next_seq %#x client_ack %#x, want %#x", prev.ServerNextSeq, prev.ClientAck, want)
			}
			if want := tc.cISN + 1 + 20*37; prev.ServerAck != want {
				t.Fatalf("server_ack %#x, want %#x", prev.ServerAck, want)
			}
			// An old segment from before the wrap does not win.
			c.out(trkSeg{seq: tc.sISN + 1, ack: tc.cISN + 1, flags: header.TCPFlagAck, payload: make([]byte, 10)})
			c.in(trkSeg{seq: c.cNext, ack: tc.sISN + 101, flags: header.TCPFlagAck})
			if s := c.state(); s.ServerNextSeq != prev.ServerNextSeq || s.ClientAck != prev.ClientAck || s.ServerAck != prev.ServerAck {
				t.Fatalf("old tcpSegment moved positions: %+v", s)
			}
			// The checkpoint sequence wraps the same way.
			tr.SetCheckpoint(c.key(), sent, []byte("x"))
			if s := c.state(); s.CheckpointSeq != prev.ServerNextSeq {
				t.Fatalf("checkpoint_seq %#x, want %#x", s.CheckpointSeq, prev.ServerNextSeq)
			}
		})
	}
}

func TestTrackerFIN(t *testing.T) {
	type step func(c *trkConn)
	cFin := func(c *trkConn) { c.clientFin() }
	sFin := func(c *trkConn) { c.serverFin() }
	cAck := func(c *trkConn) { c.ack() }
	sAck := func(c *trkConn) { c.serverAck() }
	cases := []struct {
		name  string
		steps []step
		// the step index after which the flow must be gone
		goneAfter int
	}{
		{"client-first", []step{cFin, sAck, sFin, cAck}, 3},
		{"server-first", []step{sFin, cAck, cFin, sAck}, 3},
		{"server-fin-with-ack", []step{cFin, sFin, cAck}, 2},
		{"simultaneous", []step{cFin, sFin, sAck, cAck}, 3},
		{"server-acks-last", []step{sFin, cFin, cAck, sAck}, 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr, _ := newTrkTracker(TrackerConfig{})
			c := trkConn4(t, tr, 40000, 1000, 5000)
			c.handshake(trkNoOpts, trkNoOpts)
			c.clientData(10)
			c.serverData(100)
			c.ack()
			if ch := trkTake(t, tr); ch[c.key().String()].Kind != trkOpen {
				t.Fatalf("no open: %v", ch)
			}
			for i, st := range tc.steps {
				st(c)
				if i < tc.goneAfter {
					s := c.state()
					if s.Phase != trkPhClosing {
						t.Fatalf("step %d: phase %v", i, s.Phase)
					}
					continue
				}
			}
			if tr.Len() != 0 {
				s, _ := tr.Lookup(c.key())
				t.Fatalf("flow not removed: %+v", s)
			}
			ch := trkTake(t, tr)
			got := ch[c.key().String()]
			if len(ch) != 1 || got.Kind != trkClose || got.State.Phase != trkPhClosed || !got.State.ClientFin || !got.State.ServerFin {
				t.Fatalf("changes: %v", ch)
			}
			if st := tr.Stats(); st.Closed.FIN != 1 || st.Closed.Total() != 1 || st.Opened != 1 {
				t.Fatalf("stats %+v", st)
			}
			// A late retransmitted FIN does not resurrect anything.
			c.in(trkSeg{seq: c.cNext - 1, ack: c.sNext, flags: header.TCPFlagAck | header.TCPFlagFin})
			if tr.Len() != 0 || len(trkTake(t, tr)) != 0 {
				t.Fatal("late FIN changed the table")
			}
			// A new SYN on the 4-tuple starts a new flow.
			n := trkConn4(t, tr, 40000, 99999, 123456)
			n.handshake(trkNoOpts, trkNoOpts)
			if s := n.state(); s.ClientIsn != 99999 {
				t.Fatalf("new flow: %+v", s)
			}
		})
	}
}

func TestTrackerFINNotAcked(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := trkConn4(t, tr, 40000, 1000, 5000)
	c.handshake(trkNoOpts, trkNoOpts)
	c.serverData(100)
	c.serverFin()
	// The client's FIN acks the data but not the server's FIN.
	c.in(trkSeg{seq: c.cNext, ack: c.sNext - 1, flags: header.TCPFlagAck | header.TCPFlagFin})
	c.cNext++
	c.serverAck()
	if tr.Len() != 1 || c.state().Phase != trkPhClosing {
		t.Fatal("removed before the server FIN was acked")
	}
	c.ack()
	if tr.Len() != 0 {
		t.Fatal("not removed after both FINs were acked")
	}
}

func TestTrackerRST(t *testing.T) {
	cases := []struct {
		name   string
		rst    func(c *trkConn)
		gone   bool
		opened bool
	}{
		{"outbound", func(c *trkConn) {
			c.out(trkSeg{seq: c.sNext, ack: c.cNext, flags: header.TCPFlagRst | header.TCPFlagAck})
		}, true, true},
		{"inbound-exact", func(c *trkConn) { c.in(trkSeg{seq: c.cNext, flags: header.TCPFlagRst}) }, true, true},
		{"inbound-in-window", func(c *trkConn) { c.in(trkSeg{seq: c.cNext + 1000, flags: header.TCPFlagRst}) }, true, true},
		{"inbound-blind", func(c *trkConn) { c.in(trkSeg{seq: c.cNext + 70000, flags: header.TCPFlagRst}) }, false, true},
		{"inbound-old", func(c *trkConn) { c.in(trkSeg{seq: c.cNext - 1, flags: header.TCPFlagRst}) }, false, true},
		{"handshake-outbound", nil, true, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr, _ := newTrkTracker(TrackerConfig{})
			c := trkConn4(t, tr, 40000, 1000, 5000)
			if !tc.opened {
				c.syn(trkNoOpts)
				// No service on the port: the stack answers RST.
				c.out(trkSeg{seq: 0, ack: c.cISN + 1, flags: header.TCPFlagRst | header.TCPFlagAck})
				if tr.Len() != 0 || tr.Stats().Closed.RST != 1 || len(trkTake(t, tr)) != 0 {
					t.Fatalf("refused handshake: len %d, %+v", tr.Len(), tr.Stats())
				}
				return
			}
			c.handshake(trkNoOpts, trkNoOpts)
			c.clientData(10)
			c.serverData(10) // window 65535, unscaled
			trkTake(t, tr)
			tc.rst(c)
			if gone := tr.Len() == 0; gone != tc.gone {
				t.Fatalf("removed %v, want %v", gone, tc.gone)
			}
			ch := trkTake(t, tr)
			if tc.gone {
				if ch[c.key().String()].Kind != trkClose || tr.Stats().Closed.RST != 1 {
					t.Fatalf("changes %v, stats %+v", ch, tr.Stats())
				}
			} else if len(ch) != 0 {
				t.Fatalf("ignored RST reported: %v", ch)
			}
		})
	}
}

func TestTrackerIdleSweep(t *testing.T) {
	tr, clk := newTrkTracker(TrackerConfig{IdleTimeout: time.Minute, HandshakeTimeout: 10 * time.Second})
	hs := trkConn4(t, tr, 40001, 1000, 5000)
	hs.syn(trkNoOpts)
	est := trkConn4(t, tr, 40002, 1000, 5000)
	est.handshake(trkNoOpts, trkNoOpts)
	busy := trkConn4(t, tr, 40003, 1000, 5000)
	busy.handshake(trkNoOpts, trkNoOpts)
	trkTake(t, tr)

	clk.Advance(9 * time.Second)
	if n := tr.Sweep(); n != 0 {
		t.Fatalf("swept %d before any timeout", n)
	}
	clk.Advance(time.Second)
	if n := tr.Sweep(); n != 1 || tr.Len() != 2 {
		t.Fatalf("handshake timeout: swept %d, len %d", n, tr.Len())
	}
	clk.Advance(49 * time.Second)
	busy.serverData(10) // keeps busy alive
	clk.Advance(time.Second)
	if n := tr.Sweep(); n != 1 || tr.Len() != 1 {
		t.Fatalf("idle timeout: swept %d, len %d", n, tr.Len())
	}
	if _, ok := tr.Lookup(busy.key()); !ok {
		t.Fatal("busy flow swept")
	}
	ch := trkTake(t, tr)
	if ch[est.key().String()].Kind != trkClose || ch[est.key().String()].State.Phase != trkPhClosed {
		t.Fatalf("idle close not reported: %v", ch)
	}
	if _, ok := ch[hs.key().String()]; ok {
		t.Fatal("handshake-only flow reported")
	}
	if st := tr.Stats(); st.Closed.Idle != 2 || st.Created != 3 || st.Opened != 2 {
		t.Fatalf("stats %+v", st)
	}
}

func TestTrackerRun(t *testing.T) {
	tr, clk := newTrkTracker(TrackerConfig{IdleTimeout: time.Second})
	if got := tr.SweepInterval(); got != 100*time.Millisecond {
		t.Fatalf("sweep interval %v", got)
	}
	if got := NewTracker(TrackerConfig{}).SweepInterval(); got != 6*time.Second {
		t.Fatalf("default sweep interval %v", got)
	}
	if got := NewTracker(TrackerConfig{IdleTimeout: 10 * time.Hour, HandshakeTimeout: 10 * time.Hour}).SweepInterval(); got != 30*time.Second {
		t.Fatalf("bounded sweep interval %v", got)
	}
	c := trkConn4(t, tr, 40000, 1, 2)
	c.handshake(trkNoOpts, trkNoOpts)
	clk.Advance(time.Hour)
	trkTake(t, tr)
	select { // drop the signal of the open
	case <-tr.Changes():
	default:
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tr.Run(ctx); close(done) }()
	<-tr.Changes() // the close of the swept flow
	cancel()
	<-done
	if tr.Len() != 0 {
		t.Fatal("Run did not sweep")
	}
}

func TestTrackerBound(t *testing.T) {
	// The handshake bound is the table's: this is the table bound alone
	// (track_bound_test.go tests the handshake bound).
	tr, _ := newTrkTracker(TrackerConfig{MaxFlows: 2, MaxHandshaking: 2})
	a := trkConn4(t, tr, 40001, 1, 2)
	b := trkConn4(t, tr, 40002, 1, 2)
	c := trkConn4(t, tr, 40003, 1, 2)
	a.handshake(trkNoOpts, trkNoOpts)
	b.syn(trkNoOpts)
	c.handshake(trkNoOpts, trkNoOpts) // verdicts are checked to be Pass
	if tr.Len() != 2 || tr.Stats().Untracked != 1 {
		t.Fatalf("len %d, stats %+v", tr.Len(), tr.Stats())
	}
	if _, ok := tr.Lookup(c.key()); ok {
		t.Fatal("third flow tracked")
	}
	c.serverData(10)
	c.clientFin()
	b.synAck(trkNoOpts)
	b.ack()
	a.out(trkSeg{seq: a.sNext, flags: header.TCPFlagRst})
	d := trkConn4(t, tr, 40004, 1, 2)
	d.handshake(trkNoOpts, trkNoOpts)
	if tr.Len() != 2 || tr.Stats().Untracked != 1 {
		t.Fatalf("after a close: len %d, stats %+v", tr.Len(), tr.Stats())
	}
	trkCheckInvariants(t, tr)
}

func TestTrackerIgnores(t *testing.T) {
	client := netip.AddrPortFrom(trkClient4, 40000)
	outside := netip.MustParseAddrPort("203.0.113.9:9000")
	syn := trkSeg{src: client, dst: trkAnycast4, seq: 1, flags: header.TCPFlagSyn}
	udp := func() []byte {
		b := syn.bytes()
		header.IPv4(b).Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), Protocol: 17, TTL: 64,
			SrcAddr: header.IPv4(b).SourceAddress(), DstAddr: header.IPv4(b).DestinationAddress()})
		return b
	}
	mutate := func(s trkSeg, f func(b []byte)) []byte { b := s.bytes(); f(b); return b }
	cases := []struct {
		name    string
		dir     stack.Direction
		pkt     []byte
		counter func(TrackerStats) uint64
	}{
		{"outside-prefix-in", stack.Inbound, trkSeg{src: client, dst: outside, seq: 1, flags: header.TCPFlagSyn}.bytes(), nil},
		{"outside-prefix-out", stack.Outbound, trkSeg{src: outside, dst: client, seq: 1, flags: header.TCPFlagSyn | header.TCPFlagAck}.bytes(), nil},
		{"wrong-direction", stack.Outbound, syn.bytes(), nil},
		{"udp", stack.Inbound, udp(), nil},
		{"empty", stack.Inbound, nil, nil},
		{"garbage", stack.Inbound, []byte{0x45, 1, 2}, nil},
		{"not-ip", stack.Inbound, make([]byte, 60), nil},
		{"v6-outside", stack.Inbound, trkSeg{src: netip.AddrPortFrom(trkClient6, 1), dst: netip.MustParseAddrPort("[2001:db8:b::1]:9000"), seq: 1, flags: header.TCPFlagSyn}.bytes(), nil},
		{"truncated-tcp", stack.Inbound, mutate(syn, func(b []byte) {})[:30], func(s TrackerStats) uint64 { return s.Malformed }},
		{"bad-data-offset", stack.Inbound, mutate(syn, func(b []byte) { b[20+12] = 0x20 }), func(s TrackerStats) uint64 { return s.Malformed }},
		{"bad-ihl", stack.Inbound, mutate(syn, func(b []byte) { b[0] = 0x44 }), func(s TrackerStats) uint64 { return s.Malformed }},
		{"multicast-client", stack.Inbound, trkSeg{src: netip.MustParseAddrPort("224.0.0.1:5"), dst: trkAnycast4, seq: 1, flags: header.TCPFlagSyn}.bytes(), func(s TrackerStats) uint64 { return s.Malformed }},
		{"port-zero", stack.Inbound, trkSeg{src: netip.AddrPortFrom(trkClient4, 0), dst: trkAnycast4, seq: 1, flags: header.TCPFlagSyn}.bytes(), func(s TrackerStats) uint64 { return s.Malformed }},
		{"bad-checksum", stack.Inbound, mutate(syn, func(b []byte) { b[len(b)-1] ^= 0xff }), func(s TrackerStats) uint64 { return s.BadChecksum }},
		{"fragment", stack.Inbound, mutate(syn, func(b []byte) {
			ip := header.IPv4(b)
			ip.SetFlagsFragmentOffset(header.IPv4FlagMoreFragments, 0)
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
		}), func(s TrackerStats) uint64 { return s.Fragments }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr, _ := newTrkTracker(TrackerConfig{})
			p := stack.Packet{Dir: tc.dir, Data: tc.pkt}
			var v stack.Verdict
			if tc.dir == stack.Inbound {
				v = tr.Inbound(&p)
			} else {
				v = tr.Outbound(&p)
			}
			if v != stack.Pass {
				t.Fatalf("verdict %v", v)
			}
			if tr.Len() != 0 {
				t.Fatal("packet created a flow")
			}
			if tc.counter != nil && tc.counter(tr.Stats()) != 1 {
				t.Fatalf("not counted: %+v", tr.Stats())
			}
			if tc.counter == nil && tr.Stats() != (TrackerStats{}) {
				t.Fatalf("counted: %+v", tr.Stats())
			}
		})
	}
}

func TestTrackerIPv6ExtensionHeaders(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := newTrkConn(t, tr, netip.AddrPortFrom(trkClient6, 40000), trkAnycast6, 1000, 5000)
	// A SYN behind a destination-options header.
	b := trkSeg{src: c.client, dst: c.anycast, seq: 1000, flags: header.TCPFlagSyn, opts: trkOpts{mss: 1400}}.bytes()
	ext := []byte{uint8(header.TCPProtocolNumber), 0, 1, 4, 0, 0, 0, 0} // next header, length 0 (8 bytes), PadN(4)
	pkt := append(append(append([]byte(nil), b[:40]...), ext...), b[40:]...)
	ip := header.IPv6(pkt)
	ip.SetNextHeader(uint8(header.IPv6DestinationOptionsExtHdrIdentifier))
	ip.SetPayloadLength(ip.PayloadLength() + 8)
	p := stack.Packet{Dir: stack.Inbound, Data: pkt}
	tr.Inbound(&p)
	if tr.Len() != 1 {
		t.Fatalf("SYN behind an extension header not tracked: %+v", tr.Stats())
	}
	c.synAck(trkNoOpts)
	c.ack()
	if s := c.state(); s.ClientSyn.Mss != 1400 {
		t.Fatalf("mss %d", s.ClientSyn.Mss)
	}
	// A fragment header with the M flag: not tracked, counted.
	frag := append(append(append([]byte(nil), b[:40]...), uint8(header.TCPProtocolNumber), 0, 0, 1, 0, 0, 0, 1), b[40:]...)
	header.IPv6(frag).SetNextHeader(uint8(header.IPv6FragmentExtHdrIdentifier))
	header.IPv6(frag).SetPayloadLength(header.IPv6(frag).PayloadLength() + 8)
	p = stack.Packet{Dir: stack.Inbound, Data: frag}
	tr.Inbound(&p)
	if tr.Stats().Fragments != 1 {
		t.Fatalf("fragment not counted: %+v", tr.Stats())
	}
}

func TestTSOption(t *testing.T) {
	cases := []struct {
		name string
		opts []byte
		val  uint32
		ok   bool
	}{
		{"none", nil, 0, false},
		{"fast", []byte{1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9}, 7, true},
		{"after-sack", []byte{1, 1, 5, 10, 0, 0, 0, 1, 0, 0, 0, 2, 8, 10, 0, 0, 1, 0, 0, 0, 0, 0}, 256, true},
		{"eol-first", []byte{0, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9}, 0, false},
		{"truncated", []byte{1, 1, 8, 10, 0, 0, 0}, 0, false},
		{"bad-length", []byte{8, 6, 0, 0, 0, 7}, 0, false},
		{"zero-length", []byte{5, 0, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9}, 0, false},
		{"sack-only", []byte{1, 1, 5, 10, 0, 0, 0, 1, 0, 0, 0, 2}, 0, false},
	}
	for _, tc := range cases {
		v, ok := tcpTSval(tc.opts)
		if v != tc.val || ok != tc.ok {
			t.Errorf("%s: got %d,%v want %d,%v", tc.name, v, ok, tc.val, tc.ok)
		}
	}
}

func TestTrackerIgnoresOwnClients(t *testing.T) {
	var probe netip.Addr
	tr, _ := newTrkTracker(TrackerConfig{IgnoreClient: func(a netip.Addr) bool { return a == probe }})
	c := trkConn4(t, tr, 40010, 1, 2)
	probe = c.client.Addr()
	c.handshake(trkNoOpts, trkNoOpts)
	c.serverData(100)
	if tr.Len() != 0 || tr.Stats().Ignored == 0 {
		t.Fatalf("flow from an ignored client tracked: len %d, stats %+v", tr.Len(), tr.Stats())
	}
	probe = netip.Addr{}
	d := trkConn4(t, tr, 40011, 1, 2)
	d.handshake(trkNoOpts, trkNoOpts)
	if tr.Len() != 1 {
		t.Fatalf("other client not tracked: len %d", tr.Len())
	}
}
