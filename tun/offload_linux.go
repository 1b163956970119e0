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
//   - TUNSETOFFLOAD 0. These flags say what the kernel may send TO us:
//     TUN_F_CSUM would let it hand us packets with partial checksums, and
//     TUN_F_TSO4/6 packets larger than the MTU. Offering none means every
//     packet Baton reads is complete, with a zero (or DATA_VALID) header:
//     the readers, the hook chain (the flow tracker verifies the checksum
//     of inbound SYN/FIN/RST segments) and gVisor's receive path stay as
//     they are. The flags do not restrict what we write: measured on
//     6.18, writes with gso_type TCPV4 and TCPV6, with or without
//     NEEDS_CSUM, are accepted and delivered with TUNSETOFFLOAD 0
//     (TestOffloadGSOWrite).
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
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, 0); err != nil {
		return fmt.Errorf("TUNSETOFFLOAD 0: %w", err)
	}
	return nil
}
