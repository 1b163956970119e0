package handoff

import (
	"context"
	"net"
	"testing"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// leaseWorld sets up a Members of "n1" with the given peers and, relative
// to now, what it heard and what its peers acknowledged and reported.
type leaseWorld struct {
	peers   []string
	support map[string]time.Duration // peer -> age of the newest send it acknowledged
	heard   map[string]time.Duration // peer -> age of the last thing heard from it
	up      map[string]bool          // peer -> a stream is up
	dead    map[string]bool
	// reports: reporter -> (member -> age heard at the report; < 0 never),
	// reports received reportAge ago.
	reports   map[string]map[string]time.Duration
	reportAge time.Duration
}

func (w leaseWorld) build(t *testing.T, now time.Time) *Members {
	t.Helper()
	var ps []Peer
	for _, p := range w.peers {
		ps = append(ps, Peer{Name: p, Addr: "127.0.0.1:1"})
	}
	m, err := NewMembers("n1", ps)
	if err != nil {
		t.Fatal(err)
	}
	m.SetLease(3 * time.Second)
	for p, age := range w.support {
		m.supported(p, now.Add(-age))
	}
	for p, age := range w.heard {
		m.seen(p, now.Add(-age))
	}
	for p := range w.up {
		m.setOutbound(p, true)
		m.seen(p, now.Add(-w.heard[p]))
	}
	for p := range w.dead {
		m.markDead(p)
	}
	for from, hs := range w.reports {
		var rs []*batonv1.HeardReport
		for node, age := range hs {
			rs = append(rs, &batonv1.HeardReport{Node: node, AgeNanos: int64(age)})
		}
		m.report(from, rs, now.Add(-w.reportAge))
	}
	return m
}

func TestLeaseHeld(t *testing.T) {
	now := time.Now()
	s := time.Second
	for _, tc := range []struct {
		name string
		w    leaseWorld
		want bool
	}{
		{"alone", leaseWorld{}, true},
		{"two nodes, peer acked 1 s ago", leaseWorld{peers: []string{"n2"}, support: map[string]time.Duration{"n2": s}}, true},
		{"two nodes, peer acked 4 s ago", leaseWorld{peers: []string{"n2"}, support: map[string]time.Duration{"n2": 4 * s}}, false},
		{"two nodes, never acked", leaseWorld{peers: []string{"n2"}}, false},
		{"two nodes, peer dead", leaseWorld{peers: []string{"n2"}, dead: map[string]bool{"n2": true}}, true},
		{"three nodes, one acked", leaseWorld{peers: []string{"n2", "n3"}, support: map[string]time.Duration{"n3": s}}, true},
		{"three nodes, acks too old", leaseWorld{peers: []string{"n2", "n3"}, support: map[string]time.Duration{"n2": 5 * s, "n3": 4 * s}}, false},
		{"four nodes, one ack of two needed", leaseWorld{peers: []string{"n2", "n3", "n4"}, support: map[string]time.Duration{"n2": s}}, false},
		{"four nodes, two acks", leaseWorld{peers: []string{"n2", "n3", "n4"}, support: map[string]time.Duration{"n2": s, "n4": 2 * s}}, true},
		{"four nodes, one dead, one ack", leaseWorld{peers: []string{"n2", "n3", "n4"}, support: map[string]time.Duration{"n2": s}, dead: map[string]bool{"n3": true}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.w.build(t, now)
			if got := m.HasLease(now); got != tc.want {
				t.Errorf("HasLease = %v, want %v (lease until %v from now)", got, tc.want, m.LeaseUntil().Sub(now))
			}
		})
	}
}

func TestLeaseOwnerGone(t *testing.T) {
	now := time.Now()
	s := time.Second
	ms := time.Millisecond
	fresh := map[string]time.Duration{"n2": s, "n3": s, "n4": s} // acks that keep n1's lease
	for _, tc := range []struct {
		name string
		w    leaseWorld
		want string // Gone's why for owner n2
	}{
		{"dead", leaseWorld{peers: []string{"n2"}, dead: map[string]bool{"n2": true}}, "dead"},
		{"up", leaseWorld{peers: []string{"n2", "n3"}, support: fresh, up: map[string]bool{"n2": true}}, "up"},
		{"two nodes: silent 4 s, this node has no lease", leaseWorld{peers: []string{"n2"}, heard: map[string]time.Duration{"n2": 4 * s}, support: map[string]time.Duration{"n2": 4 * s}}, "this node holds no lease"},
		{"three nodes: silent here and at n3", leaseWorld{peers: []string{"n2", "n3"}, support: fresh,
			heard: map[string]time.Duration{"n2": 4 * s}, reports: map[string]map[string]time.Duration{"n3": {"n2": 4 * s}}}, "fenced"},
		{"three nodes: never heard anywhere", leaseWorld{peers: []string{"n2", "n3"}, support: fresh,
			reports: map[string]map[string]time.Duration{"n3": {"n2": -1}}}, "fenced"},
		{"three nodes: n3 still hears n2 (partial partition)", leaseWorld{peers: []string{"n2", "n3"}, support: fresh,
			heard: map[string]time.Duration{"n2": 4 * s}, reports: map[string]map[string]time.Duration{"n3": {"n2": 200 * ms}}}, "not proven silent"},
		{"three nodes: n3's report is stale", leaseWorld{peers: []string{"n2", "n3"}, support: fresh,
			heard: map[string]time.Duration{"n2": 4 * s}, reports: map[string]map[string]time.Duration{"n3": {"n2": 4 * s}}, reportAge: 3 * s}, "not proven silent"},
		{"three nodes: silent only for the lease, not the margin", leaseWorld{peers: []string{"n2", "n3"}, support: fresh,
			heard: map[string]time.Duration{"n2": 3200 * ms}, reports: map[string]map[string]time.Duration{"n3": {"n2": 4 * s}}}, "not proven silent"},
		{"three nodes: no report from n3", leaseWorld{peers: []string{"n2", "n3"}, support: fresh,
			heard: map[string]time.Duration{"n2": 4 * s}}, "not proven silent"},
		{"three nodes: n3 dead, silence here suffices", leaseWorld{peers: []string{"n2", "n3"}, support: fresh,
			heard: map[string]time.Duration{"n2": 4 * s}, dead: map[string]bool{"n3": true}}, "fenced"},
		{"four nodes: two of three silent", leaseWorld{peers: []string{"n2", "n3", "n4"}, support: fresh,
			heard: map[string]time.Duration{"n2": 4 * s}, reports: map[string]map[string]time.Duration{"n3": {"n2": 5 * s}, "n4": {"n2": 100 * ms}}}, "fenced"},
		{"four nodes: only this node silent", leaseWorld{peers: []string{"n2", "n3", "n4"}, support: fresh,
			heard: map[string]time.Duration{"n2": 4 * s}, reports: map[string]map[string]time.Duration{"n3": {"n2": 100 * ms}, "n4": {"n2": 100 * ms}}}, "not proven silent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.w.build(t, now)
			gone, why := m.Gone("n2", now)
			if why != tc.want || gone != (tc.want == "dead" || tc.want == "fenced") {
				t.Errorf("Gone(n2) = %v, %q; want %q", gone, why, tc.want)
			}
			if gone, why := m.Gone("n9", now); !gone || why != "not a member" {
				t.Errorf("Gone(n9) = %v, %q; want true, not a member", gone, why)
			}
		})
	}
}

// The rules fit together: whenever a node proves an owner gone by
// silence, the owner, acknowledged by nobody who is silent, holds no
// lease. Exhaustive over who hears whom in clusters of 2 to 5 nodes
// (everyone's view of the dead is empty; acknowledgements are as fresh as
// hearing: a node acks what it hears).
func TestLeaseProofImpliesFence(t *testing.T) {
	now := time.Now()
	for n := 2; n <= 5; n++ {
		// bit i of mask: node i (1..n-1; node 0 is the owner) heard the
		// owner recently; the prover is node 1.
		for mask := 0; mask < 1<<(n-1); mask++ {
			names := []string{"n0"}
			for i := 1; i < n; i++ {
				names = append(names, "n"+string(rune('0'+i)))
			}
			hears := func(i int) bool { return mask&(1<<(i-1)) != 0 }
			// The owner's lease: acks from the nodes that hear it.
			var ownerPeers []Peer
			for _, p := range names[1:] {
				ownerPeers = append(ownerPeers, Peer{Name: p, Addr: "127.0.0.1:1"})
			}
			owner, _ := NewMembers("n0", ownerPeers)
			for i := 1; i < n; i++ {
				if hears(i) {
					owner.supported(names[i], now.Add(-time.Second))
				}
			}
			// The prover: n1, lease held (every other node acks it).
			var proverPeers []Peer
			for i, p := range names {
				if i != 1 {
					proverPeers = append(proverPeers, Peer{Name: p, Addr: "127.0.0.1:1"})
				}
			}
			prover, _ := NewMembers("n1", proverPeers)
			for i, p := range names {
				if i == 1 {
					continue
				}
				prover.supported(p, now.Add(-time.Second))
			}
			if hears(1) {
				prover.seen("n0", now.Add(-time.Second))
			} else {
				prover.seen("n0", now.Add(-10*time.Second))
			}
			for i := 2; i < n; i++ {
				age := 10 * time.Second
				if hears(i) {
					age = time.Second
				}
				prover.report(names[i], []*batonv1.HeardReport{{Node: "n0", AgeNanos: int64(age)}}, now)
			}
			gone, _ := prover.Gone("n0", now)
			if gone && owner.HasLease(now) {
				t.Errorf("%d nodes, hearing mask %b: the prover takes over while the owner holds its lease", n, mask)
			}
			// And no stall without cause: a silent majority proves it.
			silent := 0
			for i := 1; i < n; i++ {
				if !hears(i) {
					silent++
				}
			}
			if !owner.HasLease(now) && silent >= n-majority(n)+1 && !gone {
				t.Errorf("%d nodes, hearing mask %b: owner fenced, %d silent, not proven", n, mask, silent)
			}
		}
	}
}

func TestProbeDead(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	if probeDead(context.Background(), addr) {
		t.Fatal("a listening port probed dead")
	}
	lis.Close()
	if !probeDead(context.Background(), addr) {
		t.Fatal("a closed port not probed dead")
	}
}
