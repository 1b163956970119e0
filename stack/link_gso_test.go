package stack

import (
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/baton-anycast/baton/tun"
)

// gsoPacket builds a TCP packet as gVisor's host-GSO path does: the checksum
// field holds the pseudo-header sum. IPv4 packets get ipOpts bytes of IP
// options.
func gsoPacket(v6 bool, ipOpts, tcpOpts, payload int) []byte {
	l3 := header.IPv4MinimumSize + ipOpts
	src, dst := tcpip.AddrFrom4([4]byte{192, 0, 2, 1}), tcpip.AddrFrom4([4]byte{198, 51, 100, 2})
	if v6 {
		l3 = header.IPv6MinimumSize
		src = tcpip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xa, 15: 1})
		dst = tcpip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 1, 0, 15: 2})
	}
	thl := header.TCPMinimumSize + tcpOpts
	b := make([]byte, l3+thl+payload)
	if v6 {
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(thl + payload),
			TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: src, DstAddr: dst})
	} else {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64,
			Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst})
		b[0] = 0x40 | byte(l3/4)
		for i := header.IPv4MinimumSize; i < l3; i++ {
			b[i] = 1 // NOP options
		}
		ip.SetChecksum(0)
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(b[l3:])
	tcp.Encode(&header.TCPFields{SrcPort: 9000, DstPort: 40000, SeqNum: 1, AckNum: 1,
		DataOffset: uint8(thl), Flags: header.TCPFlagAck, WindowSize: 1000})
	tcp.SetChecksum(header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(thl+payload)))
	return b
}

func TestVirtioHdr(t *testing.T) {
	const mss = 1448
	v4 := GSOInfo{Type: GSOTCPv4, MSS: mss, PartialChecksum: true}
	v6 := GSOInfo{Type: GSOTCPv6, MSS: mss - 20, PartialChecksum: true}
	needs := uint8(tun.VirtioNetHdrFNeedsCsum)
	tests := []struct {
		name string
		pkt  []byte
		g    GSOInfo
		want tun.VirtioNetHdr
		ok   bool
	}{
		{"v4 large", gsoPacket(false, 0, 12, 60000), v4,
			tun.VirtioNetHdr{Flags: needs, GSOType: tun.VirtioNetHdrGSOTCPv4, HdrLen: 52, GSOSize: mss, CsumStart: 20, CsumOffset: 16}, true},
		{"v6 large", gsoPacket(true, 0, 12, 60000), v6,
			tun.VirtioNetHdr{Flags: needs, GSOType: tun.VirtioNetHdrGSOTCPv6, HdrLen: 72, GSOSize: mss - 20, CsumStart: 40, CsumOffset: 16}, true},
		{"v4 with IP options", gsoPacket(false, 8, 0, 3000), v4,
			tun.VirtioNetHdr{Flags: needs, GSOType: tun.VirtioNetHdrGSOTCPv4, HdrLen: 48, GSOSize: mss, CsumStart: 28, CsumOffset: 16}, true},
		// Payload of at most the MSS: not cut, only the checksum to finish
		// (a pure ACK, as gVisor sends on these connections).
		{"exactly mss", gsoPacket(false, 0, 12, mss), v4,
			tun.VirtioNetHdr{Flags: needs, HdrLen: 52, CsumStart: 20, CsumOffset: 16}, true},
		{"pure ack", gsoPacket(true, 0, 12, 0), v6,
			tun.VirtioNetHdr{Flags: needs, HdrLen: 72, CsumStart: 40, CsumOffset: 16}, true},
		// gVisor has not set the MSS yet (before the handshake completes).
		{"mss 0", gsoPacket(false, 0, 0, 0), GSOInfo{Type: GSOTCPv4, PartialChecksum: true},
			tun.VirtioNetHdr{Flags: needs, HdrLen: 40, CsumStart: 20, CsumOffset: 16}, true},
		{"full checksum", gsoPacket(false, 0, 0, 5000), GSOInfo{Type: GSOTCPv4, MSS: mss},
			tun.VirtioNetHdr{GSOType: tun.VirtioNetHdrGSOTCPv4, HdrLen: 40, GSOSize: mss}, true},
		{"v4 info on v6", gsoPacket(true, 0, 0, 5000), v4, tun.VirtioNetHdr{}, false},
		{"v6 info on v4", gsoPacket(false, 0, 0, 5000), v6, tun.VirtioNetHdr{}, false},
		{"truncated TCP", gsoPacket(false, 0, 0, 0)[:30], v4, tun.VirtioNetHdr{}, false},
		{"not TCP", func() []byte { b := gsoPacket(false, 0, 0, 10); b[9] = 17; return b }(), v4, tun.VirtioNetHdr{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, ok := virtioHdr(tt.pkt, tt.g)
			if ok != tt.ok || h != tt.want {
				t.Fatalf("virtioHdr = %v, %v; want %v, %v", h, ok, tt.want, tt.ok)
			}
			if !ok {
				return
			}
			// The kernel (played by SegmentGSO) accepts it and the wire
			// packets carry valid checksums.
			segs, err := tun.SegmentGSO(h, tt.pkt, 1500)
			if err != nil {
				t.Fatal(err)
			}
			if !tt.g.PartialChecksum {
				return // the test packet's checksum is not a full one
			}
			for i, s := range segs {
				var l4 []byte
				var xsum uint16
				if s[0]>>4 == 4 {
					ip := header.IPv4(s)
					l4 = ip.Payload()
					xsum = header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(l4)))
				} else {
					ip := header.IPv6(s)
					l4 = s[header.IPv6MinimumSize:]
					xsum = header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), uint16(len(l4)))
				}
				if checksum.Checksum(l4, xsum) != 0xffff {
					t.Fatalf("segment %d: bad TCP checksum", i)
				}
			}
		})
	}
}

func TestResetPartialChecksum(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		pkt := gsoPacket(v6, 0, 12, 3000)
		want := append([]byte(nil), pkt...)
		l4 := header.IPv4MinimumSize
		typ := GSOTCPv4
		if v6 {
			l4, typ = header.IPv6MinimumSize, GSOTCPv6
		}
		header.TCP(pkt[l4:]).SetChecksum(0x1234)
		p := Packet{Dir: Outbound, Data: pkt, GSO: GSOInfo{Type: typ, MSS: 1000, PartialChecksum: true}}
		if !p.ResetPartialChecksum() || string(p.Data) != string(want) {
			t.Fatalf("v6 %v: ResetPartialChecksum did not restore the pseudo-header sum", v6)
		}
		p.GSO.PartialChecksum = false
		if p.ResetPartialChecksum() {
			t.Fatal("ResetPartialChecksum changed a packet without a partial checksum")
		}
		p.GSO.PartialChecksum = true
		p.Data = p.Data[:len(p.Data)-1] // length no longer matches the IP header
		if p.ResetPartialChecksum() {
			t.Fatal("ResetPartialChecksum accepted a truncated packet")
		}
	}
}
