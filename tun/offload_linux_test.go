// offload_linux_test.go: the offload device (Config.Offload) against the
// kernel, each test in its own throwaway network namespace (root only).

//go:build linux

package tun

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func TestOffloadOpen(t *testing.T) {
	for _, queues := range []int{1, 4} {
		ns := newTestNS(t)
		cfg := Config{Name: "bt0", MTU: 1500, Queues: queues, Offload: true}
		dev := ns.open(t, cfg)
		if !dev.GSO() || dev.Queues() != queues || dev.MTU() != 1500 {
			t.Fatalf("GSO/Queues/MTU = %v/%d/%d", dev.GSO(), dev.Queues(), dev.MTU())
		}
		var link netlink.Link
		ns.must(t, func() (err error) { link, err = netlink.LinkByName("bt0"); return err })
		tt, ok := link.(*netlink.Tuntap)
		if !ok || tt.Flags&netlink.TUNTAP_VNET_HDR == 0 || tt.Flags&netlink.TUNTAP_NO_PI == 0 ||
			(queues > 1) != (tt.Flags&netlink.TUNTAP_MULTI_QUEUE != 0) || link.Attrs().Flags&net.FlagUp == 0 {
			t.Fatalf("link %T flags %v (up: %v)", link, tt.Flags, link.Attrs().Flags&net.FlagUp != 0)
		}
		for i, q := range dev.(*device).queues {
			var fdFlags, flFlags int
			var err1, err2 error
			q.rc.Control(func(fd uintptr) {
				fdFlags, err1 = unix.FcntlInt(fd, unix.F_GETFD, 0)
				flFlags, err2 = unix.FcntlInt(fd, unix.F_GETFL, 0)
			})
			if err1 != nil || err2 != nil || fdFlags&unix.FD_CLOEXEC == 0 || flFlags&unix.O_NONBLOCK == 0 {
				t.Fatalf("queue %d: fd flags %#x, file flags %#x (%v %v); want FD_CLOEXEC and O_NONBLOCK", i, fdFlags, flFlags, err1, err2)
			}
		}
		// Either kind of device finds the other in the way.
		ns.must(t, func() error {
			for _, off := range []bool{false, true} {
				if d, err := Open(Config{Name: "bt0", MTU: 1500, Queues: queues, Offload: off}); !errors.Is(err, ErrInUse) {
					if err == nil {
						d.Close()
					}
					return errors.New("second Open of bt0 did not fail with ErrInUse")
				}
			}
			return nil
		})
		if err := dev.Close(); err != nil {
			t.Fatal(err)
		}
		ns.must(t, func() error {
			if _, err := netlink.LinkByName("bt0"); err == nil {
				return errors.New("interface still exists after Close")
			}
			return nil
		})
	}
}

func TestWriteGSOWithoutOffload(t *testing.T) {
	_, dev := udpNS(t, Config{Name: "bt0", MTU: 1500, Queues: 1})
	if dev.GSO() {
		t.Fatal("the default device reports GSO")
	}
	pkt := buildTCP(anycast, remote, 1, 1, header.TCPFlagAck, nil, make([]byte, 3000), true)
	h := VirtioNetHdr{Flags: 1, GSOType: VirtioNetHdrGSOTCPv4, HdrLen: 40, GSOSize: 1460, CsumStart: 20, CsumOffset: 16}
	if err := dev.WriteGSO(0, h, [][]byte{pkt}); !errors.Is(err, ErrNoGSO) {
		t.Fatalf("WriteGSO = %v, want ErrNoGSO", err)
	}
	if s := dev.Stats(); s.TxErrors != 1 || s.TxPackets != 0 {
		t.Fatalf("Stats = %+v, want one error", s)
	}
}

// TestOffloadForwarded writes GSO segments that the kernel forwards straight
// back into the TUN (loopNS): what Baton writes must leave as correct wire
// packets, and since the device offers the kernel receive offload
// (TUN_F_CSUM|TSO4|TSO6), what Baton reads back is the same segment whole,
// larger than the MTU, its checksum completed by Read.
func TestOffloadForwarded(t *testing.T) {
	dev := loopNSConfig(t, Config{Name: "bt0", MTU: 1500, Queues: 1, Offload: true})
	payload := make([]byte, 60000)
	for i := range payload {
		payload[i] = byte(i * 13)
	}
	// remote -> anycast, as a client's segment would be forwarded, with a
	// partial checksum (NEEDS_CSUM), as the kernel's TCP and GRO make
	// them.
	pkt := buildTCP(remote, anycast, 1000, 1, header.TCPFlagAck|header.TCPFlagPsh, tsOpts, payload, true)
	want := buildTCP(remote, anycast, 1000, 1, header.TCPFlagAck|header.TCPFlagPsh, tsOpts, payload, false)
	want[8]-- // the TTL, decremented by the forwarding
	binary.BigEndian.PutUint16(want[10:12], 0)
	binary.BigEndian.PutUint16(want[10:12], ^checksum.Checksum(want[:20], 0))
	h := VirtioNetHdr{GSOType: VirtioNetHdrGSOTCPv4, HdrLen: 52, GSOSize: 1448, Flags: VirtioNetHdrFNeedsCsum, CsumStart: 20, CsumOffset: 16}
	if err := dev.WriteGSO(0, h, [][]byte{pkt[:52], pkt[52:]}); err != nil {
		t.Fatalf("WriteGSO: %v", err)
	}
	buf := make([]byte, MaxReadPacket)
	n, err := dev.Read(0, buf)
	if err != nil {
		t.Fatal(err)
	}
	tcpValid(t, buf[:n])
	if !bytes.Equal(buf[:n], want) {
		t.Fatalf("read %d bytes, not the %d-byte segment written (with its checksum completed)", n, len(want))
	}
	if s := dev.Stats(); s.RxGSO != 1 || s.RxPackets != 1 {
		t.Fatalf("Stats = %+v", s)
	}
	// A reader with an MTU-sized buffer cannot take it: truncated.
	if err := dev.WriteGSO(0, h, [][]byte{pkt[:52], pkt[52:]}); err != nil {
		t.Fatalf("WriteGSO: %v", err)
	}
	if _, err := dev.Read(0, buf[:1500]); !errors.Is(err, ErrTruncated) {
		t.Fatalf("Read into 1500 bytes = %v", err)
	}
	// A plain packet still goes through Write (zero header).
	if err := dev.Write(0, udp4(remote, anycast, []byte("plain"))); err != nil {
		t.Fatal(err)
	}
	if n, err := dev.Read(0, buf); err != nil || !bytes.HasSuffix(buf[:n], []byte("plain")) {
		t.Fatalf("Read = %d, %v", n, err)
	}
	// Refused before the kernel sees them, and counted.
	if err := dev.Write(0, [][]byte{make([]byte, 1501)}); !errors.Is(err, ErrPacketSize) {
		t.Fatalf("Write over MTU = %v", err)
	}
	if err := dev.WriteGSO(0, VirtioNetHdr{GSOType: 1, GSOSize: 1000}, [][]byte{make([]byte, 65536)}); !errors.Is(err, ErrPacketSize) {
		t.Fatalf("WriteGSO over 64 KiB = %v", err)
	}
	s := dev.Stats()
	if s.TxPackets != 3 || s.TxErrors != 2 || s.RxErrors != 1 || s.KernelRxDropped != 0 {
		t.Fatalf("Stats = %+v", s)
	}
}

// offloadTCPNS is a namespace with an offload TUN bt0, local addresses on lo
// and the anycast addresses routed into the TUN; the test plays the anycast
// server on the TUN for a kernel client.
func offloadTCPNS(t *testing.T) (*testNS, Device) {
	t.Helper()
	ns := newTestNS(t)
	ns.sysctl(t, "net/ipv4/conf/all/rp_filter", "0")
	ns.sysctl(t, "net/ipv4/conf/default/rp_filter", "0")
	dev := ns.open(t, Config{Name: "bt0", MTU: 1500, Queues: 1, Offload: true})
	ns.addAddr(t, "198.51.100.1/32", "lo")
	ns.addAddr(t, "2001:db8:100::1/128", "lo")
	ns.addRoute(t, "192.0.2.1/32", "bt0")
	ns.addRoute(t, "2001:db8:a::1/128", "bt0")
	return ns, dev
}

// TestOffloadTCP is Baton's case: a kernel TCP client, the server on the
// TUN side sending large segments with partial checksums, the kernel
// delivering them to the client's socket (the lab adds forwarding and veths
// in between; e2e covers that).
func TestOffloadTCP(t *testing.T) {
	for _, fam := range []struct {
		name          string
		client, local netip.AddrPort
		gsoType       uint8
		l3            uint16
	}{
		{"ipv4", netip.MustParseAddrPort("198.51.100.1:41000"), netip.MustParseAddrPort("192.0.2.1:80"), VirtioNetHdrGSOTCPv4, 20},
		{"ipv6", netip.MustParseAddrPort("[2001:db8:100::1]:41000"), netip.MustParseAddrPort("[2001:db8:a::1]:80"), VirtioNetHdrGSOTCPv6, 40},
	} {
		t.Run(fam.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), hangGuard)
			defer cancel()
			ns, dev := offloadTCPNS(t)
			server := fam.local
			isTCPTo := func(dst netip.AddrPort, flags header.TCPFlags) func([]byte) bool {
				return func(p []byte) bool {
					tcp, ok := tcpOf(p, dst)
					return ok && tcp.Flags()&flags == flags
				}
			}
			// The kernel client connects; the test answers the SYN.
			type dialed struct {
				c   net.Conn
				err error
			}
			dch := make(chan dialed, 1)
			go ns.run(func() error {
				d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(fam.client), Timeout: hangGuard}
				c, err := d.DialContext(ctx, "tcp", server.String())
				dch <- dialed{c, err}
				return nil
			})
			syn, err := readUntil(ctx, dev, 0, isTCPTo(server, header.TCPFlagSyn))
			if err != nil {
				t.Fatal(err)
			}
			cisn := tcpMust(t, syn, server).SequenceNumber()
			const sisn = 5000
			mss := []byte{2, 4, 0x05, 0xb4} // 1460
			if err := dev.Write(0, [][]byte{buildTCP(server, fam.client, sisn, cisn+1, header.TCPFlagSyn|header.TCPFlagAck, mss, nil, false)}); err != nil {
				t.Fatal(err)
			}
			d := <-dch
			if d.err != nil {
				t.Fatal(d.err)
			}
			c := d.c
			defer c.Close()

			// Server -> client: GSO with a partial checksum, GSO with a
			// full one, a small partial-checksum packet without GSO.
			seq := uint32(sisn + 1)
			segSize := uint16(1500 - fam.l3 - 20)
			for i, tc := range []struct {
				n       int
				gso     bool
				partial bool
			}{{30000, true, true}, {30001, true, false}, {999, false, true}} {
				payload := bytes.Repeat([]byte{byte(i + 1), 0xa5, 0x3c}, tc.n)[:tc.n]
				pkt := buildTCP(server, fam.client, seq, cisn+1, header.TCPFlagAck|header.TCPFlagPsh, nil, payload, tc.partial)
				var h VirtioNetHdr
				if tc.gso {
					h.GSOType, h.GSOSize, h.HdrLen = fam.gsoType, segSize, fam.l3+20
				}
				if tc.partial {
					h.Flags, h.CsumStart, h.CsumOffset = VirtioNetHdrFNeedsCsum, fam.l3, 16
				}
				if err := dev.WriteGSO(0, h, [][]byte{pkt}); err != nil {
					t.Fatalf("%v: %v", h, err)
				}
				got := make([]byte, tc.n)
				c.SetReadDeadline(time.Now().Add(hangGuard))
				if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, payload) {
					t.Fatalf("%v: the client socket read %v (equal %v)", h, err, bytes.Equal(got, payload))
				}
				seq += uint32(tc.n)
				// The client acknowledges everything.
				if _, err := readUntil(ctx, dev, 0, func(p []byte) bool {
					tcp, ok := tcpOf(p, server)
					return ok && tcp.AckNumber() == seq
				}); err != nil {
					t.Fatal(err)
				}
			}

			// Client -> server: the kernel builds large segments (TSO)
			// and, the device offering receive offload, hands them to
			// the TUN whole: Read returns them complete (checksum
			// valid), larger than the MTU, and the bytes are the
			// client's, in order. The test acknowledges what it reads,
			// with a large window, so the client keeps sending.
			sent := make([]byte, 300000)
			for i := range sent {
				sent[i] = byte(i*7 + i>>11)
			}
			go c.Write(sent)
			var got []byte
			largest := 0
			for len(got) < len(sent) {
				p, err := readUntil(ctx, dev, 0, isTCPTo(server, 0))
				if err != nil {
					t.Fatal(err)
				}
				tcp, payload := tcpValid(t, p)
				if len(payload) == 0 {
					continue
				}
				if tcp.SequenceNumber() != cisn+1+uint32(len(got)) {
					t.Fatalf("seq %d after %d bytes", tcp.SequenceNumber()-cisn-1, len(got))
				}
				got = append(got, payload...)
				largest = max(largest, len(p))
				ack := buildTCP(server, fam.client, seq, cisn+1+uint32(len(got)), header.TCPFlagAck, nil, nil, false)
				setTCPChecksum(ack, int(fam.l3), fam.l3 == 40)
				if err := dev.Write(0, [][]byte{ack}); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(got, sent) {
				t.Fatal("the bytes read from the TUN are not the client's")
			}
			s := dev.Stats()
			if largest <= 1500 || s.RxGSO == 0 {
				t.Fatalf("no segment larger than the MTU read (largest %d bytes, Stats %+v)", largest, s)
			}
			if s.RxErrors != 0 || s.TxErrors != 0 || s.KernelRxDropped != 0 {
				t.Fatalf("Stats = %+v", s)
			}
			t.Logf("%d bytes in %d reads, %d of them GSO, largest %d bytes", len(sent), s.RxPackets, s.RxGSO, largest)
		})
	}
}

// tcpOf returns the TCP header of pkt if it is a TCP packet to dst.
func tcpOf(pkt []byte, dst netip.AddrPort) (header.TCP, bool) {
	if len(pkt) == 0 {
		return nil, false
	}
	switch {
	case pkt[0]>>4 == 4 && dst.Addr().Is4() && len(pkt) >= 40:
		ip := header.IPv4(pkt)
		if ip.TransportProtocol() != header.TCPProtocolNumber || ip.DestinationAddress().As4() != dst.Addr().As4() {
			return nil, false
		}
		tcp := header.TCP(ip.Payload())
		return tcp, len(tcp) >= 20 && tcp.DestinationPort() == dst.Port()
	case pkt[0]>>4 == 6 && dst.Addr().Is6() && len(pkt) >= 60:
		ip := header.IPv6(pkt)
		if ip.NextHeader() != uint8(header.TCPProtocolNumber) || ip.DestinationAddress().As16() != dst.Addr().As16() {
			return nil, false
		}
		tcp := header.TCP(pkt[40:])
		return tcp, tcp.DestinationPort() == dst.Port()
	}
	return nil, false
}

func tcpMust(t *testing.T, pkt []byte, dst netip.AddrPort) header.TCP {
	t.Helper()
	tcp, ok := tcpOf(pkt, dst)
	if !ok {
		t.Fatalf("not a TCP packet to %v", dst)
	}
	return tcp
}

func TestOffloadNoAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("sync.Pool drops items under the race detector")
	}
	dev := loopNSConfig(t, Config{Name: "bt0", MTU: 1500, Queues: 1, Offload: true})
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
	big := buildTCP(remote, anycast, 1, 1, header.TCPFlagAck, nil, make([]byte, 20000), true)
	h := VirtioNetHdr{Flags: 1, GSOType: VirtioNetHdrGSOTCPv4, HdrLen: 40, GSOSize: 1460, CsumStart: 20, CsumOffset: 16}
	iov := [][]byte{big}
	bigBuf := make([]byte, MaxReadPacket)
	allocs = testing.AllocsPerRun(50, func() {
		if err := dev.WriteGSO(0, h, iov); err != nil {
			t.Fatal(err)
		}
		// Back whole (receive offload), its checksum completed.
		if n, err := dev.Read(0, bigBuf); err != nil || n != len(big) {
			t.Fatal(n, err)
		}
	})
	if allocs != 0 {
		t.Fatalf("WriteGSO+Read allocates %v times per packet", allocs)
	}
}
