// rxoffload.go: receive offload on an offload device (Config.Offload), what
// Read does with the virtio_net_hdr the kernel puts in front of every packet
// it hands Baton. Shared by the real device and the fake; no build tag.

package tun

import (
	"encoding/binary"
	"fmt"
)

// MaxReadPacket is the largest packet Read returns on an offload device (an
// IPv6 packet with a 65535-byte payload): the size of a read buffer that no
// packet of such a device can overflow. With receive offload the kernel
// hands the device TCP segments of up to 64 KiB (its gso_max_size) instead
// of cutting them to the MTU.
const MaxReadPacket = 40 + 65535

// finishRx turns a packet read from an offload device, with the header the
// kernel put in front of it, into a complete IP packet, in place. The
// device offers the kernel TUN_F_CSUM|TUN_F_TSO4|TUN_F_TSO6
// (offload_linux.go), so the header says one of:
//
//   - nothing (zero) or DATA_VALID: the packet is complete and at most the
//     MTU; nothing to do.
//   - NEEDS_CSUM: the transport checksum is partial. The field at
//     CsumStart+CsumOffset holds the pseudo-header sum (not complemented),
//     over the whole packet's length; the checksum is completed as the
//     kernel's skb_checksum_help does (the sum of the bytes from CsumStart
//     to the end, complemented into the field). The kernel trusts such a
//     packet (a local sender's, or one it coalesced after checking every
//     piece); so does Baton.
//   - GSO TCPv4/TCPv6 (always with NEEDS_CSUM in practice): the packet is
//     ONE TCP segment of up to 64 KiB, larger than the MTU, made by the
//     client's TSO or by GRO on the way, which the kernel would otherwise
//     have cut into segments of GSOSize payload bytes. Its IP header is
//     complete (total or payload length and IPv4 header checksum cover the
//     whole packet, as the kernel keeps them), so once the checksum is
//     complete it is an ordinary TCP segment that happens to be long, and
//     gVisor takes it as such (its own GRO, pkg/tcpip/stack/gro, hands its
//     TCP the same kind of segment). Without NEEDS_CSUM its TCP checksum is
//     computed from scratch.
//
// It returns whether the header had a GSO type, and an error (the packet is
// to be dropped) for a header the device did not ask for or that does not
// describe pkt.
func finishRx(h VirtioNetHdr, pkt []byte) (gso bool, err error) {
	if h.Flags&^(VirtioNetHdrFNeedsCsum|VirtioNetHdrFDataValid) != 0 {
		return false, fmt.Errorf("tun: read virtio_net_hdr flags %#x", h.Flags)
	}
	needsCsum := h.Flags&VirtioNetHdrFNeedsCsum != 0
	if needsCsum {
		// The checksum field must lie in the packet, past a minimal IP
		// header: completing it must not touch the IP header.
		start, off := int(h.CsumStart), int(h.CsumOffset)
		if start < 20 || start+off+2 > len(pkt) {
			return false, fmt.Errorf("tun: read virtio_net_hdr checksum at %d+%d in a %d-byte packet", start, off, len(pkt))
		}
	}
	switch h.GSOType {
	case VirtioNetHdrGSONone:
		if needsCsum {
			completeChecksum(pkt, int(h.CsumStart), int(h.CsumOffset))
		}
		return false, nil
	case VirtioNetHdrGSOTCPv4, VirtioNetHdrGSOTCPv6:
	default:
		return false, fmt.Errorf("tun: read virtio_net_hdr gso_type %#x", h.GSOType)
	}
	v6 := h.GSOType == VirtioNetHdrGSOTCPv6
	var l4 int
	switch {
	case len(pkt) == 0:
		return true, fmt.Errorf("tun: read an empty GSO packet")
	case !v6 && pkt[0]>>4 == 4:
		if len(pkt) < 20 {
			return true, fmt.Errorf("tun: read a GSO TCPv4 packet of %d bytes", len(pkt))
		}
		l4 = int(pkt[0]&0x0f) * 4
		switch {
		case l4 < 20:
			return true, fmt.Errorf("tun: read a GSO TCPv4 packet with IP header length %d", l4)
		case int(binary.BigEndian.Uint16(pkt[2:4])) != len(pkt):
			return true, fmt.Errorf("tun: read a GSO TCPv4 packet: total length %d, %d bytes read", binary.BigEndian.Uint16(pkt[2:4]), len(pkt))
		case pkt[9] != 6:
			return true, fmt.Errorf("tun: read a GSO TCPv4 packet of protocol %d", pkt[9])
		}
	case v6 && pkt[0]>>4 == 6:
		if len(pkt) < 40 {
			return true, fmt.Errorf("tun: read a GSO TCPv6 packet of %d bytes", len(pkt))
		}
		// A payload length of 0 (a jumbogram, BIG TCP) never comes: the
		// TUN's gso_max_size is 64 KiB.
		if pl := int(binary.BigEndian.Uint16(pkt[4:6])); pl+40 != len(pkt) {
			return true, fmt.Errorf("tun: read a GSO TCPv6 packet: payload length %d, %d bytes read", pl, len(pkt))
		}
		l4 = 40 // used only without NEEDS_CSUM, checked below
	default:
		return true, fmt.Errorf("tun: read gso_type %d on an IPv%d packet", h.GSOType, pkt[0]>>4)
	}
	if needsCsum {
		// With IPv6 extension headers CsumStart points past them; the
		// kernel found the TCP header, gVisor will walk to it again.
		if int(h.CsumStart) < l4 || h.CsumOffset != 16 || int(h.CsumStart)+20 > len(pkt) {
			return true, fmt.Errorf("tun: read a GSO packet with its checksum at %d+%d (IP header %d bytes)", h.CsumStart, h.CsumOffset, l4)
		}
		completeChecksum(pkt, int(h.CsumStart), int(h.CsumOffset))
		return true, nil
	}
	if v6 && pkt[6] != 6 {
		return true, fmt.Errorf("tun: read a GSO TCPv6 packet with next header %d and no checksum offset", pkt[6])
	}
	if len(pkt) < l4+20 {
		return true, fmt.Errorf("tun: read a GSO packet without a whole TCP header")
	}
	setTCPChecksum(pkt, l4, v6)
	return true, nil
}
