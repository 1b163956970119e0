package handoff

import (
	"slices"
	"strings"
	"testing"
)

func TestMembersLiveness(t *testing.T) {
	m, err := NewMembers("n2", []Peer{{"n3", "127.0.0.1:3"}, {"n1", "127.0.0.1:1"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Peers(); got[0].Name != "n1" || got[1].Name != "n3" {
		t.Errorf("Peers not sorted: %v", got)
	}
	if !m.IsPeer("n1") || m.IsPeer("n2") || m.IsPeer("x") {
		t.Error("IsPeer wrong")
	}
	live, ch := m.Watch()
	if !slices.Equal(live, []string{"n2"}) {
		t.Fatalf("initial live %v", live)
	}
	changed := func(ch <-chan struct{}) bool {
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}

	m.setOutbound("n3", true)
	if !changed(ch) {
		t.Fatal("no change notification when n3 came up")
	}
	live, ch = m.Watch()
	if !slices.Equal(live, []string{"n2", "n3"}) || !m.Up("n3") || m.LastSeen("n3").IsZero() {
		t.Fatalf("after outbound up: %v", live)
	}
	// Inbound on an already-up peer: no change.
	m.inboundOpened("n3")
	if changed(ch) {
		t.Fatal("notified without a liveness change")
	}
	m.setOutbound("n3", false)
	if changed(ch) || !m.Up("n3") {
		t.Fatal("n3 should stay up while its inbound stream is open")
	}
	m.inboundOpened("n1")
	if !changed(ch) {
		t.Fatal("no notification for n1")
	}
	live, ch = m.Watch()
	if !slices.Equal(live, []string{"n1", "n2", "n3"}) || !slices.Equal(m.Live(), live) {
		t.Fatalf("live %v", live)
	}
	m.inboundClosed("n3")
	m.inboundClosed("n1")
	m.inboundClosed("n1") // extra close: harmless
	if !changed(ch) {
		t.Fatal("no notification when peers went down")
	}
	if got := m.Live(); !slices.Equal(got, []string{"n2"}) {
		t.Fatalf("live %v after everything closed", got)
	}
	m.setOutbound("unknown", true) // ignored
	if got := m.Live(); len(got) != 1 {
		t.Fatalf("unknown peer became live: %v", got)
	}
}

func TestMembersConfigErrors(t *testing.T) {
	long := strings.Repeat("x", MaxNodeNameBytes+1)
	for _, c := range []struct {
		self  string
		peers []Peer
		want  string
	}{
		{"", nil, "empty node name"},
		{long, nil, "longer than"},
		{"a", []Peer{{"a", "x:1"}}, "this node itself"},
		{"a", []Peer{{"b", "x:1"}, {"b", "x:2"}}, "listed twice"},
		{"a", []Peer{{"b", ""}}, "no address"},
		{"a", []Peer{{"", "x:1"}}, "empty node name"},
	} {
		if _, err := NewMembers(c.self, c.peers); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("NewMembers(%q, %v) = %v, want %q", c.self, c.peers, err, c.want)
		}
	}
	var many []Peer
	for i := 0; i < maxMembers; i++ {
		many = append(many, Peer{Name: "p" + string(rune('A'+i%26)) + string(rune('a'+i/26)), Addr: "x:1"})
	}
	if _, err := NewMembers("self", many); err == nil || !strings.Contains(err.Error(), "at most") {
		t.Errorf("too many members: %v", err)
	}
}
