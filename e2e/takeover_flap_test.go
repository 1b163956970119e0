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

// TestTakeoverFlap (scenario c): one 200 MB download moves n1 -> n2 -> n1
// -> n3 as the router's nexthops flap, each owner serving part of it
// (the client reads in steps, and each step is read from the new owner),
// and completes exactly with no reset. The flow's ownership history on its
// last owner shows every move, each a live claim.
func TestTakeoverFlap(t *testing.T) {
	const (
		size = 200 << 20
		step = 16 << 20 // read from each owner in turn
	)
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btkc", 2, nil)
	l := c.Lab

	port := portsTo(t, l, streamPort, 0, 1, 23000)[0]
	resets := clientResets(t, l)
	d := startDownload(t, ctx, l, port, size, step)
	waitProgress(t, ctx, []*download{d}, step)

	// Each move: the client may read one more step, the route changes
	// under the running flow, and the step is read (from the new owner:
	// the old one is fenced once it handed the flow over).
	moves := []struct {
		nexthops []int
		owner    int
	}{{[]int{1}, 1}, {[]int{0, 1, 2}, 0}, {[]int{2}, 2}}
	for i, m := range moves {
		limit := int64(step * (i + 2))
		d.cr.limit.Store(limit)
		if err := l.SetNexthops(m.nexthops); err != nil {
			t.Fatal(err)
		}
		if got := predict(t, l, port, streamPort); got != m.owner {
			t.Fatalf("nexthops %v send the flow to %s, not %s", m.nexthops, lab.NodeName(got), lab.NodeName(m.owner))
		}
		waitProgress(t, ctx, []*download{d}, limit)
	}

	// The flow, still open (the client holds back the rest), is owned by
	// n3, whose history shows every move.
	key := handoff.FlowKey{Client: netip.AddrPortFrom(l.ClientAddr4, uint16(port)), Anycast: netip.AddrPortFrom(l.Anycast4, streamPort)}
	resp, err := c.admins[2].GetFlow(ctx, &batonv1.GetFlowRequest{Key: key.Proto(), LocalOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	want := "n1/open n2/pull-migrate n1/pull-migrate n3/pull-migrate"
	if got := history(resp.Flow.GetState()); got != want {
		t.Errorf("ownership history on n3 %q, want %q", got, want)
	} else {
		t.Logf("ownership history: %s", got)
	}

	d.cr.limit.Store(0)
	finish(t, []*download{d})
	noResets(t, l, resets)
	c.logMetrics()
	if n := c.total("total", `kind="pull-migrate"`); n < float64(len(moves)) {
		t.Errorf("%v pull-migrate takeovers, want >= %d", n, len(moves))
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
