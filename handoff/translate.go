package handoff

// This file is the per-packet translation of a restored flow: pure
// functions on whole IP packets, rewritten in place (every change keeps the
// packet's length). A restored flow lives in two sequence spaces: the
// client's (the ISNs and timestamps the client agreed on with the node
// that opened the connection) and the new stack's (the ISS and timestamp
// clock its synthetic handshake chose). The interception hook, innermost
// in the chain, translates between them, so every other hook and the
// client see the client's space and the stack sees its own:
//
//	server -> client: seq += SeqDelta, TSval += TSDelta, window rescaled
//	client -> server: ack -= SeqDelta, SACK blocks -= SeqDelta,
//	                  TSecr -= TSDelta, window rescaled
//
// Client sequence numbers and TSvals need no translation: the synthetic SYN
// carries the client's own ISN and TSval (synth.go).
//
// Two clamps apply to client packets only (InboundClamp), both outside the
// bijection the fuzz tests check:
//
//   - Pitfall 2: the client may acknowledge output it got from the old
//     owner beyond what the new stack has sent. gVisor drops an ACK of
//     unsent data ("acks unsent data") and the flow stalls, so such an ack
//     is lowered to the highest sequence number the new stack has sent; the
//     bytes the stack then resends are duplicates the client discards.
//   - Pitfall 5 (timestamps): a client TSecr echoing a TSval of the old
//     owner means nothing to the new stack's clock (it would feed gVisor a
//     bogus RTT sample of about a second, inflating its RTO), so it is
//     replaced by 0, which gVisor ignores. The old owner's TSvals are all
//     below the first one the new stack sent (translated), which is the
//     floor.
//
// Checksums. A translated packet's TCP checksum is updated incrementally
// (RFC 1624) from the header words that changed, never recomputed from the
// payload: a packet that arrived corrupted stays invalid, and the stack
// drops it as it would have. The IP header does not change. An outbound
// segment with a partial checksum (Packet.GSO.PartialChecksum) holds the
// pseudo-header sum, which none of these rewrites touch: it is left alone.

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Translator holds one restored flow's translation parameters. It is
// immutable once the flow is active.
type Translator struct {
	// SeqDelta: a server sequence number in the client's space is the
	// stack's plus SeqDelta (mod 2^32).
	SeqDelta uint32
	// TS: timestamps are on for the flow; TSDelta: a server TSval in the
	// client's space is the stack's plus TSDelta.
	TS      bool
	TSDelta uint32
	// Window shifts. A server window field w reaches the client as
	// (w << OutStack) >> OutClient (the stack's scale, the scale the
	// client applies to the server's windows); a client window field as
	// (w << InClient) >> InStack. Equal shifts leave windows alone. The
	// result is capped at 65535 and a non-zero window never becomes 0.
	OutStack, OutClient uint8
	InClient, InStack   uint8
}

// InboundClamp are the clamps on client packets (see the file comment).
type InboundClamp struct {
	// AckCap (stack space) when CapAck: the highest ack the stack may see.
	AckCap uint32
	CapAck bool
	// TSecrFloor (client space) when HaveFloor: echoes of TSvals before it
	// are replaced by 0. Without a floor (the stack sent nothing yet),
	// every echo is an old owner's and is replaced by 0.
	TSecrFloor uint32
	HaveFloor  bool
}

// tcpLocation is where the TCP header of an IP packet is.
type tcpLocation struct {
	off, hlen int // header offset in the packet and length (with options)
}

// locateTCP finds the TCP header of a whole, unfragmented IPv4 or IPv6 TCP
// packet. ok is false for anything else (which is left untranslated).
func locateTCP(pkt []byte) (loc tcpLocation, ok bool) {
	if len(pkt) == 0 {
		return loc, false
	}
	var off, end int
	switch pkt[0] >> 4 {
	case header.IPv4Version:
		if len(pkt) < header.IPv4MinimumSize {
			return loc, false
		}
		ip := header.IPv4(pkt)
		ihl := int(ip.HeaderLength())
		tl := int(ip.TotalLength())
		if ip.Protocol() != uint8(header.TCPProtocolNumber) || ihl < header.IPv4MinimumSize || tl < ihl || tl > len(pkt) {
			return loc, false
		}
		if ip.More() || ip.FragmentOffset() != 0 {
			return loc, false
		}
		off, end = ihl, tl
	case header.IPv6Version:
		if len(pkt) < header.IPv6MinimumSize {
			return loc, false
		}
		ip := header.IPv6(pkt)
		end = header.IPv6MinimumSize + int(ip.PayloadLength())
		if end > len(pkt) {
			return loc, false
		}
		proto, l4, frag, fine := ipv6TCPPayload(ip.NextHeader(), pkt[header.IPv6MinimumSize:end])
		if !fine || frag || proto != uint8(header.TCPProtocolNumber) {
			return loc, false
		}
		off = end - len(l4)
	default:
		return loc, false
	}
	if end-off < header.TCPMinimumSize {
		return loc, false
	}
	hl := int(header.TCP(pkt[off:end]).DataOffset())
	if hl < header.TCPMinimumSize || off+hl > end {
		return loc, false
	}
	return tcpLocation{off: off, hlen: hl}, true
}

// tcpOption is an option's position inside the options bytes.
type tcpOption struct {
	ts, sack, sackLen int // offsets of the TS and SACK options (-1: none)
}

// findOptions locates the timestamp and SACK options. A malformed option
// list ends the walk (what follows stays untranslated, as the stack would
// not parse it either).
func findOptions(opts []byte) tcpOption {
	o := tcpOption{ts: -1, sack: -1}
	for i := 0; i < len(opts); {
		switch opts[i] {
		case header.TCPOptionEOL:
			return o
		case header.TCPOptionNOP:
			i++
			continue
		}
		if i+1 >= len(opts) {
			return o
		}
		l := int(opts[i+1])
		if l < 2 || i+l > len(opts) {
			return o
		}
		switch {
		case opts[i] == header.TCPOptionTS && l == header.TCPOptionTSLength && o.ts < 0:
			o.ts = i
		case opts[i] == header.TCPOptionSACK && l >= 10 && (l-2)%8 == 0 && o.sack < 0:
			o.sack, o.sackLen = i, l
		}
		i += l
	}
	return o
}

func add32(b []byte, d uint32) {
	binary.BigEndian.PutUint32(b, binary.BigEndian.Uint32(b)+d)
}

// rescaleWindow returns (w << from) >> to, rounded up, capped at 65535.
func rescaleWindow(w uint16, from, to uint8) uint16 {
	if from == to || w == 0 {
		return w
	}
	v := (uint64(w)<<from + (uint64(1)<<to - 1)) >> to
	return uint16(min(v, 65535))
}

// fixChecksum updates the TCP checksum of hdr after rewriting header words
// other than the checksum: before is the sum of the header bytes before.
func fixChecksum(hdr []byte, before uint16) {
	after := checksum.Checksum(hdr, 0)
	if after == before {
		return
	}
	tcp := header.TCP(hdr)
	s := checksum.Combine(^tcp.Checksum(), after)
	s = checksum.Combine(s, ^before)
	tcp.SetChecksum(^s)
}

// Outbound translates a packet the stack sent (server -> client) into the
// client's space. partial is the packet's GSO.PartialChecksum. It returns
// false, changing nothing, for a packet that is not whole unfragmented TCP.
func (t *Translator) Outbound(pkt []byte, partial bool) bool {
	loc, ok := locateTCP(pkt)
	if !ok {
		return false
	}
	hdr := pkt[loc.off : loc.off+loc.hlen]
	var before uint16
	if !partial {
		before = checksum.Checksum(hdr, 0)
	}
	tcp := header.TCP(hdr)
	add32(hdr[4:8], t.SeqDelta)
	if t.OutStack != t.OutClient && tcp.Flags()&header.TCPFlagSyn == 0 {
		tcp.SetWindowSize(rescaleWindow(tcp.WindowSize(), t.OutStack, t.OutClient))
	}
	if t.TS {
		opts := hdr[header.TCPMinimumSize:]
		if o := findOptions(opts); o.ts >= 0 {
			add32(opts[o.ts+2:o.ts+6], t.TSDelta)
		}
	}
	if !partial {
		fixChecksum(hdr, before)
	}
	return true
}

// Inbound translates a client packet (client -> server) into the stack's
// space, applying c's clamps (nil: none). It returns false, changing
// nothing, for a packet that is not whole unfragmented TCP.
func (t *Translator) Inbound(pkt []byte, c *InboundClamp) bool {
	loc, ok := locateTCP(pkt)
	if !ok {
		return false
	}
	hdr := pkt[loc.off : loc.off+loc.hlen]
	before := checksum.Checksum(hdr, 0)
	tcp := header.TCP(hdr)
	if tcp.Flags()&header.TCPFlagAck != 0 {
		ack := tcp.AckNumber() - t.SeqDelta
		if c != nil && c.CapAck && tcpSeqAfter(ack, c.AckCap) {
			ack = c.AckCap
		}
		tcp.SetAckNumber(ack)
	}
	if t.InClient != t.InStack && tcp.Flags()&header.TCPFlagSyn == 0 {
		tcp.SetWindowSize(rescaleWindow(tcp.WindowSize(), t.InClient, t.InStack))
	}
	opts := hdr[header.TCPMinimumSize:]
	o := findOptions(opts)
	if o.sack >= 0 {
		for i := o.sack + 2; i+4 <= o.sack+o.sackLen; i += 4 {
			add32(opts[i:i+4], -t.SeqDelta)
		}
	}
	if t.TS && o.ts >= 0 {
		ecr := opts[o.ts+6 : o.ts+10]
		v := binary.BigEndian.Uint32(ecr)
		switch {
		case c == nil:
			binary.BigEndian.PutUint32(ecr, v-t.TSDelta)
		case v == 0:
			// No echo stays no echo.
		case !c.HaveFloor || tcpSeqAfter(c.TSecrFloor, v):
			binary.BigEndian.PutUint32(ecr, 0)
		default:
			binary.BigEndian.PutUint32(ecr, v-t.TSDelta)
		}
	}
	fixChecksum(hdr, before)
	return true
}
