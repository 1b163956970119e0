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
		size  = 40 << 20
	)
	ctx := testCtx(t)
	c := startCluster(t, ctx, 4, "btkb", 2, []int{0, 1, 2})
	l := c.Lab

	resets := clientResets(t, l)
	ds := startDownloads(t, ctx, l, -1, flows, 22000, size)
	before := make([]int, len(ds))
	for i, d := range ds {
		before[i] = predict(t, l, d.port, streamPort)
	}
	waitProgress(t, ctx, ds, size/10)
	if err := l.SetNexthops([]int{0, 1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	// Which flows the router now sends elsewhere, and how many of them
	// were still running when it did (a finished one has nothing to move).
	moved, movedRunning, toNew := 0, 0, 0
	for i, d := range ds {
		after := predict(t, l, d.port, streamPort)
		if after == before[i] {
			continue
		}
		moved++
		if after == 3 {
			toNew++
		}
		select {
		case <-d.done:
		default:
			movedRunning++
		}
		t.Logf("port %d: %s -> %s", d.port, lab.NodeName(before[i]), lab.NodeName(after))
	}
	t.Logf("%d of %d flows rehashed (%d to the new node), %d of them still running", moved, flows, toNew, movedRunning)
	if movedRunning == 0 {
		t.Fatal("no running flow was rehashed: the scenario tested nothing")
	}
	finish(t, ds)
	noResets(t, l, resets)
	c.logMetrics()
	got := c.total("total", `kind="pull-migrate"`)
	if got == 0 {
		t.Fatal("no pull-migrate takeover counted")
	}
	if c.counter(3, "total", `kind="pull-migrate"`) == 0 && toNew > 0 {
		t.Error("the new node migrated no flow")
	}
	if other := c.total("total", `kind="push"`) + c.total("total", `kind="pull-restore"`); other != 0 {
		t.Errorf("%v push or pull-restore takeovers with every owner alive", other)
	}
	t.Logf("%v pull-migrate takeovers for %d rehashed flows", got, moved)
}
