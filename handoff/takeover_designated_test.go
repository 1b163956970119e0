package handoff

import (
	"bytes"
	"io"
	"testing"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

// The dead owner's designated replica holds no copy of an echo session
// (the owner's stream to it never delivered one), another replica does,
// and the client's next packets reach that other replica: its claim to the
// designated replica makes the latter fetch the state from its peers and
// restore the session, which then moves to the claimer; the echo goes on
// exactly, with no reset.
func TestTakeoverDesignatedReplicaWithoutState(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 3, service: func() services.TCPService { return services.NewEcho() }})
	ctx := testCtx(t)
	c, err := l.client.DialTCP(ctx, tkDst4)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	var sent uint64
	round := func(n int) {
		t.Helper()
		out, in := make([]byte, n), make([]byte, n)
		services.FillPattern(3, sent, out)
		if _, err := c.Write(out); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, in); err != nil {
			t.Fatalf("echo at %d: %v", sent, err)
		}
		if !bytes.Equal(in, out) {
			t.Fatalf("echo at %d: bytes differ", sent)
		}
		sent += uint64(n)
	}
	round(20000)
	la := c.LocalAddr().String()
	var k FlowKey
	l.nodes[0].tr.Owned(func(st *batonv1.FlowState) bool {
		if kk, err := KeyFromProto(st.Key); err == nil && kk.Client.String() == la {
			k = kk
		}
		return true
	})
	if !k.Client.IsValid() {
		t.Fatalf("n1 does not track the flow from %s", la)
	}
	// Both replicas hold the caught-up state (nothing owed: echo resumes).
	for _, n := range l.nodes[1:] {
		eventually(t, n.name+" to hold the caught-up state", func() bool {
			st, ok := n.r.store.Lookup(k)
			return ok && st.ServerAckedBytes == sent && st.ClientAckedBytes == sent
		})
	}
	d := l.node(l.nodes[1].e.designated(k, "n1"))
	h := 3 - d // the other replica (indexes 1 and 2)
	st, _ := l.nodes[d].r.store.Lookup(k)
	if _, err := l.nodes[d].r.store.Apply("n1", &batonv1.FlowEvent{Kind: batonv1.FlowEvent_KIND_CLOSE, State: closeState(k.Proto(), "n1", st.Epoch)}); err != nil {
		t.Fatal(err)
	}
	if _, ok := l.nodes[d].r.store.Lookup(k); ok {
		t.Fatal("the designated replica still holds the flow")
	}
	l.kill(0)
	l.waitLive("n2", "n3")
	l.route.Store(int32(h))
	round(30000)
	l.logStats()
	if n := l.resets(); n != 0 {
		t.Fatalf("client got %d resets", n)
	}
	if got := l.nodes[h].e.Stats().Takeovers[HowPullMigrate]; got != 1 {
		t.Errorf("%s pull-migrations: %d, want 1", l.nodes[h].name, got)
	}
}
