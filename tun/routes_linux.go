// routes_linux.go: installing the anycast prefixes as routes into the TUN
// with netlink, and removing exactly those again.

//go:build linux

package tun

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteProtocol is the routing protocol number (rtm_protocol, RTPROT_*)
// Baton's routes carry, so that `ip route` shows them as `proto 183` and
// `ip route show proto 183` (or StaleRoutes) finds them.
//
// 183 (0xb7) is not assigned in the kernel's rtnetlink.h nor in iproute2's
// rt_protos, and stays clear of FRR's block (186..198). The obvious 0xba
// (186) is taken: it is RTPROT_BGP, which FRR's bgpd uses and iproute2
// prints as `proto bgp`.
const RouteProtocol = 0xb7

// Routes installs anycast prefixes as routes `PREFIX dev NAME scope link
// proto 183` in the main table and removes exactly the routes it installed.
//
// A route through a TUN lives only as long as the device: when the process
// exits, even by SIGKILL, the kernel destroys the non-persistent TUN and
// every route through it, so no stale route survives a crash. Remove is for
// an orderly shutdown or reload, when the device may outlive the routes.
//
// A Routes is safe for concurrent use. Its netlink socket is created by
// NewRoutes, so it keeps working on the namespace of the thread that called
// NewRoutes, whichever goroutine calls Add or Remove later.
type Routes struct {
	mu        sync.Mutex
	h         *netlink.Handle // nil after a complete Remove
	link      string
	index     int
	installed map[netip.Prefix]netlink.Route
	order     []netip.Prefix // installation order, for Installed
}

// NewRoutes prepares to route prefixes into the existing interface named
// link (normally Device.Name()). It installs nothing yet.
func NewRoutes(link string) (*Routes, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("tun: netlink: %w", err)
	}
	l, err := h.LinkByName(link)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("tun: routes: look up %s: %w", link, err)
	}
	return &Routes{h: h, link: link, index: l.Attrs().Index, installed: map[netip.Prefix]netlink.Route{}}, nil
}

// Add installs a route for each prefix not installed yet, all or nothing:
// on failure the routes added by this call are removed again and the error
// names the prefix at fault.
//
// A prefix for which the main table already has a route that does not go
// through our device (a blackhole, a route via lo, the uplink...) is refused
// before anything is added: our route would silently shadow or duplicate it.
// An existing route via our device (left by an earlier Routes on the same
// device) is replaced and adopted.
func (r *Routes) Add(prefixes ...netip.Prefix) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.h == nil {
		return errors.New("tun: routes: Add after Remove")
	}

	var todo []netip.Prefix
	seen := map[netip.Prefix]bool{}
	for _, p := range prefixes {
		if !p.IsValid() || p.Addr().Is4In6() || p.Addr().Zone() != "" {
			return fmt.Errorf("tun: route %s: not an IPv4 or IPv6 prefix", p)
		}
		if p != p.Masked() {
			return fmt.Errorf("tun: route %s: host bits set (did you mean %s?)", p, p.Masked())
		}
		if _, ok := r.installed[p]; ok || seen[p] {
			continue
		}
		seen[p] = true
		todo = append(todo, p)
	}

	// One dump of the main table per family, then check every prefix.
	existing := map[int][]netlink.Route{}
	replace := map[netip.Prefix]bool{}
	for _, p := range todo {
		fam := family(p)
		if _, ok := existing[fam]; !ok {
			rs, err := r.h.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return fmt.Errorf("tun: routes: list the main table: %w", err)
			}
			existing[fam] = rs
		}
		for _, e := range existing[fam] {
			if routeDst(e) != p {
				continue
			}
			if e.LinkIndex == r.index && len(e.MultiPath) == 0 {
				replace[p] = true
				continue
			}
			return fmt.Errorf("tun: route %s already exists in the main table (%s); refusing to shadow it", p, r.describe(e))
		}
	}

	var added []netip.Prefix
	for _, p := range todo {
		rt := netlink.Route{
			LinkIndex: r.index,
			Dst:       ipNet(p),
			Scope:     netlink.SCOPE_LINK,
			Protocol:  RouteProtocol,
			Table:     unix.RT_TABLE_MAIN,
			Type:      unix.RTN_UNICAST,
		}
		var err error
		if replace[p] {
			err = r.h.RouteReplace(&rt)
		} else {
			err = r.h.RouteAdd(&rt)
		}
		if err != nil {
			for _, a := range added {
				r.del(a) // best effort: the first error is the one to report
			}
			return fmt.Errorf("tun: route %s dev %s: %w", p, r.link, err)
		}
		r.installed[p] = rt
		r.order = append(r.order, p)
		added = append(added, p)
	}
	return nil
}

// Remove deletes every route this Routes installed. Routes already gone (for
// instance with the device) are not an error. On success the Routes is spent:
// Add returns an error. On failure the routes not removed are kept and Remove
// may be called again.
func (r *Routes) Remove() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.h == nil {
		return nil
	}
	var errs []error
	for _, p := range append([]netip.Prefix(nil), r.order...) {
		if err := r.del(p); err != nil {
			errs = append(errs, fmt.Errorf("tun: remove route %s dev %s: %w", p, r.link, err))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	r.h.Close()
	r.h = nil
	return nil
}

// Installed returns the prefixes currently installed, in installation order.
func (r *Routes) Installed() []netip.Prefix {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]netip.Prefix(nil), r.order...)
}

// del removes one installed route. Matching on protocol and device as well
// as prefix means the kernel never deletes someone else's route.
func (r *Routes) del(p netip.Prefix) error {
	rt := r.installed[p]
	err := r.h.RouteDel(&rt)
	if err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENODEV) {
		return err
	}
	delete(r.installed, p)
	for i, q := range r.order {
		if q == p {
			r.order = append(r.order[:i], r.order[i+1:]...)
			break
		}
	}
	return nil
}

// describe renders where a route points, for one-line error messages.
func (r *Routes) describe(rt netlink.Route) string {
	var parts []string
	switch rt.Type {
	case unix.RTN_BLACKHOLE:
		parts = append(parts, "blackhole")
	case unix.RTN_UNREACHABLE:
		parts = append(parts, "unreachable")
	case unix.RTN_PROHIBIT:
		parts = append(parts, "prohibit")
	case unix.RTN_THROW:
		parts = append(parts, "throw")
	}
	hop := func(gw net.IP, index int) {
		if gw != nil {
			parts = append(parts, "via "+gw.String())
		}
		if index != 0 {
			parts = append(parts, "dev "+r.linkName(index))
		}
	}
	if len(rt.MultiPath) > 0 {
		parts = append(parts, "multipath")
		for _, nh := range rt.MultiPath {
			hop(nh.Gw, nh.LinkIndex)
		}
	} else {
		hop(rt.Gw, rt.LinkIndex)
	}
	parts = append(parts, "proto "+rt.Protocol.String())
	if rt.Priority != 0 {
		parts = append(parts, fmt.Sprintf("metric %d", rt.Priority))
	}
	return strings.Join(parts, " ")
}

func (r *Routes) linkName(index int) string {
	if l, err := r.h.LinkByIndex(index); err == nil {
		return l.Attrs().Name
	}
	return fmt.Sprintf("ifindex %d", index)
}

// StaleRoutes lists, for diagnostics, routes carrying RouteProtocol (in any
// table) whose device no longer exists or has no carrier (`linkdown`: a TUN
// that no process holds open, which only a persistent TUN can be). Normally
// the list is empty, since the kernel deletes a TUN's routes with it. h
// selects the namespace; nil means the calling thread's.
func StaleRoutes(h *netlink.Handle) ([]netlink.Route, error) {
	if h == nil {
		var err error
		if h, err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
			return nil, fmt.Errorf("tun: netlink: %w", err)
		}
		defer h.Close()
	}
	// Table unspecified + RT_FILTER_TABLE means every table, not just main.
	rs, err := h.RouteListFiltered(netlink.FAMILY_ALL,
		&netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_UNSPEC},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("tun: list routes with proto %d: %w", RouteProtocol, err)
	}
	var stale []netlink.Route
	for _, rt := range rs {
		if rt.Flags&unix.RTNH_F_LINKDOWN != 0 {
			stale = append(stale, rt)
			continue
		}
		if rt.LinkIndex == 0 {
			continue
		}
		if _, err := h.LinkByIndex(rt.LinkIndex); errors.As(err, &netlink.LinkNotFoundError{}) {
			stale = append(stale, rt)
		}
	}
	return stale, nil
}

func family(p netip.Prefix) int {
	if p.Addr().Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// routeDst converts a route's destination; the default route may come back
// with a nil Dst.
func routeDst(rt netlink.Route) netip.Prefix {
	if rt.Dst == nil {
		if rt.Family == netlink.FAMILY_V6 {
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	a, ok := netip.AddrFromSlice(rt.Dst.IP)
	if !ok {
		return netip.Prefix{}
	}
	ones, _ := rt.Dst.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}
