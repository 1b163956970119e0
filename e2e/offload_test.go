package e2e

import (
	"testing"

	"github.com/baton-anycast/baton/e2e/lab"
)

// TestServicesThroughRouterOffload is TestServicesThroughRouter with every
// batond started with -tun-offload: the TUN carries a virtio header and
// gVisor's TCP writes segments of up to 64 KiB with partial checksums, which
// the kernel forwards whole through the router to the Linux client. Every
// byte and every hash is checked as on the default device; the TUN's own
// counters then show that the large segments were used.
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
}
