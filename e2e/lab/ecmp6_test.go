package lab

import (
	"encoding/binary"
	"testing"
)

// The reference SipHash-2-4 vector (Aumasson & Bernstein, appendix A):
// key 00..0f, message 00..0e.
func TestSiphash24Vector(t *testing.T) {
	var key [16]byte
	msg := make([]byte, 15)
	for i := range key {
		key[i] = byte(i)
	}
	for i := range msg {
		msg[i] = byte(i)
	}
	k0 := binary.LittleEndian.Uint64(key[:8])
	k1 := binary.LittleEndian.Uint64(key[8:])
	if got, want := siphash24(k0, k1, msg), uint64(0xa129ca6149be45e5); got != want {
		t.Fatalf("siphash24 = %#x, want %#x", got, want)
	}
}

func TestPickBounds(t *testing.T) {
	// Three equal nexthops split [0, 2^31) into thirds, as
	// rt6_upper_bound_set() does.
	nhs := []nexthop6{{node: 2, bound: 715827882}, {node: 0, bound: 1431655764}, {node: 1, bound: 2147483647}}
	for _, c := range []struct {
		h    uint32
		want int
	}{{0, 2}, {715827882, 2}, {715827883, 0}, {1431655765, 1}, {1<<31 - 1, 1}} {
		if got := pick(nhs, c.h); got != c.want {
			t.Errorf("pick(%d) = %d, want %d", c.h, got, c.want)
		}
	}
	if got := pick([]nexthop6{{node: 0, bound: -1}}, 0); got != -1 {
		t.Errorf("dead nexthop picked: %d", got)
	}
}
