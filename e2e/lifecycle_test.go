package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/tun"
)

// nodeRoutes returns the node's routes through the TUN (any family) and
// whether the TUN link exists.
func nodeRoutes(t *testing.T, n *lab.Node) (routes []string, tunExists bool) {
	t.Helper()
	h := n.Netlink()
	link, err := h.LinkByName(lab.TUNName)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			t.Fatalf("looking up %s: %v", lab.TUNName, err)
		}
	} else {
		tunExists = true
		_ = link
	}
	all, err := h.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Protocol: tun.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range all {
		routes = append(routes, r.Dst.String())
	}
	return routes, tunExists
}

func whoami(ctx context.Context, l *lab.Lab) (string, error) {
	h, err := dialHTTP(ctx, l.Client, "tcp4", hostPort(l.Anycast4, 80), 0)
	if err != nil {
		return "", err
	}
	defer h.Close()
	_, who, err := h.getString("/whoami")
	return strings.TrimSpace(who), err
}

// TestKillLeavesNothingBehind kills batond with SIGKILL and checks that its
// TUN and routes are gone, then that a restarted batond serves again with a
// single fresh set of routes.
func TestKillLeavesNothingBehind(t *testing.T) {
	t.Parallel()
	l, procs := newLab(t, 1)
	ctx := testCtx(t)
	n := l.Nodes[0]
	if routes, ok := nodeRoutes(t, n); !ok || len(routes) != 2 {
		t.Fatalf("before kill: tun %v, routes %v, want the TUN and 2 routes", ok, routes)
	}
	if err := procs[0].Kill(); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := procs[0].Wait(wctx); err != nil {
		t.Fatal(err)
	}
	if routes, ok := nodeRoutes(t, n); ok || len(routes) != 0 {
		t.Fatalf("after kill -9: tun exists %v, routes %v; want none", ok, routes)
	}
	if _, err := whoami(ctx, l); err == nil {
		t.Fatal("a connection succeeded with the only node dead")
	}
	// The admin socket file is left behind by SIGKILL; the restart must
	// replace it (it is stale: nobody answers on it).
	if _, err := l.StartBatond(ctx, batond, 0); err != nil {
		t.Fatalf("restart after kill -9: %v", err)
	}
	if routes, ok := nodeRoutes(t, n); !ok || len(routes) != 2 {
		t.Fatalf("after restart: tun %v, routes %v", ok, routes)
	}
	if who, err := whoami(ctx, l); err != nil || who != "n1" {
		t.Fatalf("after restart: whoami %q, %v", who, err)
	}
}

// TestSIGTERMCleansUp checks a graceful stop: exit status 0, routes, TUN and
// admin socket removed.
func TestSIGTERMCleansUp(t *testing.T) {
	t.Parallel()
	l, procs := newLab(t, 1)
	ctx := testCtx(t)
	if err := procs[0].Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	st, err := procs[0].Wait(wctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.ExitCode() != 0 {
		t.Fatalf("exit status %d after SIGTERM\n%s", st.ExitCode(), procs[0].Log())
	}
	if routes, ok := nodeRoutes(t, l.Nodes[0]); ok || len(routes) != 0 {
		t.Fatalf("after SIGTERM: tun exists %v, routes %v", ok, routes)
	}
	if _, err := os.Stat(l.AdminSocket(0)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("admin socket still there: %v", err)
	}
	if !strings.Contains(procs[0].Log(), "stopped") {
		t.Fatalf("log does not say stopped:\n%s", procs[0].Log())
	}
}

// TestBadConfig runs batond with each kind of bad configuration and checks
// it exits non-zero with one line naming the field and the problem, and
// leaves nothing behind.
func TestBadConfig(t *testing.T) {
	t.Parallel()
	l, _ := newLab(t, 1) // node 0 runs a good batond that owns any0
	ctx := testCtx(t)
	n := l.Nodes[0]
	adminFree := "unix:" + l.LogDir + "/bad.sock"
	cases := []struct {
		name string
		args []string
		uid  int // run as this user when non-zero
		want string
	}{
		{"overlapping prefix", []string{"-anycast", "192.0.2.0/24,192.0.2.1/32", "-tun", "bad0"},
			0, "batond: anycast[1]: 192.0.2.1/32 overlaps anycast[0] 192.0.2.0/24"},
		{"invalid prefix", []string{"-anycast", "192.0.2.1/40", "-tun", "bad0"},
			0, `batond: anycast[0]: "192.0.2.1/40" is not a valid prefix`},
		{"bad port", []string{"-anycast", "192.0.2.1/32", "-tun", "bad0", "-services", "http=0"},
			0, "batond: services.http.port: 0 out of range 1..65535"},
		{"no CAP_NET_ADMIN", []string{"-anycast", "192.0.2.1/32", "-tun", "bad0", "-admin", "unix:/tmp/baton-e2e-nobody.sock"},
			65534, "batond: no CAP_NET_ADMIN: run batond as root or grant it cap_net_admin"},
		{"TUN in use", []string{"-anycast", "192.0.2.1/32", "-tun", lab.TUNName},
			0, "batond: tun.name: interface " + lab.TUNName + " already exists (in use by another process?)"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			argv := append([]string{batond, "-node", "bad", "-admin", adminFree, "-metrics", ""}, tc.args...)
			var p *lab.Proc
			var err error
			if tc.uid != 0 {
				p, err = n.StartAs(fmt.Sprintf("bad-%d", i), argv, nil, uint32(tc.uid))
			} else {
				p, err = n.Start(fmt.Sprintf("bad-%d", i), argv, nil)
			}
			if err != nil {
				t.Fatal(err)
			}
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			st, err := p.Wait(wctx)
			if err != nil {
				t.Fatal(err)
			}
			out := p.Log()
			if st.ExitCode() == 0 {
				t.Fatalf("exit status 0, want non-zero; output:\n%s", out)
			}
			if strings.TrimRight(out, "\n") != tc.want {
				t.Fatalf("output:\n%s\nwant exactly one line:\n%s", out, tc.want)
			}
		})
	}
	// Nothing of the failed starts is left; the good node still serves.
	routes, ok := nodeRoutes(t, n)
	if !ok || len(routes) != 2 {
		t.Fatalf("after the bad starts: tun %v, routes %v", ok, routes)
	}
	for _, r := range routes {
		if p := netip.MustParsePrefix(r); p.Bits() != p.Addr().BitLen() {
			t.Fatalf("unexpected route %s left by a failed start", r)
		}
	}
	if _, err := n.Netlink().LinkByName("bad0"); err == nil {
		t.Fatal("a failed start left TUN bad0 behind")
	}
	if who, err := whoami(ctx, l); err != nil || who != "n1" {
		t.Fatalf("the good node stopped serving: %q %v", who, err)
	}
}
