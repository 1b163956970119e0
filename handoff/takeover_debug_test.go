package handoff

import (
	"net/netip"
	"strings"
	"testing"
)

// DebugFlow shows a migrated flow's engine entry, translator, tracker
// state and endpoint on its new owner, and says so when a node knows
// nothing of a flow.
func TestDebugFlow(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 2, replicas: 1})
	ctx := testCtx(t)
	d := l.startDownload(ctx, tkDst4, 32<<20, 3)
	d.waitBytes(t, 1<<20)
	l.route.Store(1)
	d.waitBytes(t, 8<<20)
	got := l.nodes[1].e.DebugFlow(d.key)
	for _, want := range []string{
		"node n2 flow " + d.key.String(),
		`engine: state active how "pull-migrate"`,
		"translator: {SeqDelta:",
		"tracker: phase FLOW_PHASE_ESTABLISHED",
		"endpoint: state ESTABLISHED",
		"endpoint: segments in",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("n2's view lacks %q:\n%s", want, got)
		}
	}
	if err := d.wait(t); err != nil {
		t.Fatalf("download: %v", err)
	}
	unknown := FlowKey{Client: netip.AddrPortFrom(d.key.Client.Addr(), d.key.Client.Port()+1), Anycast: d.key.Anycast}
	got = l.nodes[0].e.DebugFlow(unknown)
	for _, want := range []string{"engine: no entry", "tracker: not tracked", "endpoint: none"} {
		if !strings.Contains(got, want) {
			t.Errorf("the view of an unknown flow lacks %q:\n%s", want, got)
		}
	}
}
