package stack_test

import (
	"bytes"
	"io"
	"net/netip"
	"sync"
	"testing"

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
