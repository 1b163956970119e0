package handoff

// This file parses just enough of an IP packet for the flow tracker: the
// addresses, the TCP ports, sequence and ack numbers, flags, window, payload
// length and the options slice. It never allocates.
//
// The IPv4, IPv6 and TCP accessors come from gVisor's header package, and SYN
// options are parsed with header.ParseSynOptions. Two things are hand-rolled,
// each for a reason:
//
//   - tcpTSval: header.ParseTCPOptions allocates a slice for SACK blocks,
//     which clients send on every packet while recovering from loss; the
//     tracker only needs the TSval, so it scans for the timestamp option
//     alone (with a fast path for the NOP NOP TS layout of RFC 7323,
//     Appendix A, that Linux and gVisor use).
//   - tcpChecksumValid: header.PseudoHeaderChecksum allocates (it takes
//     tcpip.Address by value and slices it); the addresses are contiguous in
//     both IPv4 and IPv6 headers, so the pseudo-header sum is taken over the
//     packet bytes directly.

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/seqnum"
)

// tcpParseResult says what parseTCPSegment made of a packet.
type tcpParseResult uint8

const (
	// tcpIgnore: not TCP, or the anycast side is outside the prefixes.
	tcpIgnore tcpParseResult = iota
	// tcpMalformed: TCP to or from an anycast address that cannot be parsed.
	tcpMalformed
	// tcpFragment: an IP fragment (TCP over fragments is not tracked: the
	// TCP header or the payload length would be incomplete).
	tcpFragment
	// tcpOK: seg holds the parsed segment.
	tcpOK
)

// tcpSegment is the part of a TCP segment the tracker uses.
type tcpSegment struct {
	key        FlowKey
	seq, ack   uint32
	flags      header.TCPFlags
	window     uint16
	payloadLen uint32
	// opts are the TCP options (may be empty).
	opts []byte
	// l4 is the whole TCP segment and addrs the source and destination
	// addresses as they appear in the IP header (for the checksum).
	l4    []byte
	addrs []byte
}

// Has reports whether every flag in f is set.
func (s *tcpSegment) has(f header.TCPFlags) bool { return s.flags&f == f }

// seqLen is the sequence space the segment occupies: payload plus SYN and
// FIN.
func (s *tcpSegment) seqLen() uint32 {
	n := s.payloadLen
	if s.flags&header.TCPFlagSyn != 0 {
		n++
	}
	if s.flags&header.TCPFlagFin != 0 {
		n++
	}
	return n
}

// Maximum number of IPv6 extension headers walked before giving up.
const maxIPv6ExtHeaders = 8

// parseTCPSegment parses data, an IP packet crossing the hook chain in the
// given direction (inbound means client -> anycast). The segment is returned
// by value: it lands in the caller's frame without write barriers.
func parseTCPSegment(data []byte, inbound bool, prefixes []netip.Prefix) (seg tcpSegment, res tcpParseResult) {
	if len(data) == 0 {
		return seg, tcpIgnore
	}
	var (
		src, dst netip.Addr
		proto    uint8
		l4       []byte
		addrs    []byte
		frag     bool
	)
	switch data[0] >> 4 {
	case header.IPv4Version:
		if len(data) < header.IPv4MinimumSize {
			return seg, tcpIgnore
		}
		ip := header.IPv4(data)
		src = netip.AddrFrom4([4]byte(data[12:16]))
		dst = netip.AddrFrom4([4]byte(data[16:20]))
		if !tcpAnycastSide(src, dst, inbound, prefixes) {
			return seg, tcpIgnore
		}
		proto = ip.Protocol()
		if proto != uint8(header.TCPProtocolNumber) {
			return seg, tcpIgnore
		}
		if !ip.IsValid(len(data)) {
			return seg, tcpMalformed
		}
		frag = ip.More() || ip.FragmentOffset() != 0
		l4 = data[ip.HeaderLength():ip.TotalLength()]
		addrs = data[12:20]
	case header.IPv6Version:
		if len(data) < header.IPv6MinimumSize {
			return seg, tcpIgnore
		}
		ip := header.IPv6(data)
		src = netip.AddrFrom16([16]byte(data[8:24]))
		dst = netip.AddrFrom16([16]byte(data[24:40]))
		if !tcpAnycastSide(src, dst, inbound, prefixes) {
			return seg, tcpIgnore
		}
		end := header.IPv6MinimumSize + int(ip.PayloadLength())
		if end > len(data) {
			// Truncated, or a jumbogram (payload length 0 with a
			// hop-by-hop option): not TCP we can track.
			if ip.NextHeader() == uint8(header.TCPProtocolNumber) {
				return seg, tcpMalformed
			}
			return seg, tcpIgnore
		}
		var ok bool
		proto, l4, frag, ok = ipv6TCPPayload(ip.NextHeader(), data[header.IPv6MinimumSize:end])
		if proto != uint8(header.TCPProtocolNumber) {
			return seg, tcpIgnore
		}
		if !ok {
			return seg, tcpMalformed
		}
		addrs = data[8:40]
	default:
		return seg, tcpIgnore
	}
	if frag {
		return seg, tcpFragment
	}
	if len(l4) < header.TCPMinimumSize {
		return seg, tcpMalformed
	}
	tcp := header.TCP(l4)
	off := int(tcp.DataOffset())
	if off < header.TCPMinimumSize || off > len(l4) {
		return seg, tcpMalformed
	}
	sport, dport := tcp.SourcePort(), tcp.DestinationPort()
	if sport == 0 || dport == 0 {
		return seg, tcpMalformed
	}
	client, anycast := netip.AddrPortFrom(src, sport), netip.AddrPortFrom(dst, dport)
	if !inbound {
		client, anycast = anycast, client
	}
	seg.key = FlowKey{Client: client, Anycast: anycast}
	seg.seq = tcp.SequenceNumber()
	seg.ack = tcp.AckNumber()
	seg.flags = tcp.Flags()
	seg.window = tcp.WindowSize()
	seg.payloadLen = uint32(len(l4) - off)
	seg.opts = l4[header.TCPMinimumSize:off]
	seg.l4 = l4
	seg.addrs = addrs
	return seg, tcpOK
}

// tcpAnycastSide reports whether the anycast side of a packet (the destination
// inbound, the source outbound) is inside one of the prefixes.
func tcpAnycastSide(src, dst netip.Addr, inbound bool, prefixes []netip.Prefix) bool {
	a := dst
	if !inbound {
		a = src
	}
	for _, p := range prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// ipv6TCPPayload walks the IPv6 extension headers starting with next over
// payload. It returns the transport protocol, its bytes, whether the packet
// is a fragment, and false if the chain is truncated.
func ipv6TCPPayload(next uint8, payload []byte) (proto uint8, l4 []byte, frag, ok bool) {
	for i := 0; i < maxIPv6ExtHeaders; i++ {
		var n int
		switch header.IPv6ExtensionHeaderIdentifier(next) {
		case header.IPv6HopByHopOptionsExtHdrIdentifier,
			header.IPv6RoutingExtHdrIdentifier,
			header.IPv6DestinationOptionsExtHdrIdentifier:
			if len(payload) < 2 {
				return next, nil, false, false
			}
			n = (int(payload[1]) + 1) * 8
		case header.IPv6FragmentExtHdrIdentifier:
			if len(payload) < 8 {
				return next, nil, false, false
			}
			frag = frag || binary.BigEndian.Uint16(payload[2:4]) != 0 // offset and M flag
			n = 8
		case header.IPv6AuthenticationExtHdrIdentifier:
			if len(payload) < 2 {
				return next, nil, false, false
			}
			n = (int(payload[1]) + 2) * 4
		default:
			return next, payload, frag, true
		}
		if n > len(payload) {
			return next, nil, frag, false
		}
		next, payload = payload[0], payload[n:]
	}
	return next, nil, frag, false
}

// tcpTSval returns the TSval of the segment's timestamp option.
func tcpTSval(opts []byte) (uint32, bool) {
	// Fast path: NOP NOP TS(10), the layout every common stack uses.
	if len(opts) >= 12 && opts[0] == header.TCPOptionNOP && opts[1] == header.TCPOptionNOP &&
		opts[2] == header.TCPOptionTS && opts[3] == header.TCPOptionTSLength {
		return binary.BigEndian.Uint32(opts[4:8]), true
	}
	for i := 0; i < len(opts); {
		switch opts[i] {
		case header.TCPOptionEOL:
			return 0, false
		case header.TCPOptionNOP:
			i++
			continue
		}
		if i+2 > len(opts) {
			return 0, false
		}
		l := int(opts[i+1])
		if l < 2 || i+l > len(opts) {
			return 0, false
		}
		if opts[i] == header.TCPOptionTS {
			if l != header.TCPOptionTSLength {
				return 0, false
			}
			return binary.BigEndian.Uint32(opts[i+2 : i+6]), true
		}
		i += l
	}
	return 0, false
}

// tcpChecksumValid verifies the segment's TCP checksum.
func tcpChecksumValid(s *tcpSegment) bool {
	if len(s.l4) > 0xffff {
		return false
	}
	xsum := checksum.Checksum(s.addrs, 0)
	xsum = checksum.Combine(xsum, uint16(len(s.l4)))
	xsum = checksum.Combine(xsum, uint16(header.TCPProtocolNumber))
	return checksum.Checksum(s.l4, xsum) == 0xffff
}

// Sequence-space helpers (32-bit, wrapping).

// tcpSeqAfter reports a > b in sequence space.
func tcpSeqAfter(a, b uint32) bool { return seqnum.Value(b).LessThan(seqnum.Value(a)) }

// tcpSeqAtLeast reports a >= b in sequence space.
func tcpSeqAtLeast(a, b uint32) bool { return seqnum.Value(b).LessThanEq(seqnum.Value(a)) }

// tcpSeqInRange reports lo < v <= hi in sequence space.
func tcpSeqInRange(v, lo, hi uint32) bool {
	return seqnum.Value(v).InRange(seqnum.Value(lo+1), seqnum.Value(hi+1))
}
