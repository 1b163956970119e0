package handoff

// Placement: which peers hold a replica of a flow. Every node computes it
// independently, so the function below is a wire contract: two nodes of
// different versions must agree on it bit for bit.
//
// Rendezvous (highest-random-weight) hashing. The weight of member m for
// flow key k is
//
//	h = FNV-1a-64(m || k.Bytes())     // offset basis 0xcbf29ce484222325,
//	                                  // prime 0x00000100000001b3, over the
//	                                  // member name's bytes followed by
//	                                  // the key's Bytes() form
//	w = mix(h)                        // the splitmix64 finalizer:
//	    z = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9
//	    z = (z ^ (z >> 27)) * 0x94d049bb133111eb
//	    w = z ^ (z >> 31)
//
// and a flow's replicas are the k live members other than its owner with
// the highest weights, in decreasing weight order (equal weights: the
// byte-wise smaller name first). When a member joins, the only flows whose
// replica set changes are those for which it is now in the top k (it
// replaces the previous k-th); when one leaves, only those that had it.

import (
	"net/netip"
	"sort"
)

const (
	fnvOffset64 = 0xcbf29ce484222325
	fnvPrime64  = 0x00000100000001b3
)

func fnvAdd(h uint64, b []byte) uint64 {
	for _, c := range b {
		h ^= uint64(c)
		h *= fnvPrime64
	}
	return h
}

func fnvAddString(h uint64, s string) uint64 {
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= fnvPrime64
	}
	return h
}

func mix64(z uint64) uint64 {
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// PlacementWeight is member's rendezvous weight for key (see the file
// comment for the exact function).
func PlacementWeight(member string, key FlowKey) uint64 {
	var buf [36]byte
	return mix64(fnvAdd(fnvAddString(fnvOffset64, member), appendKeyBytes(buf[:0], key)))
}

// appendKeyBytes appends key.Bytes() without allocating.
func appendKeyBytes(b []byte, k FlowKey) []byte {
	b = appendAddr(b, k.Client.Addr())
	b = append(b, byte(k.Client.Port()>>8), byte(k.Client.Port()))
	b = appendAddr(b, k.Anycast.Addr())
	return append(b, byte(k.Anycast.Port()>>8), byte(k.Anycast.Port()))
}

func appendAddr(b []byte, a netip.Addr) []byte {
	switch {
	case a.Is4():
		v := a.As4()
		return append(b, v[:]...)
	case a.Is6():
		v := a.As16()
		return append(b, v[:]...)
	}
	return b
}

// Replicas returns the k members of live, other than owner, with the
// highest rendezvous weight for key, highest first. k >= len(live)-1 means
// every other live member; k <= 0 means none. Duplicate names in live are
// counted once.
func Replicas(key FlowKey, owner string, live []string, k int) []string {
	if k <= 0 {
		return nil
	}
	var buf [36]byte
	kb := appendKeyBytes(buf[:0], key)
	type cand struct {
		name string
		w    uint64
	}
	cs := make([]cand, 0, len(live))
	seen := make(map[string]bool, len(live))
	for _, m := range live {
		if m == owner || seen[m] {
			continue
		}
		seen[m] = true
		cs = append(cs, cand{m, mix64(fnvAdd(fnvAddString(fnvOffset64, m), kb))})
	}
	sort.Slice(cs, func(i, j int) bool {
		if cs[i].w != cs[j].w {
			return cs[i].w > cs[j].w
		}
		return cs[i].name < cs[j].name
	})
	if k > len(cs) {
		k = len(cs)
	}
	out := make([]string, k)
	for i := range out {
		out[i] = cs[i].name
	}
	return out
}

// peerSet is a set of member indices (a placer's index space, at most
// maxMembers members).
type peerSet uint64

const maxMembers = 64

func (s peerSet) has(i int) bool { return s&(1<<uint(i)) != 0 }

// placer computes placements over a fixed member list with the per-member
// FNV prefix precomputed: the hot path of the replicator.
type placer struct {
	names []string // every configured member, self included, sorted
	idx   map[string]int
	seeds []uint64 // FNV-1a state after the member's name
}

func newPlacer(names []string) *placer {
	p := &placer{names: append([]string(nil), names...), idx: make(map[string]int, len(names))}
	sort.Strings(p.names)
	for i, n := range p.names {
		p.idx[n] = i
		p.seeds = append(p.seeds, fnvAddString(fnvOffset64, n))
	}
	return p
}

// set converts names to a peerSet, ignoring unknown names.
func (p *placer) set(names []string) peerSet {
	var s peerSet
	for _, n := range names {
		if i, ok := p.idx[n]; ok {
			s |= 1 << uint(i)
		}
	}
	return s
}

// top returns the replica set of key: the k members of live other than
// owner (an index, or -1) with the highest weights. Same result as
// Replicas, as a set.
func (p *placer) top(key FlowKey, owner int, live peerSet, k int) peerSet {
	if k <= 0 {
		return 0
	}
	var buf [36]byte
	kb := appendKeyBytes(buf[:0], key)
	var (
		bestW [maxMembers]uint64
		bestI [maxMembers]int
		n     int
	)
	for i, seed := range p.seeds {
		if i == owner || !live.has(i) {
			continue
		}
		w := mix64(fnvAdd(seed, kb))
		// Insert into the sorted top list (weight desc, index asc on ties:
		// names are sorted, so a lower index is the smaller name).
		if n == k && w <= bestW[n-1] {
			continue
		}
		j := n
		if n < k {
			n++
		} else {
			j = n - 1
		}
		for j > 0 && bestW[j-1] < w {
			bestW[j], bestI[j] = bestW[j-1], bestI[j-1]
			j--
		}
		bestW[j], bestI[j] = w, i
	}
	var s peerSet
	for _, i := range bestI[:n] {
		s |= 1 << uint(i)
	}
	return s
}
