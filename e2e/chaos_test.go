package e2e

// Chaos in the lab (issue 7): impairments of the client link during
// takeovers, kill -9 of random nodes in a loop, a partition of the peer
// network. Every flow must end with exactly the right bytes or with a
// reset, never with wrong bytes; the count of each outcome is logged.
//
// The lab's kernel has no netem (sch_netem is not built), so the client
// link is impaired with nftables on the netdev egress hook of both ends
// (numgen random: 1% loss, 1% duplication via dup) and, for reordering, an
// HTB qdisc on the router's side: 2% of the packets to the client are put
// in a class that is under its guaranteed rate and so is served before
// the packets already queued in the busy default class (the link is
// capped at 400 Mbit/s so that the default class has a queue). A
// partition blackholes the peer traffic between two nodes in the router
// (policy rules by incoming interface and destination): their BGP
// sessions and client traffic are untouched.

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

// nsRun runs argv in namespace ns with stdin and fails the test on error.
func nsRun(t *testing.T, ns *lab.NS, stdin string, argv ...string) string {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name}, argv...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s in %s: %v\n%s", strings.Join(argv, " "), ns.Name, err, out)
	}
	return string(out)
}

// chaosImpairment is an impaired client link.
type chaosImpairment struct {
	t *testing.T
	l *lab.Lab
}

// impairClientLink impairs the client link both ways (loss and
// duplication) and reorders packets to the client; the namespaces'
// deletion at teardown removes it all.
func impairClientLink(t *testing.T, l *lab.Lab) *chaosImpairment {
	t.Helper()
	if _, err := exec.LookPath("nft"); err != nil {
		t.Fatal("nft not found: make deps installs nftables")
	}
	r := l.Router
	nsRun(t, r, "", "tc", "qdisc", "add", "dev", "to-c", "root", "handle", "1:", "htb", "default", "10")
	nsRun(t, r, "", "tc", "class", "add", "dev", "to-c", "parent", "1:", "classid", "1:1", "htb", "rate", "400mbit")
	nsRun(t, r, "", "tc", "class", "add", "dev", "to-c", "parent", "1:1", "classid", "1:10", "htb", "rate", "390mbit", "ceil", "400mbit", "prio", "1")
	nsRun(t, r, "", "tc", "class", "add", "dev", "to-c", "parent", "1:1", "classid", "1:20", "htb", "rate", "10mbit", "ceil", "400mbit", "prio", "0")
	rules := func(dev string, reorder bool) string {
		s := `table netdev chaos {
  chain egress {
    type filter hook egress device "` + dev + `" priority 0; policy accept;
    meta protocol ip6 meta l4proto tcp counter comment "tcp6"
    meta l4proto tcp numgen random mod 1000 < 10 counter drop comment "loss"
    meta l4proto tcp numgen random mod 1000 < 10 counter dup to "` + dev + `" comment "dup"
`
		if reorder {
			s += `    meta l4proto tcp numgen random mod 1000 < 20 counter meta priority set 1:20 comment "reorder"
`
		}
		return s + "  }\n}\n"
	}
	nsRun(t, r, rules("to-c", true), "nft", "-f", "-")
	nsRun(t, l.Client, rules("eth0", false), "nft", "-f", "-")
	return &chaosImpairment{t: t, l: l}
}

var nftCounterRE = regexp.MustCompile(`counter packets ([0-9]+) .* comment "([a-z0-9]+)"`)

// counts returns the packets each impairment rule matched, by side.
func (c *chaosImpairment) counts() map[string]uint64 {
	out := map[string]uint64{}
	for side, ns := range map[string]*lab.NS{"to-client": c.l.Router, "from-client": c.l.Client} {
		for _, m := range nftCounterRE.FindAllStringSubmatch(nsRun(c.t, ns, "", "nft", "list", "table", "netdev", "chaos"), -1) {
			n, _ := strconv.ParseUint(m[1], 10, 64)
			out[side+" "+m[2]] += n
		}
	}
	return out
}

// clientNetstat returns the client namespace's TcpExt counters named.
func clientNetstat(t *testing.T, l *lab.Lab, names ...string) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	err := l.Client.Do(func() error {
		b, err := os.ReadFile("/proc/thread-self/net/netstat")
		if err != nil {
			return err
		}
		lines := strings.Split(string(b), "\n")
		for i := 0; i+1 < len(lines); i += 2 {
			keys, vals := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			for j := 1; j < len(keys) && j < len(vals); j++ {
				for _, n := range names {
					if keys[j] == n {
						out[n], _ = strconv.ParseUint(vals[j], 10, 64)
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Outcomes of a chaos flow.
const (
	outExact   = "exact"
	outReset   = "reset"
	outWrong   = "wrong-bytes"
	outError   = "other-error"
	outStalled = "stalled"
)

// chaosFlow is one checked stream download.
type chaosFlow struct {
	src     netip.AddrPort // the client's socket
	conn    interface{ Close() error }
	cr      *countingReader
	outcome string
	err     error
	done    chan struct{}
}

// chaosSources returns n client sockets whose stream flows the router
// sends to node target, half of them over IPv4 and half over IPv6.
func chaosSources(t *testing.T, l *lab.Lab, target, n, first int) []netip.AddrPort {
	t.Helper()
	return append(sourcesTo(t, l, l.ClientAddr4, streamPort, target, n-n/2, first),
		sourcesTo(t, l, l.ClientAddr6, streamPort, target, n/2, first)...)
}

// startChaosFlows opens a download of size bytes from each client socket
// (IPv4 or IPv6, to the anycast address of the same family), reading at
// most hold bytes (0: no limit) until released; each ends in one outcome.
func startChaosFlows(t *testing.T, ctx context.Context, l *lab.Lab, srcs []netip.AddrPort, size uint64, hold int64) []*chaosFlow {
	t.Helper()
	var fs []*chaosFlow
	for _, src := range srcs {
		network := "tcp4"
		if src.Addr().Is6() {
			network = "tcp6"
		}
		c, err := l.Client.Dial(ctx, network, anycastFor(l, src.Addr(), streamPort).String(), int(src.Port()))
		if err != nil {
			t.Fatalf("%v: %v", src, err)
		}
		t.Cleanup(func() { c.Close() })
		seed := uint64(src.Port())*7 + 1
		f := &chaosFlow{src: src, conn: c, cr: &countingReader{r: c, ctx: ctx}, done: make(chan struct{})}
		f.cr.limit.Store(hold)
		if _, err := io.WriteString(c, services.StreamRequest(size, seed)); err != nil {
			t.Fatal(err)
		}
		go func() {
			defer close(f.done)
			h := sha256.New()
			got, ok, err := services.ReadStream(io.TeeReader(f.cr, h), size, seed)
			f.err = err
			switch {
			case err == nil && ok && [32]byte(h.Sum(nil)) == services.PatternSHA256(seed, 0, size):
				f.outcome = outExact
			case err == nil && ok:
				f.outcome, f.err = outWrong, errors.New("SHA-256 differs")
			case errors.Is(err, syscall.ECONNRESET):
				f.outcome = outReset
			case strings.Contains(err.Error(), "mismatch") || strings.Contains(err.Error(), "data after"):
				f.outcome = outWrong
			default:
				f.outcome = outError
			}
			if f.err != nil {
				f.err = fmt.Errorf("%v after %d bytes: %w", src, got, f.err)
			}
		}()
		fs = append(fs, f)
	}
	return fs
}

// waitHeld waits until every flow read its hold (or ended).
func waitHeld(t *testing.T, ctx context.Context, fs []*chaosFlow, hold int64) {
	t.Helper()
	if err := waitFor(ctx, 2*time.Minute, func() error {
		for _, f := range fs {
			select {
			case <-f.done:
				continue
			default:
			}
			if n := f.cr.n.Load(); n < hold {
				return fmt.Errorf("%v at %d bytes", f.src, n)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("flows not progressing: %v", err)
	}
}

func releaseChaos(fs []*chaosFlow) {
	for _, f := range fs {
		f.cr.limit.Store(0)
	}
}

// chaosOutcomes waits (at most limit in all) for every flow, closes the
// ones still running (stalled), logs the count of each outcome and fails
// the test on a flow that ended otherwise than exactly or by a reset.
func chaosOutcomes(t *testing.T, what string, fs []*chaosFlow, limit time.Duration) map[string]int {
	t.Helper()
	deadline := time.After(limit)
	counts := map[string]int{}
	for _, f := range fs {
		select {
		case <-f.done:
		case <-deadline:
		}
		select {
		case <-f.done:
		default:
			f.conn.Close()
			<-f.done
			f.outcome, f.err = outStalled, fmt.Errorf("%v stalled at %d bytes", f.src, f.cr.n.Load())
		}
		counts[f.outcome]++
		if f.outcome != outExact && f.outcome != outReset {
			t.Errorf("%s: %s: %v", what, f.outcome, f.err)
		} else if f.outcome == outReset {
			t.Logf("%s: %v", what, f.err)
		}
	}
	t.Logf("%s: %d flows: outcomes %v", what, len(fs), counts)
	if counts[outWrong] != 0 {
		t.Errorf("%s: %d flows received wrong bytes", what, counts[outWrong])
	}
	return counts
}

// TestChaosImpairedTakeovers: 1% loss and 1% duplication on the client
// link both ways, 2% of the packets to the client reordered, while the
// router drains a node (its flows migrate by pull) and then while a node
// is killed with SIGKILL (its flows are restored from replicas); half of
// the downloads run over IPv4, half over IPv6. Every download ends
// exactly or reset, none with wrong bytes.
func TestChaosImpairedTakeovers(t *testing.T) {
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btq", 2, nil)
	l := c.Lab
	imp := impairClientLink(t, l)
	reorder := []string{"TCPSACKReorder", "TCPTSReorder", "TCPRenoReorder", "TCPOFOQueue", "TCPDSACKRecv", "TCPDSACKOfoRecv"}
	net0 := clientNetstat(t, l, reorder...)
	const flows, size, hold = 8, 12 << 20, 1 << 20

	resets := clientResets(t, l)
	fs := startChaosFlows(t, ctx, l, chaosSources(t, l, 0, flows, 22000), size, hold)
	waitHeld(t, ctx, fs, hold)
	releaseChaos(fs)
	if err := l.SetNexthops([]int{1, 2}); err != nil {
		t.Fatal(err)
	}
	drain := chaosOutcomes(t, "drain under impairment", fs, 3*time.Minute)
	t.Logf("drain: client connections reset: %d", clientResets(t, l)-resets)

	if err := l.SetNexthops([]int{0, 1, 2}); err != nil {
		t.Fatal(err)
	}
	resets = clientResets(t, l)
	fs = startChaosFlows(t, ctx, l, chaosSources(t, l, 1, flows, 23000), size, hold)
	waitHeld(t, ctx, fs, hold)
	releaseChaos(fs)
	if err := c.procs[1].Kill(); err != nil {
		t.Fatal(err)
	}
	if err := l.SetNexthops([]int{0, 2}); err != nil {
		t.Fatal(err)
	}
	kill := chaosOutcomes(t, "kill -9 under impairment", fs, 3*time.Minute)
	t.Logf("kill: client connections reset: %d", clientResets(t, l)-resets)

	counts := imp.counts()
	net1 := clientNetstat(t, l, reorder...)
	var keys []string
	for k := range net1 {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var deltas []string
	for _, k := range keys {
		deltas = append(deltas, fmt.Sprintf("%s=%d", k, net1[k]-net0[k]))
	}
	t.Logf("impairment packets matched: %v; client TCP counters: %s", counts, strings.Join(deltas, " "))
	t.Logf("router's client link classes (1:10 default, 1:20 overtaking; overlimits: the default class was queueing):\n%s",
		nsRun(t, l.Router, "", "tc", "-s", "class", "show", "dev", "to-c"))
	c.logMetrics()
	for _, k := range []string{"to-client loss", "to-client dup", "to-client reorder", "from-client loss", "from-client dup", "to-client tcp6", "from-client tcp6"} {
		if counts[k] == 0 {
			t.Errorf("impairment %q never applied", k)
		}
	}
	_, _ = drain, kill
}

// TestChaosKillLoop: 50 paced downloads run while a random node (seeded,
// logged) is killed with SIGKILL and restarted, 4 times; each download
// ends exactly or reset, none with wrong bytes.
func TestChaosKillLoop(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	t.Cleanup(cancel)
	c := rrStartCluster(t, ctx, 3, "btz")
	resets0 := clientResets(t, c.Lab)
	var rate atomic.Int64
	var over atomic.Bool
	rate.Store(256 << 10)
	ds := rrStartDownloads(t, ctx, c.Lab, portsTo(t, c.Lab, rrStreamPort, -1, 50, 24000), 12<<20, &rate, &over)
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 7))
	t.Logf("kill loop seed %d", seed)
	time.Sleep(2 * time.Second)
	all := []int{0, 1, 2}
	for round := range 4 {
		v := rng.IntN(3)
		var others []int
		for _, j := range all {
			if j != v {
				others = append(others, j)
			}
		}
		had := c.owned(v)
		if err := c.procs[v].Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		waitNexthops(t, ctx, c.Lab, others...)
		time.Sleep(time.Second)
		c.start(v)
		if err := waitPeersUp(ctx, c.admins); err != nil {
			t.Fatal(err)
		}
		waitNexthops(t, ctx, c.Lab, all...)
		t.Logf("round %d: killed and restarted %s (owning %d flows)", round, lab.NodeName(v), had)
		time.Sleep(time.Second)
	}
	over.Store(true)
	rate.Store(rrEndRate)
	counts := map[string]int{}
	deadline := time.After(3 * time.Minute)
	for _, d := range ds {
		select {
		case <-d.done:
		case <-deadline:
			t.Fatalf("download port %d did not finish (%d bytes)", d.port, d.pr.n.Load())
		}
		switch {
		case d.err == nil:
			counts[outExact]++
		case strings.Contains(d.err.Error(), "RESET"):
			counts[outReset]++
			t.Log(d.err)
		case strings.Contains(d.err.Error(), "mismatch") || strings.Contains(d.err.Error(), "SHA-256") ||
			strings.Contains(d.err.Error(), "data after"):
			counts[outWrong]++
			t.Errorf("wrong bytes: %v", d.err)
		default:
			counts[outError]++
			t.Errorf("neither exact nor reset: %v", d.err)
		}
	}
	t.Logf("kill loop: %d downloads: outcomes %v; client connections reset: %d", len(ds), counts, clientResets(t, c.Lab)-resets0)
	c.logMetrics()
}

// partitionPeers blackholes the traffic between nodes a and b in the
// router (both ways); the returned function heals it.
func partitionPeers(t *testing.T, l *lab.Lab, a, b int) func() {
	t.Helper()
	args := func(op string, x, y int) []string {
		return []string{"ip", "rule", op, "iif", l.Node(x).RouterLink, "to", l.Node(y).Addr4.String() + "/32", "blackhole", "pref", "100"}
	}
	nsRun(t, l.Router, "", args("add", a, b)...)
	nsRun(t, l.Router, "", args("add", b, a)...)
	healed := false
	heal := func() {
		if !healed {
			healed = true
			nsRun(t, l.Router, "", args("del", a, b)...)
			nsRun(t, l.Router, "", args("del", b, a)...)
		}
	}
	return heal
}

// peerUp reports whether node i's admin API sees peer up.
func peerUp(ctx context.Context, c *takeoverCluster, i int, peer string) (bool, error) {
	resp, err := c.admins[i].ListPeers(ctx, &batonv1.ListPeersRequest{})
	if err != nil {
		return false, err
	}
	for _, p := range resp.Peers {
		if p.Name == peer {
			return p.Up, nil
		}
	}
	return false, fmt.Errorf("%s has no peer %s", lab.NodeName(i), peer)
}

// TestChaosPeerPartition: n1 is cut off from n2 and n3 on the peer
// network (not from the router or the client) while downloads run on
// every node, until each side sees the other down, then healed. Each side
// takes the flows of the owner it lost over (push: it cannot tell a
// partition from a death; counted, logged); after the heal every node
// holds a copy of every flow and all copies agree on one owner and epoch
// (higher epochs win), and a drain of n1 then moves its flows to n2 and
// n3: every flow ends exactly or reset, never with wrong bytes.
func TestChaosPeerPartition(t *testing.T) {
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btp", 2, nil)
	l := c.Lab
	const size, hold = 12 << 20, 1 << 20
	fs := startChaosFlows(t, ctx, l, sourcesTo(t, l, l.ClientAddr4, streamPort, 0, 6, 25000), size, hold)
	fs = append(fs, startChaosFlows(t, ctx, l, sourcesTo(t, l, l.ClientAddr4, streamPort, -1, 6, 25500), size, hold)...)
	waitHeld(t, ctx, fs, hold)

	pushes0 := c.total("total", `kind="push"`)
	heal := partitionPeers(t, l, 0, 1)
	heal2 := partitionPeers(t, l, 0, 2)
	t.Cleanup(func() { heal(); heal2() })
	t0 := time.Now()
	if err := waitFor(ctx, time.Minute, func() error {
		for _, pair := range [][2]int{{0, 1}, {0, 2}, {1, 0}, {2, 0}} {
			up, err := peerUp(ctx, c, pair[0], lab.NodeName(pair[1]))
			if err != nil {
				return err
			}
			if up {
				return fmt.Errorf("%s still sees %s up", lab.NodeName(pair[0]), lab.NodeName(pair[1]))
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("partition not seen: %v", err)
	}
	t.Logf("partition seen by both sides after %s", time.Since(t0).Round(time.Millisecond))
	// The flows move on meanwhile (state the replicas do not get).
	for _, f := range fs {
		f.cr.limit.Store(2 * hold)
	}
	time.Sleep(2 * time.Second)
	heal()
	heal2()
	t1 := time.Now()
	if err := waitPeersUp(ctx, c.admins); err != nil {
		t.Fatal(err)
	}
	t.Logf("takeovers by push (a designated replica restoring the flows of an owner it saw die) during the partition: %v",
		c.total("total", `kind="push"`)-pushes0)
	// Convergence: every node holds a copy of every flow, and all copies
	// agree on its owner and epoch.
	byOwner := map[string]int{}
	if err := waitFor(ctx, time.Minute, func() error {
		copies := make([]map[string]*batonv1.FlowState, 3)
		for i := range copies {
			var err error
			if copies[i], err = localFlows(ctx, c.admins[i]); err != nil {
				return err
			}
		}
		clear(byOwner)
		for _, f := range fs {
			k := handoff.FlowKey{Client: f.src, Anycast: anycastFor(l, f.src.Addr(), streamPort)}.String()
			var first *batonv1.FlowState
			for i := range copies {
				cp := copies[i][k]
				if cp == nil {
					return fmt.Errorf("%s has no copy of %s", lab.NodeName(i), k)
				}
				if first == nil {
					first = cp
				} else if cp.Owner != first.Owner || cp.Epoch != first.Epoch {
					return fmt.Errorf("%s: copies disagree: %s at %d, %s at %d", k, first.Owner, first.Epoch, cp.Owner, cp.Epoch)
				}
			}
			byOwner[first.Owner]++
		}
		return nil
	}); err != nil {
		t.Fatalf("flow states did not converge after the partition healed: %v", err)
	}
	t.Logf("healed: peers up and every flow's copies agree on one owner and epoch %s after the heal; flows by owner %v",
		time.Since(t1).Round(time.Millisecond), byOwner)
	releaseChaos(fs)
	if err := l.SetNexthops([]int{1, 2}); err != nil {
		t.Fatal(err)
	}
	chaosOutcomes(t, "drain after a healed peer partition", fs, 3*time.Minute)
	c.logMetrics()
}
