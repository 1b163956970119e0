package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const testSeed = 0xba7017

func newLab(t *testing.T, cfg Config) *Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if cfg.Logf == nil {
		cfg.Logf = t.Logf
	}
	if cfg.LogDir == "" {
		cfg.LogDir = t.TempDir()
	}
	if cfg.Routing == "" {
		// These tests route to nodes without batond: the kernel answers.
		cfg.Routing = RoutingStatic
	}
	l, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Logf("lab %s: %s (logs in %s)", l.Name, strings.Join(l.Namespaces(), " "), l.LogDir)
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return l
}

// serveIndex makes the kernel of every node answer on the anycast addresses
// (assigned to lo, for these tests only) with a TCP server on port 80 that
// writes the node's index and closes.
func serveIndex(t *testing.T, l *Lab) {
	t.Helper()
	for _, n := range l.Nodes {
		if err := n.AddAddr("lo", l.Anycast4, 32); err != nil {
			t.Fatal(err)
		}
		if l.IPv6 {
			if err := n.AddAddr("lo", l.Anycast6, 128); err != nil {
				t.Fatal(err)
			}
		}
		ln, err := n.ListenTCP(t.Context(), "tcp", ":80")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%d\n", n.Index)
				c.Close()
			}
		}()
	}
}

// connect opens one connection from the client with the given source port
// and returns the index of the node that answered.
func connect(t *testing.T, l *Lab, network string, dst netip.AddrPort, port int) int {
	t.Helper()
	c, err := l.Client.Dial(t.Context(), network, dst.String(), port)
	if err != nil {
		t.Fatalf("dial %s from port %d: %v", dst, port, err)
	}
	defer c.Close()
	if got := c.LocalAddr().(*net.TCPAddr).Port; got != port {
		t.Fatalf("local port %d, want %d", got, port)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("read from %s (port %d): %v", dst, port, err)
	}
	idx, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("bad answer %q", line)
	}
	return idx
}

type family struct {
	name    string
	network string
	src     func(*Lab) netip.Addr
	dst     func(*Lab) netip.Addr
}

var families = []family{
	{"ipv4", "tcp4", func(l *Lab) netip.Addr { return l.ClientAddr4 }, func(l *Lab) netip.Addr { return l.Anycast4 }},
	{"ipv6", "tcp6", func(l *Lab) netip.Addr { return l.ClientAddr6 }, func(l *Lab) netip.Addr { return l.Anycast6 }},
}

// flows opens n connections with source ports base..base+n-1, checks each
// landed on the node PredictNode named, and returns the count per node.
func flows(t *testing.T, l *Lab, f family, base, n int) []int {
	t.Helper()
	count := make([]int, len(l.Nodes))
	dst := netip.AddrPortFrom(f.dst(l), 80)
	for port := base; port < base+n; port++ {
		want, err := l.PredictNode(netip.AddrPortFrom(f.src(l), uint16(port)), dst)
		if err != nil {
			t.Fatal(err)
		}
		got := connect(t, l, f.network, dst, port)
		if got != want {
			t.Errorf("%s sport %d: landed on node %d, PredictNode said %d", f.name, port, got, want)
		}
		count[got]++
	}
	return count
}

func TestECMPSpreadAndPrediction(t *testing.T) {
	t.Parallel()
	l := newLab(t, Config{Nodes: 3, HashSeed: testSeed})
	serveIndex(t, l)
	if l.model6 == nil {
		t.Fatalf("no IPv6 hash model: %v", l.model6Err)
	}
	t.Logf("IPv6 flow_keys model: %s", l.model6.name)

	for _, n := range l.Nodes {
		if err := l.Ping(t.Context(), l.Client, n.Addr4); err != nil {
			t.Fatal(err)
		}
		if err := l.Ping(t.Context(), l.Client, n.Addr6); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Ping(t.Context(), l.Client, l.Anycast4); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(t.Context(), l.Client, l.Anycast6); err != nil {
		t.Fatal(err)
	}

	for fi, f := range families {
		t.Run(f.name, func(t *testing.T) {
			count := flows(t, l, f, 40000+1000*fi, 64)
			t.Logf("%s: 64 flows per node: %v", f.name, count)
			used := 0
			for _, c := range count {
				if c > 0 {
					used++
				}
			}
			if used < 2 {
				t.Errorf("%s: flows used %d node(s): %v", f.name, used, count)
			}
		})
	}

	t.Run("only node 0", func(t *testing.T) {
		if err := l.SetNexthops([]int{0}); err != nil {
			t.Fatal(err)
		}
		for fi, f := range families {
			if nh, err := l.Nexthops("ip" + f.name[3:]); err != nil || !slices.Equal(nh, []int{0}) {
				t.Fatalf("%s nexthops %v, %v; want [0]", f.name, nh, err)
			}
			count := flows(t, l, f, 42000+1000*fi, 64)
			if count[0] != 64 {
				t.Errorf("%s: with only node 0, flows per node %v", f.name, count)
			}
		}
	})

	t.Run("nodes 1 and 2", func(t *testing.T) {
		if err := l.SetNexthops([]int{2, 1}); err != nil {
			t.Fatal(err)
		}
		for fi, f := range families {
			count := flows(t, l, f, 44000+1000*fi, 32)
			t.Logf("%s: without node 0: %v", f.name, count)
			if count[0] != 0 {
				t.Errorf("%s: node 0 still got flows: %v", f.name, count)
			}
		}
	})

	t.Run("no route", func(t *testing.T) {
		if err := l.SetNexthops(nil); err != nil {
			t.Fatal(err)
		}
		for fi, f := range families {
			if nh, err := l.Nexthops("ip" + f.name[3:]); err != nil || len(nh) != 0 {
				t.Fatalf("%s nexthops %v, %v; want none", f.name, nh, err)
			}
			dst := netip.AddrPortFrom(f.dst(l), 80)
			if i, err := l.PredictNode(netip.AddrPortFrom(f.src(l), 46000), dst); err == nil {
				t.Errorf("%s: PredictNode without route = %d, want error", f.name, i)
			}
			c, err := l.Client.Dial(t.Context(), f.network, dst.String(), 46000+fi)
			if err == nil {
				c.Close()
				t.Errorf("%s: dial without route succeeded", f.name)
			} else {
				t.Logf("%s: dial without route: %v", f.name, err)
			}
		}
		if err := l.SetNexthops(nil); err != nil {
			t.Fatalf("second removal: %v", err)
		}
		if err := l.SetNexthops([]int{0, 1, 2}); err != nil {
			t.Fatal(err)
		}
		if nh, err := l.Nexthops("ip6"); err != nil || !slices.Equal(nh, []int{0, 1, 2}) {
			t.Fatalf("nexthops %v, %v; want all", nh, err)
		}
	})

	if err := l.SetNexthops([]int{3}); err == nil {
		t.Error("SetNexthops with a bad index succeeded")
	}
}

// TestSeedReproducible builds two labs with the same seed and checks that
// the kernel maps the same flows to the same nodes in both.
func TestSeedReproducible(t *testing.T) {
	t.Parallel()
	a := newLab(t, Config{Nodes: 4, HashSeed: testSeed})
	b := newLab(t, Config{Nodes: 4, HashSeed: testSeed, Prefix: "btseed"})
	if seed, err := a.Router.Sysctl("net.ipv4.fib_multipath_hash_seed"); err != nil || seed != strconv.Itoa(testSeed) {
		t.Skipf("hash seed not supported here (%q, %v)", seed, err)
	}
	differ := 0
	for _, f := range families {
		dst := netip.AddrPortFrom(f.dst(a), 80)
		for port := 20000; port < 20256; port++ {
			src := netip.AddrPortFrom(f.src(a), uint16(port))
			x, err1 := a.PredictNode(src, dst)
			y, err2 := b.PredictNode(src, dst)
			if err1 != nil || err2 != nil {
				t.Fatal(err1, err2)
			}
			if x != y {
				differ++
			}
		}
	}
	if differ != 0 {
		t.Errorf("%d of 512 flows map differently in two labs with the same seed", differ)
	}
}

func TestProcessesAndClose(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	l, err := New(t.Context(), Config{Nodes: 2, DisableIPv6: true, Logf: t.Logf, LogDir: t.TempDir(), Routing: RoutingStatic})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	if l.Anycast6.IsValid() || l.IPv6 {
		t.Errorf("IPv4-only lab has Anycast6 %v", l.Anycast6)
	}
	node := l.Nodes[1]
	ino, err := node.inode()
	if err != nil {
		t.Fatal(err)
	}

	// A short process: its output lands in the log, its exit status is
	// reported, and it ran inside the node namespace.
	p, err := node.Start("probe", []string{"sh", "-c", "readlink /proc/self/ns/net; echo to-stderr >&2; exit 3"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := p.Wait(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if st.ExitCode() != 3 {
		t.Errorf("exit code %d, want 3", st.ExitCode())
	}
	if want := fmt.Sprintf("net:[%d]\nto-stderr\n", ino); p.Log() != want {
		t.Errorf("log %q, want %q", p.Log(), want)
	}
	if want := l.LogDir + "/" + l.Name + "-probe.log"; p.LogPath() != want {
		t.Errorf("log path %s, want %s", p.LogPath(), want)
	}

	// A long one, killed by Close.
	sleep, err := node.Start("sleep", []string{"sleep", "600"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	pid := sleep.PID()
	if link, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid)); err != nil || link != fmt.Sprintf("net:[%d]", ino) {
		t.Errorf("sleep's netns %q (%v), want net:[%d]", link, err, ino)
	}
	// A grandchild that Start does not know about: Close must find it.
	orphanLog := l.LogDir + "/orphan.pid"
	if _, err := l.Router.Start("spawner", []string{"sh", "-c", "sleep 600 & echo $! > " + orphanLog}, nil); err != nil {
		t.Fatal(err)
	}

	// Ask the kernel in each namespace something, from a socket opened there.
	if err := l.Ping(t.Context(), l.Client, l.Nodes[0].Addr4); err != nil {
		t.Fatal(err)
	}
	if _, err := l.PredictNode(netip.MustParseAddrPort("198.51.100.2:1234"), netip.MustParseAddrPort("192.0.2.1:80")); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(t.Context(), l.Client, netip.MustParseAddr("2001:db8:200:1::2")); err == nil {
		t.Error("IPv6 ping worked in an IPv4-only lab")
	}

	var orphan int
	for _, pr := range l.Procs() {
		if pr.Name == "spawner" {
			pr.Wait(t.Context())
		}
	}
	b, err := os.ReadFile(orphanLog)
	if err != nil {
		t.Fatal(err)
	}
	orphan, _ = strconv.Atoi(strings.TrimSpace(string(b)))

	err = l.Close()
	// The orphan is reported, and nothing else.
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("leftover process %d", orphan)) {
		t.Errorf("Close: %v; want a report of leftover process %d", err, orphan)
	} else if n := strings.Count(err.Error(), "\n") + 1; n != 1 {
		t.Errorf("Close reported %d errors: %v", n, err)
	}
	if err2 := l.Close(); err2 != err && err2.Error() != err.Error() {
		t.Errorf("second Close: %v, first %v", err2, err)
	}
	if !sleep.Exited() {
		t.Error("sleep not reaped")
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("kill(%d, 0) after Close: %v, want ESRCH", pid, err)
	}
	if st, _ := sleep.Wait(t.Context()); st == nil || st.ExitCode() != -1 {
		t.Errorf("sleep state %v, want killed by signal", st)
	}
	waitGone(t, orphan)

	ents, err := os.ReadDir("/run/netns")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), l.Name) {
			t.Errorf("/run/netns/%s left after Close", e.Name())
		}
	}
	for _, name := range l.Namespaces() {
		if h, err := netns.GetFromName(name); err == nil {
			h.Close()
			t.Errorf("netns %s still exists", name)
		}
	}
	if _, err := node.Start("late", []string{"true"}, nil); err == nil {
		t.Error("Start after Close succeeded")
	}
	if err := node.Do(func() error { return nil }); err == nil {
		t.Error("Do after Close succeeded")
	}
}

// waitGone waits (without a deadline: the go test timeout bounds it) until
// pid, killed but not our child, has been reaped by its parent.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return
		}
		// "pid (comm) S ...": a zombie is dead already.
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && strings.HasPrefix(string(b[i:]), ") Z") {
			return
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// TestNewFailureCleansUp: a failed New leaves no namespace behind.
func TestNewFailureCleansUp(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	l, err := New(ctx, Config{Nodes: 2, Prefix: "btfail", Logf: t.Logf})
	if err == nil {
		l.Close()
		t.Fatal("New with a cancelled context succeeded")
	}
	t.Logf("New: %v", err)
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "btfail") {
			t.Errorf("/run/netns/%s left by a failed New", e.Name())
		}
	}
	if _, err := New(t.Context(), Config{Nodes: 9}); err == nil {
		t.Error("New with 9 nodes succeeded")
	}
}

// TestParallelLabs runs two labs at once: names, addresses and processes of
// one must not disturb the other.
func TestParallelLabs(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"a", "b"} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			l := newLab(t, Config{Nodes: 2, Prefix: "btpar"})
			serveIndex(t, l)
			p, err := l.Router.Start("sleep", []string{"sleep", "600"}, nil)
			if err != nil {
				t.Fatal(err)
			}
			for fi, f := range families {
				flows(t, l, f, 30000+100*fi, 16)
			}
			if p.Exited() {
				t.Error("the other lab's teardown killed our process")
			}
		})
	}
}

// TestWaitRoute plays batond's part with a real TUN device: WaitRoute must
// wait until the device is up with carrier and both anycast routes use it.
func TestWaitRoute(t *testing.T) {
	t.Parallel()
	l := newLab(t, Config{Nodes: 2})
	n := l.Nodes[1]
	if err := l.CheckRoute(1, "any0"); err == nil {
		t.Fatal("CheckRoute succeeded without a TUN")
	}
	waited := make(chan error, 1)
	go func() { waited <- l.WaitRoute(t.Context(), 1, "any0") }()

	var tunFd int
	if err := n.Do(func() error {
		var err error
		tunFd, err = openTUN("any0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(tunFd) })
	h := n.Netlink()
	link, err := h.LinkByName("any0")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.CheckRoute(1, "any0"); err == nil || !strings.Contains(err.Error(), "down") {
		t.Fatalf("CheckRoute before up: %v", err)
	}
	if err := h.LinkSetUp(link); err != nil {
		t.Fatal(err)
	}
	for _, p := range l.anycastPrefixes() {
		if err := l.CheckRoute(1, "any0"); err == nil {
			t.Fatalf("CheckRoute succeeded before route %s", p)
		}
		if err := h.RouteAdd(&netlink.Route{Dst: prefixNet(p), LinkIndex: link.Attrs().Index}); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-waited; err != nil {
		t.Fatal(err)
	}
	if err := l.CheckRoute(0, "any0"); err == nil {
		t.Error("node 0 has no TUN but CheckRoute succeeded")
	}

	// Packets for the anycast address now reach the TUN of node 1.
	src := netip.AddrPortFrom(l.ClientAddr4, 0)
	var port uint16
	for port = 50000; ; port++ {
		i, err := l.PredictNode(netip.AddrPortFrom(src.Addr(), port), netip.AddrPortFrom(l.Anycast4, 80))
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 {
			break
		}
	}
	go func() {
		c, err := l.Client.Dial(t.Context(), "tcp4", "192.0.2.1:80", int(port))
		if err == nil {
			c.Close()
		}
	}()
	buf := make([]byte, 1500)
	for {
		nr, err := unix.Read(tunFd, buf)
		if err != nil {
			t.Fatal(err)
		}
		// IPv4, TCP, to 192.0.2.1, from our source port.
		if nr >= 40 && buf[0]>>4 == 4 && buf[9] == unix.IPPROTO_TCP &&
			netip.AddrFrom4([4]byte(buf[16:20])) == l.Anycast4 &&
			uint16(buf[20])<<8|uint16(buf[21]) == port {
			break
		}
	}

	unix.Close(tunFd)
	tunFd = -1
	// The device goes with the last reference to its file, which is not
	// always this one: a child another test forks in the meantime holds a
	// copy of the descriptor until it execs (O_CLOEXEC closes it only
	// then). CI saw CheckRoute succeed right after the close.
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for l.CheckRoute(1, "any0") == nil {
		select {
		case <-ctx.Done():
			t.Fatal("CheckRoute still succeeds after the TUN was closed")
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// openTUN opens a non-persistent TUN device (no packet-information header)
// in the namespace of the calling thread.
func openTUN(name string) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("TUNSETIFF: %w", err)
	}
	return fd, nil
}
