package handoff

import (
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// A client packet that reaches the node a flow just left (routed there
// before the route change, judged after the new owner's claim) is
// tunnelled to the new owner, which keeps the flow (MovedSettle); once the
// window is over, such a packet takes the flow back. Either way the
// download ends exact, without a reset.
func TestTakeoverLatePacket(t *testing.T) {
	for _, c := range []struct {
		name        string
		settle      time.Duration
		forwarded   bool   // the late packet is tunnelled to n2
		wantHistory string // once the late packet was handled
	}{
		{"within-window", time.Minute, true, "n1@1:open n2@2:pull-migrate"},
		{"after-window", time.Millisecond, false, "n1@1:open n2@2:pull-migrate n1@3:pull-migrate"},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newTkLab(t, tkConfig{nodes: 2, movedSettle: c.settle})
			ctx := testCtx(t)
			d := l.startDownload(ctx, tkDst4, tkSize, 23)
			d.waitBytes(t, tkSize/4)
			// A copy of one client packet of the flow as n1 gets it.
			var late atomic.Pointer[[]byte]
			capture := func(pkt []byte) bool {
				if late.Load() == nil {
					c := append([]byte(nil), pkt...)
					late.Store(&c)
				}
				return true
			}
			l.rewrite.Store(&capture)
			eventually(t, "a client packet", func() bool { return late.Load() != nil })
			l.rewrite.Store(nil)
			l.route.Store(1)
			eventually(t, "n2 to own the flow", func() bool { return l.nodes[1].tr.Has(d.key) })
			time.Sleep(2 * time.Millisecond) // past the short window (the claim was granted before n2 owned it)

			n1, n2 := l.nodes[0].e.Stats().Packets, l.nodes[1].e.Stats().Packets
			if err := l.nodes[0].dev.Deliver(ctx, *late.Load()); err != nil {
				t.Fatal(err)
			}
			history := func() string {
				for _, n := range l.nodes {
					if st, ok := n.tr.Lookup(d.key); ok {
						var hows []string
						for _, h := range st.History {
							hows = append(hows, fmt.Sprintf("%s@%d:%s", h.Node, h.Epoch, h.How))
						}
						return strings.Join(hows, " ")
					}
				}
				return ""
			}
			if c.forwarded {
				eventually(t, "n2 to get the late packet from n1", func() bool {
					return l.nodes[1].e.Stats().Packets["forward_in"] > n2["forward_in"]
				})
				if got := l.nodes[0].e.Stats().Packets["late_forward"] - n1["late_forward"]; got != 1 {
					t.Fatalf("n1 tunnelled %d late packets, want 1", got)
				}
			} else {
				// The flow comes back to n1 for the late packet; the
				// next packets (routed to n2) take it to n2 again.
				eventually(t, "the late packet to take the flow back", func() bool {
					return strings.HasPrefix(history(), c.wantHistory)
				})
				if got := l.nodes[0].e.Stats().Packets["late_forward"] - n1["late_forward"]; got != 0 {
					t.Fatalf("n1 tunnelled %d late packets after the window, want 0", got)
				}
			}
			l.finishExact(t, d)
			got := history()
			if c.forwarded && got != c.wantHistory {
				t.Fatalf("history %q, want %q", got, c.wantHistory)
			}
			if !strings.HasPrefix(got, c.wantHistory) {
				t.Fatalf("history %q, want it to begin %q", got, c.wantHistory)
			}
		})
	}
}
