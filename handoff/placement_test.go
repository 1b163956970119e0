package handoff

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"testing"
)

// The weight function is a wire contract: these values were computed
// independently (Python, from the documented definition) and must never
// change.
func TestPlacementWeightContract(t *testing.T) {
	k4, _ := ParseFlowKey("198.51.100.2:40000->192.0.2.1:80")
	k6, _ := ParseFlowKey("[2001:db8::2]:40000->[2001:db8:a::1]:443")
	for _, c := range []struct {
		member string
		key    FlowKey
		want   uint64
	}{
		{"n1", k4, 0x6d0127be811a7c6b},
		{"node-b", k4, 0xefbd49d1feac555a},
		{"n1", k6, 0x5e335ba3f65743b7},
	} {
		if got := PlacementWeight(c.member, c.key); got != c.want {
			t.Errorf("PlacementWeight(%q, %s) = %#x, want %#x", c.member, c.key, got, c.want)
		}
	}
}

func TestAppendKeyBytesMatchesBytes(t *testing.T) {
	for _, s := range []string{"198.51.100.2:40000->192.0.2.1:80", "[2001:db8::2]:1->[2001:db8:a::1]:65535"} {
		k, err := ParseFlowKey(s)
		if err != nil {
			t.Fatal(err)
		}
		if got := appendKeyBytes(nil, k); !bytes.Equal(got, k.Bytes()) {
			t.Errorf("%s: appendKeyBytes %x, Bytes %x", s, got, k.Bytes())
		}
	}
	// A key with v4-mapped v6 client built by hand (not via ParseFlowKey).
	k := FlowKey{Client: netip.MustParseAddrPort("[::ffff:10.0.0.1]:5"), Anycast: netip.MustParseAddrPort("[2001:db8:a::1]:80")}
	if got := appendKeyBytes(nil, k); !bytes.Equal(got, k.Bytes()) {
		t.Errorf("mapped: appendKeyBytes %x, Bytes %x", got, k.Bytes())
	}
}

func TestReplicasBasics(t *testing.T) {
	live := []string{"a", "b", "c", "d", "e"}
	k := testKey(7)
	all := Replicas(k, "c", live, 10)
	if len(all) != 4 || slices.Contains(all, "c") {
		t.Fatalf("k >= len(live)-1: %v, want every member but the owner", all)
	}
	for i := 1; i < len(all); i++ {
		if PlacementWeight(all[i-1], k) < PlacementWeight(all[i], k) {
			t.Fatalf("not in decreasing weight order: %v", all)
		}
	}
	if got := Replicas(k, "c", live, 4); !slices.Equal(got, all) {
		t.Errorf("k = len(live)-1: %v, want %v", got, all)
	}
	if got := Replicas(k, "c", live, 2); !slices.Equal(got, all[:2]) {
		t.Errorf("k=2: %v, want the top two %v", got, all[:2])
	}
	if got := Replicas(k, "c", live, 0); len(got) != 0 {
		t.Errorf("k=0: %v", got)
	}
	// Order of live and duplicates do not matter; the owner need not be live.
	shuffled := []string{"e", "d", "a", "a", "b", "c"}
	if got := Replicas(k, "c", shuffled, 2); !slices.Equal(got, all[:2]) {
		t.Errorf("shuffled live: %v, want %v", got, all[:2])
	}
	if got := Replicas(k, "z", []string{"a"}, 2); !slices.Equal(got, []string{"a"}) {
		t.Errorf("one live: %v", got)
	}
}

// The placer (index sets, hot path) agrees with Replicas.
func TestPlacerMatchesReplicas(t *testing.T) {
	names := []string{"n1", "n2", "n3", "n4", "n5", "n6", "n7"}
	p := newPlacer(names)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 20000; i++ {
		k := testKey(rng.IntN(1 << 24))
		var live []string
		for _, n := range names {
			if rng.IntN(3) > 0 {
				live = append(live, n)
			}
		}
		owner := names[rng.IntN(len(names))]
		kk := rng.IntN(5)
		want := p.set(Replicas(k, owner, live, kk))
		if got := p.top(k, p.idx[owner], p.set(live), kk); got != want {
			t.Fatalf("key %s owner %s live %v k %d: placer %b, Replicas %b", k, owner, live, kk, got, want)
		}
	}
}

func TestPlacementBalance(t *testing.T) {
	live := []string{"n1", "n2", "n3", "n4", "n5"}
	const keys = 100000
	for _, c := range []struct {
		k     int
		owner bool
	}{{1, false}, {2, false}, {2, true}} {
		count := map[string]int{}
		owned := map[string]int{}
		for i := 0; i < keys; i++ {
			owner := ""
			if c.owner {
				owner = live[i%len(live)]
				owned[owner]++
			}
			for _, n := range Replicas(testKey(i), owner, live, c.k) {
				count[n]++
			}
		}
		for _, n := range live {
			// Each member gets its share of the placements: k of the
			// len(live) (or len(live)-1 candidates when owners rotate).
			want := float64(keys*c.k) / float64(len(live))
			got := float64(count[n])
			if dev := (got - want) / want; dev < -0.02 || dev > 0.02 {
				t.Errorf("k=%d owner=%v: %s got %d placements, want %.0f ±2%%", c.k, c.owner, n, count[n], want)
			}
		}
	}
}

// When a member joins, a flow's replica set changes exactly when the
// member is in its new top k, and then the newcomer replaces the previous
// k-th; leaving is the reverse.
func TestPlacementJoinLeaveMinimalChange(t *testing.T) {
	before := []string{"n1", "n2", "n3", "n4", "n5"}
	after := append(slices.Clone(before), "n6")
	for _, k := range []int{1, 2, 3} {
		changed := 0
		const keys = 30000
		for i := 0; i < keys; i++ {
			key := testKey(i)
			owner := before[i%len(before)]
			old := Replicas(key, owner, before, k)
			nw := Replicas(key, owner, after, k)
			if slices.Contains(nw, "n6") {
				// n6 is in; exactly the previous last one is out.
				want := append(slices.Clone(old[:len(old)-1]), "n6")
				if !sameSet(nw, want) {
					t.Fatalf("k=%d key %s: join: %v -> %v, want %v", k, key, old, nw, want)
				}
				changed++
			} else if !slices.Equal(nw, old) {
				t.Fatalf("k=%d key %s: join changed %v -> %v without n6", k, key, old, nw)
			}
			// Leave is the same pair in reverse: from nw back to old.
			if back := Replicas(key, owner, before, k); !slices.Equal(back, old) {
				t.Fatalf("k=%d key %s: leave: %v, want %v", k, key, back, old)
			}
		}
		// About k/5 of the flows (n6 among 5 candidates) move.
		frac := float64(changed) / keys
		want := float64(k) / 5
		if frac < want-0.02 || frac > want+0.02 {
			t.Errorf("k=%d: %.3f of flows changed on join, want about %.3f", k, frac, want)
		}
	}
	// Leave of a member that is not the newest: only flows that had it.
	for i := 0; i < 30000; i++ {
		key := testKey(i)
		full := Replicas(key, "n1", before, 2)
		less := Replicas(key, "n1", []string{"n1", "n2", "n4", "n5"}, 2)
		if slices.Contains(full, "n3") == slices.Equal(full, less) {
			t.Fatalf("key %s: n3 leaves: %v -> %v", key, full, less)
		}
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	sort.Strings(a)
	sort.Strings(b)
	return slices.Equal(a, b)
}

func BenchmarkPlacerTop(b *testing.B) {
	var names []string
	for i := 0; i < 8; i++ {
		names = append(names, fmt.Sprintf("node-%d", i))
	}
	p := newPlacer(names)
	live := p.set(names)
	keys := keysRange(0, 1024)
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		p.top(keys[i%len(keys)], 0, live, 2)
	}
}
