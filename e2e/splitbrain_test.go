package e2e

// Split brain: two nodes that both hold a flow are partitioned from each
// other on the peer network, the router moves the flow from its owner to
// the other node (which restores it from its replica at a higher epoch,
// the owner being unreachable), and the partition heals. The router
// counts the flow's data segments by the node they come from (nftables
// counters on its forward path, by incoming interface).

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// countFlowSegments makes the router count the data segments (IP length
// > 200) from the anycast stream port to the client port, per node link;
// it returns a reader of the counts by node name.
func countFlowSegments(t *testing.T, l *lab.Lab, clientPort int) func() map[string]uint64 {
	t.Helper()
	rules := "table inet splitbrain {\n  chain counted {\n    type filter hook forward priority 0; policy accept;\n"
	for i := range l.Nodes {
		rules += fmt.Sprintf("    iifname %q ip saddr %s tcp sport %d tcp dport %d ip length > 200 counter comment %q\n",
			l.Node(i).RouterLink, l.Anycast4, rrStreamPort, clientPort, lab.NodeName(i))
	}
	rules += "  }\n}\n"
	nsRun(t, l.Router, rules, "nft", "-f", "-")
	return func() map[string]uint64 {
		out := map[string]uint64{}
		for _, m := range nftCounterRE.FindAllStringSubmatch(nsRun(t, l.Router, "", "nft", "list", "table", "inet", "splitbrain"), -1) {
			n, _ := strconv.ParseUint(m[1], 10, 64)
			out[m[2]] = n
		}
		return out
	}
}

// flowCopy returns node i's own copy of flow k (nil when it has none).
func flowCopy(ctx context.Context, c *takeoverCluster, i int, k string) (*batonv1.FlowState, error) {
	fl, err := localFlows(ctx, c.admins[i])
	if err != nil {
		return nil, err
	}
	return fl[k], nil
}

// TestSplitBrainFencing: n1 owns a paced download, n2 holds its replica.
// The peer network between them is cut; the router moves the flow to n2,
// which restores it from the replica at a higher epoch while n1 still
// owns it at the old one (both hold the flow). After the partition heals,
// the states converge (n1 owns no flow any more, both record n2 as the
// owner at n2's epoch) and from then on only n2 sends data segments of the flow
// (router counters); the download ends exactly or reset, never wrong.
// The old owner's segments while it was cut off (retransmissions of data
// the client's acknowledgements, now going to n2, never confirmed to it)
// are counted and logged.
func TestSplitBrainFencing(t *testing.T) {
	ctx := testCtx(t)
	c := startCluster(t, ctx, 2, "btw", 1, nil)
	l := c.Lab
	port := portsTo(t, l, rrStreamPort, 0, 1, 26000)[0]
	key := handoff.FlowKey{Client: netip.AddrPortFrom(l.ClientAddr4, uint16(port)), Anycast: netip.AddrPortFrom(l.Anycast4, rrStreamPort)}.String()
	segments := countFlowSegments(t, l, port)
	var rate atomic.Int64
	var over atomic.Bool
	rate.Store(512 << 10)
	ds := rrStartDownloads(t, ctx, l, []int{port}, 16<<20, &rate, &over)
	d := ds[0]

	// n1 owns it, n2 holds the replica.
	var e1 uint64
	if err := waitFor(ctx, 30*time.Second, func() error {
		own, err := flowCopy(ctx, c, 0, key)
		if err != nil || own == nil || own.Owner != "n1" {
			return fmt.Errorf("n1's copy %v, %v", own, err)
		}
		rep, err := flowCopy(ctx, c, 1, key)
		if err != nil || rep == nil || rep.Owner != "n1" {
			return fmt.Errorf("n2's copy %v, %v", rep, err)
		}
		e1 = own.Epoch
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)

	heal := partitionPeers(t, l, 0, 1)
	t.Cleanup(heal)
	if err := waitFor(ctx, time.Minute, func() error {
		for _, pair := range [][2]int{{0, 1}, {1, 0}} {
			if up, err := peerUp(ctx, c, pair[0], lab.NodeName(pair[1])); err != nil || up {
				return fmt.Errorf("%s sees %s up (%v)", lab.NodeName(pair[0]), lab.NodeName(pair[1]), err)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("partition not seen: %v", err)
	}
	if err := l.SetNexthops([]int{1}); err != nil {
		t.Fatal(err)
	}
	var e2 uint64
	if err := waitFor(ctx, time.Minute, func() error {
		st, err := flowCopy(ctx, c, 1, key)
		if err != nil || st == nil || st.Owner != "n2" {
			return fmt.Errorf("n2's copy %v, %v", st, err)
		}
		e2 = st.Epoch
		return nil
	}); err != nil {
		t.Fatalf("n2 did not take the flow over: %v", err)
	}
	atTakeover := segments()
	old, err := flowCopy(ctx, c, 0, key)
	if err != nil {
		t.Fatal(err)
	}
	if old == nil || old.Owner != "n1" {
		t.Fatalf("n1's copy during the partition: %v (the scenario wants both nodes holding the flow)", old)
	}
	t.Logf("split brain: n1 owns the flow at epoch %d, n2 at epoch %d (n1's epoch before: %d)", old.Epoch, e2, e1)
	if e2 <= old.Epoch {
		t.Fatalf("n2 took the flow at epoch %d, not above n1's %d", e2, old.Epoch)
	}
	time.Sleep(3 * time.Second)
	partitioned := segments()
	heal()
	t1 := time.Now()
	if err := waitPeersUp(ctx, c.admins); err != nil {
		t.Fatal(err)
	}
	// Convergence: n1 owns no flow any more and both copies say n2 at e2.
	if err := waitFor(ctx, time.Minute, func() error {
		h, err := c.admins[0].Health(ctx, &batonv1.HealthRequest{})
		if err != nil || h.OwnedFlows != 0 {
			return fmt.Errorf("n1 owns %d flows (%v)", h.GetOwnedFlows(), err)
		}
		for i := range 2 {
			st, err := flowCopy(ctx, c, i, key)
			if err != nil || st == nil || st.Owner != "n2" || st.Epoch != e2 {
				return fmt.Errorf("%s's copy %v, %v", lab.NodeName(i), st, err)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("states did not converge after the partition healed: %v", err)
	}
	converged := segments()
	t.Logf("healed: states converged (owner n2, epoch %d on both) %s after the heal", e2, time.Since(t1).Round(time.Millisecond))
	time.Sleep(3 * time.Second)
	after := segments()
	t.Logf("data segments of the flow by node: at the takeover %v, end of the partition %v, converged %v, 3 s later %v",
		atTakeover, partitioned, converged, after)
	t.Logf("n1 (old owner) sent %d data segments while cut off, %d between the heal and convergence, %d after convergence",
		partitioned["n1"]-atTakeover["n1"], converged["n1"]-partitioned["n1"], after["n1"]-converged["n1"])
	if n := after["n1"] - converged["n1"]; n != 0 {
		t.Errorf("n1 sent %d data segments of the flow after the states converged on n2's epoch", n)
	}
	if after["n2"] <= converged["n2"] {
		select {
		case <-d.done:
		default:
			t.Errorf("n2 sent no data segment of the running flow after convergence")
		}
	}
	over.Store(true)
	rate.Store(rrEndRate)
	select {
	case <-d.done:
	case <-time.After(3 * time.Minute):
		t.Fatalf("download did not finish (%d bytes)", d.pr.n.Load())
	}
	switch {
	case d.err == nil:
		t.Log("download: exact bytes")
	case strings.Contains(d.err.Error(), "RESET"):
		t.Logf("download: reset: %v", d.err)
	default:
		t.Errorf("download: %v", d.err)
	}
	c.logMetrics()
}
