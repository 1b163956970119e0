package lab

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"log"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink/nl"
)

// MaxNodes is the largest Config.Nodes.
const MaxNodes = 8

// The fixed anycast addresses. Every lab has its own namespaces, so all labs
// use the same ones.
var (
	Anycast4 = netip.MustParseAddr("192.0.2.1")
	Anycast6 = netip.MustParseAddr("2001:db8:a::1")
)

// Config describes a lab. The zero value plus Nodes is a complete config.
type Config struct {
	// Nodes is the number of node namespaces, 1..MaxNodes.
	Nodes int
	// Prefix starts every namespace name; default "bt". A random 6-hex-digit
	// suffix makes each run unique: namespaces are <Prefix><hex>-c, -r,
	// -n1..-nN. At most 16 characters of [A-Za-z0-9_-].
	Prefix string
	// DisableIPv6 builds an IPv4-only lab. The zero value sets up both IPv4
	// and IPv6 (addresses, default routes, anycast routes, forwarding).
	DisableIPv6 bool
	// HashSeed is written to the router's net.ipv4.fib_multipath_hash_seed
	// (kernel >= 6.11; it covers IPv4 and IPv6) so the flow->node mapping is
	// the same on every run with the same seed. 0 picks a random non-zero
	// seed (Lab.HashSeed tells which): IPv6 prediction needs a known seed.
	// On a kernel without the sysctl this is skipped with a note, and only
	// IPv4 prediction works.
	HashSeed uint32
	// LogDir receives the process logs. Default: a new temporary directory,
	// which Close leaves in place (logs are most useful after a failure).
	LogDir string
	// Logf receives notes (e.g. an unsupported sysctl). Default log.Printf;
	// tests usually pass t.Logf.
	Logf func(format string, args ...any)
	// Routing is how the router learns the anycast routes: RoutingBGP
	// (the default, "" too): BIRD peers with every node's batond, which
	// announces when healthy (bgp.go); RoutingStatic: a static multipath
	// route over every node, whatever runs there.
	Routing string
}

// Lab is a running lab: client, router and node namespaces wired together.
// See the package documentation for the topology.
type Lab struct {
	// Name is the unique run name, <Prefix><6 hex>; namespaces are
	// <Name>-c, <Name>-r, <Name>-n1...
	Name   string
	LogDir string
	IPv6   bool // IPv6 is configured (Config.DisableIPv6 was false)
	// HashSeed is the router's fib_multipath_hash_seed, 0 if the kernel
	// has none.
	HashSeed uint32
	// Routing is RoutingBGP or RoutingStatic (Config.Routing).
	Routing string

	Client, Router *NS
	// Nodes[i] is node index i (0-based), namespace <Name>-n<i+1>.
	Nodes []*Node

	Anycast4, Anycast6       netip.Addr // Anycast6 is invalid when !IPv6
	ClientAddr4, ClientAddr6 netip.Addr // client eth0 addresses

	logf            func(string, ...any)
	routerClientIdx int // ifindex of to-c in the router namespace

	predMu   sync.Mutex
	predSock *nl.SocketHandle // NETLINK_ROUTE socket in the router namespace

	model6    *flowKeysModel // IPv6 hash model, chosen by calibrate6
	model6Err error          // why model6 is nil

	cluster *Cluster // set by EnableCluster
	bird    *bird    // the BIRD router (RoutingBGP), set once it runs

	mu        sync.Mutex
	closed    bool
	procs     []*Proc
	closeOnce sync.Once
	closeErr  error
}

// Node is one anycast node namespace.
type Node struct {
	*NS
	// Index is the node's 0-based index (SetNexthops, PredictNode); the
	// namespace and link names use Index+1.
	Index int
	// Addr4/Addr6 are the node's eth0 addresses; Gateway4/Gateway6 the
	// router's addresses on the same link (the node's default gateways and
	// the router's ECMP nexthops).
	Addr4, Addr6       netip.Addr
	Gateway4, Gateway6 netip.Addr
	// RouterLink is the router-side interface name, "to-n<Index+1>".
	RouterLink string

	routerLinkIdx int
}

var prefixRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,16}$`)

// New builds a lab: namespaces, veths, addresses, sysctls, default routes and
// the router's multipath anycast routes over all nodes. On error it tears
// down everything it made. ctx bounds the setup only; Close ends the lab.
func New(ctx context.Context, cfg Config) (*Lab, error) {
	if cfg.Nodes < 1 || cfg.Nodes > MaxNodes {
		return nil, fmt.Errorf("lab: Nodes must be 1..%d, got %d", MaxNodes, cfg.Nodes)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "bt"
	}
	if !prefixRE.MatchString(cfg.Prefix) {
		return nil, fmt.Errorf("lab: bad Prefix %q", cfg.Prefix)
	}
	switch cfg.Routing {
	case "":
		cfg.Routing = RoutingBGP
	case RoutingBGP, RoutingStatic:
	default:
		return nil, fmt.Errorf("lab: Routing %q is not %q or %q", cfg.Routing, RoutingBGP, RoutingStatic)
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("lab: needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")
	}
	l := &Lab{
		Routing:     cfg.Routing,
		IPv6:        !cfg.DisableIPv6,
		Anycast4:    Anycast4,
		ClientAddr4: netip.MustParseAddr("198.51.100.2"),
		logf:        cfg.Logf,
	}
	if l.logf == nil {
		l.logf = log.Printf
	}
	if l.IPv6 {
		l.Anycast6 = Anycast6
		l.ClientAddr6 = netip.MustParseAddr("2001:db8:100::2")
	}
	if err := l.build(ctx, cfg); err != nil {
		err = errors.Join(err, l.Close())
		if cfg.LogDir == "" && l.LogDir != "" {
			os.Remove(l.LogDir) // only if still empty
		}
		return nil, err
	}
	return l, nil
}

func (l *Lab) build(ctx context.Context, cfg Config) error {
	// The client namespace is created first, with O_EXCL on its name: that
	// reserves the run name against concurrent runs.
	for try := 0; ; try++ {
		var b [3]byte
		if _, err := rand.Read(b[:]); err != nil {
			return err
		}
		name := cfg.Prefix + hex.EncodeToString(b[:])
		ns, err := newNamedNS(name + "-c")
		if err == nil {
			l.Name, l.Client, ns.lab = name, ns, l
			break
		}
		if !errors.Is(err, os.ErrExist) || try == 10 {
			return err
		}
	}
	l.LogDir = cfg.LogDir
	if l.LogDir == "" {
		d, err := os.MkdirTemp("", "batonlab-"+l.Name+"-")
		if err != nil {
			return fmt.Errorf("lab: %w", err)
		}
		l.LogDir = d
	} else if err := os.MkdirAll(l.LogDir, 0o755); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	var err error
	if l.Router, err = l.newNS("-r"); err != nil {
		return err
	}
	for i := 0; i < cfg.Nodes; i++ {
		ns, err := l.newNS("-n" + strconv.Itoa(i+1))
		if err != nil {
			return err
		}
		l.Nodes = append(l.Nodes, newNode(ns, i))
	}
	steps := []func() error{
		func() error { return l.setSysctls(cfg.HashSeed) },
		l.setupLinks,
		l.setupRoutes,
		l.openPredictSocket,
		func() error { l.calibrate6(); return nil },
	}
	if l.Routing == RoutingBGP {
		// The static routes above served the IPv6 hash calibration only.
		steps = append(steps, func() error { return l.startBIRD(ctx) })
	}
	for _, step := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

func (l *Lab) newNS(suffix string) (*NS, error) {
	ns, err := newNamedNS(l.Name + suffix)
	if err != nil {
		return nil, err
	}
	ns.lab = l
	return ns, nil
}

// namespaces lists every namespace created so far.
func (l *Lab) namespaces() []*NS {
	var all []*NS
	if l.Client != nil {
		all = append(all, l.Client)
	}
	if l.Router != nil {
		all = append(all, l.Router)
	}
	for _, n := range l.Nodes {
		all = append(all, n.NS)
	}
	return all
}

// Node returns node i, or nil if out of range.
func (l *Lab) Node(i int) *Node {
	if i < 0 || i >= len(l.Nodes) {
		return nil
	}
	return l.Nodes[i]
}

// Namespaces returns the names of all the lab's namespaces.
func (l *Lab) Namespaces() []string {
	var names []string
	for _, ns := range l.namespaces() {
		names = append(names, ns.Name)
	}
	return names
}

func (l *Lab) setSysctls(seed uint32) error {
	v6 := l.IPv6
	common := func(ns *NS, forward bool) error {
		return ns.Do(func() error {
			kv := [][2]string{
				{"net.ipv4.conf.all.rp_filter", "0"},
				{"net.ipv4.conf.default.rp_filter", "0"},
			}
			if forward {
				kv = append(kv, [2]string{"net.ipv4.ip_forward", "1"})
			}
			if v6 {
				kv = append(kv,
					[2]string{"net.ipv6.conf.all.accept_dad", "0"},
					[2]string{"net.ipv6.conf.default.accept_dad", "0"})
				if forward {
					kv = append(kv, [2]string{"net.ipv6.conf.all.forwarding", "1"})
				}
			}
			for _, e := range kv {
				if err := writeSysctl(e[0], e[1]); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err := common(l.Client, false); err != nil {
		return err
	}
	for _, n := range l.Nodes {
		if err := common(n.NS, true); err != nil {
			return err
		}
	}
	if err := common(l.Router, true); err != nil {
		return err
	}
	return l.Router.Do(func() error {
		// Policy 3 = custom field set; 0x37 = src IP, dst IP, IP proto,
		// src port, dst port. Policy 1 is not stable over veth (the skb
		// keeps the sending socket's random flow hash).
		kv := [][2]string{
			{"net.ipv4.fib_multipath_hash_fields", "0x0037"},
			{"net.ipv4.fib_multipath_hash_policy", "3"},
		}
		if v6 {
			kv = append(kv,
				[2]string{"net.ipv6.fib_multipath_hash_fields", "0x0037"},
				[2]string{"net.ipv6.fib_multipath_hash_policy", "3"})
		}
		for _, e := range kv {
			if err := writeSysctl(e[0], e[1]); err != nil {
				return err
			}
		}
		for seed == 0 {
			var b [4]byte
			if _, err := rand.Read(b[:]); err != nil {
				return err
			}
			seed = binary.LittleEndian.Uint32(b[:])
		}
		if err := writeSysctl("net.ipv4.fib_multipath_hash_seed", strconv.FormatUint(uint64(seed), 10)); err != nil {
			l.logf("lab %s: fib_multipath_hash_seed not set (kernel < 6.11?): %v", l.Name, err)
		} else {
			l.HashSeed = seed
		}
		return nil
	})
}

func (l *Lab) addProc(p *Proc) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return fmt.Errorf("lab %s: closed", l.Name)
	}
	l.procs = append(l.procs, p)
	return nil
}

func (l *Lab) removeProc(p *Proc) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, q := range l.procs {
		if q == p {
			l.procs = append(l.procs[:i], l.procs[i+1:]...)
			return
		}
	}
}

// Procs returns the processes started in the lab (running or not).
func (l *Lab) Procs() []*Proc {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Proc(nil), l.procs...)
}

// Close tears the lab down; it is idempotent and safe to call on a
// half-built lab. In order:
//
//  1. every process started with Start gets SIGTERM, then SIGKILL if it has
//     not exited after a few seconds, and is reaped (all by PID);
//  2. any other process still inside a lab namespace (e.g. a daemon's
//     child) gets SIGKILL by PID and is reported in the error;
//  3. the lab's netlink sockets and namespace fds are closed and every
//     /run/netns/<Name>-* entry is unmounted and removed.
//
// The kernel then frees the namespaces with their veths and TUNs, as soon
// as no socket created in them is still open: close your conns and
// listeners too. Close returns all the errors it met, joined; later calls
// return the same error.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() { l.closeErr = l.close() })
	return l.closeErr
}

func (l *Lab) close() error {
	l.mu.Lock()
	l.closed = true
	procs := append([]*Proc(nil), l.procs...)
	l.mu.Unlock()

	var errs []error
	var wg sync.WaitGroup
	var emu sync.Mutex
	for _, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.Stop(); err != nil {
				emu.Lock()
				errs = append(errs, fmt.Errorf("lab %s: stop %s: %w", l.Name, p, err))
				emu.Unlock()
			}
		}()
	}
	wg.Wait()

	for _, ns := range l.namespaces() {
		ino, err := ns.inode()
		if err != nil {
			continue
		}
		for _, pid := range pidsInNS(ino) {
			err := syscall.Kill(pid, syscall.SIGKILL)
			errs = append(errs, fmt.Errorf("lab %s: leftover process %d in %s killed (%v)", l.Name, pid, ns.Name, err))
		}
	}

	l.predMu.Lock()
	if l.predSock != nil {
		l.predSock.Close()
		l.predSock = nil
	}
	l.predMu.Unlock()

	for _, ns := range l.namespaces() {
		if err := ns.close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
