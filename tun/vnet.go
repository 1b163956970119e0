// vnet.go: the virtio_net_hdr that an offload device (Config.Offload) puts in
// front of every packet, and the checks a header must pass (shared by the
// fake, which plays the kernel, and by SegmentGSO). No build tag: the fake and
// the tests use it on every OS.

package tun

import (
	"encoding/binary"
	"fmt"
)

// VirtioNetHdr is struct virtio_net_hdr from linux/virtio_net.h, without the
// num_buffers field (TUNSETVNETHDRSZ 10). It tells the kernel how to finish a
// packet written with WriteGSO:
//
//   - Flags&VirtioNetHdrFNeedsCsum: the packet's transport checksum is
//     partial. The field at CsumStart+CsumOffset holds the pseudo-header sum
//     (not complemented); the kernel completes it over the bytes from
//     CsumStart to the end (per segment when it splits the packet), or never
//     computes it at all when the packet reaches a local socket through veths
//     (CHECKSUM_PARTIAL is trusted inside the host).
//   - GSOType VirtioNetHdrGSOTCPv4/TCPv6: the packet is one TCP segment whose
//     payload is larger than GSOSize; the kernel cuts it into segments of
//     GSOSize payload bytes each, if and when a device on the way needs that
//     (veth does not: it forwards the large packet whole). HdrLen is the
//     length of the IP and TCP headers.
//
// The zero value is a packet that needs nothing done.
type VirtioNetHdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16
	GSOSize    uint16
	CsumStart  uint16
	CsumOffset uint16
}

// VirtioNetHdrLen is the size of VirtioNetHdr on the wire.
const VirtioNetHdrLen = 10

// Values of VirtioNetHdr.Flags and GSOType (linux/virtio_net.h).
const (
	VirtioNetHdrFNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	VirtioNetHdrFDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID (kernel -> us only)

	VirtioNetHdrGSONone  = 0    // VIRTIO_NET_HDR_GSO_NONE
	VirtioNetHdrGSOTCPv4 = 1    // VIRTIO_NET_HDR_GSO_TCPV4
	VirtioNetHdrGSOTCPv6 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	VirtioNetHdrGSOECN   = 0x80 // VIRTIO_NET_HDR_GSO_ECN (not used by Baton)
)

// MaxGSOPacket is the largest packet WriteGSO takes when the header asks for
// segmentation (an IPv4 packet cannot be larger; gVisor's TCP keeps its GSO
// segments below it for IPv6 too).
const MaxGSOPacket = 65535

// encode writes h in little-endian byte order, which the kernel uses for the
// header because the device is switched to little-endian headers
// (TUNSETVNETLE) whatever the host's byte order.
func (h *VirtioNetHdr) encode(b *[VirtioNetHdrLen]byte) {
	b[0], b[1] = h.Flags, h.GSOType
	binary.LittleEndian.PutUint16(b[2:], h.HdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.GSOSize)
	binary.LittleEndian.PutUint16(b[6:], h.CsumStart)
	binary.LittleEndian.PutUint16(b[8:], h.CsumOffset)
}

// decodeVirtioNetHdr reads a header encoded by encode (or the kernel).
func decodeVirtioNetHdr(b []byte) VirtioNetHdr {
	return VirtioNetHdr{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     binary.LittleEndian.Uint16(b[2:]),
		GSOSize:    binary.LittleEndian.Uint16(b[4:]),
		CsumStart:  binary.LittleEndian.Uint16(b[6:]),
		CsumOffset: binary.LittleEndian.Uint16(b[8:]),
	}
}

// gso reports whether h asks for segmentation.
func (h *VirtioNetHdr) gso() bool { return h.GSOType != VirtioNetHdrGSONone }

// tcpGSOLayout is where the headers of a TCP packet with a GSO header are.
type tcpGSOLayout struct {
	v6       bool
	l4       int // offset of the TCP header (= IP header length)
	payload  int // offset of the TCP payload
	segments int // number of packets the kernel makes of it (1: no split)
}

// checkVirtioNetHdr checks h against the packet it goes with, as strictly as
// the kernel and a little more (the kernel trusts CsumStart for a packet
// that it does not split; a wrong one is a Baton bug worth a test failure).
// mtu bounds every packet that reaches the wire.
func checkVirtioNetHdr(h VirtioNetHdr, pkt []byte, mtu int) (tcpGSOLayout, error) {
	var lay tcpGSOLayout
	if h.Flags&^VirtioNetHdrFNeedsCsum != 0 {
		return lay, fmt.Errorf("tun: virtio_net_hdr flags %#x: only NEEDS_CSUM may be written", h.Flags)
	}
	needsCsum := h.Flags&VirtioNetHdrFNeedsCsum != 0
	if needsCsum && int(h.CsumStart)+int(h.CsumOffset)+2 > len(pkt) {
		return lay, fmt.Errorf("tun: virtio_net_hdr checksum at %d+%d outside the %d-byte packet", h.CsumStart, h.CsumOffset, len(pkt))
	}
	if !h.gso() {
		if len(pkt) > mtu {
			return lay, fmt.Errorf("%w: %d bytes without GSO (MTU %d)", ErrPacketSize, len(pkt), mtu)
		}
		lay.segments = 1
		return lay, nil
	}
	switch h.GSOType {
	case VirtioNetHdrGSOTCPv4, VirtioNetHdrGSOTCPv6:
	default:
		return lay, fmt.Errorf("tun: virtio_net_hdr gso_type %#x not supported", h.GSOType)
	}
	lay.v6 = h.GSOType == VirtioNetHdrGSOTCPv6
	if len(pkt) > MaxGSOPacket {
		return lay, fmt.Errorf("%w: %d-byte GSO packet (at most %d)", ErrPacketSize, len(pkt), MaxGSOPacket)
	}
	if h.GSOSize == 0 {
		return lay, fmt.Errorf("tun: virtio_net_hdr gso_size 0")
	}
	if len(pkt) == 0 {
		return lay, ErrPacketSize
	}
	switch v := pkt[0] >> 4; {
	case v == 4 && !lay.v6:
		if len(pkt) < 20 {
			return lay, fmt.Errorf("tun: GSO TCPv4 packet of %d bytes", len(pkt))
		}
		lay.l4 = int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:4]))
		switch {
		case lay.l4 < 20 || lay.l4 > len(pkt):
			return lay, fmt.Errorf("tun: GSO TCPv4 packet with IP header length %d", lay.l4)
		case total != len(pkt):
			return lay, fmt.Errorf("tun: GSO TCPv4 packet: total length %d, %d bytes written", total, len(pkt))
		case pkt[9] != 6:
			return lay, fmt.Errorf("tun: GSO TCPv4 packet of protocol %d", pkt[9])
		case pkt[6]&0x3f != 0 || pkt[7] != 0:
			return lay, fmt.Errorf("tun: GSO TCPv4 packet is a fragment")
		}
	case v == 6 && lay.v6:
		if len(pkt) < 40 {
			return lay, fmt.Errorf("tun: GSO TCPv6 packet of %d bytes", len(pkt))
		}
		lay.l4 = 40
		if pl := int(binary.BigEndian.Uint16(pkt[4:6])); pl+40 != len(pkt) {
			return lay, fmt.Errorf("tun: GSO TCPv6 packet: payload length %d, %d bytes written", pl, len(pkt))
		}
		if pkt[6] != 6 {
			// The kernel walks extension headers; gVisor's TCP sends
			// none, so the fake does not either.
			return lay, fmt.Errorf("tun: GSO TCPv6 packet with next header %d (extension headers are not supported)", pkt[6])
		}
	default:
		return lay, fmt.Errorf("tun: gso_type %d on an IPv%d packet", h.GSOType, pkt[0]>>4)
	}
	if len(pkt) < lay.l4+20 {
		return lay, fmt.Errorf("tun: GSO packet without a whole TCP header")
	}
	thl := int(pkt[lay.l4+12]>>4) * 4
	lay.payload = lay.l4 + thl
	switch {
	case thl < 20 || lay.payload > len(pkt):
		return lay, fmt.Errorf("tun: GSO packet with TCP header length %d", thl)
	case needsCsum && (int(h.CsumStart) != lay.l4 || h.CsumOffset != 16):
		return lay, fmt.Errorf("tun: GSO packet: checksum at %d+%d, TCP header at %d", h.CsumStart, h.CsumOffset, lay.l4)
	case int(h.HdrLen) > len(pkt):
		return lay, fmt.Errorf("tun: GSO packet: hdr_len %d beyond the %d-byte packet", h.HdrLen, len(pkt))
	case lay.payload+int(h.GSOSize) > mtu:
		return lay, fmt.Errorf("%w: %d-byte segments (headers %d + gso_size %d) exceed the MTU %d",
			ErrPacketSize, lay.payload+int(h.GSOSize), lay.payload, h.GSOSize, mtu)
	}
	n := len(pkt) - lay.payload
	lay.segments = max(1, (n+int(h.GSOSize)-1)/int(h.GSOSize))
	return lay, nil
}
