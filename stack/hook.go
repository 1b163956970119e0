package stack

import (
	"net/netip"

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
type Packet struct {
	Dir  Direction
	Data []byte
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
// Hooks run in the order they were added for both directions. Packets put on
// the path with an Injector skip the whole chain.
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
	// had sent it. It blocks like any other write to the device.
	InjectOutbound(data []byte) error
}
