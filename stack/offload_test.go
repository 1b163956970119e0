package stack_test

import (
	"bytes"
	"io"
	"net/netip"
	"sync"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
	"github.com/baton-anycast/baton/stack/stacktest"
	"github.com/baton-anycast/baton/tun"
)

// gsoChecker is a hook that checks what the endpoint tells hooks about
// outbound packets on a GSO device.
type gsoChecker struct {
	mu                              sync.Mutex
	gso, partial, overMTU, segments int
	bad                             []string
}

func (*gsoChecker) Name() string { return "gso-checker" }

func (c *gsoChecker) Inbound(p *stack.Packet) stack.Verdict {
	if p.GSO != (stack.GSOInfo{}) {
		c.fail("inbound packet with GSO info")
	}
	return stack.Pass
}

func (c *gsoChecker) Outbound(p *stack.Packet) stack.Verdict {
	c.mu.Lock()
	defer c.mu.Unlock()
	g := p.GSO
	var l4 int
	var gsoType stack.GSOType
	switch p.Version() {
	case 4:
		if header.IPv4(p.Data).Protocol() == uint8(header.TCPProtocolNumber) {
			l4, gsoType = int(header.IPv4(p.Data).HeaderLength()), stack.GSOTCPv4
		}
	case 6:
		if header.IPv6(p.Data).NextHeader() == uint8(header.TCPProtocolNumber) {
			l4, gsoType = header.IPv6MinimumSize, stack.GSOTCPv6
		}
	}
	if l4 == 0 {
		if g != (stack.GSOInfo{}) {
			c.bad = append(c.bad, "non-TCP packet with GSO info")
		}
		return stack.Pass
	}
	// gVisor sends SYN-ACKs and resets without GSO: complete packets.
	if g == (stack.GSOInfo{}) && header.TCP(p.Data[l4:]).Flags()&(header.TCPFlagSyn|header.TCPFlagRst) != 0 {
		return stack.Pass
	}
	if g.Type != gsoType {
		c.bad = append(c.bad, "TCP packet of type "+header.TCP(p.Data[l4:]).Flags().String()+" without GSO info of its IP version")
		return stack.Pass
	}
	c.gso++
	if len(p.Data) > 1500 {
		c.overMTU++
	}
	if !g.PartialChecksum {
		c.bad = append(c.bad, "TCP packet of a host-GSO connection without a partial checksum")
		return stack.Pass
	}
	c.partial++
	// The field holds exactly the pseudo-header sum that
	// ResetPartialChecksum computes.
	before := header.TCP(p.Data[l4:]).Checksum()
	if !p.ResetPartialChecksum() || header.TCP(p.Data[l4:]).Checksum() != before {
		c.bad = append(c.bad, "partial checksum is not the pseudo-header sum")
	}
	if g.MSS > 0 {
		c.segments += max(1, (len(header.TCP(p.Data[l4:]).Payload())+int(g.MSS)-1)/int(g.MSS))
	}
	return stack.Pass
}

func (c *gsoChecker) fail(s string) {
	c.mu.Lock()
	c.bad = append(c.bad, s)
	c.mu.Unlock()
}

// TestServicesOverStackGSO runs the TCP services on a node whose device has
// segmentation offload: gVisor hands the endpoint large segments with
// partial checksums, the fake checks every virtio header as the kernel
// would and cuts the segments for the client stack, which verifies every
// checksum and byte.
func TestServicesOverStackGSO(t *testing.T) {
	c, err := stacktest.NewClient(1500)
	if err != nil {
		t.Fatal(err)
	}
	n := newNodeOn(t, "n1", tun.NewFakeGSO("any0", 1500, 1, 256))
	chk := &gsoChecker{}
	n.st.Endpoint().AddHook(chk)
	sw := stacktest.NewSwitch(c, n.dev)
	t.Cleanup(func() { sw.Close(); c.Close() })

	for _, addr := range []netip.Addr{stacktest.Anycast4, stacktest.Anycast6} {
		t.Run("stream/"+addr.String(), func(t *testing.T) { checkStream(t, c, addr, 8<<20+17, 43) })
		t.Run("echo/"+addr.String(), func(t *testing.T) {
			conn, err := c.DialTCP(ctxT(t), netip.AddrPortFrom(addr, 7))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			msg := bytes.Repeat([]byte("baton gso echo "), 100000)
			go conn.Write(msg)
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(conn, buf); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(buf, msg) {
				t.Fatal("echo returned different bytes")
			}
		})
	}
	ls, ds := n.st.Endpoint().Stats(), n.dev.Stats()
	chk.mu.Lock()
	defer chk.mu.Unlock()
	t.Logf("endpoint: %d packets written, %d as GSO; hooks saw %d TCP packets (%d over the MTU), %d wire segments",
		ls.TxPackets, ls.TxGSO, chk.gso, chk.overMTU, chk.segments)
	if len(chk.bad) > 0 {
		t.Fatalf("%d bad packets: %q", len(chk.bad), chk.bad)
	}
	if ls.TxGSO == 0 || chk.overMTU == 0 {
		t.Fatalf("no GSO segments: %+v", ls)
	}
	if ls.TxErrors != 0 || ds.TxErrors != 0 {
		t.Fatalf("write errors: endpoint %d, device %d", ls.TxErrors, ds.TxErrors)
	}
}

// TestNoGSOInfoWithoutOffload: on a device without offload every outbound
// packet is complete and at most the MTU, and hooks see no GSO info.
func TestNoGSOInfoWithoutOffload(t *testing.T) {
	c, n := newLab(t)
	var mu sync.Mutex
	var withGSO, over int
	n.st.Endpoint().AddHook(hookFunc(func(p *stack.Packet) {
		mu.Lock()
		defer mu.Unlock()
		if p.GSO != (stack.GSOInfo{}) {
			withGSO++
		}
		if len(p.Data) > 1500 {
			over++
		}
	}))
	conn, err := c.DialTCP(ctxT(t), netip.AddrPortFrom(stacktest.Anycast4, 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, services.StreamRequest(1<<20, 1)); err != nil {
		t.Fatal(err)
	}
	if got, ok, err := services.ReadStream(conn, 1<<20, 1); err != nil || !ok || got != 1<<20 {
		t.Fatalf("stream: %d, %v, %v", got, ok, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if withGSO != 0 || over != 0 || n.st.Endpoint().Stats().TxGSO != 0 {
		t.Fatalf("%d packets with GSO info, %d over the MTU", withGSO, over)
	}
}

// hookFunc observes outbound packets.
type hookFunc func(p *stack.Packet)

func (hookFunc) Name() string                             { return "observe" }
func (hookFunc) Inbound(*stack.Packet) stack.Verdict      { return stack.Pass }
func (f hookFunc) Outbound(p *stack.Packet) stack.Verdict { f(p); return stack.Pass }

// rawTCP builds a TCP segment between the test client and the anycast
// address, as a kernel's TSO or GRO hands it to an offload TUN: with
// partial, the checksum field holds the pseudo-header sum of the whole
// segment (NEEDS_CSUM); otherwise the full checksum.
func rawTCP(src, dst netip.AddrPort, seq, ack uint32, flags header.TCPFlags, payload []byte, partial bool) []byte {
	v6 := src.Addr().Is6()
	l3 := header.IPv4MinimumSize
	if v6 {
		l3 = header.IPv6MinimumSize
	}
	s, d := tcpip.AddrFromSlice(src.Addr().AsSlice()), tcpip.AddrFromSlice(dst.Addr().AsSlice())
	b := make([]byte, l3+header.TCPMinimumSize+len(payload))
	if v6 {
		header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(len(b) - l3),
			TransportProtocol: header.TCPProtocolNumber, HopLimit: 64, SrcAddr: s, DstAddr: d})
	} else {
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Flags: header.IPv4FlagDontFragment,
			Protocol: uint8(header.TCPProtocolNumber), SrcAddr: s, DstAddr: d})
		ip.SetChecksum(^ip.CalculateChecksum())
	}
	tcp := header.TCP(b[l3:])
	tcp.Encode(&header.TCPFields{SrcPort: src.Port(), DstPort: dst.Port(), SeqNum: seq, AckNum: ack,
		DataOffset: header.TCPMinimumSize, Flags: flags, WindowSize: 65535})
	copy(tcp.Payload(), payload)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, s, d, uint16(len(tcp)))
	if partial {
		tcp.SetChecksum(xsum)
	} else {
		tcp.SetChecksum(^checksum.Checksum(tcp, xsum))
	}
	return b
}

// wireTCP checks a packet the node wrote (as the fake cut it for the wire)
// and returns its TCP header if it goes to dst.
func wireTCP(t *testing.T, pkt []byte, dst netip.AddrPort) (header.TCP, bool) {
	t.Helper()
	var s, d tcpip.Address
	var l4 []byte
	switch pkt[0] >> 4 {
	case 4:
		ip := header.IPv4(pkt)
		if !ip.IsChecksumValid() || int(ip.TotalLength()) != len(pkt) || ip.Protocol() != uint8(header.TCPProtocolNumber) {
			return nil, false
		}
		s, d, l4 = ip.SourceAddress(), ip.DestinationAddress(), ip.Payload()
	case 6:
		ip := header.IPv6(pkt)
		if ip.NextHeader() != uint8(header.TCPProtocolNumber) {
			return nil, false
		}
		s, d, l4 = ip.SourceAddress(), ip.DestinationAddress(), pkt[header.IPv6MinimumSize:]
	}
	if d.String() != dst.Addr().String() || header.TCP(l4).DestinationPort() != dst.Port() {
		return nil, false
	}
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, s, d, uint16(len(l4)))
	if checksum.Checksum(l4, xsum) != 0xffff {
		t.Fatalf("node wrote a TCP packet with a bad checksum")
	}
	return header.TCP(l4), true
}

// bigInbound is a hook that records the largest inbound TCP packet and
// checks that every inbound packet it sees is complete (its checksum
// verifies) whatever its size.
type bigInbound struct {
	mu      sync.Mutex
	largest int
	bad     int
}

func (*bigInbound) Name() string                         { return "big-inbound" }
func (*bigInbound) Outbound(*stack.Packet) stack.Verdict { return stack.Pass }
func (h *bigInbound) Inbound(p *stack.Packet) stack.Verdict {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.largest = max(h.largest, len(p.Data))
	var s, d tcpip.Address
	var l4 []byte
	switch p.Version() {
	case 4:
		ip := header.IPv4(p.Data)
		s, d, l4 = ip.SourceAddress(), ip.DestinationAddress(), ip.Payload()
	case 6:
		ip := header.IPv6(p.Data)
		s, d, l4 = ip.SourceAddress(), ip.DestinationAddress(), p.Data[header.IPv6MinimumSize:]
	}
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, s, d, uint16(len(l4)))
	if p.GSO != (stack.GSOInfo{}) || checksum.Checksum(l4, xsum) != 0xffff {
		h.bad++
	}
	return stack.Pass
}

// TestReceiveOffloadUpload plays the kernel of an offload device with
// receive offload: the client's data reaches the node as TCP segments of up
// to 64 KiB with a virtio header (GSO type, partial checksum), which the
// device completes and the endpoint hands the hooks and gVisor whole. The
// echo service must return every byte, in order, over IPv4 and IPv6.
func TestReceiveOffloadUpload(t *testing.T) {
	for _, fam := range []struct {
		name           string
		client, server netip.AddrPort
		gsoType        uint8
		l3             uint16
	}{
		{"ipv4", netip.AddrPortFrom(stacktest.ClientAddr4, 40001), netip.AddrPortFrom(stacktest.Anycast4, 7), tun.VirtioNetHdrGSOTCPv4, 20},
		{"ipv6", netip.AddrPortFrom(stacktest.ClientAddr6, 40001), netip.AddrPortFrom(stacktest.Anycast6, 7), tun.VirtioNetHdrGSOTCPv6, 40},
	} {
		t.Run(fam.name, func(t *testing.T) {
			ctx := ctxT(t)
			dev := tun.NewFakeGSO("any0", 1500, 1, 256)
			n := newNodeOn(t, "n1", dev)
			hook := &bigInbound{}
			n.st.Endpoint().AddHook(hook)
			next := func() header.TCP {
				t.Helper()
				for {
					b, err := dev.Receive(ctx)
					if err != nil {
						t.Fatal(err)
					}
					if tcp, ok := wireTCP(t, b, fam.client); ok {
						return tcp
					}
				}
			}
			const cisn = 7000
			if err := dev.Deliver(ctx, rawTCP(fam.client, fam.server, cisn, 0, header.TCPFlagSyn, nil, false)); err != nil {
				t.Fatal(err)
			}
			synack := next()
			if synack.Flags() != header.TCPFlagSyn|header.TCPFlagAck || synack.AckNumber() != cisn+1 {
				t.Fatalf("no SYN-ACK: %v", synack.Flags())
			}
			sseq := synack.SequenceNumber() + 1
			seq := uint32(cisn + 1)
			if err := dev.Deliver(ctx, rawTCP(fam.client, fam.server, seq, sseq, header.TCPFlagAck, nil, false)); err != nil {
				t.Fatal(err)
			}
			// 8 segments of up to 64 KiB (the last one odd-sized),
			// each echoed back before the next: the window (64 KiB,
			// no scaling) must not close.
			var sent, echoed []byte
			for i := range 8 {
				size := 65535 - int(fam.l3) - header.TCPMinimumSize
				if i == 7 {
					size = 30001
				}
				payload := make([]byte, size)
				for j := range payload {
					payload[j] = byte(i*31 + j*7 + j>>9)
				}
				seg := rawTCP(fam.client, fam.server, seq, sseq, header.TCPFlagAck|header.TCPFlagPsh, payload, true)
				h := tun.VirtioNetHdr{Flags: tun.VirtioNetHdrFNeedsCsum, GSOType: fam.gsoType,
					HdrLen: fam.l3 + header.TCPMinimumSize, GSOSize: 1500 - fam.l3 - header.TCPMinimumSize,
					CsumStart: fam.l3, CsumOffset: header.TCPChecksumOffset}
				if err := dev.DeliverGSO(ctx, h, seg); err != nil {
					t.Fatal(err)
				}
				sent = append(sent, payload...)
				seq += uint32(size)
				for len(echoed) < len(sent) {
					tcp := next()
					if p := tcp.Payload(); len(p) > 0 {
						if tcp.SequenceNumber() != sseq {
							t.Fatalf("echo at %d, want %d", tcp.SequenceNumber()-sseq, 0)
						}
						echoed = append(echoed, p...)
						sseq += uint32(len(p))
						if err := dev.Deliver(ctx, rawTCP(fam.client, fam.server, seq, sseq, header.TCPFlagAck, nil, false)); err != nil {
							t.Fatal(err)
						}
					}
				}
			}
			if !bytes.Equal(echoed, sent) {
				t.Fatal("the echo differs from what was sent")
			}
			ds, ls := dev.Stats(), n.st.Endpoint().Stats()
			hook.mu.Lock()
			defer hook.mu.Unlock()
			if ds.RxGSO != 8 || ds.RxErrors != 0 || hook.largest != 65535 || hook.bad != 0 {
				t.Fatalf("device %+v; hooks: largest inbound %d bytes, %d bad", ds, hook.largest, hook.bad)
			}
			if ls.RxBytes < uint64(len(sent)) {
				t.Fatalf("endpoint delivered %d bytes", ls.RxBytes)
			}
		})
	}
}
