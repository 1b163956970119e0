package tun

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	segSrc4 = netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), 9000)
	segDst4 = netip.AddrPortFrom(netip.MustParseAddr("198.51.100.2"), 40000)
	segSrc6 = netip.AddrPortFrom(netip.MustParseAddr("2001:db8:a::1"), 9000)
	segDst6 = netip.AddrPortFrom(netip.MustParseAddr("2001:db8:100::2"), 40000)
)

// tsOpts is NOP NOP TS, the options gVisor and Linux put on every segment.
var tsOpts = []byte{1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9}

// tcpSeg builds a TCP segment from the fixed test addresses (see buildTCP).
func tcpSeg(v6 bool, seq uint32, flags header.TCPFlags, opts, payload []byte, partial bool) []byte {
	if v6 {
		return buildTCP(segSrc6, segDst6, seq, 77, flags, opts, payload, partial)
	}
	return buildTCP(segSrc4, segDst4, seq, 77, flags, opts, payload, partial)
}

// buildTCP builds one TCP segment as gVisor's TCP does: with partial, the
// checksum field holds the pseudo-header sum of the whole segment (host GSO,
// NeedsCsum); otherwise the full checksum. IPv4 packets have DF set and ID
// 0xfffe; the window is 65535.
func buildTCP(srcAP, dstAP netip.AddrPort, seq, ack uint32, flags header.TCPFlags, opts, payload []byte, partial bool) []byte {
	v6 := srcAP.Addr().Is6()
	l3 := header.IPv4MinimumSize
	if v6 {
		l3 = header.IPv6MinimumSize
	}
	src, dst := tcpip.AddrFromSlice(srcAP.Addr().AsSlice()), tcpip.AddrFromSlice(dstAP.Addr().AsSlice())
	thl := header.TCPMinimumSize + len(opts)
	b := make([]byte, l3+thl+len(payload))
	if v6 {
		header.IPv6(b).Encode(&header.IPv6Fields{
			PayloadLength: uint16(thl + len(payload)), TransportProtocol: header.TCPProtocolNumber,
			HopLimit: 64, SrcAddr: src, DstAddr: dst,
		})
	} else {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(b)), ID: 0xfffe, Flags: header.IPv4FlagDontFragment, TTL: 64,
			Protocol: uint8(header.TCPProtocolNumber), SrcAddr: src, DstAddr: dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(b[l3:])
	tcp.Encode(&header.TCPFields{
		SrcPort: srcAP.Port(), DstPort: dstAP.Port(), SeqNum: seq, AckNum: ack, DataOffset: uint8(thl),
		Flags: flags, WindowSize: 65535,
	})
	copy(tcp[header.TCPMinimumSize:], opts)
	copy(tcp[thl:], payload)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(thl+len(payload)))
	if partial {
		tcp.SetChecksum(xsum)
	} else {
		tcp.SetChecksum(^checksum.Checksum(tcp, xsum))
	}
	return b
}

// tcpValid checks the IP and TCP checksums and lengths of a wire packet and
// returns its TCP header and payload.
func tcpValid(t *testing.T, pkt []byte) (header.TCP, []byte) {
	t.Helper()
	var src, dst tcpip.Address
	var l4 []byte
	switch pkt[0] >> 4 {
	case 4:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || int(ip.TotalLength()) != len(pkt) || !ip.IsChecksumValid() {
			t.Fatalf("bad IPv4 header: total %d of %d bytes, checksum %#x", ip.TotalLength(), len(pkt), ip.Checksum())
		}
		src, dst, l4 = ip.SourceAddress(), ip.DestinationAddress(), ip.Payload()
	case 6:
		ip := header.IPv6(pkt)
		if int(ip.PayloadLength())+header.IPv6MinimumSize != len(pkt) {
			t.Fatalf("bad IPv6 payload length %d for %d bytes", ip.PayloadLength(), len(pkt))
		}
		src, dst, l4 = ip.SourceAddress(), ip.DestinationAddress(), pkt[header.IPv6MinimumSize:]
	default:
		t.Fatalf("not IP: %x", pkt[:1])
	}
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(l4)))
	if checksum.Checksum(l4, xsum) != 0xffff {
		t.Fatalf("bad TCP checksum %#x", header.TCP(l4).Checksum())
	}
	tcp := header.TCP(l4)
	return tcp, tcp.Payload()
}

func gsoHdr(v6 bool, pkt []byte, mss uint16) VirtioNetHdr {
	l3, typ := uint16(20), uint8(VirtioNetHdrGSOTCPv4)
	if v6 {
		l3, typ = 40, VirtioNetHdrGSOTCPv6
	}
	thl := uint16(header.TCP(pkt[l3:]).DataOffset())
	return VirtioNetHdr{Flags: VirtioNetHdrFNeedsCsum, GSOType: typ, HdrLen: l3 + thl, GSOSize: mss, CsumStart: l3, CsumOffset: 16}
}

func TestSegmentGSO(t *testing.T) {
	const mtu, mss = 1500, 1448 // 1448 + 20 + 20 + 12 = 1500 over IPv4
	rng := rand.New(rand.NewPCG(1, 2))
	for _, v6 := range []bool{false, true} {
		segMSS := uint16(mss)
		if v6 {
			segMSS = mss - 20
		}
		hdrs := 20 + 20 + len(tsOpts)
		if v6 {
			hdrs += 20
		}
		for _, n := range []int{1, int(segMSS), int(segMSS) + 1, 3 * int(segMSS), 3*int(segMSS) + 1, 65535 - hdrs} {
			for _, partial := range []bool{true, false} {
				payload := make([]byte, n)
				for i := range payload {
					payload[i] = byte(rng.Uint32())
				}
				const seq = 0xffffff00 // wraps within the packet
				flags := header.TCPFlagAck | header.TCPFlagPsh | header.TCPFlagFin | header.TCPFlagCwr
				pkt := tcpSeg(v6, seq, flags, tsOpts, payload, partial)
				orig := bytes.Clone(pkt)
				h := gsoHdr(v6, pkt, segMSS)
				if !partial {
					h.Flags, h.CsumStart, h.CsumOffset = 0, 0, 0
				}
				segs, err := SegmentGSO(h, pkt, mtu)
				if err != nil {
					t.Fatalf("v6 %v n %d partial %v: %v", v6, n, partial, err)
				}
				if !bytes.Equal(pkt, orig) {
					t.Fatal("SegmentGSO modified its input")
				}
				want := (n + int(segMSS) - 1) / int(segMSS)
				if len(segs) != want {
					t.Fatalf("v6 %v n %d: %d segments, want %d", v6, n, len(segs), want)
				}
				var got []byte
				for i, s := range segs {
					if len(s) > mtu {
						t.Fatalf("segment %d: %d bytes > MTU", i, len(s))
					}
					tcp, p := tcpValid(t, s)
					if tcp.SequenceNumber() != seq+uint32(len(got)) {
						t.Fatalf("segment %d: seq %#x, want %#x", i, tcp.SequenceNumber(), seq+uint32(len(got)))
					}
					if i < len(segs)-1 && len(p) != int(segMSS) {
						t.Fatalf("segment %d: %d payload bytes, want %d", i, len(p), segMSS)
					}
					wantFlags := header.TCPFlagAck
					if i == 0 {
						wantFlags |= header.TCPFlagCwr
					}
					if i == len(segs)-1 {
						wantFlags |= header.TCPFlagPsh | header.TCPFlagFin
					}
					if tcp.Flags() != wantFlags || tcp.AckNumber() != 77 || tcp.WindowSize() != 65535 ||
						!bytes.Equal(tcp.Options(), tsOpts) || tcp.SourcePort() != 9000 || tcp.DestinationPort() != 40000 {
						t.Fatalf("segment %d: flags %v ack %d wnd %d opts %x", i, tcp.Flags(), tcp.AckNumber(), tcp.WindowSize(), tcp.Options())
					}
					if !v6 {
						ip := header.IPv4(s)
						if ip.ID() != 0xfffe+uint16(i) || ip.Flags() != header.IPv4FlagDontFragment || ip.TTL() != 64 {
							t.Fatalf("segment %d: id %#x flags %d ttl %d", i, ip.ID(), ip.Flags(), ip.TTL())
						}
					}
					got = append(got, p...)
				}
				if !bytes.Equal(got, payload) {
					t.Fatalf("v6 %v n %d: payload differs after segmentation", v6, n)
				}
			}
		}
	}
}

func TestSegmentChecksumOnly(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, n := range []int{0, 1, 2, 999, 1000} {
			payload := bytes.Repeat([]byte{0xa5, 0x5a, 0xff}, n)[:n]
			pkt := tcpSeg(v6, 1, header.TCPFlagAck, tsOpts, payload, true)
			h := gsoHdr(v6, pkt, 0)
			h.GSOType, h.GSOSize = VirtioNetHdrGSONone, 0
			segs, err := SegmentGSO(h, pkt, 1500)
			if err != nil || len(segs) != 1 {
				t.Fatalf("v6 %v n %d: %d segments, %v", v6, n, len(segs), err)
			}
			full := tcpSeg(v6, 1, header.TCPFlagAck, tsOpts, payload, false)
			if !bytes.Equal(segs[0], full) {
				t.Fatalf("v6 %v n %d: completed checksum differs from the full one", v6, n)
			}
			// Zero header: a copy.
			segs, err = SegmentGSO(VirtioNetHdr{}, full, 1500)
			if err != nil || !bytes.Equal(segs[0], full) {
				t.Fatalf("zero header: %v", err)
			}
		}
	}
}

func TestSegmentGSOErrors(t *testing.T) {
	big := make([]byte, 4000)
	v4 := tcpSeg(false, 1, header.TCPFlagAck, tsOpts, big, true)
	v6 := tcpSeg(true, 1, header.TCPFlagAck, tsOpts, big, true)
	udp := bytes.Clone(v4)
	udp[9] = 17
	frag := bytes.Clone(v4)
	frag[6] |= 0x20 // MF
	short := v4[:len(v4)-1]
	tests := []struct {
		name string
		hdr  VirtioNetHdr
		pkt  []byte
		want string
	}{
		{"gso size 0", gsoHdr(false, v4, 0), v4, "gso_size 0"},
		{"v4 type on v6", gsoHdr(false, v4, 1000), v6, "gso_type 1 on an IPv6"},
		{"v6 type on v4", gsoHdr(true, v6, 1000), v4, "gso_type 4 on an IPv4"},
		{"total length", gsoHdr(false, v4, 1000), short, "total length"},
		{"not tcp", gsoHdr(false, v4, 1000), udp, "protocol 17"},
		{"fragment", gsoHdr(false, v4, 1000), frag, "fragment"},
		{"segments over mtu", gsoHdr(false, v4, 1449), v4, "exceed the MTU"},
		{"csum start", VirtioNetHdr{Flags: 1, GSOType: 1, HdrLen: 52, GSOSize: 1000, CsumStart: 20, CsumOffset: 6}, v4, "checksum at 20+6"},
		{"csum outside", VirtioNetHdr{Flags: 1, CsumStart: 200, CsumOffset: 16}, v4[:100], "outside"},
		{"data valid written", VirtioNetHdr{Flags: VirtioNetHdrFDataValid}, v4[:100], "flags"},
		{"udp gso", VirtioNetHdr{GSOType: 3, GSOSize: 1000}, v4, "not supported"},
		{"big without gso", VirtioNetHdr{Flags: 1, CsumStart: 20, CsumOffset: 16}, v4, "without GSO"},
		{"too big", gsoHdr(false, v4, 1000), make([]byte, 70000), "at most 65535"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := SegmentGSO(tt.hdr, tt.pkt, 1500)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("SegmentGSO(%v) = %v, want an error containing %q", tt.hdr, err, tt.want)
			}
		})
	}
	if _, err := SegmentGSO(gsoHdr(false, v4, 1449), v4, 1500); !errors.Is(err, ErrPacketSize) {
		t.Fatalf("oversize segments: %v, want ErrPacketSize", err)
	}
}

func TestOnesSum(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 2000 {
		b := make([]byte, rng.IntN(3000))
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		init := uint16(rng.Uint32())
		if got, want := onesSum(b, init), checksum.Checksum(b, init); got != want {
			t.Fatalf("onesSum(%d bytes, %#x) = %#x, want %#x", len(b), init, got, want)
		}
		v := uint16(rng.Uint32())
		if got, want := onesSum16(init, v), checksum.Combine(init, v); got != want {
			t.Fatalf("onesSum16(%#x, %#x) = %#x, want %#x", init, v, got, want)
		}
	}
	// All ones stays all ones.
	if got := onesSum(bytes.Repeat([]byte{0xff}, 64), 0xffff); got != 0xffff {
		t.Fatalf("onesSum(ff...) = %#x", got)
	}
}

func TestVirtioNetHdrEncoding(t *testing.T) {
	h := VirtioNetHdr{Flags: 1, GSOType: 4, HdrLen: 0x0102, GSOSize: 0x0304, CsumStart: 0x0506, CsumOffset: 0x0708}
	var b [VirtioNetHdrLen]byte
	h.encode(&b)
	if want := [...]byte{1, 4, 2, 1, 4, 3, 6, 5, 8, 7}; b != want {
		t.Fatalf("encode = % x, want % x (little-endian)", b, want)
	}
	if decodeVirtioNetHdr(b[:]) != h {
		t.Fatal("decode(encode(h)) != h")
	}
}
