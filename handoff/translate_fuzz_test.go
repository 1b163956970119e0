package handoff

// Fuzz targets of the translation: no panic on arbitrary bytes; a valid
// packet stays valid (checksum) through any translation; translating and
// then translating back (the inverse deltas, equal window scales, no
// clamps) gives back the exact bytes.

import (
	"bytes"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/baton-anycast/baton/stack"
)

func stackPacketGSO(pkt []byte) *stack.Packet {
	return &stack.Packet{Dir: stack.Outbound, Data: pkt, GSO: stack.GSOInfo{Type: stack.GSOTCPv4, MSS: 1400, PartialChecksum: true}}
}

// validTCP reports whether pkt is a TCP packet (any direction) with a
// valid checksum.
func validTCP(pkt []byte) bool {
	for _, in := range []bool{true, false} {
		if seg, res := parseTCPSegment(pkt, in, trkPrefixes); res == tcpOK {
			return tcpChecksumValid(&seg)
		}
	}
	return false
}

func FuzzTranslateBytes(f *testing.F) {
	f.Add(trkSeg{src: trkAnycast4, dst: netip.AddrPortFrom(trkClient4, 1), seq: 1, flags: header.TCPFlagAck,
		opts: trkOpts{ts: true, sack: []header.SACKBlock{{Start: 1, End: 2}}}}.bytes(), uint32(5), uint32(6), uint8(3))
	f.Add([]byte{0x45, 0, 0, 20}, uint32(0), uint32(0), uint8(0))
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 6, 64}, uint32(1), uint32(1), uint8(1))
	f.Fuzz(func(t *testing.T, data []byte, delta, tsd uint32, shifts uint8) {
		valid := validTCP(data)
		tr := &Translator{SeqDelta: delta, TS: shifts&1 != 0, TSDelta: tsd,
			OutStack: shifts >> 1 & 7, OutClient: shifts >> 4 & 7, InClient: shifts >> 4 & 7, InStack: shifts >> 1 & 7}
		a := append([]byte(nil), data...)
		tr.Outbound(a, false)
		if valid && !validTCP(a) {
			t.Fatal("outbound translation broke the checksum")
		}
		b := append([]byte(nil), data...)
		tr.Inbound(b, &InboundClamp{AckCap: delta ^ tsd, CapAck: shifts&0x80 != 0, TSecrFloor: tsd, HaveFloor: shifts&0x40 != 0})
		if valid && !validTCP(b) {
			t.Fatal("inbound translation broke the checksum")
		}
		c := append([]byte(nil), data...)
		tr.Outbound(c, true) // partial checksum: must not panic either
		_, _ = parseSynAck(data)
	})
}

func FuzzTranslateRoundTrip(f *testing.F) {
	f.Add(false, uint32(1), uint32(2), uint32(3), uint32(4), uint8(0x10), uint16(100), []byte{1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2}, []byte("x"))
	f.Add(true, uint32(0xffffffff), uint32(0), uint32(0x80000000), uint32(7), uint8(0x18), uint16(0),
		[]byte{1, 1, 5, 26, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0, 6}, []byte(nil))
	f.Fuzz(func(t *testing.T, v6 bool, seq, ack, delta, tsd uint32, flags uint8, wnd uint16, opts, payload []byte) {
		if len(opts) > header.TCPOptionsMaximumSize {
			opts = opts[:header.TCPOptionsMaximumSize]
		}
		opts = append([]byte(nil), opts...)
		for len(opts)%4 != 0 {
			opts = append(opts, header.TCPOptionNOP)
		}
		if len(payload) > 1400 {
			payload = payload[:1400]
		}
		client, anycast := netip.AddrPortFrom(trkClient4, 40000), trkAnycast4
		if v6 {
			client, anycast = netip.AddrPortFrom(trkClient6, 40000), trkAnycast6
		}
		for _, out := range []bool{true, false} {
			p := tcpPacket{src: client, dst: anycast, seq: seq, ack: ack, flags: header.TCPFlags(flags), window: wnd, opts: opts, payload: payload}
			if out {
				p.src, p.dst = anycast, client
			}
			orig := p.build()
			if !validTCP(orig) {
				t.Fatal("built an invalid packet")
			}
			pkt := append([]byte(nil), orig...)
			tr := &Translator{SeqDelta: delta, TS: true, TSDelta: tsd, OutStack: 3, OutClient: 3, InClient: 2, InStack: 2}
			inv := &Translator{SeqDelta: -delta, TS: true, TSDelta: -tsd, OutStack: 3, OutClient: 3, InClient: 2, InStack: 2}
			if out {
				tr.Outbound(pkt, false)
			} else {
				tr.Inbound(pkt, nil)
			}
			if !validTCP(pkt) {
				t.Fatal("translation broke the checksum")
			}
			if out {
				inv.Outbound(pkt, false)
			} else {
				inv.Inbound(pkt, nil)
			}
			if !bytes.Equal(pkt, orig) {
				t.Fatalf("round trip (outbound %v) changed the packet:\n%x\n%x", out, orig, pkt)
			}
		}
	})
}
