package lab

// This file is the lab's BGP router mode (Config.Routing "bgp", the
// default): BIRD 2 runs in the router namespace and peers with every node
// over IPv4 (one iBGP session per node, ASN BGPASN everywhere, IPv6 routes
// over the same session with multiprotocol BGP). The nodes' batond speak
// BGP passively (GoBGP dials late and slowly); BIRD dials each node every
// second. BIRD merges the nodes' paths to the anycast prefixes into one
// kernel multipath route (merge paths), which is what PredictNode and
// Nexthops read.
//
// SetNexthops works in this mode too: it rewrites the per-node import
// filters (import table on keeps every node's announcement, so a changed
// filter is re-applied at once, without a route refresh) and waits until
// the router's FIB uses exactly the allowed nodes that announce.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
)

// Routing modes (Config.Routing).
const (
	// RoutingBGP: BIRD in the router learns the anycast routes from the
	// nodes' batond (announce bgp). The default.
	RoutingBGP = "bgp"
	// RoutingStatic: a static kernel multipath route over every node,
	// whatever runs on them; SetNexthops changes it.
	RoutingStatic = "static"
)

// BGP settings of the lab.
const (
	// BGPASN is the AS of the router and of every node (iBGP: BIRD merges
	// equal paths from one AS without further configuration).
	BGPASN = 64512
	// BGPHoldTime is the hold time on both sides (keepalives every second).
	BGPHoldTime = 3 * time.Second
	// BGPPort is where every node's batond listens for BIRD.
	BGPPort = 179
)

var routerID = netip.MustParseAddr("198.51.100.1")

// bird is the router's BIRD process and its files.
type bird struct {
	conf, sock, pid string
	proc            *Proc

	setMu   sync.Mutex   // serializes SetNexthops
	mu      sync.Mutex   // guards allowed
	allowed map[int]bool // nodes whose routes BIRD imports
}

// startBIRD replaces the static anycast routes (used at New to calibrate
// the IPv6 hash model) by a BIRD router. Called by New in BGP mode.
func (l *Lab) startBIRD(ctx context.Context) error {
	if err := l.setStaticNexthops(nil); err != nil {
		return err
	}
	b := &bird{
		conf:    filepath.Join(l.LogDir, l.Name+"-bird.conf"),
		sock:    filepath.Join(l.LogDir, l.Name+"-bird.ctl"),
		pid:     filepath.Join(l.LogDir, l.Name+"-bird.pid"),
		allowed: map[int]bool{},
	}
	if len(b.sock) > 100 {
		return fmt.Errorf("lab: BIRD control socket path %s is too long for a unix socket (use a shorter LogDir)", b.sock)
	}
	if _, err := exec.LookPath("bird"); err != nil {
		return errors.New("lab: bird not found: install BIRD 2 (make deps installs bird2), or use Config.Routing \"static\"")
	}
	for _, n := range l.Nodes {
		b.allowed[n.Index] = true
	}
	if err := os.WriteFile(b.conf, []byte(l.birdConfig(b.allowed)), 0o644); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	// -f: foreground, so the PID is BIRD's own (Close stops it by PID).
	p, err := l.Router.Start("bird", []string{"bird", "-f", "-c", b.conf, "-s", b.sock, "-P", b.pid}, nil)
	if err != nil {
		return err
	}
	b.proc = p
	l.bird = b
	// Ready once birdc answers.
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		out, err := l.Birdc(wctx, "show", "status")
		if err == nil && strings.Contains(out, "Daemon is up and running") {
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("lab: bird exited at start:\n%s", p.Log())
		case <-wctx.Done():
			return fmt.Errorf("lab: bird not ready: %v %s\n%s", err, out, p.Log())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// birdConfig is BIRD's configuration with the given nodes' routes
// imported.
func (l *Lab) birdConfig(allowed map[int]bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# BIRD 2 configuration of lab %s, written by e2e/lab (bgp.go).
log stderr all;
router id %s;

protocol device { scan time 10; }

# The anycast routes learned from the nodes go into the kernel as one
# multipath route (merge paths: ECMP over every announcing node).
protocol kernel kernel4 {
	merge paths on;
	ipv4 { import none; export where source = RTS_BGP; };
}
`, l.Name, routerID)
	if l.IPv6 {
		b.WriteString(`protocol kernel kernel6 {
	merge paths on;
	ipv6 { import none; export where source = RTS_BGP; };
}
`)
	}
	fmt.Fprintf(&b, `
# A node may announce only the anycast prefixes.
filter anycast4 { if net = %s/32 then accept; reject; }
`, l.Anycast4)
	if l.IPv6 {
		fmt.Fprintf(&b, "filter anycast6 { if net = %s/128 then accept; reject; }\n", l.Anycast6)
	}
	fmt.Fprintf(&b, `
# Short timers for tests: hold 3 s, keepalive 1 s, dial every second, and
# 1-2 s (not 60-300 s) before retrying after an error. The router dials:
# the nodes are passive.
template bgp lab_node {
	direct;
	hold time %d;
	keepalive time 1;
	connect delay time 1;
	connect retry time 1;
	error wait time 1,2;
	error forget time 10;
}
`, int(BGPHoldTime/time.Second))
	for _, n := range l.Nodes {
		imp4, imp6 := "import filter anycast4;", "import filter anycast6;"
		if !allowed[n.Index] {
			imp4, imp6 = "import none;", "import none;"
		}
		fmt.Fprintf(&b, "\nprotocol bgp %s from lab_node {\n\tlocal %s as %d;\n\tneighbor %s port %d as %d;\n",
			NodeName(n.Index), n.Gateway4, BGPASN, n.Addr4, BGPPort, BGPASN)
		fmt.Fprintf(&b, "\tipv4 { import table on; %s export none; gateway direct; };\n", imp4)
		if l.IPv6 {
			fmt.Fprintf(&b, "\tipv6 { import table on; %s export none; gateway direct; };\n", imp6)
		}
		b.WriteString("}\n")
	}
	return b.String()
}

// Birdc runs `birdc -s SOCKET args...` inside the router namespace and
// returns its output (BGP mode only).
func (l *Lab) Birdc(ctx context.Context, args ...string) (string, error) {
	if l.bird == nil {
		return "", errors.New("lab: no BIRD router (Config.Routing is static)")
	}
	var out []byte
	err := l.Router.Do(func() error {
		// Forked from this thread, so birdc runs in the router namespace.
		cmd := exec.CommandContext(ctx, "birdc", append([]string{"-s", l.bird.sock}, args...)...)
		var err error
		out, err = cmd.CombinedOutput()
		return err
	})
	if err != nil {
		return string(out), fmt.Errorf("lab: birdc %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// BIRDProc is the router's BIRD process (nil in static mode).
func (l *Lab) BIRDProc() *Proc {
	if l.bird == nil {
		return nil
	}
	return l.bird.proc
}

// RouterSessions returns the state of the router's BGP session with each
// node, by node index ("Established", "Active", "Connect", ...).
func (l *Lab) RouterSessions(ctx context.Context) (map[int]string, error) {
	out, err := l.Birdc(ctx, "show", "protocols")
	if err != nil {
		return nil, err
	}
	states := map[int]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 5 || f[1] != "BGP" || !strings.HasPrefix(f[0], "n") {
			continue
		}
		i, err := strconv.Atoi(f[0][1:])
		if err != nil || i < 1 || i > len(l.Nodes) {
			continue
		}
		// Name Proto Table State Since Info...: Info starts with the
		// BGP state (Established, Active, Connect, ...).
		states[i-1] = "?"
		if len(f) >= 6 {
			states[i-1] = f[5]
		}
	}
	return states, nil
}

// announcing returns the nodes whose announcement of the family's anycast
// prefix BIRD holds, imported or not (from the import tables).
func (l *Lab) announcing(ctx context.Context, family string) ([]int, error) {
	var idx []int
	ch, p := "ipv4", netip.PrefixFrom(l.Anycast4, 32)
	if family == "ip6" {
		ch, p = "ipv6", netip.PrefixFrom(l.Anycast6, 128)
	}
	for _, n := range l.Nodes {
		out, err := l.Birdc(ctx, "show", "route", p.String(), "import", "table", NodeName(n.Index)+"."+ch)
		if strings.Contains(out, "No import table") {
			continue // the session is not up
		}
		if err != nil {
			return nil, err
		}
		if strings.Contains(out, p.String()) {
			idx = append(idx, n.Index)
		}
	}
	return idx, nil
}

// setBGPNexthops is SetNexthops in BGP mode: import only the given nodes'
// routes, then wait until the FIB uses exactly those of them that
// announce.
func (l *Lab) setBGPNexthops(active []int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l.bird.setMu.Lock()
	defer l.bird.setMu.Unlock()
	allowed := map[int]bool{}
	for _, i := range active {
		allowed[i] = true
	}
	if err := os.WriteFile(l.bird.conf, []byte(l.birdConfig(allowed)), 0o644); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	out, err := l.Birdc(ctx, "configure")
	if err != nil {
		return err
	}
	if !strings.Contains(out, "Reconfigured") && !strings.Contains(out, "Reconfiguration in progress") {
		return fmt.Errorf("lab: birdc configure: %s", strings.TrimSpace(out))
	}
	l.bird.mu.Lock()
	l.bird.allowed = allowed
	l.bird.mu.Unlock()
	fams := []string{"ip4"}
	if l.IPv6 {
		fams = append(fams, "ip6")
	}
	for _, fam := range fams {
		var last []int
		err := l.waitRouter(ctx, func() (bool, error) {
			ann, err := l.announcing(ctx, fam)
			if err != nil {
				return false, err
			}
			var want []int
			for _, i := range ann {
				if allowed[i] {
					want = append(want, i)
				}
			}
			got, err := l.Nexthops(fam)
			last = got
			return err == nil && slices.Equal(got, want), err
		})
		if err != nil {
			return fmt.Errorf("lab: SetNexthops(%v): %s route has nexthops %v: %w", active, fam, last, err)
		}
	}
	return nil
}

// allowedByRouter reports whether SetNexthops lets node i's routes in.
func (l *Lab) allowedByRouter(i int) bool {
	if l.bird == nil {
		return true
	}
	l.bird.mu.Lock()
	defer l.bird.mu.Unlock()
	return l.bird.allowed[i]
}

// waitRouter calls cond after every route change in the router namespace
// (netlink notifications), and every 50 ms in case one was missed, until
// it returns true or an error, or ctx is done.
func (l *Lab) waitRouter(ctx context.Context, cond func() (bool, error)) error {
	updates := make(chan netlink.RouteUpdate, 256)
	done := make(chan struct{})
	defer close(done)
	h := l.Router.Handle()
	subErr := netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{Namespace: &h})
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := cond()
		if ok || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			if subErr != nil {
				return fmt.Errorf("%w (route notifications: %v)", ctx.Err(), subErr)
			}
			return ctx.Err()
		case <-updates:
			// Drain a burst before looking again.
			for len(updates) > 0 {
				<-updates
			}
		case <-tick.C:
		}
	}
}

// WaitNexthops waits until the router's anycast route for family ("ip4"
// or "ip6") uses exactly the given nodes (any order; none: no route), or
// ctx is done. It reacts to the router's route notifications, so the
// moment it returns is within microseconds of the FIB change.
func (l *Lab) WaitNexthops(ctx context.Context, family string, nodes []int) error {
	want := slices.Clone(nodes)
	slices.Sort(want)
	var last []int
	err := l.waitRouter(ctx, func() (bool, error) {
		got, err := l.Nexthops(family)
		last = got
		return err == nil && slices.Equal(got, want), err
	})
	if err != nil {
		return fmt.Errorf("lab: WaitNexthops %s %v: last %v: %w", family, want, last, err)
	}
	return nil
}

// WaitAnnounced waits until the router routes the anycast addresses (both
// families with IPv6) to node i among others, or ctx is done.
func (l *Lab) WaitAnnounced(ctx context.Context, i int) error {
	fams := []string{"ip4"}
	if l.IPv6 {
		fams = append(fams, "ip6")
	}
	var last []int
	err := l.waitRouter(ctx, func() (bool, error) {
		for _, fam := range fams {
			got, err := l.Nexthops(fam)
			last = got
			if err != nil || !slices.Contains(got, i) {
				return false, err
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("lab: node %d not announced (router nexthops %v): %w", i, last, err)
	}
	return nil
}

// bgpArgs are batond's announcer flags for node index i: announce bgp to
// the router (passive), next hops = the node's eth0 addresses.
func (l *Lab) bgpArgs(i int) []string {
	n := l.Nodes[i]
	args := []string{
		"-announce", "bgp",
		"-bgp-asn", strconv.Itoa(BGPASN),
		"-bgp-router-id", n.Addr4.String(),
		"-bgp-listen-port", strconv.Itoa(BGPPort),
		"-bgp-next-hop4", n.Addr4.String(),
		"-bgp-hold-time", BGPHoldTime.String(),
		"-bgp-neighbors", fmt.Sprintf("%s=%d:passive", n.Gateway4, BGPASN),
	}
	if l.IPv6 {
		args = append(args, "-bgp-next-hop6", n.Addr6.String())
	}
	return args
}

// StartBatondUnannounced is StartBatond without waiting for the router to
// route to the node: it returns once batond's TUN and routes are up (in
// BGP mode the node announces only when its checks pass, which a test may
// hold back).
func (l *Lab) StartBatondUnannounced(ctx context.Context, bin string, i int, extra ...string) (*Proc, error) {
	if i < 0 || i >= len(l.Nodes) {
		return nil, fmt.Errorf("lab: no node index %d", i)
	}
	p, err := l.Nodes[i].Start("batond-"+NodeName(i), l.BatondArgs(bin, i, extra...), nil)
	if err != nil {
		return nil, err
	}
	if err := l.waitBatond(ctx, p, i); err != nil {
		_ = p.Kill()
		return nil, err
	}
	return p, nil
}

// waitAnnouncedOrExit waits for WaitAnnounced(i) unless p exits first.
func (l *Lab) waitAnnouncedOrExit(ctx context.Context, p *Proc, i int) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ready := make(chan error, 1)
	go func() { ready <- l.WaitAnnounced(ctx, i) }()
	select {
	case err := <-ready:
		if err != nil {
			return fmt.Errorf("%w\n%s", err, p.Log())
		}
		return nil
	case <-p.Done():
		cancel()
		<-ready
		return errors.New("lab: batond on " + NodeName(i) + " exited before it was announced:\n" + p.Log())
	}
}
