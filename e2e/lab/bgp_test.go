package lab

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

// TestBGPRouter: a BGP-mode lab (the default) runs BIRD in the router
// namespace with a session per node, no anycast route until a node
// announces, and Close stops BIRD and leaves no process behind. Announcing
// nodes are covered by e2e/health_test.go (real batond).
func TestBGPRouter(t *testing.T) {
	for _, v6 := range []bool{true, false} {
		name := "ipv4+ipv6"
		if !v6 {
			name = "ipv4"
		}
		t.Run(name, func(t *testing.T) {
			l := newLab(t, Config{Nodes: 2, Routing: RoutingBGP, DisableIPv6: !v6, Prefix: "btbgp"})
			if l.Routing != RoutingBGP || l.BIRDProc() == nil || l.BIRDProc().NS != l.Router {
				t.Fatalf("routing %q, bird %v", l.Routing, l.BIRDProc())
			}
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			out, err := l.Birdc(ctx, "show", "protocols")
			if err != nil || !strings.Contains(out, "n1 ") || !strings.Contains(out, "n2 ") || !strings.Contains(out, "kernel4") {
				t.Fatalf("birdc show protocols: %v\n%s", err, out)
			}
			if strings.Contains(out, "kernel6") != v6 {
				t.Fatalf("kernel6 protocol with IPv6 %v:\n%s", v6, out)
			}
			sessions, err := l.RouterSessions(ctx)
			if err != nil || len(sessions) != 2 || sessions[0] == "Established" {
				t.Fatalf("sessions %v %v", sessions, err)
			}
			fams := []string{"ip4"}
			if v6 {
				fams = append(fams, "ip6")
			}
			for _, fam := range fams {
				if nh, err := l.Nexthops(fam); err != nil || len(nh) != 0 {
					t.Fatalf("%s nexthops %v %v before any node announces", fam, nh, err)
				}
				if err := l.WaitNexthops(ctx, fam, nil); err != nil {
					t.Fatal(err)
				}
			}
			// SetNexthops works without announcing nodes: nothing to wait for.
			if err := l.SetNexthops([]int{1}); err != nil {
				t.Fatal(err)
			}
			if conf, err := os.ReadFile(l.bird.conf); err != nil || strings.Count(string(conf), "import none; export none;") != len(fams) {
				t.Fatalf("config after SetNexthops([1]): %v\n%s", err, conf)
			}
			if _, err := l.PredictNode(netip.AddrPortFrom(l.ClientAddr4, 1234), netip.AddrPortFrom(l.Anycast4, 80)); err == nil {
				t.Fatal("PredictNode without a route succeeded")
			}
			bird := l.BIRDProc()
			if err := l.Close(); err != nil {
				t.Fatal(err)
			}
			if !bird.Exited() {
				t.Fatal("bird still running after Close")
			}
		})
	}
}
