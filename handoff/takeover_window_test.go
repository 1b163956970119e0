package handoff

import (
	"testing"
	"time"
)

// A crash while the client's receive window is closed: the client stopped
// reading (its window fell to zero, the owner probes it), starts reading
// again just as the owner dies, and its packets then reach a node other
// than the dead owner's designated replica. The designated replica pushes
// the flow with no client packet in hand (it assumes a window), the other
// node claims it from there moments later (push, then claim). The
// download must finish exactly, without a reset (CI saw it stall once in
// the lab).
func TestTakeoverCrashClosedWindow(t *testing.T) {
	for _, tc := range []struct {
		name       string
		routeDelay time.Duration // from the kill to the route change
		gso        bool          // the nodes' devices take GSO segments
	}{
		{"route-at-once", 0, false},
		{"route-after-2ms", 2 * time.Millisecond, false},
		{"route-after-20ms", 20 * time.Millisecond, false},
		{"gso-route-after-2ms", 2 * time.Millisecond, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTkLab(t, tkConfig{nodes: 3, gso: tc.gso})
			l.enableClientSACK()
			ctx := testCtx(t)
			d := l.startDownload(ctx, tkDst4, tkSize, 21)
			hold := int64(tkSize / 3)
			d.conn.limit.Store(hold)
			d.waitBytes(t, hold)
			// The window is closed and the replicas know where the client is.
			des := l.nodes[0].e.designated(d.key, "n1")
			di, oi := l.node(des), 3-l.node(des)
			eventually(t, "the replica at the client's position", func() bool {
				st, ok := l.nodes[di].r.Store().Lookup(d.key)
				own, ok2 := l.nodes[0].tr.Lookup(d.key)
				return ok && ok2 && st.ClientAckedBytes == own.ClientAckedBytes && st.ClientAckedBytes > uint64(hold)
			})
			time.Sleep(300 * time.Millisecond) // a zero-window probe or two
			d.conn.limit.Store(0)
			l.kill(0)
			if tc.routeDelay > 0 {
				time.Sleep(tc.routeDelay)
			}
			l.route.Store(int32(oi))
			if err := d.wait(t); err != nil {
				l.logStats()
				t.Fatalf("download: %v", err)
			}
			l.logStats()
			if n := l.resets(); n != 0 {
				t.Fatalf("client got %d resets", n)
			}
		})
	}
}
