package lab

// IPv6 ECMP prediction.
//
// With fib_multipath_hash_policy=3 a forwarded IPv6 packet is hashed by
// rt6_multipath_custom_hash_skb():
//
//	outer := fib_multipath_hash_from_keys(net, keys) // siphash of struct flow_keys
//	inner := 0                                       // no encapsulation
//	hash  := jhash_2words(outer, inner, 0) >> 1
//
// but an IPv6 RTM_GETROUTE (no skb) uses rt6_multipath_custom_hash_fl6(),
// which returns outer>>1 without the jhash step. IPv4 has no such gap: its
// RTM_GETROUTE builds a real skb. So for IPv6 the lab computes outer
// itself, checks that outer>>1 reproduces the kernel's RTM_GETROUTE answer
// (which validates the struct layout, the seed and the nexthop bounds), and
// applies the jhash step to predict the forwarding path.
//
// The siphash key is derived from net.ipv4.fib_multipath_hash_seed
// (kernel >= 6.11), which is why every lab sets a known non-zero seed.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Multipath hash field bits (net.ipv[46].fib_multipath_hash_fields).
const (
	hashFieldSrcIP   = 0x01
	hashFieldDstIP   = 0x02
	hashFieldProto   = 0x04
	hashFieldLabel   = 0x08
	hashFieldSrcPort = 0x10
	hashFieldDstPort = 0x20
	hashFields       = hashFieldSrcIP | hashFieldDstIP | hashFieldProto | hashFieldSrcPort | hashFieldDstPort
)

// flowKeysModel is one candidate layout of the kernel's struct flow_keys
// and of __flow_hash_consistentify(). The lab picks, at New, the first one
// whose hashes reproduce the kernel's own RTM_GETROUTE answers.
type flowKeysModel struct {
	name string
	// cvlan, icmp: struct flow_keys has these members (both since ~5.x).
	cvlan, icmp bool
	// portsAlone: ports are ordered independently of the addresses
	// (current kernels); otherwise they are swapped only with them.
	portsAlone bool
}

var flowKeysModels = []flowKeysModel{
	{"6.x", true, true, true},
	{"6.x, ports swap with addresses", true, true, false},
	{"no icmp", true, false, true},
	{"no icmp, ports swap with addresses", true, false, false},
	{"no cvlan, no icmp", false, false, false},
}

// hash returns the kernel's fib_multipath_hash_from_keys() for an IPv6
// flow with the given hash fields (flow label excluded).
func (m flowKeysModel) hash(seed uint32, fields uint32, proto uint8, src, dst netip.AddrPort) uint32 {
	// Offsets in struct flow_keys: control 0..8, basic 8 (n_proto, ip_proto,
	// padding), tags 12, vlan 16, [cvlan], keyid, ports, [icmp], addrs.
	off := 24
	if m.cvlan {
		off += 8
	}
	offPorts := off + 4
	off = offPorts + 4
	if m.icmp {
		off += 4
	}
	offAddrs := off
	size := (offAddrs + 32 + 7) &^ 7 // struct aligned to 8 (siphash)
	k := make([]byte, size)

	var s, d [16]byte
	if fields&hashFieldSrcIP != 0 {
		s = src.Addr().As16()
	}
	if fields&hashFieldDstIP != 0 {
		d = dst.Addr().As16()
	}
	if fields&hashFieldProto != 0 {
		k[10] = proto
	}
	var sp, dp [2]byte
	if fields&hashFieldSrcPort != 0 {
		binary.BigEndian.PutUint16(sp[:], src.Port())
	}
	if fields&hashFieldDstPort != 0 {
		binary.BigEndian.PutUint16(dp[:], dst.Port())
	}

	// __flow_hash_consistentify: make the hash symmetric. Ports compare
	// as the raw __be16 loaded in host order.
	raw := func(p [2]byte) uint16 { return binary.NativeEndian.Uint16(p[:]) }
	addrSwap := bytesLess(d[:], s[:])
	if m.portsAlone {
		if addrSwap {
			s, d = d, s
		}
		if raw(dp) < raw(sp) {
			sp, dp = dp, sp
		}
	} else if addrSwap || (s == d && raw(dp) < raw(sp)) {
		s, d = d, s
		sp, dp = dp, sp
	}
	copy(k[offPorts:], sp[:])
	copy(k[offPorts+2:], dp[:])
	copy(k[offAddrs:], s[:])
	copy(k[offAddrs+16:], d[:])

	key := uint64(seed)<<32 | uint64(seed)
	h := uint32(siphash24(key, key, k[8:]))
	if h == 0 {
		h = 1
	}
	return h
}

func bytesLess(a, b []byte) bool {
	for i := range a {
		if a[i] != b[i] {
			return a[i] < b[i]
		}
	}
	return false
}

// siphash24 is SipHash-2-4 as in lib/siphash.c (64-bit output).
func siphash24(k0, k1 uint64, p []byte) uint64 {
	v0 := k0 ^ 0x736f6d6570736575
	v1 := k1 ^ 0x646f72616e646f6d
	v2 := k0 ^ 0x6c7967656e657261
	v3 := k1 ^ 0x7465646279746573
	round := func() {
		v0 += v1
		v1 = bits.RotateLeft64(v1, 13)
		v1 ^= v0
		v0 = bits.RotateLeft64(v0, 32)
		v2 += v3
		v3 = bits.RotateLeft64(v3, 16)
		v3 ^= v2
		v0 += v3
		v3 = bits.RotateLeft64(v3, 21)
		v3 ^= v0
		v2 += v1
		v1 = bits.RotateLeft64(v1, 17)
		v1 ^= v2
		v2 = bits.RotateLeft64(v2, 32)
	}
	b := uint64(len(p)) << 56
	for ; len(p) >= 8; p = p[8:] {
		m := binary.LittleEndian.Uint64(p)
		v3 ^= m
		round()
		round()
		v0 ^= m
	}
	for i, c := range p {
		b |= uint64(c) << (8 * i)
	}
	v3 ^= b
	round()
	round()
	v0 ^= b
	v2 ^= 0xff
	round()
	round()
	round()
	round()
	return v0 ^ v1 ^ v2 ^ v3
}

// jhash2words is the kernel's jhash_2words(a, b, initval).
func jhash2words(a, b, initval uint32) uint32 {
	const jhashInitval = 0xdeadbeef
	iv := initval + jhashInitval + 2<<2
	a += iv
	b += iv
	c := iv
	rol := bits.RotateLeft32
	c ^= b
	c -= rol(b, 14)
	a ^= c
	a -= rol(c, 11)
	b ^= a
	b -= rol(a, 25)
	c ^= b
	c -= rol(b, 16)
	a ^= c
	a -= rol(c, 4)
	b ^= a
	b -= rol(a, 14)
	c ^= b
	c -= rol(b, 24)
	return c
}

// nexthop6 is one nexthop of the router's IPv6 anycast route, in the
// kernel's order, with its hash-threshold upper bound.
type nexthop6 struct {
	node  int
	bound int64 // -1 for a dead nexthop
}

// anycastNexthops6 reads the router's IPv6 anycast route and computes the
// upper bounds as rt6_upper_bound_set() does.
func (l *Lab) anycastNexthops6() ([]nexthop6, error) {
	p := netip.PrefixFrom(l.Anycast6, 128)
	rs, err := l.Router.Netlink().RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Dst: prefixNet(p)}, netlink.RT_FILTER_DST)
	if err != nil {
		return nil, fmt.Errorf("lab: list routes %s: %w", p, err)
	}
	type hop struct {
		link, weight int
		dead         bool
	}
	var hops []hop
	for _, r := range rs {
		if len(r.MultiPath) == 0 {
			hops = append(hops, hop{link: r.LinkIndex, weight: 1})
		}
		for _, nh := range r.MultiPath {
			hops = append(hops, hop{link: nh.LinkIndex, weight: nh.Hops + 1,
				dead: nh.Flags&(unix.RTNH_F_DEAD|unix.RTNH_F_LINKDOWN) != 0})
		}
	}
	total := 0
	for _, h := range hops {
		if !h.dead {
			total += h.weight
		}
	}
	var out []nexthop6
	w := 0
	for _, h := range hops {
		n := l.nodeByRouterLink(h.link)
		if n == nil {
			return nil, fmt.Errorf("lab: route %s has a nexthop on ifindex %d, no node", p, h.link)
		}
		nh := nexthop6{node: n.Index, bound: -1}
		if !h.dead && total > 0 {
			w += h.weight
			// DIV_ROUND_CLOSEST_ULL((u64)w << 31, total) - 1
			nh.bound = int64((uint64(w)<<31+uint64(total)/2)/uint64(total)) - 1
		}
		out = append(out, nh)
	}
	return out, nil
}

func (l *Lab) nodeByRouterLink(ifindex int) *Node {
	for _, n := range l.Nodes {
		if n.routerLinkIdx == ifindex {
			return n
		}
	}
	return nil
}

// pick is fib6_select_path(): the first nexthop whose bound is >= h.
func pick(nhs []nexthop6, h uint32) int {
	for _, nh := range nhs {
		if int64(h) <= nh.bound {
			return nh.node
		}
	}
	return -1
}

// predict6 predicts the node for a forwarded IPv6 flow; see ecmp6.go's
// header comment.
func (l *Lab) predict6(proto uint8, src, dst netip.AddrPort) (int, error) {
	kernel, err := l.routeGet(proto, src, dst)
	if err != nil {
		return -1, err
	}
	nhs, err := l.anycastNexthops6()
	if err != nil {
		return -1, err
	}
	if len(nhs) == 1 {
		return kernel, nil
	}
	if l.model6 == nil {
		return -1, fmt.Errorf("lab: IPv6 ECMP prediction unavailable: %w", l.model6Err)
	}
	outer := l.model6.hash(l.HashSeed, hashFields, proto, src, dst)
	if got := pick(nhs, outer>>1); got != kernel {
		return -1, fmt.Errorf("lab: IPv6 hash model %q says node %d for %s -> %s, kernel RTM_GETROUTE says %d",
			l.model6.name, got, src, dst, kernel)
	}
	return pick(nhs, jhash2words(outer, 0, 0)>>1), nil
}

// calibrate6 picks the flow_keys model that reproduces the kernel's IPv6
// RTM_GETROUTE answers for a sample of flows over the current nexthops.
func (l *Lab) calibrate6() {
	if !l.IPv6 || len(l.Nodes) < 2 {
		return
	}
	if l.HashSeed == 0 {
		l.model6Err = errors.New("fib_multipath_hash_seed not settable (kernel < 6.11)")
		return
	}
	nhs, err := l.anycastNexthops6()
	if err != nil {
		l.model6Err = err
		return
	}
	const samples = 64
	kernel := make([]int, samples)
	flow := func(i int) (netip.AddrPort, netip.AddrPort) {
		return netip.AddrPortFrom(l.ClientAddr6, uint16(33000+i*7)), netip.AddrPortFrom(l.Anycast6, uint16(80+i%3))
	}
	for i := range kernel {
		s, d := flow(i)
		if kernel[i], err = l.routeGet(unix.IPPROTO_TCP, s, d); err != nil {
			l.model6Err = err
			return
		}
	}
	for _, m := range flowKeysModels {
		ok := true
		for i := 0; ok && i < samples; i++ {
			s, d := flow(i)
			ok = pick(nhs, m.hash(l.HashSeed, hashFields, unix.IPPROTO_TCP, s, d)>>1) == kernel[i]
		}
		if ok {
			l.model6 = &m
			return
		}
	}
	l.model6Err = errors.New("no flow_keys model reproduces the kernel's RTM_GETROUTE answers")
	l.logf("lab %s: IPv6 ECMP prediction disabled: %v", l.Name, l.model6Err)
}
