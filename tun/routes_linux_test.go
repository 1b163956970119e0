// routes_linux_test.go: Routes and StaleRoutes in a throwaway namespace.

//go:build linux

package tun

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// routesNS opens a TUN named bt0 in a fresh namespace and returns a Routes
// for it, created inside the namespace.
func routesNS(t *testing.T) (*testNS, *Routes) {
	t.Helper()
	ns := newTestNS(t)
	ns.open(t, Config{Name: "bt0", MTU: 1500, Queues: 1})
	var r *Routes
	ns.must(t, func() (err error) { r, err = NewRoutes("bt0"); return err })
	t.Cleanup(func() { r.Remove() })
	return ns, r
}

// ourRoutes lists the namespace's main-table routes with our protocol, as
// "PREFIX dev NAME".
func ourRoutes(t *testing.T, ns *testNS) []string {
	t.Helper()
	var out []string
	ns.must(t, func() error {
		rs, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			return err
		}
		for _, rt := range rs {
			l, err := netlink.LinkByIndex(rt.LinkIndex)
			if err != nil {
				return err
			}
			if rt.Table != unix.RT_TABLE_MAIN || (rt.Family == netlink.FAMILY_V4 && rt.Scope != netlink.SCOPE_LINK) {
				t.Errorf("route %v: table %d scope %v, want main, link", rt.Dst, rt.Table, rt.Scope)
			}
			out = append(out, routeDst(rt).String()+" dev "+l.Attrs().Name)
		}
		return nil
	})
	slices.Sort(out)
	return out
}

func prefixes(s ...string) []netip.Prefix {
	var ps []netip.Prefix
	for _, p := range s {
		ps = append(ps, netip.MustParsePrefix(p))
	}
	return ps
}

func TestRoutesAddRemove(t *testing.T) {
	ns, r := routesNS(t)
	// Someone else's route in the namespace, which Remove must not touch.
	ns.addRoute(t, "198.51.100.0/24", "lo")

	add := prefixes("192.0.2.0/24", "2001:db8:1::/48", "203.0.113.7/32", "2001:db8::53/128")
	if err := r.Add(add...); err != nil {
		t.Fatal(err)
	}
	want := []string{"192.0.2.0/24 dev bt0", "2001:db8:1::/48 dev bt0", "2001:db8::53/128 dev bt0", "203.0.113.7/32 dev bt0"}
	if got := ourRoutes(t, ns); !slices.Equal(got, want) {
		t.Fatalf("routes with proto %d: %v, want %v", RouteProtocol, got, want)
	}
	if got := r.Installed(); !slices.Equal(got, add) {
		t.Fatalf("Installed = %v, want %v", got, add)
	}
	// Adding again is a no-op; a new prefix is added.
	if err := r.Add(append(add, netip.MustParsePrefix("203.0.113.8/32"))...); err != nil {
		t.Fatal(err)
	}
	if got := len(ourRoutes(t, ns)); got != 5 {
		t.Fatalf("%d routes after the second Add, want 5", got)
	}

	if err := r.Remove(); err != nil {
		t.Fatal(err)
	}
	if got := ourRoutes(t, ns); len(got) != 0 {
		t.Fatalf("routes left after Remove: %v", got)
	}
	if len(r.Installed()) != 0 {
		t.Fatalf("Installed after Remove = %v", r.Installed())
	}
	var other []netlink.Route
	ns.must(t, func() (err error) {
		other, err = netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: ipNet(netip.MustParsePrefix("198.51.100.0/24"))}, netlink.RT_FILTER_DST)
		return err
	})
	if len(other) != 1 {
		t.Fatalf("the route via lo was touched: %v", other)
	}
	if err := r.Remove(); err != nil {
		t.Fatalf("second Remove = %v", err)
	}
	if err := r.Add(add[0]); err == nil {
		t.Fatal("Add after Remove succeeded")
	}
}

func TestRoutesConflict(t *testing.T) {
	tests := []struct {
		name   string
		setup  func(ns *testNS) error
		add    []netip.Prefix
		errHas []string
	}{
		{
			name: "blackhole",
			setup: func(*testNS) error {
				return netlink.RouteAdd(&netlink.Route{Dst: ipNet(netip.MustParsePrefix("192.0.2.0/24")), Type: unix.RTN_BLACKHOLE})
			},
			add:    prefixes("203.0.113.0/24", "192.0.2.0/24"),
			errHas: []string{"192.0.2.0/24", "blackhole"},
		},
		{
			name: "via lo",
			setup: func(*testNS) error {
				lo, err := netlink.LinkByName("lo")
				if err != nil {
					return err
				}
				return netlink.RouteAdd(&netlink.Route{LinkIndex: lo.Attrs().Index, Dst: ipNet(netip.MustParsePrefix("203.0.113.0/24")), Scope: netlink.SCOPE_LINK, Priority: 100})
			},
			add:    prefixes("192.0.2.0/24", "203.0.113.0/24"),
			errHas: []string{"203.0.113.0/24", "dev lo", "metric 100"},
		},
		{
			name: "ipv6 unreachable",
			setup: func(*testNS) error {
				return netlink.RouteAdd(&netlink.Route{Dst: ipNet(netip.MustParsePrefix("2001:db8:5::/48")), Type: unix.RTN_UNREACHABLE})
			},
			add:    prefixes("2001:db8:5::/48"),
			errHas: []string{"2001:db8:5::/48", "unreachable"},
		},
		{
			name:   "host bits",
			add:    prefixes("192.0.2.1/24"),
			errHas: []string{"192.0.2.1/24", "192.0.2.0/24"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns, r := routesNS(t)
			if tt.setup != nil {
				ns.must(t, func() error { return tt.setup(ns) })
			}
			err := r.Add(tt.add...)
			if err == nil {
				t.Fatal("Add succeeded")
			}
			for _, s := range tt.errHas {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not mention %q", err, s)
				}
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("error is not one line: %q", err)
			}
			t.Logf("%v", err)
			// Refused before anything was added.
			if got := ourRoutes(t, ns); len(got) != 0 || len(r.Installed()) != 0 {
				t.Fatalf("routes installed despite the error: %v", got)
			}
		})
	}
}

// TestRoutesRollback makes the second of two routes fail in the kernel
// (IPv6 is disabled on the device) and checks the first is removed again.
func TestRoutesRollback(t *testing.T) {
	ns, r := routesNS(t)
	ns.sysctl(t, "net/ipv6/conf/bt0/disable_ipv6", "1")
	err := r.Add(prefixes("192.0.2.0/24", "2001:db8:2::/48")...)
	if err == nil || !strings.Contains(err.Error(), "2001:db8:2::/48") {
		t.Fatalf("Add = %v, want an error naming 2001:db8:2::/48", err)
	}
	t.Logf("%v", err)
	if got := ourRoutes(t, ns); len(got) != 0 || len(r.Installed()) != 0 {
		t.Fatalf("routes left after a failed Add: %v", got)
	}
}

// TestRoutesAdopt: a route for the prefix via our own device (left by an
// earlier Routes) is replaced, not refused.
func TestRoutesAdopt(t *testing.T) {
	ns, r := routesNS(t)
	ns.addRoute(t, "192.0.2.0/24", "bt0")
	if err := r.Add(prefixes("192.0.2.0/24")...); err != nil {
		t.Fatal(err)
	}
	if got := ourRoutes(t, ns); !slices.Equal(got, []string{"192.0.2.0/24 dev bt0"}) {
		t.Fatalf("routes = %v", got)
	}
}

// TestRoutesGoWithDevice: closing the TUN (as the kernel does when the
// process dies, even by SIGKILL) removes its routes; Remove then succeeds.
func TestRoutesGoWithDevice(t *testing.T) {
	ns := newTestNS(t)
	dev := ns.open(t, Config{Name: "bt0", MTU: 1500, Queues: 1})
	var r *Routes
	ns.must(t, func() (err error) { r, err = NewRoutes("bt0"); return err })
	if err := r.Add(prefixes("192.0.2.0/24", "2001:db8:1::/48")...); err != nil {
		t.Fatal(err)
	}
	dev.Close()
	if got := ourRoutes(t, ns); len(got) != 0 {
		t.Fatalf("routes survived the device: %v", got)
	}
	if err := r.Remove(); err != nil {
		t.Fatalf("Remove after the device went away = %v", err)
	}
	var stale []netlink.Route
	ns.must(t, func() (err error) { stale, err = StaleRoutes(nil); return err })
	if len(stale) != 0 {
		t.Fatalf("StaleRoutes = %v", stale)
	}
}

// TestStaleRoutes: a route with our protocol through a device without
// carrier (here the down end of a veth pair, standing in for a persistent
// TUN nobody holds) is reported; a live one is not.
func TestStaleRoutes(t *testing.T) {
	ns, r := routesNS(t)
	if err := r.Add(prefixes("192.0.2.0/24")...); err != nil {
		t.Fatal(err)
	}
	var stale []netlink.Route
	ns.must(t, func() error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "stale0"}, PeerName: "stale0-peer"}); err != nil {
			return err
		}
		l, err := netlink.LinkByName("stale0")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil { // peer stays down: no carrier
			return err
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(netip.MustParsePrefix("203.0.113.0/24")), Scope: netlink.SCOPE_LINK, Protocol: RouteProtocol}); err != nil {
			return err
		}
		stale, err = StaleRoutes(nil)
		return err
	})
	if len(stale) != 1 || routeDst(stale[0]) != netip.MustParsePrefix("203.0.113.0/24") {
		t.Fatalf("StaleRoutes = %v, want only 203.0.113.0/24", stale)
	}
}
