// segment.go: SegmentGSO, what the kernel makes of a packet written with a
// virtio_net_hdr. The fake device uses it to hand wire packets to tests; a
// hook that must forward an outbound GSO packet somewhere else than the TUN
// (a peer, a capture) can use it too. No build tag.

package tun

import (
	"encoding/binary"
	"fmt"
	"math/bits"
)

// SegmentGSO returns the packets the kernel puts on the wire for pkt written
// with hdr, each a new slice with complete checksums (pkt is not modified):
//
//   - no GSO, no NEEDS_CSUM: a copy of pkt;
//   - NEEDS_CSUM without GSO: a copy with the checksum completed (the sum of
//     the bytes from CsumStart, the pseudo-header sum in the field included,
//     complemented into the field);
//   - GSO TCPv4/TCPv6: the TCP segment cut into segments of hdr.GSOSize
//     payload bytes (the last one shorter), as Linux's tcp_gso_segment does:
//     every segment repeats the IP and TCP headers (options included), its
//     sequence number advances by the payload before it, FIN and PSH stay on
//     the last segment only and CWR on the first only; IPv4 identifications
//     count up from the original's, total/payload lengths and the IPv4 header
//     checksum are rewritten, and every TCP checksum is computed in full
//     (whatever the field held).
//
// mtu bounds the size of every resulting packet. SegmentGSO returns an error
// for a header the kernel would refuse or that does not describe pkt.
func SegmentGSO(hdr VirtioNetHdr, pkt []byte, mtu int) ([][]byte, error) {
	lay, err := checkVirtioNetHdr(hdr, pkt, mtu)
	if err != nil {
		return nil, err
	}
	if !hdr.gso() {
		out := append([]byte(nil), pkt...)
		if hdr.Flags&VirtioNetHdrFNeedsCsum != 0 {
			completeChecksum(out, int(hdr.CsumStart), int(hdr.CsumOffset))
		}
		return [][]byte{out}, nil
	}
	hdrs, payload := pkt[:lay.payload], pkt[lay.payload:]
	mss := int(hdr.GSOSize)
	seq := binary.BigEndian.Uint32(pkt[lay.l4+4:])
	flags := pkt[lay.l4+13]
	var id uint16
	if !lay.v6 {
		id = binary.BigEndian.Uint16(pkt[4:6])
	}
	out := make([][]byte, 0, lay.segments)
	for i := range lay.segments {
		chunk := payload[min(i*mss, len(payload)):min((i+1)*mss, len(payload))]
		seg := make([]byte, len(hdrs)+len(chunk))
		copy(seg, hdrs)
		copy(seg[len(hdrs):], chunk)
		if lay.v6 {
			binary.BigEndian.PutUint16(seg[4:6], uint16(len(seg)-40))
		} else {
			binary.BigEndian.PutUint16(seg[2:4], uint16(len(seg)))
			binary.BigEndian.PutUint16(seg[4:6], id+uint16(i))
			binary.BigEndian.PutUint16(seg[10:12], 0)
			binary.BigEndian.PutUint16(seg[10:12], ^onesSum(seg[:lay.l4], 0))
		}
		tcp := seg[lay.l4:]
		binary.BigEndian.PutUint32(tcp[4:8], seq+uint32(i*mss))
		f := flags
		if i < lay.segments-1 {
			f &^= tcpFlagFin | tcpFlagPsh
		}
		if i > 0 {
			f &^= tcpFlagCwr
		}
		tcp[13] = f
		setTCPChecksum(seg, lay.l4, lay.v6)
		out = append(out, seg)
	}
	return out, nil
}

// TCP flag bits in byte 13 of the TCP header.
const (
	tcpFlagFin = 0x01
	tcpFlagPsh = 0x08
	tcpFlagCwr = 0x80
)

// completeChecksum finishes a partial checksum like the kernel's
// skb_checksum_help: the field already holds the pseudo-header sum, so the
// sum from start to the end, complemented, is the checksum; a result of 0
// is written as 0xffff (CSUM_MANGLED_0: the same sum, and for UDP 0 would
// mean "no checksum").
func completeChecksum(pkt []byte, start, off int) {
	sum := ^onesSum(pkt[start:], 0)
	if sum == 0 {
		sum = 0xffff
	}
	binary.BigEndian.PutUint16(pkt[start+off:], sum)
}

// setTCPChecksum computes the TCP checksum of seg (IP header, TCP header at
// l4, payload) from scratch.
func setTCPChecksum(seg []byte, l4 int, v6 bool) {
	tcp := seg[l4:]
	binary.BigEndian.PutUint16(tcp[16:18], 0)
	var sum uint16
	if v6 {
		sum = onesSum(seg[8:40], 0)
	} else {
		sum = onesSum(seg[12:20], 0)
	}
	sum = onesSum16(sum, uint16(len(tcp)))
	sum = onesSum16(sum, 6)
	sum = onesSum(tcp, sum)
	binary.BigEndian.PutUint16(tcp[16:18], ^sum)
}

// onesSum returns the 16-bit ones' complement sum (RFC 1071) of b, an odd
// last byte padded with zero, added to initial. It is on the read path of
// every large segment (finishRx), so it sums 64-bit words with end-around
// carry, 32 bytes per round: the ones' complement sum does not depend on
// the byte order (RFC 1071, 2.B), so the words are loaded little-endian
// (the host's order on amd64 and arm64) and the folded sum swapped back.
// 2^64-1 is a multiple of 2^16-1, so folding the 64-bit sum into 16 bits
// gives the same sum as adding 16-bit words.
func onesSum(b []byte, initial uint16) uint16 {
	var s, c uint64
	for len(b) >= 32 {
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b), c)
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b[8:]), c)
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b[16:]), c)
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b[24:]), c)
		b = b[32:]
	}
	for len(b) >= 8 {
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b), c)
		b = b[8:]
	}
	for len(b) >= 2 {
		s, c = bits.Add64(s, uint64(binary.LittleEndian.Uint16(b)), c)
		b = b[2:]
	}
	if len(b) == 1 {
		// Big-endian, the odd byte is the high half of a word padded
		// with zero; little-endian, the low half.
		s, c = bits.Add64(s, uint64(b[0]), c)
	}
	s, c = bits.Add64(s, c, 0)
	s += c // cannot carry again: s is 0 when the add above carried
	t := s>>32 + s&0xffffffff
	t = t>>32 + t&0xffffffff
	t = t>>16 + t&0xffff
	t = t>>16 + t&0xffff
	t = t>>16 + t&0xffff
	return onesSum16(bits.ReverseBytes16(uint16(t)), initial)
}

// onesSum16 adds v to the ones' complement sum a.
func onesSum16(a, v uint16) uint16 {
	s := uint32(a) + uint32(v)
	return uint16(s&0xffff + s>>16)
}

// String formats h for test failures and logs.
func (h VirtioNetHdr) String() string {
	return fmt.Sprintf("virtio_net_hdr{flags %#x gso_type %d hdr_len %d gso_size %d csum %d+%d}",
		h.Flags, h.GSOType, h.HdrLen, h.GSOSize, h.CsumStart, h.CsumOffset)
}
