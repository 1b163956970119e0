package e2e

import (
	"testing"

	"github.com/baton-anycast/baton/e2e/lab"
)

// TestTakeoverRehashAddition (scenario b): a 4-node cluster (2 replicas)
// whose route starts with 3 nodes serves 50 downloads; then the 4th node
// joins the route. Linux's hash-threshold multipath moves every flow whose
// hash range changed owner, to the new node and between the old ones; those
// flows are claimed live from their owners (pull-migrate) and every
// download completes exactly, with no reset.
func TestTakeoverRehashAddition(t *testing.T) {
	const (
		flows = 50
		size  = 24 << 20
	)
	ctx := testCtx(t)
	c := startCluster(t, ctx, 4, "btkb", 2, []int{0, 1, 2})
	l := c.Lab

	resets := clientResets(t, l)
	ds := startDownloads(t, ctx, l, -1, flows, 22000, size, size/10)
	before := make([]int, len(ds))
	for i, d := range ds {
		before[i] = predict(t, l, d.port, streamPort)
	}
	waitProgress(t, ctx, ds, size/10)
	release(ds) // every flow runs, 90% of it still to come, as the route changes
	if err := l.SetNexthops([]int{0, 1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	// Which flows the router now sends elsewhere: each of them has its
	// client's next packets land on a node that must claim it.
	moved, toNew := 0, 0
	for i, d := range ds {
		after := predict(t, l, d.port, streamPort)
		if after == before[i] {
			continue
		}
		moved++
		if after == 3 {
			toNew++
		}
		t.Logf("port %d: %s -> %s", d.port, lab.NodeName(before[i]), lab.NodeName(after))
	}
	t.Logf("%d of %d flows rehashed (%d to the new node)", moved, flows, toNew)
	if moved == 0 || toNew == 0 {
		t.Fatal("no flow was rehashed to the new node: the scenario tested nothing")
	}
	finish(t, ds)
	noResets(t, l, resets)
	c.logMetrics()
	c.noFailures()
	// More than one claim per moved flow happens when a node's health
	// check fails under load and its route flaps (each move is a claim).
	got := c.total("total", `kind="pull-migrate"`)
	t.Logf("%v pull-migrate takeovers for %d rehashed flows", got, moved)
	if got < float64(moved) {
		t.Errorf("%v pull-migrate takeovers, want >= %d (one per rehashed flow)", got, moved)
	}
	if n := c.counter(3, "total", `kind="pull-migrate"`); n < float64(toNew) {
		t.Errorf("the new node migrated %v flows, want >= %d", n, toNew)
	}
	if other := c.total("total", `kind="push"`) + c.total("total", `kind="pull-restore"`); other != 0 {
		t.Errorf("%v push or pull-restore takeovers with every owner alive", other)
	}
}
