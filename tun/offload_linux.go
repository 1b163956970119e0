// offload_linux.go: opening the offload device (Config.Offload), a TUN with a
// virtio_net_hdr in front of every packet, without water.

//go:build linux

package tun

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Why the offload device departs from water (the default opener):
//
// The single-flow profile of the default device is dominated by one write(2)
// per 1500-byte packet, each of which also runs the kernel's forwarding path.
// The kernel's own TCP sends 64 KiB segments through the veths and has them
// cut late or never (segmentation offload, GSO). A TUN can take such
// segments only when it is opened with IFF_VNET_HDR: every packet then
// carries a struct virtio_net_hdr saying how to checksum and cut it. water
// cannot ask for that: its TUNSETIFF flags are fixed (IFF_TUN|IFF_NO_PI, plus
// IFF_MULTI_QUEUE), and a second TUNSETIFF on the descriptor fails with
// EINVAL. So this file opens /dev/net/tun itself, the way water does
// (O_NONBLOCK and os.NewFile, so the Go poller parks blocked calls and Close
// wakes them), plus O_CLOEXEC from the start, which water cannot do either.
//
// The ioctls, and why each value:
//
//   - TUNSETIFF IFF_TUN|IFF_NO_PI|IFF_VNET_HDR (|IFF_MULTI_QUEUE with more
//     than one queue; every queue must be opened with the same flags).
//   - TUNSETVNETHDRSZ 10: struct virtio_net_hdr without num_buffers (the
//     kernel's default; set so the layout never depends on it).
//   - TUNSETVNETLE 1: the header's 16-bit fields are little-endian on every
//     host (legacy virtio would use the host's byte order).
//   - TUNSETOFFLOAD TUN_F_CSUM|TUN_F_TSO4|TUN_F_TSO6. These flags say what
//     the kernel may send TO us (they do not restrict what we write:
//     writes with gso_type TCPV4 and TCPV6, with or without NEEDS_CSUM,
//     are accepted whatever they say, TestOffloadGSOWrite). With them the
//     TUN device has checksum offload and TSO, so a TCP segment the kernel
//     forwards into it whole (the client's own 64 KiB TSO segment, which
//     veths and forwarding keep whole, or what GRO coalesced on the way)
//     reaches us as one read of up to 64 KiB with NEEDS_CSUM and
//     gso_type TCPV4/6, instead of ~45 reads of 1500 bytes: the upload
//     profile (docs/bench/profiles/upload-offload.txt) was one read(2), one
//     pass through gVisor and ~one ACK per 1500-byte packet. Read
//     completes the partial checksum and hands the segment on whole
//     (finishRx, rxoffload.go), so the hooks and gVisor see ordinary,
//     complete packets, some longer than the MTU. Not offered: TUN_F_TSO_ECN
//     (a segment with CWR set is cut by the kernel first, as before),
//     TUN_F_UFO/USO (UDP is not Baton's bulk traffic).
//     TUNSETOFFLOAD 0 (what this device did before) made the kernel cut
//     and checksum every packet first: every read a complete packet of at
//     most the MTU.
//
// The device keeps the default device's existence check, ErrInUse and
// netlink set-up (tun_linux.go's open); only opening a queue differs.
func openVnetQueue(name string, multiQueue bool) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	if err := setupVnetQueue(fd, name, multiQueue); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// os.NewFile sees O_NONBLOCK and registers the descriptor with the
	// poller (as it does for water's).
	f := os.NewFile(uintptr(fd), "/dev/net/tun")
	if f == nil {
		unix.Close(fd)
		return nil, fmt.Errorf("os.NewFile(%d) failed", fd)
	}
	return f, nil
}

func setupVnetQueue(fd int, name string, multiQueue bool) error {
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("interface name %q: %w", name, err)
	}
	flags := uint16(unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if multiQueue {
		flags |= unix.IFF_MULTI_QUEUE
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("TUNSETIFF: %w", err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, VirtioNetHdrLen); err != nil {
		return fmt.Errorf("TUNSETVNETHDRSZ %d: %w", VirtioNetHdrLen, err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETLE, 1); err != nil {
		return fmt.Errorf("TUNSETVNETLE: %w", err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, rxOffloads); err != nil {
		return fmt.Errorf("TUNSETOFFLOAD %#x: %w", rxOffloads, err)
	}
	return nil
}

// rxOffloads is what the offload device lets the kernel hand it (see
// TUNSETOFFLOAD above).
const rxOffloads = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6
