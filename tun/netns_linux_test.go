// netns_linux_test.go: throwaway network namespaces for the root-only tests,
// so that no test ever touches the host's interfaces or routes.

//go:build linux

package tun

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// testNS is a named network namespace with one OS thread living in it. Code
// that must run inside the namespace (creating the TUN, netlink handles,
// sockets, /proc/sys writes) is sent to that thread with run. Sockets and
// file descriptors keep their namespace, so using them from any goroutine
// afterwards is fine.
type testNS struct {
	name string
	fns  chan func()
	done chan struct{}
}

// newTestNS creates a namespace named uniquely for this run, with lo up, and
// deletes it in t.Cleanup. It skips the test when not root.
func newTestNS(t testing.TB) *testNS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a throwaway network namespace")
	}
	ns := &testNS{
		name: fmt.Sprintf("batontun-%08x", rand.Uint32()),
		fns:  make(chan func()),
		done: make(chan struct{}),
	}
	ready := make(chan error, 1)
	go func() {
		defer close(ns.done)
		// The thread's namespace is changed for good: it is never
		// unlocked, so when this goroutine returns the runtime destroys
		// the thread instead of reusing it for other goroutines.
		runtime.LockOSThread()
		h, err := netns.NewNamed(ns.name)
		if err != nil {
			ready <- err
			return
		}
		h.Close() // the bind mount and this thread keep the namespace alive
		ready <- nil
		for f := range ns.fns {
			f()
		}
	}()
	if err := <-ready; err != nil {
		t.Fatalf("create netns %s: %v", ns.name, err)
	}
	t.Cleanup(func() {
		close(ns.fns)
		<-ns.done
		if err := netns.DeleteNamed(ns.name); err != nil {
			t.Errorf("delete netns %s: %v", ns.name, err)
		}
	})
	ns.must(t, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.LinkSetUp(lo)
	})
	return ns
}

// run runs f on the namespace's thread and returns its error.
func (ns *testNS) run(f func() error) error {
	errc := make(chan error, 1)
	ns.fns <- func() { errc <- f() }
	return <-errc
}

// must is run that fails the test on error.
func (ns *testNS) must(t testing.TB, f func() error) {
	t.Helper()
	if err := ns.run(f); err != nil {
		t.Fatal(err)
	}
}

// sysctl writes a /proc/sys value of the namespace.
func (ns *testNS) sysctl(t testing.TB, path, value string) {
	t.Helper()
	ns.must(t, func() error { return os.WriteFile("/proc/sys/"+path, []byte(value), 0o644) })
}

// open opens a device inside the namespace and closes it in t.Cleanup.
func (ns *testNS) open(t testing.TB, cfg Config) Device {
	t.Helper()
	var dev Device
	ns.must(t, func() (err error) {
		dev, err = Open(cfg)
		return err
	})
	t.Cleanup(func() { dev.Close() })
	return dev
}

// addRoute routes prefix to the link named dev (scope link, main table).
func (ns *testNS) addRoute(t testing.TB, prefix, dev string) {
	t.Helper()
	ns.must(t, func() error {
		link, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		return netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(netip.MustParsePrefix(prefix)), Scope: netlink.SCOPE_LINK})
	})
}

// addAddr assigns addr (a prefix) to the link named dev.
func (ns *testNS) addAddr(t testing.TB, addr, dev string) {
	t.Helper()
	ns.must(t, func() error {
		link, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		a, err := netlink.ParseAddr(addr)
		if err != nil {
			return err
		}
		return netlink.AddrAdd(link, a)
	})
}

// listenUDP opens a UDP socket in the namespace.
func (ns *testNS) listenUDP(t testing.TB, addr string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	ns.must(t, func() error {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return err
		}
		c = pc.(*net.UDPConn)
		return nil
	})
	t.Cleanup(func() { c.Close() })
	return c
}

// udp4 builds an IPv4/UDP packet with correct checksums, split into header
// and payload slices as the stack would hand it to Write.
func udp4(src, dst netip.AddrPort, payload []byte) [][]byte {
	hdr := make([]byte, header.IPv4MinimumSize+header.UDPMinimumSize)
	total := len(hdr) + len(payload)
	ip := header.IPv4(hdr)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(total),
		TTL:         64,
		Protocol:    uint8(header.UDPProtocolNumber),
		SrcAddr:     tcpip.AddrFrom4(src.Addr().As4()),
		DstAddr:     tcpip.AddrFrom4(dst.Addr().As4()),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	u := header.UDP(hdr[header.IPv4MinimumSize:])
	ulen := uint16(header.UDPMinimumSize + len(payload))
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: ulen})
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), ulen)
	xsum = u.CalculateChecksum(checksum.Checksum(payload, xsum))
	u.SetChecksum(^xsum)
	return [][]byte{hdr, payload}
}

// udpTo reports whether pkt is an IPv4/UDP packet to dst and returns its
// source port and payload.
func udpTo(pkt []byte, dst netip.AddrPort) (srcPort uint16, payload []byte, ok bool) {
	if len(pkt) < header.IPv4MinimumSize+header.UDPMinimumSize || pkt[0]>>4 != 4 {
		return 0, nil, false
	}
	ip := header.IPv4(pkt)
	if ip.TransportProtocol() != header.UDPProtocolNumber || ip.DestinationAddress() != tcpip.AddrFrom4(dst.Addr().As4()) {
		return 0, nil, false
	}
	u := header.UDP(ip.Payload())
	if u.DestinationPort() != dst.Port() {
		return 0, nil, false
	}
	return u.SourcePort(), u.Payload(), true
}

// readUntil reads queue q until match accepts a packet (other traffic, such
// as the kernel's IPv6 router solicitations, is skipped) or the device is
// closed.
func readUntil(ctx context.Context, dev Device, q int, match func([]byte) bool) ([]byte, error) {
	buf := make([]byte, dev.MTU())
	if dev.GSO() {
		buf = make([]byte, MaxReadPacket) // receive offload
	}
	for ctx.Err() == nil {
		n, err := dev.Read(q, buf)
		if err != nil {
			return nil, err
		}
		if match(buf[:n]) {
			return buf[:n], nil
		}
	}
	return nil, ctx.Err()
}
