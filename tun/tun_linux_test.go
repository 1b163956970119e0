// tun_linux_test.go: the real TUN device, each test in its own throwaway
// network namespace (root only; skipped otherwise).

//go:build linux

package tun

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

var (
	anycast   = netip.MustParseAddrPort("192.0.2.1:9")       // routed into the TUN
	localAddr = netip.MustParseAddr("198.51.100.1")          // on lo in the namespace
	remote    = netip.MustParseAddrPort("198.51.100.9:1000") // for the forwarding loop
)

// hangGuard bounds waits for packets that should arrive at once. It is not
// a performance threshold: reaching it means the packet is lost.
const hangGuard = 30 * time.Second

// udpNS is a namespace with a TUN named cfg.Name, 198.51.100.1/32 on lo, the
// anycast address 192.0.2.1/32 routed into the TUN and rp_filter off. IPv6
// is disabled on the TUN: otherwise the kernel gives it a link-local address
// and sends router solicitations into it, which tests would have to skip.
func udpNS(t *testing.T, cfg Config) (*testNS, Device) {
	t.Helper()
	ns := newTestNS(t)
	ns.sysctl(t, "net/ipv4/conf/all/rp_filter", "0")
	ns.sysctl(t, "net/ipv4/conf/default/rp_filter", "0")
	ns.sysctl(t, "net/ipv6/conf/default/disable_ipv6", "1")
	dev := ns.open(t, cfg)
	ns.sysctl(t, "net/ipv4/conf/"+cfg.Name+"/rp_filter", "0")
	ns.addAddr(t, localAddr.String()+"/32", "lo")
	ns.addRoute(t, anycast.Addr().String()+"/32", cfg.Name)
	return ns, dev
}

func TestOpen(t *testing.T) {
	tests := []Config{
		{Name: "bt0", MTU: 1500, Queues: 1},
		{Name: "anycast-node-0", MTU: 9000, Queues: 4, TxQueueLen: 64},
		{Name: "bt1", MTU: 576, Queues: 16, TxQueueLen: 4096},
	}
	for _, cfg := range tests {
		t.Run(cfg.Name, func(t *testing.T) {
			ns := newTestNS(t)
			dev := ns.open(t, cfg)
			if dev.Name() != cfg.Name || dev.MTU() != cfg.MTU || dev.Queues() != cfg.Queues {
				t.Fatalf("Name/MTU/Queues = %s/%d/%d", dev.Name(), dev.MTU(), dev.Queues())
			}
			var link netlink.Link
			ns.must(t, func() (err error) { link, err = netlink.LinkByName(cfg.Name); return err })
			a := link.Attrs()
			wantQLen := cfg.TxQueueLen
			if wantQLen == 0 {
				wantQLen = 500 // the TUN driver's default
			}
			if link.Type() != "tuntap" || a.Flags&net.FlagUp == 0 || a.MTU != cfg.MTU || a.TxQLen != wantQLen {
				t.Fatalf("link %s: type %s flags %v mtu %d txqlen %d; want tuntap, up, %d, %d",
					a.Name, link.Type(), a.Flags, a.MTU, a.TxQLen, cfg.MTU, wantQLen)
			}
			if tt, ok := link.(*netlink.Tuntap); ok && cfg.Queues > 1 && tt.Flags&netlink.TUNTAP_MULTI_QUEUE == 0 {
				t.Fatalf("flags %v: want multi_queue", tt.Flags)
			}

			// No queue leaks into child processes (water omits O_CLOEXEC).
			for i, q := range dev.(*device).queues {
				var flags int
				var ferr error
				q.rc.Control(func(fd uintptr) { flags, ferr = unix.FcntlInt(fd, unix.F_GETFD, 0) })
				if ferr != nil || flags&unix.FD_CLOEXEC == 0 {
					t.Fatalf("queue %d: fd flags %#x, %v; want FD_CLOEXEC", i, flags, ferr)
				}
			}

			// Close removes the interface, so the name can be opened again.
			if err := dev.Close(); err != nil {
				t.Fatal(err)
			}
			ns.must(t, func() error {
				if _, err := netlink.LinkByName(cfg.Name); err == nil {
					return errors.New("interface still exists after Close")
				}
				return nil
			})
			ns.open(t, cfg)
		})
	}
}

func TestOpenInUse(t *testing.T) {
	tests := []struct {
		name          string
		first, second int // queues; 0 for a veth interface instead of a TUN
	}{
		{"single single", 1, 1},
		// Without the existence check this one succeeds: the kernel
		// attaches the second opener as a third queue of the first device.
		{"multi multi", 2, 2},
		{"single multi", 1, 2},
		{"multi single", 2, 1},
		{"veth single", 0, 1},
		{"veth multi", 0, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns := newTestNS(t)
			if tt.first == 0 {
				ns.must(t, func() error {
					return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "bt0", MTU: 1500}, PeerName: "bt0-peer"})
				})
			} else {
				ns.open(t, Config{Name: "bt0", MTU: 1500, Queues: tt.first})
			}
			var err error
			ns.must(t, func() error {
				var dev Device
				if dev, err = Open(Config{Name: "bt0", MTU: 1400, Queues: tt.second}); err == nil {
					dev.Close()
				}
				return nil
			})
			if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "bt0") {
				t.Fatalf("second Open = %v, want ErrInUse naming bt0", err)
			}
			// The first device was left alone.
			ns.must(t, func() error {
				link, err := netlink.LinkByName("bt0")
				if err == nil && link.Attrs().MTU != 1500 {
					err = errors.New("first interface was reconfigured")
				}
				return err
			})
		})
	}
}

func TestOpenInvalidConfig(t *testing.T) {
	// Validation happens before anything touches the kernel: no root needed.
	_, err := Open(Config{Name: "bt0", MTU: 70000, Queues: 1})
	if err == nil || err.Error() != "tun.mtu: 70000 out of range 576..65535" {
		t.Fatalf("Open = %v", err)
	}
}

func TestRead(t *testing.T) {
	ns, dev := udpNS(t, Config{Name: "bt0", MTU: 1500, Queues: 1})
	c := ns.listenUDP(t, localAddr.String()+":0")
	if _, err := c.WriteTo([]byte("to the anycast address"), net.UDPAddrFromAddrPort(anycast)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), hangGuard)
	defer cancel()
	got, err := readUntil(ctx, dev, 0, func(p []byte) bool { _, _, ok := udpTo(p, anycast); return ok })
	if err != nil {
		t.Fatal(err)
	}
	sport, payload, _ := udpTo(got, anycast)
	if string(payload) != "to the anycast address" || int(sport) != c.LocalAddr().(*net.UDPAddr).Port {
		t.Fatalf("read %x", got)
	}
	if s := dev.Stats(); s.RxPackets == 0 || s.RxBytes < uint64(len(got)) || s.RxErrors != 0 {
		t.Fatalf("Stats = %+v", s)
	}
}

func TestReadTruncated(t *testing.T) {
	ns, dev := udpNS(t, Config{Name: "bt0", MTU: 1500, Queues: 1})
	c := ns.listenUDP(t, localAddr.String()+":0")
	for _, size := range []int{100, 72} { // UDP payloads: packets of 128 and 100 bytes
		if _, err := c.WriteTo(make([]byte, size), net.UDPAddrFromAddrPort(anycast)); err != nil {
			t.Fatal(err)
		}
	}
	// The first packet (128 bytes) does not fit 100 bytes, the second
	// (100 bytes) fits exactly: a plain read(2) cannot tell them apart.
	buf := make([]byte, 100)
	n, err := dev.Read(0, buf)
	if !errors.Is(err, ErrTruncated) || n != 100 || buf[0] != 0x45 {
		t.Fatalf("Read of 128 bytes into 100 = %d, %v", n, err)
	}
	n, err = dev.Read(0, buf)
	if err != nil || n != 100 {
		t.Fatalf("Read of 100 bytes into 100 = %d, %v", n, err)
	}
	if s := dev.Stats(); s.RxErrors != 1 || s.RxPackets != 1 || s.RxBytes != 100 {
		t.Fatalf("Stats = %+v", s)
	}
}

func TestWrite(t *testing.T) {
	ns, dev := udpNS(t, Config{Name: "bt0", MTU: 1500, Queues: 1})
	c := ns.listenUDP(t, localAddr.String()+":0")
	dst := c.LocalAddr().(*net.UDPAddr).AddrPort()
	pkt := udp4(anycast, dst, []byte("reply from the stack"))
	if err := dev.Write(0, pkt); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(hangGuard))
	buf := make([]byte, 1500)
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "reply from the stack" || from != anycast {
		t.Fatalf("socket got %q from %v, %v", buf[:n], from, err)
	}

	// Refused before the kernel sees them, and counted.
	if err := dev.Write(0, [][]byte{make([]byte, 1000), make([]byte, 501)}); !errors.Is(err, ErrPacketSize) {
		t.Fatalf("Write over MTU = %v", err)
	}
	if err := dev.Write(0, nil); !errors.Is(err, ErrPacketSize) {
		t.Fatalf("empty Write = %v", err)
	}
	// The kernel refuses a packet that is neither IPv4 nor IPv6 (EINVAL)
	// and counts it in rx_dropped.
	if err := dev.Write(0, [][]byte{make([]byte, 20)}); err == nil || !errors.Is(err, unix.EINVAL) {
		t.Fatalf("Write of a non-IP packet = %v, want EINVAL", err)
	}
	want := Stats{TxPackets: 1, TxBytes: uint64(len(pkt[0]) + len(pkt[1])), TxErrors: 3, KernelRxDropped: 1}
	if s := dev.Stats(); s != want {
		t.Fatalf("Stats = %+v, want %+v", s, want)
	}
}

func TestKernelTxDropped(t *testing.T) {
	const qlen, sent = 8, 64
	ns, dev := udpNS(t, Config{Name: "bt0", MTU: 1500, Queues: 1, TxQueueLen: qlen})
	c := ns.listenUDP(t, localAddr.String()+":0")
	for range sent {
		if _, err := c.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(anycast)); err != nil {
			t.Fatal(err)
		}
	}
	// Nobody read: the queue holds qlen packets, the kernel dropped the rest.
	s := dev.Stats()
	if s.KernelTxDropped < sent-qlen {
		t.Fatalf("KernelTxDropped = %d, want >= %d", s.KernelTxDropped, sent-qlen)
	}
	t.Logf("sent %d with txqueuelen %d: kernel tx_dropped %d", sent, qlen, s.KernelTxDropped)
	// The last values survive Close.
	dev.Close()
	if after := dev.Stats(); after.KernelTxDropped != s.KernelTxDropped {
		t.Fatalf("KernelTxDropped after Close = %d, want %d", after.KernelTxDropped, s.KernelTxDropped)
	}
}

func TestClose(t *testing.T) {
	_, dev := udpNS(t, Config{Name: "bt0", MTU: 1500, Queues: 2})
	errc := make(chan error, 2)
	for q := range 2 {
		go func() {
			buf := make([]byte, 1500)
			for {
				if _, err := dev.Read(q, buf); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	if err := dev.Close(); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := <-errc; !errors.Is(err, ErrClosed) {
			t.Fatalf("pending Read after Close = %v, want ErrClosed", err)
		}
	}
	if err := dev.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	if _, err := dev.Read(0, make([]byte, 10)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Read after Close = %v", err)
	}
	if err := dev.Write(1, udp4(anycast, remote, nil)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Write after Close = %v", err)
	}
	if s := dev.Stats(); s.RxErrors != 0 || s.TxErrors != 0 {
		t.Fatalf("Close counted errors: %+v", s)
	}
}

func TestMultiqueueRead(t *testing.T) {
	const flows = 64
	ns, dev := udpNS(t, Config{Name: "bt0", MTU: 1500, Queues: 2})
	var mu sync.Mutex
	perQueue := make([]int, 2)
	seen := map[uint16]int{} // source port -> queue
	all := make(chan struct{})
	var wg sync.WaitGroup
	for q := range 2 {
		wg.Go(func() {
			buf := make([]byte, 1500)
			for {
				n, err := dev.Read(q, buf)
				if err != nil {
					return
				}
				sport, _, ok := udpTo(buf[:n], anycast)
				if !ok {
					continue
				}
				mu.Lock()
				perQueue[q]++
				seen[sport] = q
				if len(seen) == flows {
					close(all)
				}
				mu.Unlock()
			}
		})
	}
	// 64 flows: one socket per source port.
	for range flows {
		c := ns.listenUDP(t, localAddr.String()+":0")
		if _, err := c.WriteTo([]byte("x"), net.UDPAddrFromAddrPort(anycast)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-all:
	case <-time.After(hangGuard):
		t.Errorf("packets lost: got %d of %d flows", len(seen), flows)
	}
	dev.Close()
	wg.Wait()
	t.Logf("%d flows over 2 queues: %v", flows, perQueue)
	if perQueue[0] == 0 || perQueue[1] == 0 {
		t.Fatalf("all flows on one queue: %v", perQueue)
	}
}

// TestMultiqueueFlowFollowsWrites pins down a kernel behaviour the stack must
// respect: a multiqueue TUN remembers, per flow, the queue a packet of that
// flow was last WRITTEN on, and steers the flow's incoming packets to that
// queue (tun_flow_update; entries expire after about 3 s). Writing a flow's
// replies on a different queue than it is read from moves the flow.
func TestMultiqueueFlowFollowsWrites(t *testing.T) {
	const flows = 8
	ns, dev := udpNS(t, Config{Name: "bt0", MTU: 1500, Queues: 2})
	type arrival struct {
		q     int
		sport uint16
	}
	arrivals := make(chan arrival, 16)
	for q := range 2 {
		go func() {
			buf := make([]byte, 1500)
			for {
				n, err := dev.Read(q, buf)
				if err != nil {
					return
				}
				if sport, _, ok := udpTo(buf[:n], anycast); ok {
					arrivals <- arrival{q, sport}
				}
			}
		}()
	}
	next := func() arrival {
		select {
		case a := <-arrivals:
			return a
		case <-time.After(hangGuard):
			t.Fatal("packet lost")
			return arrival{}
		}
	}
	for range flows {
		c := ns.listenUDP(t, localAddr.String()+":0")
		c.WriteTo([]byte("1"), net.UDPAddrFromAddrPort(anycast))
		first := next()
		other := 1 - first.q
		reply := udp4(anycast, netip.AddrPortFrom(localAddr, first.sport), []byte("r"))
		if err := dev.Write(other, reply); err != nil {
			t.Fatal(err)
		}
		c.WriteTo([]byte("2"), net.UDPAddrFromAddrPort(anycast))
		if second := next(); second.q != other {
			t.Fatalf("flow from port %d: read on queue %d, reply written on %d, next packet on %d; want it to follow the write",
				first.sport, first.q, other, second.q)
		}
	}
}

// loopNS sets up a namespace where a packet written to the TUN for 192.0.2.1
// is forwarded by the kernel straight back into the TUN: a write+read round
// trip through the kernel with no socket involved.
func loopNS(t testing.TB) Device {
	return loopNSConfig(t, Config{Name: "bt0", MTU: 1500, Queues: 1})
}

// loopNSConfig is loopNS with a device opened with cfg (named bt0).
func loopNSConfig(t testing.TB, cfg Config) Device {
	ns := newTestNS(t)
	ns.sysctl(t, "net/ipv4/conf/all/rp_filter", "0")
	ns.sysctl(t, "net/ipv4/conf/default/rp_filter", "0")
	ns.sysctl(t, "net/ipv4/ip_forward", "1")
	ns.sysctl(t, "net/ipv6/conf/default/disable_ipv6", "1")
	dev := ns.open(t, cfg)
	ns.addRoute(t, anycast.Addr().String()+"/32", "bt0")
	return dev
}

func TestDeviceNoAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items under the race detector")
	}
	dev := loopNS(t)
	pkt := udp4(remote, anycast, make([]byte, 1000))
	buf := make([]byte, 1500)
	allocs := testing.AllocsPerRun(200, func() {
		if err := dev.Write(0, pkt); err != nil {
			t.Fatal(err)
		}
		if _, err := dev.Read(0, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("Write+Read allocates %v times per packet", allocs)
	}
}

// BenchmarkDeviceWriteRead measures one packet written to the TUN, forwarded
// by the kernel and read back.
func BenchmarkDeviceWriteRead(b *testing.B) {
	dev := loopNS(b)
	pkt := udp4(remote, anycast, make([]byte, 1400))
	buf := make([]byte, 1500)
	b.SetBytes(1428)
	b.ReportAllocs()
	for b.Loop() {
		if err := dev.Write(0, pkt); err != nil {
			b.Fatal(err)
		}
		if _, err := dev.Read(0, buf); err != nil {
			b.Fatal(err)
		}
	}
}
