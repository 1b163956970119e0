package handoff

// Translation and synthesis on crafted packets.

import (
	"bytes"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// tcpOf parses a packet built by the tests (IPv4 or IPv6) and checks its
// TCP checksum.
func tcpOf(t *testing.T, pkt []byte, inbound bool) (tcpSegment, header.TCPOptions) {
	t.Helper()
	seg, res := parseTCPSegment(pkt, inbound, trkPrefixes)
	if res != tcpOK {
		t.Fatalf("not a TCP segment (%d)", res)
	}
	if !tcpChecksumValid(&seg) {
		t.Fatal("bad TCP checksum")
	}
	return seg, header.ParseTCPOptions(seg.opts)
}

func TestTranslateOutbound(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		client, anycast := netip.AddrPortFrom(trkClient4, 40000), trkAnycast4
		if v6 {
			client, anycast = netip.AddrPortFrom(trkClient6, 40000), trkAnycast6
		}
		s := trkSeg{src: anycast, dst: client, seq: 0xfffffff0, ack: 77, flags: header.TCPFlagAck | header.TCPFlagPsh,
			wnd: 1000, opts: trkOpts{ts: true, tsval: 0xfffffffe, tsec: 555}, payload: []byte("hello")}
		pkt := s.bytes()
		tr := &Translator{SeqDelta: 0x20, TS: true, TSDelta: 5, OutStack: 7, OutClient: 5}
		if !tr.Outbound(pkt, false) {
			t.Fatal("not translated")
		}
		seg, o := tcpOf(t, pkt, false)
		if seg.seq != 0x10 || seg.ack != 77 || o.TSVal != 3 || o.TSEcr != 555 || seg.window != 4000 {
			t.Fatalf("v6=%v: seq %#x ack %d tsval %d tsecr %d window %d", v6, seg.seq, seg.ack, o.TSVal, o.TSEcr, seg.window)
		}
		if !bytes.HasSuffix(pkt, []byte("hello")) {
			t.Fatal("payload changed")
		}
	}
}

func TestTranslateInbound(t *testing.T) {
	blocks := []header.SACKBlock{{Start: 1100, End: 1200}, {Start: 1300, End: 1400}, {Start: 1500, End: 1600}}
	for n := 1; n <= 3; n++ {
		s := trkSeg{src: netip.AddrPortFrom(trkClient4, 40000), dst: trkAnycast4, seq: 9, ack: 1050, flags: header.TCPFlagAck,
			wnd: 300, opts: trkOpts{ts: true, tsval: 42, tsec: 1005, sack: blocks[:n]}}
		pkt := s.bytes()
		tr := &Translator{SeqDelta: 1000, TS: true, TSDelta: 1000, InClient: 2, InStack: 4}
		tr.Inbound(pkt, nil)
		seg, o := tcpOf(t, pkt, true)
		if seg.ack != 50 || seg.seq != 9 || o.TSVal != 42 || o.TSEcr != 5 || seg.window != 75 {
			t.Fatalf("ack %d seq %d tsval %d tsecr %d window %d", seg.ack, seg.seq, o.TSVal, o.TSEcr, seg.window)
		}
		if len(o.SACKBlocks) != n {
			t.Fatalf("%d SACK blocks, want %d", len(o.SACKBlocks), n)
		}
		for i, b := range o.SACKBlocks {
			if b.Start != blocks[i].Start-1000 || b.End != blocks[i].End-1000 {
				t.Fatalf("%d blocks: block %d = %v, want %v - 1000", n, i, b, blocks[i])
			}
		}
	}
}

// The clamps: an ack above what the new stack sent is capped (pitfall 2);
// echoes of the old owner's TSvals become 0; no echo stays no echo.
func TestTranslateInboundClamps(t *testing.T) {
	build := func(ack, tsecr uint32) []byte {
		return trkSeg{src: netip.AddrPortFrom(trkClient4, 40000), dst: trkAnycast4, seq: 9, ack: ack, flags: header.TCPFlagAck,
			opts: trkOpts{ts: true, tsval: 42, tsec: tsecr}}.bytes()
	}
	tr := &Translator{SeqDelta: 1000, TS: true, TSDelta: 100}
	for _, c := range []struct {
		name           string
		ack, tsecr     uint32
		clamp          InboundClamp
		wantAck, wantE uint32
	}{
		{"below cap", 1500, 700, InboundClamp{AckCap: 600, CapAck: true, TSecrFloor: 650, HaveFloor: true}, 500, 600},
		{"above cap", 1900, 700, InboundClamp{AckCap: 600, CapAck: true, TSecrFloor: 650, HaveFloor: true}, 600, 600},
		{"old echo", 1500, 640, InboundClamp{TSecrFloor: 650, HaveFloor: true}, 500, 0},
		{"no floor yet", 1500, 700, InboundClamp{}, 500, 0},
		{"no echo", 1500, 0, InboundClamp{TSecrFloor: 650, HaveFloor: true}, 500, 0},
	} {
		pkt := build(c.ack, c.tsecr)
		tr.Inbound(pkt, &c.clamp)
		seg, o := tcpOf(t, pkt, true)
		if seg.ack != c.wantAck || o.TSEcr != c.wantE {
			t.Errorf("%s: ack %d tsecr %d, want %d %d", c.name, seg.ack, o.TSEcr, c.wantAck, c.wantE)
		}
	}
}

// A GSO segment with a partial checksum keeps its pseudo-header sum: the
// rewrites do not touch it.
func TestTranslatePartialChecksum(t *testing.T) {
	pkt := trkSeg{src: trkAnycast4, dst: netip.AddrPortFrom(trkClient4, 40000), seq: 5, flags: header.TCPFlagAck,
		opts: trkOpts{ts: true, tsval: 1, tsec: 2}, payload: make([]byte, 3000)}.bytes()
	p := stackPacketGSO(pkt)
	if !p.ResetPartialChecksum() {
		t.Fatal("not a partial-checksum packet")
	}
	want := header.TCP(pkt[20:]).Checksum()
	tr := &Translator{SeqDelta: 99, TS: true, TSDelta: 7}
	tr.Outbound(pkt, true)
	if got := header.TCP(pkt[20:]).Checksum(); got != want {
		t.Fatalf("partial checksum %#x, want %#x", got, want)
	}
	if header.TCP(pkt[20:]).SequenceNumber() != 104 {
		t.Fatal("sequence number not translated")
	}
}

func TestRescaleWindow(t *testing.T) {
	for _, c := range []struct {
		w        uint16
		from, to uint8
		want     uint16
	}{
		{100, 7, 7, 100}, {100, 7, 5, 400}, {100, 5, 7, 25}, {101, 5, 7, 26}, {1, 0, 14, 1},
		{0, 0, 14, 0}, {60000, 7, 0, 65535}, {65535, 14, 0, 65535},
	} {
		if got := rescaleWindow(c.w, c.from, c.to); got != c.want {
			t.Errorf("rescale(%d, %d, %d) = %d, want %d", c.w, c.from, c.to, got, c.want)
		}
	}
}

// Fragments, other protocols and truncated packets are left alone.
func TestTranslateRefuses(t *testing.T) {
	good := trkSeg{src: trkAnycast4, dst: netip.AddrPortFrom(trkClient4, 40000), seq: 5, flags: header.TCPFlagAck}.bytes()
	frag := append([]byte(nil), good...)
	header.IPv4(frag).SetFlagsFragmentOffset(header.IPv4FlagMoreFragments, 0)
	udp := append([]byte(nil), good...)
	udp[9] = uint8(header.UDPProtocolNumber)
	tr := &Translator{SeqDelta: 1}
	for name, pkt := range map[string][]byte{"fragment": frag, "udp": udp, "truncated": good[:30], "empty": nil, "garbage": {0x45, 1, 2}} {
		before := append([]byte(nil), pkt...)
		if tr.Outbound(pkt, false) || tr.Inbound(pkt, nil) {
			t.Errorf("%s: translated", name)
		}
		if !bytes.Equal(before, pkt) {
			t.Errorf("%s: changed", name)
		}
	}
}

func TestSynthesizedPackets(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		client, anycast := netip.AddrPortFrom(trkClient4, 40000), trkAnycast4
		if v6 {
			client, anycast = netip.AddrPortFrom(trkClient6, 40000), trkAnycast6
		}
		syn := buildSYN(synSpec{client: client, anycast: anycast, seq: 1234, mss: 1400, ws: 7, sackPermitted: true, ts: true, tsval: 99, window: 65535})
		seg, _ := tcpOf(t, syn, true)
		o := header.ParseSynOptions(seg.opts, false)
		if seg.flags != header.TCPFlagSyn || seg.seq != 1234 || o.MSS != 1400 || o.WS != 7 || !o.SACKPermitted || !o.TS || o.TSVal != 99 {
			t.Fatalf("SYN: flags %v seq %d options %+v", seg.flags, seg.seq, o)
		}
		bare := buildSYN(synSpec{client: client, anycast: anycast, seq: 1, mss: 536, ws: -1})
		seg, _ = tcpOf(t, bare, true)
		if o := header.ParseSynOptions(seg.opts, false); o.WS != -1 || o.TS || o.SACKPermitted {
			t.Fatalf("bare SYN options %+v", o)
		}
		ack := buildClientSegment(client, anycast, 1235, 5000, header.TCPFlagAck, 300, true, 100, 200)
		seg, opts := tcpOf(t, ack, true)
		if seg.seq != 1235 || seg.ack != 5000 || seg.window != 300 || opts.TSVal != 100 || opts.TSEcr != 200 {
			t.Fatalf("ACK: %+v %+v", seg, opts)
		}
		rst := buildRST(anycast, client, 777, 0, true)
		seg, _ = tcpOf(t, rst, false)
		if seg.flags != header.TCPFlagRst || seg.seq != 777 {
			t.Fatalf("RST from an ack: flags %v seq %d", seg.flags, seg.seq)
		}
		rst = buildRST(anycast, client, 777, 888, false)
		seg, _ = tcpOf(t, rst, false)
		if seg.flags != header.TCPFlagRst|header.TCPFlagAck || seg.seq != 777 || seg.ack != 888 {
			t.Fatalf("RST|ACK: flags %v seq %d ack %d", seg.flags, seg.seq, seg.ack)
		}
		sa := trkSeg{src: anycast, dst: client, seq: 4999, ack: 1235, flags: header.TCPFlagSyn | header.TCPFlagAck,
			opts: trkOpts{mss: 1460, hasWS: true, ws: 6, ts: true, tsval: 31}}.bytes()
		got, ok := parseSynAck(sa)
		if !ok || got.rst || got.iss != 4999 || got.ack != 1235 || got.opts.WS != 6 || got.opts.TSVal != 31 {
			t.Fatalf("parseSynAck: %+v %v", got, ok)
		}
		if got, ok := parseSynAck(rst); !ok || !got.rst {
			t.Fatalf("parseSynAck of a RST: %+v %v", got, ok)
		}
	}
}
