package e2e

// Split brain: the owner of a flow is partitioned from its replicas on the
// peer network while the router moves the flow to a replica, then the
// partition heals. The lease rules (handoff/lease.go) must keep at most
// one node sending data for the flow at any time. The router counts the
// flow's data segments by the node they come from (nftables counters on
// its forward path, by incoming interface), and each node's segments sent
// after another node's first one: a flow handed over from node to node
// never has two nodes' segments interleaved.

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
// > 200) from the anycast stream port to the client port, per node link,
// and, for every ordered pair of nodes, node a's segments forwarded after
// node b's first one (comment "naafternb"; nftables dynamic sets record
// which nodes have sent). It returns a reader of the counts by comment.
func countFlowSegments(t *testing.T, l *lab.Lab, clientPort int) func() map[string]uint64 {
	t.Helper()
	rules := "table inet splitbrain {\n"
	for i := range l.Nodes {
		rules += fmt.Sprintf("  set started%s { type inet_service; flags dynamic; size 16; }\n", lab.NodeName(i))
	}
	rules += "  chain counted {\n    type filter hook forward priority 0; policy accept;\n"
	for i := range l.Nodes {
		match := fmt.Sprintf("iifname %q ip saddr %s tcp sport %d tcp dport %d ip length > 200",
			l.Node(i).RouterLink, l.Anycast4, rrStreamPort, clientPort)
		rules += fmt.Sprintf("    %s counter comment %q\n", match, lab.NodeName(i))
		for j := range l.Nodes {
			if j != i {
				rules += fmt.Sprintf("    %s tcp dport @started%s counter comment %q\n", match, lab.NodeName(j), lab.NodeName(i)+"after"+lab.NodeName(j))
			}
		}
		rules += fmt.Sprintf("    %s add @started%s { tcp dport }\n", match, lab.NodeName(i))
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

// interleaved returns the pairs of nodes whose data segments of the flow
// interleaved: each sent some after the other's first. A flow handed from
// one node to another (and never back) has none; two nodes sending at the
// same time have.
func interleaved(counts map[string]uint64, nodes int) []string {
	var out []string
	for i := range nodes {
		for j := i + 1; j < nodes; j++ {
			a, b := lab.NodeName(i), lab.NodeName(j)
			if x, y := counts[a+"after"+b], counts[b+"after"+a]; x > 0 && y > 0 {
				out = append(out, fmt.Sprintf("%s sent %d after %s's first, %s %d after %s's first", a, x, b, b, y, a))
			}
		}
	}
	return out
}

// flowCopy returns node i's own copy of flow k (nil when it has none).
func flowCopy(ctx context.Context, c *takeoverCluster, i int, k string) (*batonv1.FlowState, error) {
	fl, err := localFlows(ctx, c.admins[i])
	if err != nil {
		return nil, err
	}
	return fl[k], nil
}

// splitBrain is a running split-brain scenario: a cluster, one paced
// download owned by n1 and replicated on every other node, the router
// counting its segments, and n1 cut off from some peers.
type splitBrain struct {
	c        *takeoverCluster
	ctx      context.Context
	d        *rrDownload
	key      string
	e1       uint64 // n1's epoch before the cut
	rate     *atomic.Int64
	over     *atomic.Bool
	segments func() map[string]uint64
	heals    []func()
	cut      time.Time
}

// startSplitBrain starts n nodes (replicas per flow), one paced download
// from a client port from firstPort that the router sends to n1, waits
// until n1 owns it and every other node holds its replica, then cuts n1
// off from each of cutFrom on the peer network, waits until both sides
// see it and moves the flow to n2.
func startSplitBrain(t *testing.T, n int, prefix string, replicas, firstPort int, cutFrom ...int) *splitBrain {
	t.Helper()
	ctx := testCtx(t)
	c := startCluster(t, ctx, n, prefix, replicas, nil)
	l := c.Lab
	sb := &splitBrain{c: c, ctx: ctx, rate: new(atomic.Int64), over: new(atomic.Bool)}
	port := portsTo(t, l, rrStreamPort, 0, 1, firstPort)[0]
	sb.key = handoff.FlowKey{Client: netip.AddrPortFrom(l.ClientAddr4, uint16(port)), Anycast: netip.AddrPortFrom(l.Anycast4, rrStreamPort)}.String()
	sb.rate.Store(512 << 10)
	sb.d = rrStartDownloads(t, ctx, l, []int{port}, 16<<20, sb.rate, sb.over)[0]
	if err := waitFor(ctx, 30*time.Second, func() error {
		for i := range c.procs {
			st, err := flowCopy(ctx, c, i, sb.key)
			if err != nil || st == nil || st.Owner != "n1" {
				return fmt.Errorf("%s's copy %v, %v", lab.NodeName(i), st, err)
			}
			sb.e1 = st.Epoch
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	sb.segments = countFlowSegments(t, l, port)
	time.Sleep(time.Second)

	var pairs [][2]int
	for _, p := range cutFrom {
		heal := partitionPeers(t, l, 0, p)
		t.Cleanup(heal)
		sb.heals = append(sb.heals, heal)
		pairs = append(pairs, [2]int{0, p})
	}
	sb.cut = time.Now()
	if err := waitFor(ctx, time.Minute, func() error {
		for _, pair := range pairs {
			for _, p := range [][2]int{pair, {pair[1], pair[0]}} {
				if up, err := peerUp(ctx, c, p[0], lab.NodeName(p[1])); err != nil || up {
					return fmt.Errorf("%s sees %s up (%v)", lab.NodeName(p[0]), lab.NodeName(p[1]), err)
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("partition not seen: %v", err)
	}
	if err := l.SetNexthops([]int{1}); err != nil {
		t.Fatal(err)
	}
	return sb
}

// heal ends the partition, waits until the states converge (n1 owns no
// flow, every copy says owner n2 above n1's epoch) and returns n2's epoch
// and how long convergence took.
func (sb *splitBrain) heal(t *testing.T) (uint64, time.Duration) {
	t.Helper()
	for _, h := range sb.heals {
		h()
	}
	t1 := time.Now()
	if err := waitPeersUp(sb.ctx, sb.c.admins); err != nil {
		t.Fatal(err)
	}
	var e2 uint64
	if err := waitFor(sb.ctx, time.Minute, func() error {
		h, err := sb.c.admins[0].Health(sb.ctx, &batonv1.HealthRequest{})
		if err != nil || h.OwnedFlows != 0 {
			return fmt.Errorf("n1 owns %d flows (%v)", h.GetOwnedFlows(), err)
		}
		for i := range sb.c.procs {
			st, err := flowCopy(sb.ctx, sb.c, i, sb.key)
			if err != nil || st == nil || st.Owner != "n2" || st.Epoch <= sb.e1 || (e2 != 0 && st.Epoch != e2) {
				return fmt.Errorf("%s's copy %v, %v", lab.NodeName(i), st, err)
			}
			e2 = st.Epoch
		}
		return nil
	}); err != nil {
		t.Fatalf("states did not converge after the partition healed: %v", err)
	}
	return e2, time.Since(t1)
}

// end fails the test if two nodes' data segments of the flow interleaved,
// then lets the download run fast to its end: exact, or reset, never
// wrong.
func (sb *splitBrain) end(t *testing.T) {
	t.Helper()
	time.Sleep(2 * time.Second)
	counts := sb.segments()
	t.Logf("data segments of the flow by node, and after another node's first: %v", counts)
	if bad := interleaved(counts, len(sb.c.procs)); len(bad) > 0 {
		t.Errorf("two nodes sent data segments of the flow interleaved: %v", bad)
	}
	sb.over.Store(true)
	sb.rate.Store(rrEndRate)
	select {
	case <-sb.d.done:
	case <-time.After(3 * time.Minute):
		t.Fatalf("download did not finish (%d bytes)", sb.d.pr.n.Load())
	}
	switch {
	case sb.d.err == nil:
		t.Log("download: exact bytes")
	case strings.Contains(sb.d.err.Error(), "RESET"):
		t.Logf("download: reset: %v", sb.d.err)
	default:
		t.Errorf("download: %v", sb.d.err)
	}
	sb.c.logMetrics()
}

// TestSplitBrainNoMajority: two nodes, n1 owns a paced download, n2 holds
// its replica; the peer network between them is cut and the router moves
// the flow to n2. Neither side has a majority: n1 loses its lease and
// fences the flow, n2 does not take it over (the owner may be alive) and
// drops its packets without a reset. After the heal, n2 claims it from
// n1 (live migration) and the download ends exactly. Asserted: the two
// nodes' data segments of the flow never interleave; n2 owns
// nothing during the partition; n1 reports its lease lost and fenced
// packets, n2 dropped packets awaiting proof; the states converge on n2.
func TestSplitBrainNoMajority(t *testing.T) {
	sb := startSplitBrain(t, 2, "btw", 1, 26000, 1)
	c, ctx := sb.c, sb.ctx
	// Well past the lease (3 s) and its margin: n1 has fenced the flow,
	// n2 has seen the client's packets and not taken the flow over.
	if err := waitFor(ctx, time.Minute, func() error {
		if v := c.counter(0, "lease_held", ""); v != 0 {
			return fmt.Errorf("n1 lease_held %v", v)
		}
		if v := c.counter(0, "packets_total", `what="lease_fenced"`); v == 0 {
			return fmt.Errorf("n1 fenced no packet yet")
		}
		if v := c.counter(1, "packets_total", `what="await_gone"`); v == 0 {
			return fmt.Errorf("n2 dropped no packet awaiting proof yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	if st, err := flowCopy(ctx, c, 1, sb.key); err != nil || (st != nil && st.Owner == "n2") {
		t.Fatalf("n2 took the flow over during the partition (%v, %v)", st, err)
	}
	if n := c.counter(1, "total", ""); n != 0 {
		t.Fatalf("n2 counted %v takeovers during the partition", n)
	}
	t.Logf("partitioned %s: n1 fenced %v packets, n2 dropped %v awaiting proof, no takeover",
		time.Since(sb.cut).Round(100*time.Millisecond), c.counter(0, "packets_total", `what="lease_fenced"`), c.counter(1, "packets_total", `what="await_gone"`))

	e2, took := sb.heal(t)
	t.Logf("healed: n2 owns the flow at epoch %d (n1's was %d) %s after the heal; pull-migrate on n2: %v",
		e2, sb.e1, took.Round(time.Millisecond), c.counter(1, "total", `kind="pull-migrate"`))
	sb.end(t)
}

// TestSplitBrainMinorityFenced: three nodes, n1 owns a paced download, n2
// and n3 hold its replicas; n1 is cut off from both on the peer network
// and the router moves the flow to n2. n1, without a majority, loses its
// lease and fences the flow; n2 and n3 have not heard n1 for longer than
// the lease and its margin (each tells the other), so the flow is taken
// over (restored at a higher epoch) on the majority side. Asserted: no two
// nodes' data segments of the flow interleave; the
// majority side takes the flow over during the partition; after the heal
// the states converge on n2; the download ends exactly or reset.
func TestSplitBrainMinorityFenced(t *testing.T) {
	sb := startSplitBrain(t, 3, "btm", 2, 27000, 1, 2)
	c, ctx := sb.c, sb.ctx
	var e2 uint64
	if err := waitFor(ctx, time.Minute, func() error {
		st, err := flowCopy(ctx, c, 1, sb.key)
		if err != nil || st == nil || st.Owner != "n2" {
			return fmt.Errorf("n2's copy %v, %v", st, err)
		}
		e2 = st.Epoch
		return nil
	}); err != nil {
		t.Fatalf("the majority side did not take the flow over: %v", err)
	}
	t.Logf("n2 owns the flow at epoch %d (n1's %d) %s after the cut; n1 lease_held %v, fenced %v packets",
		e2, sb.e1, time.Since(sb.cut).Round(100*time.Millisecond), c.counter(0, "lease_held", ""), c.counter(0, "packets_total", `what="lease_fenced"`))
	if v := c.counter(0, "lease_held", ""); v != 0 {
		t.Errorf("n1, cut off from the majority, holds its lease (lease_held %v)", v)
	}
	time.Sleep(2 * time.Second)
	e2, took := sb.heal(t)
	t.Logf("healed: states converged on n2 at epoch %d %s after the heal", e2, took.Round(time.Millisecond))
	sb.end(t)
}
