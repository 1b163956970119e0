package handoff

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
)

// trkFuzzMaxFlows and trkFuzzMaxHandshaking are small so that both bounds
// are exercised.
const (
	trkFuzzMaxFlows       = 4
	trkFuzzMaxHandshaking = 2
)

// trkFuzzEncode packs packets in the fuzz input format: per packet a flag
// byte (bit 0: outbound; bit 1: fix the TCP checksum; bit 2: take changes
// after it; bit 3: sweep after advancing the clock a minute), a big-endian
// uint16 length, and the bytes.
func trkFuzzEncode(pkts ...trkFuzzPkt) []byte {
	var b []byte
	for _, p := range pkts {
		b = append(b, p.flags)
		b = binary.BigEndian.AppendUint16(b, uint16(len(p.data)))
		b = append(b, p.data...)
	}
	return b
}

type trkFuzzPkt struct {
	flags byte
	data  []byte
}

// trkFuzzSeeds returns whole connections in the fuzz input format.
func trkFuzzSeeds() [][]byte {
	var seeds [][]byte
	for _, fam := range [][2]netip.AddrPort{
		{netip.AddrPortFrom(trkClient4, 40000), trkAnycast4},
		{netip.AddrPortFrom(trkClient6, 40000), trkAnycast6},
	} {
		c, a := fam[0], fam[1]
		in := func(s trkSeg) trkFuzzPkt { s.src, s.dst = c, a; return trkFuzzPkt{2, s.bytes()} }
		out := func(s trkSeg) trkFuzzPkt { s.src, s.dst = a, c; return trkFuzzPkt{3, s.bytes()} }
		full := trkOpts{mss: 1460, hasWS: true, ws: 7, sackPerm: true, ts: true, tsval: 1}
		ack := header.TCPFlagAck
		seeds = append(seeds, trkFuzzEncode(
			in(trkSeg{seq: 0xffffff00, flags: header.TCPFlagSyn, opts: full}),
			out(trkSeg{seq: 0xfffffff0, ack: 0xffffff01, flags: header.TCPFlagSyn | ack, opts: full}),
			in(trkSeg{seq: 0xffffff01, ack: 0xfffffff1, flags: ack, opts: trkOpts{ts: true, tsval: 2}}),
			trkFuzzPkt{4, nil},
			in(trkSeg{seq: 0xffffff01, ack: 0xfffffff1, flags: ack | header.TCPFlagPsh, payload: []byte("10 1\n")}),
			out(trkSeg{seq: 0xfffffff1, ack: 0xffffff06, flags: ack, payload: make([]byte, 100)}),
			in(trkSeg{seq: 0xffffff06, ack: 0x55, flags: ack, opts: trkOpts{sack: []header.SACKBlock{{Start: 1, End: 2}}}}),
			out(trkSeg{seq: 0x55, ack: 0xffffff06, flags: ack | header.TCPFlagFin}),
			trkFuzzPkt{4, nil},
			in(trkSeg{seq: 0xffffff06, ack: 0x56, flags: ack | header.TCPFlagFin}),
			out(trkSeg{seq: 0x56, ack: 0xffffff07, flags: ack}),
			trkFuzzPkt{4, nil},
		))
		seeds = append(seeds, trkFuzzEncode(
			in(trkSeg{seq: 5, flags: header.TCPFlagSyn}),
			out(trkSeg{seq: 9, ack: 6, flags: header.TCPFlagSyn | ack}),
			in(trkSeg{seq: 6, ack: 10, flags: ack}),
			in(trkSeg{seq: 700, flags: header.TCPFlagSyn}),
			out(trkSeg{seq: 900, ack: 701, flags: header.TCPFlagSyn | ack}),
			in(trkSeg{seq: 701, flags: header.TCPFlagRst}),
			trkFuzzPkt{8, nil},
		))
	}
	// More handshakes than trkFuzzMaxHandshaking, one completed: evictions.
	var flood []trkFuzzPkt
	for port := uint16(40001); port <= 40004; port++ {
		c := netip.AddrPortFrom(trkClient4, port)
		flood = append(flood, trkFuzzPkt{2, trkSeg{src: c, dst: trkAnycast4, seq: uint32(port), flags: header.TCPFlagSyn}.bytes()})
	}
	c := netip.AddrPortFrom(trkClient4, 40004)
	flood = append(flood,
		trkFuzzPkt{3, trkSeg{src: trkAnycast4, dst: c, seq: 77, ack: 40005, flags: header.TCPFlagSyn | header.TCPFlagAck}.bytes()},
		trkFuzzPkt{6, trkSeg{src: c, dst: trkAnycast4, seq: 40005, ack: 78, flags: header.TCPFlagAck}.bytes()},
		trkFuzzPkt{10, trkSeg{src: netip.AddrPortFrom(trkClient4, 40001), dst: trkAnycast4, seq: 40001, flags: header.TCPFlagSyn}.bytes()},
	)
	return append(seeds, trkFuzzEncode(flood...))
}

// FuzzTrackerPackets feeds arbitrary packets both ways and checks that the
// tracker never panics, passes every packet, keeps within MaxFlows and
// MaxHandshaking, keeps its table and handshake list consistent, and only
// reports states a peer would accept.
func FuzzTrackerPackets(f *testing.F) {
	for _, s := range trkFuzzSeeds() {
		f.Add(s)
	}
	f.Add([]byte{})
	f.Add([]byte{0, 0, 3, 0x45, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		tr, clk := newTrkTracker(TrackerConfig{MaxFlows: trkFuzzMaxFlows, MaxHandshaking: trkFuzzMaxHandshaking})
		reported := map[FlowKey]bool{} // open reported, not yet closed
		take := func() {
			seen := map[FlowKey]bool{}
			for _, ch := range tr.TakeChanges(nil) {
				k, err := ValidateState(ch.State, trkPrefixes)
				if err != nil {
					t.Fatalf("%v snapshot does not validate: %v (%+v)", ch.Kind, err, ch.State)
				}
				if seen[k] && ch.Kind != batonv1.FlowEvent_KIND_OPEN {
					t.Fatalf("%v reported twice", k)
				}
				seen[k] = true
				switch ch.Kind {
				case batonv1.FlowEvent_KIND_OPEN:
					if reported[k] {
						t.Fatalf("%v opened twice", k)
					}
					if ch.State.Phase != batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED && ch.State.Phase != batonv1.FlowPhase_FLOW_PHASE_CLOSING {
						t.Fatalf("open in phase %v", ch.State.Phase)
					}
					reported[k] = true
				case batonv1.FlowEvent_KIND_CLOSE:
					if !reported[k] || ch.State.Phase != batonv1.FlowPhase_FLOW_PHASE_CLOSED {
						t.Fatalf("close of %v (reported %v) in phase %v", k, reported[k], ch.State.Phase)
					}
					delete(reported, k)
				case batonv1.FlowEvent_KIND_UPDATE, batonv1.FlowEvent_KIND_CHECKPOINT:
					if !reported[k] {
						t.Fatalf("%v of %v before its open", ch.Kind, k)
					}
				default:
					t.Fatalf("kind %v", ch.Kind)
				}
			}
		}
		for len(in) >= 3 {
			flags := in[0]
			n := min(int(binary.BigEndian.Uint16(in[1:3])), len(in)-3)
			pkt := append([]byte(nil), in[3:3+n]...)
			in = in[3+n:]
			if flags&2 != 0 {
				trkFixChecksum(pkt)
			}
			p := stack.Packet{Dir: stack.Inbound, Data: pkt}
			var v stack.Verdict
			if flags&1 != 0 {
				p.Dir = stack.Outbound
				v = tr.Outbound(&p)
			} else {
				v = tr.Inbound(&p)
			}
			if v != stack.Pass {
				t.Fatalf("verdict %v", v)
			}
			if flags&4 != 0 {
				take()
			}
			if flags&8 != 0 {
				clk.Advance(DefaultIdleTimeout)
				tr.Sweep()
			}
			if tr.Len() > trkFuzzMaxFlows || tr.Len() < 0 {
				t.Fatalf("Len %d", tr.Len())
			}
			if n := tr.HandshakeStats().Handshaking; n > trkFuzzMaxHandshaking || n < 0 {
				t.Fatalf("%d flows in the handshake", n)
			}
		}
		take()
		trkCheckInvariants(t, tr)
		trkCheckHandshakeBound(t, tr)
		tr.Owned(func(s *batonv1.FlowState) bool {
			if _, err := ValidateState(s, trkPrefixes); err != nil {
				t.Fatalf("owned snapshot does not validate: %v", err)
			}
			return true
		})
		if st := tr.Stats(); st.Created != st.Closed.Total()+uint64(tr.Len()) {
			t.Fatalf("created %d, closed %d, tracked %d", st.Created, st.Closed.Total(), tr.Len())
		}
	})
}
