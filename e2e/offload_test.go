package e2e

import (
	"crypto/sha256"
	"io"
	"testing"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/stack/services"
)

// TestServicesThroughRouterOffload is TestServicesThroughRouter with every
// batond started with -tun-offload: the TUN carries a virtio header and
// gVisor's TCP writes segments of up to 64 KiB with partial checksums, which
// the kernel forwards whole through the router to the Linux client. Every
// byte and every hash is checked as on the default device; the TUN's own
// counters then show that the large segments were used, in both directions:
// the device also offers the kernel receive offload, so the client's TSO
// segments reach batond whole (an upload, echoed back and checked byte for
// byte, over IPv4 and IPv6).
func TestServicesThroughRouterOffload(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l := buildLab(t, ctx, 3, "bto")
	for i := range l.Nodes {
		if _, err := l.StartBatond(ctx, batond, i, "-tun-offload"); err != nil {
			t.Fatal(err)
		}
	}
	checkServices(t, l)

	// From the kernel's side of the TUN, what batond wrote is "received":
	// GSO segments arrive as packets far larger than the 1500-byte MTU.
	var pkts, bytes uint64
	for _, n := range l.Nodes {
		link, err := n.Netlink().LinkByName(lab.TUNName)
		if err != nil {
			t.Fatal(err)
		}
		st := link.Attrs().Statistics
		if st.RxDropped != 0 || st.RxErrors != 0 {
			t.Errorf("%s: the kernel dropped %d and refused %d packets batond wrote", n.Name, st.RxDropped, st.RxErrors)
		}
		pkts += st.RxPackets
		bytes += st.RxBytes
	}
	if pkts == 0 {
		t.Fatal("no packets written to the TUNs")
	}
	t.Logf("batond wrote %d packets, %d bytes (%d bytes per packet on average)", pkts, bytes, bytes/pkts)
	if bytes/pkts <= 1500 {
		t.Fatalf("%d bytes per packet written: no large segments", bytes/pkts)
	}

	// Receive offload: what the kernel "transmits" into the TUNs is what
	// batond reads. During uploads the reads carry the client's data as
	// TCP segments larger than the MTU (the device could not return a
	// packet of more than 1500 bytes otherwise).
	txCounters := func() (pkts, bytes uint64) {
		for _, n := range l.Nodes {
			link, err := n.Netlink().LinkByName(lab.TUNName)
			if err != nil {
				t.Fatal(err)
			}
			st := link.Attrs().Statistics
			if st.TxDropped != 0 {
				t.Errorf("%s: the kernel dropped %d packets for batond (not read in time)", n.Name, st.TxDropped)
			}
			pkts += st.TxPackets
			bytes += st.TxBytes
		}
		return pkts, bytes
	}
	for _, f := range []struct{ network, addr string }{
		{"tcp4", hostPort(l.Anycast4, 7)},
		{"tcp6", hostPort(l.Anycast6, 7)},
	} {
		p0, b0 := txCounters()
		c, err := l.Client.Dial(ctx, f.network, f.addr, 0)
		if err != nil {
			t.Fatal(err)
		}
		msg := make([]byte, 16<<20)
		services.FillPattern(11, 0, msg)
		go func() { c.Write(msg) }()
		got := make([]byte, len(msg))
		_, err = io.ReadFull(c, got)
		c.Close()
		if err != nil {
			t.Fatalf("%s upload: %v", f.network, err)
		}
		if sha256.Sum256(got) != sha256.Sum256(msg) {
			t.Fatalf("%s upload: echoed bytes differ", f.network)
		}
		p1, b1 := txCounters()
		if p1 == p0 {
			t.Fatalf("%s upload: nothing read from the TUNs", f.network)
		}
		t.Logf("%s upload of %d bytes: batond read %d packets, %d bytes (%d bytes per packet on average)",
			f.network, len(msg), p1-p0, b1-b0, (b1-b0)/(p1-p0))
		if (b1-b0)/(p1-p0) <= 1500 {
			t.Fatalf("%s upload: %d bytes per packet read: no receive offload", f.network, (b1-b0)/(p1-p0))
		}
	}
}
