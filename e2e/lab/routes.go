package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

var (
	default4 = netip.MustParsePrefix("0.0.0.0/0")
	default6 = netip.MustParsePrefix("::/0")
)

// setupRoutes installs the client and node default routes and the router's
// anycast routes over every node.
func (l *Lab) setupRoutes() error {
	add := func(ns *NS, dst netip.Prefix, gw netip.Addr) error {
		r := &netlink.Route{Dst: prefixNet(dst), Gw: gw.AsSlice()}
		if err := ns.Netlink().RouteAdd(r); err != nil {
			return fmt.Errorf("lab: route %s via %s in %s: %w", dst, gw, ns.Name, err)
		}
		return nil
	}
	if err := add(l.Client, default4, netip.MustParseAddr("198.51.100.1")); err != nil {
		return err
	}
	if l.IPv6 {
		if err := add(l.Client, default6, netip.MustParseAddr("2001:db8:100::1")); err != nil {
			return err
		}
	}
	all := make([]int, len(l.Nodes))
	for _, n := range l.Nodes {
		all[n.Index] = n.Index
		if err := add(n.NS, default4, n.Gateway4); err != nil {
			return err
		}
		if l.IPv6 {
			if err := add(n.NS, default6, n.Gateway6); err != nil {
				return err
			}
		}
	}
	return l.SetNexthops(all)
}

func (l *Lab) anycastPrefixes() []netip.Prefix {
	ps := []netip.Prefix{netip.PrefixFrom(l.Anycast4, 32)}
	if l.IPv6 {
		ps = append(ps, netip.PrefixFrom(l.Anycast6, 128))
	}
	return ps
}

// SetNexthops replaces the router's anycast routes (192.0.2.1/32 and, with
// IPv6, 2001:db8:a::1/128) by kernel multipath routes whose nexthops are the
// given node indexes (0-based), each via the node's eth0 address. The kernel
// hashes each flow onto one of them (hash-threshold: removing a nexthop
// also moves some flows between the remaining ones). An empty list
// removes the routes, so the router answers "unreachable". The change is
// atomic per family (RTM_NEWROUTE with NLM_F_REPLACE) and is read back.
//
// In BGP mode (Config.Routing) the router routes only to nodes that
// announce: SetNexthops makes BIRD import the announcements of the given
// nodes only (the others' are kept, not used), and returns once the FIB
// uses exactly the given nodes that announce (bgp.go). A node that is not
// in the list stays out when it (re)announces, until the next SetNexthops.
func (l *Lab) SetNexthops(active []int) error {
	seen := map[int]bool{}
	for _, i := range active {
		if l.Node(i) == nil {
			return fmt.Errorf("lab: SetNexthops: no node %d (have %d)", i, len(l.Nodes))
		}
		if seen[i] {
			return fmt.Errorf("lab: SetNexthops: node %d listed twice", i)
		}
		seen[i] = true
	}
	if l.bird != nil {
		return l.setBGPNexthops(active)
	}
	return l.setStaticNexthops(active)
}

// setStaticNexthops is SetNexthops with static routes (active is valid).
func (l *Lab) setStaticNexthops(active []int) error {
	var nodes []*Node
	for _, i := range active {
		nodes = append(nodes, l.Node(i))
	}
	h := l.Router.Netlink()
	var errs []error
	for _, p := range l.anycastPrefixes() {
		if len(nodes) == 0 {
			for {
				err := h.RouteDel(&netlink.Route{Dst: prefixNet(p)})
				if errors.Is(err, unix.ESRCH) {
					break
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("lab: delete route %s: %w", p, err))
					break
				}
			}
			continue
		}
		r := &netlink.Route{Dst: prefixNet(p)}
		var want []netip.Addr
		for _, n := range nodes {
			// The router's nexthop is the node's own eth0 address.
			nh := n.Addr4
			if p.Addr().Is6() {
				nh = n.Addr6
			}
			r.MultiPath = append(r.MultiPath, &netlink.NexthopInfo{LinkIndex: n.routerLinkIdx, Gw: nh.AsSlice()})
			want = append(want, nh)
		}
		if err := h.RouteReplace(r); err != nil {
			errs = append(errs, fmt.Errorf("lab: replace route %s: %w", p, err))
			continue
		}
		got, err := l.routerNexthops(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		slices.SortFunc(want, netip.Addr.Compare)
		if !slices.Equal(got, want) {
			errs = append(errs, fmt.Errorf("lab: route %s has nexthops %v after replace, want %v", p, got, want))
		}
	}
	return errors.Join(errs...)
}

// routerNexthops returns the sorted gateways of the router's route to p.
func (l *Lab) routerNexthops(p netip.Prefix) ([]netip.Addr, error) {
	fam := netlink.FAMILY_V4
	if p.Addr().Is6() {
		fam = netlink.FAMILY_V6
	}
	rs, err := l.Router.Netlink().RouteListFiltered(fam, &netlink.Route{Dst: prefixNet(p)}, netlink.RT_FILTER_DST)
	if err != nil {
		return nil, fmt.Errorf("lab: list routes %s: %w", p, err)
	}
	var got []netip.Addr
	for _, r := range rs {
		if a, ok := netip.AddrFromSlice(r.Gw); ok {
			got = append(got, a.Unmap())
		}
		for _, nh := range r.MultiPath {
			if a, ok := netip.AddrFromSlice(nh.Gw); ok {
				got = append(got, a.Unmap())
			}
		}
	}
	slices.SortFunc(got, netip.Addr.Compare)
	return got, nil
}

// Nexthops returns the node indexes the router's anycast route for family
// ("ip4" or "ip6") currently uses, in ascending order.
func (l *Lab) Nexthops(family string) ([]int, error) {
	var p netip.Prefix
	switch family {
	case "ip4":
		p = l.anycastPrefixes()[0]
	case "ip6":
		if !l.IPv6 {
			return nil, errors.New("lab: IPv6 disabled")
		}
		p = l.anycastPrefixes()[1]
	default:
		return nil, fmt.Errorf("lab: family %q, want ip4 or ip6", family)
	}
	gws, err := l.routerNexthops(p)
	if err != nil {
		return nil, err
	}
	var idx []int
	for _, gw := range gws {
		if n := l.nodeByAddr(gw); n != nil {
			idx = append(idx, n.Index)
		}
	}
	slices.Sort(idx)
	return idx, nil
}

func (l *Lab) nodeByAddr(a netip.Addr) *Node {
	for _, n := range l.Nodes {
		if n.Addr4 == a || (n.Addr6.IsValid() && n.Addr6 == a) {
			return n
		}
	}
	return nil
}

// CheckRoute reports whether node i is ready to serve the anycast
// addresses on the TUN device tunName: nil if, in the node's namespace, the
// link exists, is administratively up and has carrier (IFF_LOWER_UP: a
// process has the TUN open), and the main table's 192.0.2.1/32 (and
// 2001:db8:a::1/128 with IPv6) route uses that link and is not flagged
// linkdown. Otherwise the error says what is missing.
func (l *Lab) CheckRoute(i int, tunName string) error {
	n := l.Node(i)
	if n == nil {
		return fmt.Errorf("lab: no node %d", i)
	}
	h := n.Netlink()
	link, err := h.LinkByName(tunName)
	if err != nil {
		return fmt.Errorf("node %d: link %s: %w", i, tunName, err)
	}
	a := link.Attrs()
	if a.RawFlags&unix.IFF_UP == 0 {
		return fmt.Errorf("node %d: link %s is down", i, tunName)
	}
	if a.RawFlags&unix.IFF_LOWER_UP == 0 {
		return fmt.Errorf("node %d: link %s has no carrier (TUN not open)", i, tunName)
	}
	for _, p := range l.anycastPrefixes() {
		fam := netlink.FAMILY_V4
		if p.Addr().Is6() {
			fam = netlink.FAMILY_V6
		}
		rs, err := h.RouteListFiltered(fam, &netlink.Route{Dst: prefixNet(p)}, netlink.RT_FILTER_DST)
		if err != nil {
			return fmt.Errorf("node %d: list routes %s: %w", i, p, err)
		}
		ok := false
		for _, r := range rs {
			if r.Flags&unix.RTNH_F_LINKDOWN != 0 {
				continue
			}
			if r.LinkIndex == a.Index {
				ok = true
			}
			for _, nh := range r.MultiPath {
				if nh.LinkIndex == a.Index && nh.Flags&unix.RTNH_F_LINKDOWN == 0 {
					ok = true
				}
			}
		}
		if !ok {
			return fmt.Errorf("node %d: no usable route %s dev %s (have %v)", i, p, tunName, rs)
		}
	}
	return nil
}

// WaitRoute waits until CheckRoute(i, tunName) succeeds, which is how the
// harness knows batond on node i is ready, or until ctx is done; the error
// then includes the last unmet condition. It polls netlink in the node's
// namespace every few milliseconds.
func (l *Lab) WaitRoute(ctx context.Context, i int, tunName string) error {
	delay := time.Millisecond
	for {
		err := l.CheckRoute(i, tunName)
		if err == nil {
			return nil
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("lab: WaitRoute: %w (last: %v)", ctx.Err(), err)
		case <-t.C:
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
}
