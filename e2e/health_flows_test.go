package e2e

// Issue 5's scenario (a) with flows: a failing service check withdraws a
// node of a BIRD cluster while long downloads and echo sessions run on
// it; its flows migrate to the nodes the router now sends them to (the
// takeover's pull path, the node stays up) and none is lost; it announces
// again once the check passes. Times are logged, never asserted.

import (
	"context"
	"fmt"
	"testing"
	"time"
)

func TestHealthCheckFailureMigratesFlows(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	t.Cleanup(cancel)
	c := rrStartCluster(t, ctx, 3, "bth2")
	resets0 := clientResets(t, c.Lab)
	w := rrStartWorkload(t, ctx, c.Lab, 15, 15, 33000, 24<<20, rrRate)
	const sick = 1
	err := waitFor(ctx, 30*time.Second, func() error {
		if n := c.owned(sick); n < 5 {
			return fmt.Errorf("n2 owns %d flows", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	w.healthy(t)
	had := c.owned(sick)

	t0 := time.Now()
	setOverride(t, c.Lab, sick, "http fail\n")
	t1 := waitNexthops(t, ctx, c.Lab, 0, 2)
	t.Logf("http check failing -> n2 withdrawn from the router's FIB: %s (owning %d flows)", t1.Sub(t0).Round(time.Millisecond), had)
	// n2 stays up: every flow it owns moves once its client sends (the
	// sleepy echo sessions idle up to 15 s).
	err = waitFor(ctx, 90*time.Second, func() error {
		if n := c.owned(sick); n != 0 {
			return fmt.Errorf("n2 still owns %d flows", n)
		}
		return nil
	})
	if err != nil {
		w.healthy(t)
		t.Fatal(err)
	}
	t.Logf("n2 withdrawn -> its last flow migrated: %s", time.Since(t1).Round(time.Millisecond))
	w.healthy(t)

	t2 := time.Now()
	setOverride(t, c.Lab, sick, "")
	t3 := waitNexthops(t, ctx, c.Lab, 0, 1, 2)
	t.Logf("http check passing -> n2 announced again: %s", t3.Sub(t2).Round(time.Millisecond))
	// Flows rehash onto n2 again (pull from their owners).
	err = waitFor(ctx, 60*time.Second, func() error {
		if n := c.owned(sick); n == 0 {
			return fmt.Errorf("n2 owns no flow")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	w.finish(t)
	c.logMetrics()
	if r := clientResets(t, c.Lab) - resets0; r != 0 {
		t.Errorf("the client saw %d connections reset", r)
	}
}
