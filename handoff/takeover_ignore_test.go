package handoff

import (
	"net/netip"
	"testing"

	"github.com/baton-anycast/baton/stack/stacktest"
)

// A flow from an address the tracker ignores (batond: the node's own
// addresses, i.e. its health probes) lives and dies on its node: when its
// packets reach another node, that node's stack answers them (a reset, as
// without a cluster), with no takeover attempted, no peer asked and no
// "unknown" flow counted.
func TestTakeoverLeavesIgnoredClientsToTheStack(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 2, ignoreClient: func(a netip.Addr) bool { return a == stacktest.ClientAddr4 }})
	ctx := testCtx(t)
	d := l.startDownload(ctx, tkDst4, tkSize, 5)
	d.waitBytes(t, 1<<20)
	if l.nodes[0].tr.Has(d.key) {
		t.Fatal("n1 tracks a flow from an ignored client")
	}
	l.route.Store(1)
	if err := d.wait(t); err == nil {
		t.Fatal("the download completed: an ignored client's flow was taken over")
	}
	l.logStats()
	if n := l.resets(); n == 0 {
		t.Error("the client got no reset")
	}
	s := l.nodes[1].e.Stats()
	if s.Unknown != 0 || len(nonZero(s.Failures)) != 0 || len(nonZero(s.Takeovers)) != 0 {
		t.Errorf("n2 treated the flow as a takeover: unknown %d, failures %v, takeovers %v", s.Unknown, s.Failures, s.Takeovers)
	}
}
