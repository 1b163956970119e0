package handoff

// This file builds the packets of the synthetic handshake and the resets
// the takeover sends, and reads the stack's SYN-ACK. Pure functions, no
// state: takeover_restore.go decides what to send and when.
//
// The synthetic handshake (the proven technique of the feasibility study):
//
//   - SYN, client -> anycast, injected into the stack below the hooks. Its
//     sequence number is the client's ISN chosen so that the new stack
//     expects, as its first client byte, the first byte the old owner had
//     not acknowledged (pitfall 8: the client resends whatever was sent but
//     not acknowledged): client_isn + server_acked_bytes, i.e. "the old
//     server's last ack - 1". Its options are the client's original ones,
//     restricted to what was negotiated: MSS; window scale only if scaling
//     was on (else the stack would scale windows the client does not);
//     SACK-permitted only if SACK was on; a timestamp option only if
//     timestamps were on, with the client's latest TSval.
//   - The stack's SYN-ACK is captured and consumed by the interception
//     hook (it must never reach the client): its ISS, window scale and
//     TSval fix the translation (parseSynAck).
//   - The completing ACK, injected like the SYN, with a timestamp option
//     when timestamps are on (gVisor drops an ACK without one on a
//     connection that negotiated timestamps).

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// tcpPacket describes a TCP segment to build.
type tcpPacket struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    header.TCPFlags
	window   uint16
	opts     []byte // padded to a multiple of 4 by build
	payload  []byte
}

// build returns the IP packet with valid IP and TCP checksums. src and dst
// must be of the same family.
func (p *tcpPacket) build() []byte {
	var ob [header.TCPOptionsMaximumSize]byte
	n := copy(ob[:], p.opts)
	n += header.AddTCPOptionPadding(ob[:], n)
	opts := ob[:n]
	tcpLen := header.TCPMinimumSize + len(opts) + len(p.payload)
	src := tcpip.AddrFromSlice(p.src.Addr().AsSlice())
	dst := tcpip.AddrFromSlice(p.dst.Addr().AsSlice())
	var pkt []byte
	var ipLen int
	if p.src.Addr().Is4() {
		ipLen = header.IPv4MinimumSize
		pkt = make([]byte, ipLen+tcpLen)
		ip := header.IPv4(pkt)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(pkt)),
			TTL:         64,
			Protocol:    uint8(header.TCPProtocolNumber),
			SrcAddr:     src,
			DstAddr:     dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
	} else {
		ipLen = header.IPv6MinimumSize
		pkt = make([]byte, ipLen+tcpLen)
		header.IPv6(pkt).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(tcpLen),
			TransportProtocol: header.TCPProtocolNumber,
			HopLimit:          64,
			SrcAddr:           src,
			DstAddr:           dst,
		})
	}
	tcp := header.TCP(pkt[ipLen:])
	tcp.Encode(&header.TCPFields{
		SrcPort:    p.src.Port(),
		DstPort:    p.dst.Port(),
		SeqNum:     p.seq,
		AckNum:     p.ack,
		DataOffset: uint8(header.TCPMinimumSize + len(opts)),
		Flags:      p.flags,
		WindowSize: p.window,
	})
	copy(tcp[header.TCPMinimumSize:], opts)
	copy(tcp[header.TCPMinimumSize+len(opts):], p.payload)
	sum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(tcpLen))
	tcp.SetChecksum(^checksum.Checksum(tcp, sum))
	return pkt
}

// synSpec is what the synthetic SYN carries.
type synSpec struct {
	client, anycast netip.AddrPort
	seq             uint32 // the client's ISN for the new stack
	mss             uint16
	ws              int  // window scale; < 0: no option
	sackPermitted   bool // SACK-permitted option
	ts              bool // timestamp option
	tsval           uint32
	window          uint16
}

// buildSYN returns the synthetic SYN (see the file comment).
func buildSYN(s synSpec) []byte {
	var b [header.TCPOptionsMaximumSize]byte
	n := 0
	if s.mss != 0 {
		n += header.EncodeMSSOption(uint32(s.mss), b[n:])
	}
	if s.sackPermitted {
		n += header.EncodeNOP(b[n:])
		n += header.EncodeNOP(b[n:])
		n += header.EncodeSACKPermittedOption(b[n:])
	}
	if s.ts {
		n += header.EncodeNOP(b[n:])
		n += header.EncodeNOP(b[n:])
		n += header.EncodeTSOption(s.tsval, 0, b[n:])
	}
	if s.ws >= 0 {
		n += header.EncodeNOP(b[n:])
		n += header.EncodeWSOption(s.ws, b[n:])
	}
	p := tcpPacket{src: s.client, dst: s.anycast, seq: s.seq, flags: header.TCPFlagSyn, window: s.window, opts: b[:n]}
	return p.build()
}

// tsOption returns NOP NOP TS(tsval, tsecr).
func tsOption(tsval, tsecr uint32) []byte {
	b := make([]byte, 12)
	header.EncodeNOP(b)
	header.EncodeNOP(b[1:])
	header.EncodeTSOption(tsval, tsecr, b[2:])
	return b
}

// buildClientSegment returns a client -> anycast segment (the completing
// ACK, or a FIN the old owner had acknowledged) with a timestamp option
// when ts.
func buildClientSegment(client, anycast netip.AddrPort, seq, ack uint32, flags header.TCPFlags, window uint16, ts bool, tsval, tsecr uint32) []byte {
	p := tcpPacket{src: client, dst: anycast, seq: seq, ack: ack, flags: flags, window: window}
	if ts {
		p.opts = tsOption(tsval, tsecr)
	}
	return p.build()
}

// buildRST returns a reset from anycast to client. With ackOf set (the
// reset answers a client segment that carried an ACK), the reset takes its
// sequence number from that ack and carries no ACK (RFC 9293 3.10.7.1), so
// it is exactly what the client expects next and is accepted at once.
// Otherwise it is RST|ACK at seq, acknowledging ack.
func buildRST(anycast, client netip.AddrPort, seq, ack uint32, ackOf bool) []byte {
	p := tcpPacket{src: anycast, dst: client, seq: seq, flags: header.TCPFlagRst}
	if !ackOf {
		p.flags |= header.TCPFlagAck
		p.ack = ack
	}
	return p.build()
}

// synAck is what the interception hook read from the stack's SYN-ACK.
type synAck struct {
	iss  uint32
	ack  uint32
	opts header.TCPSynOptions
	rst  bool // the stack answered the SYN with a reset instead
}

// parseSynAck reads a SYN-ACK (or a RST answering the synthetic SYN).
func parseSynAck(pkt []byte) (synAck, bool) {
	loc, ok := locateTCP(pkt)
	if !ok {
		return synAck{}, false
	}
	tcp := header.TCP(pkt[loc.off : loc.off+loc.hlen])
	f := tcp.Flags()
	switch {
	case f&header.TCPFlagRst != 0:
		return synAck{rst: true, ack: tcp.AckNumber()}, true
	case f&(header.TCPFlagSyn|header.TCPFlagAck) == header.TCPFlagSyn|header.TCPFlagAck:
		return synAck{
			iss:  tcp.SequenceNumber(),
			ack:  tcp.AckNumber(),
			opts: header.ParseSynOptions(tcp.Options(), true),
		}, true
	}
	return synAck{}, false
}
