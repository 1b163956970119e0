// Package tun is Baton's door to the kernel: the TUN device that carries the
// anycast traffic between the host's routing table and Baton's userspace
// stack, plus the netlink plumbing that brings the device up and routes the
// anycast prefixes into it.
//
// The package knows nothing about flows or gVisor, and about TCP only what
// the kernel does with a virtio header (segment.go). It moves whole IP
// packets (no packet-information header) in both directions and reports
// honestly what it could not move. It must not parse, rewrite or buffer
// packets: that belongs to the stack and handoff layers above it.
//
// Two kinds of device: the default one, opened with water, carries bare IP
// packets; with Config.Offload the device is opened with IFF_VNET_HDR
// (offload_linux.go explains why that one is not opened with water) and
// WriteGSO can hand the kernel a TCP segment of up to 64 KiB with a partial
// checksum, which the kernel forwards whole (segmentation offload, GSO)
// instead of Baton writing one packet per 1500 bytes; on the way in the
// kernel likewise hands it large TCP segments (receive offload). The virtio
// header is the device's business: Read still returns bare, complete IP
// packets, some of them larger than the MTU (rxoffload.go).
//
// The OS details live in tun_linux.go (water + netlink) and offload_linux.go;
// vnet.go and segment.go hold the virtio_net_hdr and what the kernel does
// with it; fake.go holds an in-memory Device for tests.
package tun

import (
	"errors"
	"net/netip"
)

// Device is one open TUN interface. A device may have several queues
// (IFF_MULTI_QUEUE): the kernel spreads received flows over them by flow hash,
// so each queue can be read by its own goroutine without reordering a flow.
//
// Read and Write block: a full kernel queue makes Write wait, which gives the
// stack above natural backpressure instead of a silent drop.
type Device interface {
	// Name is the kernel interface name, e.g. "any0".
	Name() string

	// MTU is the device MTU in bytes: the largest IP packet Write accepts,
	// and Read returns on a device without GSO (an offload device's Read
	// returns TCP segments of up to MaxReadPacket bytes: see Read).
	MTU() int

	// Queues is the number of queues; valid queue indexes are 0..Queues()-1.
	Queues() int

	// Read reads one IP packet from queue q into buf and returns its length.
	// buf should be at least MTU() bytes (MaxReadPacket bytes on a device
	// with GSO); a larger packet is truncated and reported as ErrTruncated.
	// Read blocks until a packet arrives or the device is closed (then it
	// returns ErrClosed).
	//
	// The packet is complete (every checksum computed) on every device. On
	// a device with GSO (receive offload) it may be one TCP segment larger
	// than the MTU, of up to 64 KiB: what the sender's TSO or GRO on the
	// way made of several segments, which the kernel hands the device
	// whole instead of cutting it to the MTU. Its IP header and TCP
	// checksum describe the whole segment.
	Read(q int, buf []byte) (int, error)

	// Write writes one IP packet, given as a list of slices that are sent as
	// one packet (writev), on queue q. It blocks while the kernel cannot
	// take the packet. It returns ErrClosed after Close.
	Write(q int, pkt [][]byte) error

	// GSO reports whether the device takes segmentation offload through
	// WriteGSO (an offload device: Config.Offload). It never changes.
	GSO() bool

	// WriteGSO is Write with a virtio_net_hdr that tells the kernel how to
	// finish the packet (see VirtioNetHdr): complete a partial TCP checksum
	// (NEEDS_CSUM) and, with a GSO type, treat pkt as one TCP segment of up
	// to MaxGSOPacket bytes to be cut into segments of GSOSize payload bytes
	// when a device on the way needs it. Without a GSO type pkt must fit the
	// MTU. It counts as one packet (of len(pkt) bytes) whatever the kernel
	// makes of it.
	//
	// A device without GSO takes only the zero header (WriteGSO is then
	// Write) and refuses any other with ErrNoGSO. A header the kernel
	// refuses is a failed write (TxErrors), like any other.
	WriteGSO(q int, hdr VirtioNetHdr, pkt [][]byte) error

	// Stats returns the device's counters, including the kernel's own drop
	// counters for the interface.
	Stats() Stats

	// Close closes every queue; blocked Reads and Writes return ErrClosed.
	// Close does not remove routes (see Routes.Remove).
	Close() error
}

// Stats counts what crossed the device and what was lost at it. Userspace
// counters are exact; Kernel* counters come from the kernel's link
// statistics (zero for fake devices).
type Stats struct {
	RxPackets, RxBytes uint64 // read from the device by Baton
	TxPackets, TxBytes uint64 // written to the device by Baton
	RxErrors           uint64 // failed reads, truncated packets included
	// RxGSO counts the packets of RxPackets that an offload device read
	// as one large TCP segment (receive offload: the kernel did not cut
	// them to the MTU).
	RxGSO    uint64
	TxErrors uint64 // failed writes (packet lost)

	// KernelTxDropped counts packets the kernel routed into the device but
	// dropped because Baton did not read them in time (queue overflow).
	KernelTxDropped uint64
	// KernelRxDropped counts packets Baton wrote that the kernel dropped.
	KernelRxDropped uint64
}

// Config describes the device to open.
type Config struct {
	// Name of the interface to create. It must not exist yet: an existing
	// interface of that name means another process owns it.
	Name string
	// MTU of the interface, 576..65535 (1280 or more when IPv6 is routed).
	MTU int
	// Queues is the number of queues to open (1 disables IFF_MULTI_QUEUE).
	Queues int
	// TxQueueLen is the kernel transmit queue length (packets waiting for
	// Baton to read them); 0 keeps the kernel default.
	TxQueueLen int
	// Offload opens the device with a virtio_net_hdr (IFF_VNET_HDR) so that
	// WriteGSO can pass large TCP segments and partial checksums to the
	// kernel (GSO() is true), and the kernel is offered checksum and TCP
	// segmentation offload on the way in, so Read may return TCP segments
	// larger than the MTU (complete, checksums computed: see Device.Read).
	// Off by default: the default device is opened with water.
	Offload bool
}

// Errors returned by devices.
var (
	ErrClosed    = errors.New("tun: device closed")
	ErrTruncated = errors.New("tun: packet larger than the read buffer")
	ErrInUse     = errors.New("tun: interface already exists (in use by another process?)")
	// ErrPacketSize is returned by Write for an empty packet or one larger
	// than the MTU; nothing is sent and TxErrors counts it.
	ErrPacketSize = errors.New("tun: packet empty or larger than the MTU")
	// ErrNoGSO is returned by WriteGSO on a device without GSO for a
	// non-zero header; nothing is sent and TxErrors counts it.
	ErrNoGSO = errors.New("tun: device has no segmentation offload (open it with Offload)")
)

// Route is an anycast prefix routed into the device.
type Route = netip.Prefix
