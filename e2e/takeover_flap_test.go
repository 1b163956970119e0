package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// TestTakeoverFlap (scenario c): two 200 MB downloads, one over IPv4 and
// one over IPv6, move n1 -> n2 -> n1 -> n3 as the router's nexthops flap,
// each owner serving part of them (the client reads in steps, and each
// step is read from the new owner), and complete exactly with no reset.
// The flows' ownership histories on their last owner show every move, each
// a live claim.
func TestTakeoverFlap(t *testing.T) {
	const (
		size = 200 << 20
		step = 16 << 20 // read from each owner in turn
	)
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btkc", 2, nil)
	l := c.Lab

	// Flows the full route sends to n1, over both families.
	var srcs []netip.AddrPort
	dsts := []netip.Addr{l.Anycast4, l.Anycast6}
	for i, client := range []netip.Addr{l.ClientAddr4, l.ClientAddr6} {
		for port := 23000 + 100*i; ; port++ {
			src := netip.AddrPortFrom(client, uint16(port))
			n, err := l.PredictNode(src, netip.AddrPortFrom(dsts[i], streamPort))
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				srcs = append(srcs, src)
				break
			}
		}
	}
	resets := clientResets(t, l)
	var ds []*download
	for i, src := range srcs {
		ds = append(ds, startDownload(t, ctx, l, dsts[i], int(src.Port()), size, step))
	}
	waitProgress(t, ctx, ds, step)

	// Each move: the client may read one more step, the route changes
	// under the running flows, and the step is read (from the new owner:
	// the old one is fenced once it handed the flow over).
	moves := []struct {
		nexthops []int
		owner    int
	}{{[]int{1}, 1}, {[]int{0, 1, 2}, 0}, {[]int{2}, 2}}
	for i, m := range moves {
		limit := int64(step * (i + 2))
		for _, d := range ds {
			d.cr.limit.Store(limit)
		}
		if err := l.SetNexthops(m.nexthops); err != nil {
			t.Fatal(err)
		}
		for j, src := range srcs {
			got, err := l.PredictNode(src, netip.AddrPortFrom(dsts[j], streamPort))
			if err != nil {
				t.Fatal(err)
			}
			if got != m.owner {
				t.Fatalf("nexthops %v send %s to %s, not %s", m.nexthops, src, lab.NodeName(got), lab.NodeName(m.owner))
			}
		}
		waitProgress(t, ctx, ds, limit)
	}

	// The flows, still open (the client holds back the rest), are owned
	// by n3, whose history shows every move, each a live claim. A route
	// change may pass through an intermediate set (BIRD reloads one
	// node's routes after the other): an extra hop is possible, a missing
	// one is not.
	for j, src := range srcs {
		key := handoff.FlowKey{Client: src, Anycast: netip.AddrPortFrom(dsts[j], streamPort)}
		resp, err := c.admins[2].GetFlow(ctx, &batonv1.GetFlowRequest{Key: key.Proto(), LocalOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		got := history(resp.Flow.GetState())
		if err := checkPath(got, "n1", "n2", "n1", "n3"); err != nil {
			t.Errorf("%s: ownership history %q: %v", key, got, err)
		} else {
			t.Logf("%s: ownership history: %s", key, got)
		}
	}

	release(ds)
	finish(t, ds)
	noResets(t, l, resets)
	c.logMetrics()
	c.noFailures()
	if n := c.total("total", `kind="pull-migrate"`); n < float64(len(moves)*len(ds)) {
		t.Errorf("%v pull-migrate takeovers, want >= %d", n, len(moves)*len(ds))
	}
}

// history renders a flow's ownership history as "node/how ...".
func history(s *batonv1.FlowState) string {
	var parts []string
	for _, h := range s.GetHistory() {
		parts = append(parts, fmt.Sprintf("%s/%s", h.Node, h.How))
	}
	return strings.Join(parts, " ")
}

// checkPath checks a history rendered by history: opened on path[0], then
// only live claims, passing through path in order and ending on its last
// node.
func checkPath(hist string, path ...string) error {
	steps := strings.Fields(hist)
	if len(steps) == 0 || steps[0] != path[0]+"/open" {
		return fmt.Errorf("not opened on %s", path[0])
	}
	next := 1
	for _, st := range steps[1:] {
		node, how, _ := strings.Cut(st, "/")
		if how != handoff.HowPullMigrate {
			return fmt.Errorf("step %s is not a live claim", st)
		}
		if next < len(path) && node == path[next] {
			next++
		}
	}
	if next < len(path) {
		return fmt.Errorf("does not pass through %v in order", path)
	}
	if last, _, _ := strings.Cut(steps[len(steps)-1], "/"); last != path[len(path)-1] {
		return fmt.Errorf("ends on %s, not %s", last, path[len(path)-1])
	}
	return nil
}
