package e2e

import (
	"fmt"
	"testing"
	"time"
)

// TestTakeoverHTTPCrash: the node serving a keep-alive HTTP connection in
// the middle of a large GET /bytes response is killed with SIGKILL and
// removed from the route. http resumes mid-response from its replicated
// per-response checkpoint: the response completes exactly (every byte
// checked), and the same connection then serves more requests on the new
// owner, with no reset.
func TestTakeoverHTTPCrash(t *testing.T) {
	t.Parallel()
	const (
		target = 0
		size   = 64 << 20
		hold   = size / 4
	)
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btkh", 2, nil)
	l := c.Lab

	resets := clientResets(t, l)
	h, err := dialHTTP(ctx, l.Client, "tcp4", hostPort(l.Anycast4, 80), portsTo(t, l, 80, target, 1, 27000)[0])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	get := func(n, seed uint64, hold int64) (*countingReader, chan error) {
		t.Helper()
		status, body, err := h.get(fmt.Sprintf("/bytes?n=%d&seed=%d", n, seed))
		if err == nil && status != 200 {
			err = fmt.Errorf("status %d", status)
		}
		if err != nil {
			t.Fatalf("GET %d bytes: %v", n, err)
		}
		cr := &countingReader{r: body, ctx: ctx}
		cr.limit.Store(hold)
		done := make(chan error, 1)
		go func() { done <- verifyBytes(cr, n, seed) }()
		return cr, done
	}
	wait := func(what string, done chan error) {
		t.Helper()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		case <-time.After(3 * time.Minute):
			t.Fatalf("%s: not finished", what)
		}
	}
	_, done := get(1<<20, 1, 0)
	wait("first response", done)

	cr, done := get(size, 2, hold)
	if err := waitFor(ctx, 2*time.Minute, func() error {
		if n := cr.n.Load(); n < hold {
			return fmt.Errorf("response at %d bytes", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	cr.limit.Store(0) // the response runs on as the owner dies
	if err := c.procs[target].Kill(); err != nil {
		t.Fatal(err)
	}
	if err := l.SetNexthops([]int{1, 2}); err != nil {
		t.Fatal(err)
	}
	wait("response across the crash", done)
	for seed := uint64(3); seed < 6; seed++ {
		_, done := get(4<<20+seed, seed, 0)
		wait(fmt.Sprintf("request %d after the crash", seed), done)
	}
	noResets(t, l, resets)
	c.logMetrics()
	c.noFailures()
	if n := c.total("total", `kind="push"`) + c.total("total", `kind="pull-restore"`); n < 1 {
		t.Error("the connection was not restored from its replicas")
	}
}
