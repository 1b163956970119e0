package stack

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Direction says which way a packet crosses the link endpoint.
type Direction uint8

const (
	// Inbound packets were read from the TUN device and go to the gVisor stack.
	Inbound Direction = iota
	// Outbound packets were written by the gVisor stack and go to the TUN device.
	Outbound
)

func (d Direction) String() string {
	if d == Inbound {
		return "in"
	}
	return "out"
}

// Packet is one IP packet passing through the hook chain.
//
// Data is the whole IP packet, IP header first, as one contiguous slice. A
// hook may rewrite it in place (same length) or point Data at a different
// slice (the endpoint then delivers or writes the new bytes). Data is valid
// only during the hook call: a hook that keeps a packet (to queue or replay
// it later) copies it.
//
// GSO is zero except for outbound TCP packets on a device with segmentation
// offload (tun.Config.Offload); see GSOInfo for what such a packet is and
// what a hook that rewrites one must keep true.
type Packet struct {
	Dir  Direction
	Data []byte
	GSO  GSOInfo
}

// GSOType is the kind of segmentation offload of an outbound packet.
type GSOType uint8

const (
	// GSONone: an ordinary packet, complete and at most the MTU.
	GSONone GSOType = iota
	// GSOTCPv4 and GSOTCPv6: a TCP segment of gVisor's host-GSO path
	// (see GSOInfo).
	GSOTCPv4
	GSOTCPv6
)

// GSOInfo describes an outbound packet that the kernel finishes after Baton
// writes it. On a device with segmentation offload, gVisor's TCP hands the
// endpoint every segment of an accepted connection (data, pure ACKs, FIN)
// this way; SYN-ACKs and resets stay ordinary, complete packets:
//
//   - Type is GSOTCPv4 or GSOTCPv6 and Data is ONE TCP segment, which may
//     carry far more than MSS payload bytes (up to about 64 KiB, larger
//     than the MTU). When its payload is larger than MSS, the kernel cuts
//     it into segments of MSS payload bytes, if and when a device on the
//     way needs that: each repeats the IP and TCP headers (options
//     included), sequence numbers advance by the payload before them, FIN
//     and PSH stay on the last segment, CWR on the first, and IPv4 IDs
//     count up. A hook sees the segment once, as gVisor sent it: sequence
//     numbers, acks, windows and timestamps are those of every piece, and
//     seq + payload length is where the last piece ends.
//   - With PartialChecksum, the TCP checksum field does not hold the
//     checksum: it holds the pseudo-header sum (addresses, protocol, and
//     the TCP length of the whole packet as in Data), not complemented.
//     The kernel adds the TCP header and payload to it (for every piece,
//     after cutting). Do not verify such a checksum, and do not update it
//     incrementally (RFC 1624) when rewriting the TCP header or payload:
//     a rewrite of sequence or ack numbers, ports, windows, options or
//     payload needs no checksum change at all. A rewrite of the addresses
//     or a change of the length changes the pseudo-header: call
//     ResetPartialChecksum after it.
//
// A hook that takes such a packet elsewhere than the TUN (Consume, to a
// peer or a capture) must finish it first: tun.SegmentGSO returns the wire
// packets. A hook that changes the packet must keep GSO true to it (or
// clear it after producing a complete packet of at most the MTU).
// AnycastFilter and the flow tracker only read addresses, ports, sequence
// numbers and flags, which need nothing of this.
type GSOInfo struct {
	Type GSOType
	// MSS is the payload bytes per segment the kernel cuts the packet
	// into; 0 means it is never cut.
	MSS uint16
	// PartialChecksum: the TCP checksum field holds the pseudo-header sum.
	PartialChecksum bool
}

// ResetPartialChecksum stores in the TCP checksum field of a packet with
// GSO.PartialChecksum the pseudo-header sum of its current addresses and
// length (what gVisor put there). It returns false, changing nothing, for a
// packet without a partial checksum or that is not a whole IPv4/IPv6 TCP
// packet without IPv6 extension headers.
func (p *Packet) ResetPartialChecksum() bool {
	if !p.GSO.PartialChecksum {
		return false
	}
	var addrs []byte
	var l4 int
	switch p.Version() {
	case 4:
		ip := header.IPv4(p.Data)
		l4 = int(ip.HeaderLength())
		if ip.Protocol() != uint8(header.TCPProtocolNumber) || l4 < header.IPv4MinimumSize || int(ip.TotalLength()) != len(p.Data) {
			return false
		}
		addrs = p.Data[12:20]
	case 6:
		ip := header.IPv6(p.Data)
		l4 = header.IPv6MinimumSize
		if ip.NextHeader() != uint8(header.TCPProtocolNumber) || int(ip.PayloadLength())+l4 != len(p.Data) {
			return false
		}
		addrs = p.Data[8:40]
	default:
		return false
	}
	if len(p.Data) < l4+header.TCPMinimumSize || len(p.Data)-l4 > 0xffff {
		return false
	}
	sum := checksum.Checksum(addrs, 0)
	sum = checksum.Combine(sum, uint16(header.TCPProtocolNumber))
	sum = checksum.Combine(sum, uint16(len(p.Data)-l4))
	header.TCP(p.Data[l4:]).SetChecksum(sum)
	return true
}

// Version returns 4 or 6 for an IPv4 or IPv6 packet, 0 for anything else.
func (p *Packet) Version() int {
	if len(p.Data) == 0 {
		return 0
	}
	switch p.Data[0] >> 4 {
	case header.IPv4Version:
		if len(p.Data) >= header.IPv4MinimumSize {
			return 4
		}
	case header.IPv6Version:
		if len(p.Data) >= header.IPv6MinimumSize {
			return 6
		}
	}
	return 0
}

// Addrs returns the packet's source and destination addresses. ok is false
// when the packet is not a complete-enough IPv4 or IPv6 header.
func (p *Packet) Addrs() (src, dst netip.Addr, ok bool) {
	switch p.Version() {
	case 4:
		ip := header.IPv4(p.Data)
		return netip.AddrFrom4(ip.SourceAddress().As4()), netip.AddrFrom4(ip.DestinationAddress().As4()), true
	case 6:
		ip := header.IPv6(p.Data)
		return netip.AddrFrom16(ip.SourceAddress().As16()), netip.AddrFrom16(ip.DestinationAddress().As16()), true
	}
	return netip.Addr{}, netip.Addr{}, false
}

// Verdict is a hook's decision about a packet.
type Verdict uint8

const (
	// Pass hands the packet (possibly rewritten) to the next hook, and after
	// the last hook to its destination: the stack for inbound packets, the
	// TUN device for outbound ones.
	Pass Verdict = iota
	// Drop discards the packet. The endpoint counts it under the hook's name
	// and direction; the hook keeps its own finer reasons.
	Drop
	// Consume means the hook took the packet over: it copied, queued,
	// tunnelled or answered it itself. The chain stops and nothing is
	// counted as a drop.
	Consume
)

// Hook is one stage of the chain every packet crosses between the TUN device
// and the gVisor stack. Hooks run on the packet path: they must not block on
// the network, on peers or on locks held across I/O.
//
// Hooks are layers between the TUN and the stack: the first hook added is
// the outermost (closest to the TUN). Inbound packets cross the hooks in
// the order they were added, outbound packets in the reverse order, so a
// hook sees both directions of a flow in the same form: a hook added before
// a rewriting hook sees packets as they are on the wire, one added after it
// sees them as the stack does. Packets put on the path with an Injector skip
// the whole chain.
type Hook interface {
	// Name identifies the hook in metrics and logs ("anycast-filter",
	// "handoff", ...).
	Name() string
	// Inbound sees a packet read from the TUN before the stack does.
	Inbound(p *Packet) Verdict
	// Outbound sees a packet written by the stack before the TUN does.
	Outbound(p *Packet) Verdict
}

// Injector puts packets on the path without crossing the hook chain. The
// handoff layer uses it to feed synthetic handshakes to the stack and to
// send packets to clients that the stack did not produce.
type Injector interface {
	// InjectInbound delivers an IP packet to the gVisor stack as if it had
	// been read from the TUN. The bytes are copied.
	InjectInbound(data []byte) error
	// InjectOutbound writes an IP packet to the TUN device as if the stack
	// had sent it. It blocks like any other write to the device. The
	// packet goes without GSO info: it must be complete (checksums) and
	// at most the MTU, also on a device with segmentation offload.
	InjectOutbound(data []byte) error
}
