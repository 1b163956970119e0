package e2e

// Shared pieces of the takeover scenarios (takeover_*_test.go): a cluster of
// batond processes on a lab, its takeover counters read from the metrics
// endpoint, the client namespace's count of connections reset under it,
// and a checked interactive echo session.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

// takeoverCluster is a lab whose nodes run batond as one cluster.
type takeoverCluster struct {
	*lab.Lab
	t      *testing.T
	ctx    context.Context
	procs  []*lab.Proc
	admins []batonv1.AdminClient
}

// startCluster builds a lab of n nodes (namespace prefix prefix) peering
// with replicas copies of each flow, runs batond with extra flags on every
// node, and waits until every node sees every peer. Nodes left out by a
// SetNexthops made before (active) are started but not waited for by the
// router. Everything is torn down when the test ends.
func startCluster(t *testing.T, ctx context.Context, n int, prefix string, replicas int, active []int, extra ...string) *takeoverCluster {
	t.Helper()
	l := buildLab(t, ctx, n, prefix)
	if err := l.EnableCluster(replicas); err != nil {
		t.Fatal(err)
	}
	if active != nil {
		if err := l.SetNexthops(active); err != nil {
			t.Fatal(err)
		}
	}
	c := &takeoverCluster{Lab: l, t: t, ctx: ctx, procs: make([]*lab.Proc, n), admins: make([]batonv1.AdminClient, n)}
	// A node serving many full-speed flows on the default TUN device can
	// miss its 1 s health checks (seen: the http check timed out 3 times
	// in a row on a 2-core machine under 50 downloads); it then withdraws
	// and comes back 2 s later, and its flows move away and back. The
	// takeovers handle that, but it is not the scenario under test: the
	// route changes here are the test's own.
	// Debug logs name every takeover step of a flow (stallReport shows
	// them when a download fails): tens of kilobytes per node and test.
	extra = append([]string{"-check-fall", "10", "-log-level", "debug"}, extra...)
	for i := range n {
		var err error
		if c.procs[i], err = l.StartBatond(ctx, batond, i, extra...); err != nil {
			t.Fatal(err)
		}
		c.admins[i] = adminClient(t, l, i)
	}
	if err := waitPeersUp(ctx, c.admins); err != nil {
		t.Fatal(err)
	}
	// A peer counts as up while either stream between the two nodes is:
	// wait until every node's own replication stream to every peer is up
	// too, or a flow opened meanwhile lacks a replica there (the engine
	// copes, see handoff/takeover_designated.go, but the scenarios start
	// from a connected cluster).
	if err := waitFor(ctx, 30*time.Second, func() error {
		for i, p := range c.procs {
			b, err := os.ReadFile(p.LogPath())
			if err != nil {
				return err
			}
			for j := range n {
				if j != i && !bytes.Contains(b, []byte(`msg="replication: stream to peer up" peer=`+lab.NodeName(j))) {
					return fmt.Errorf("%s's replication stream to %s is not up", lab.NodeName(i), lab.NodeName(j))
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return c
}

// live reports whether node i's batond still runs.
func (c *takeoverCluster) live(i int) bool { return !c.procs[i].Exited() }

// logMetrics logs every live node's takeover metrics.
func (c *takeoverCluster) logMetrics() {
	for i := range c.procs {
		if c.live(i) {
			c.t.Logf("%s takeover metrics:\n%s", lab.NodeName(i), takeoverMetrics(c.ctx, c.Lab, i))
		}
	}
}

// counter returns node i's baton_takeover_<name> samples whose labels
// contain label (e.g. `kind="pull-migrate"`), summed; 0 when absent or
// dead.
func (c *takeoverCluster) counter(i int, name, label string) float64 {
	if !c.live(i) {
		return 0
	}
	return metricValue(takeoverMetrics(c.ctx, c.Lab, i), name, label)
}

// total sums counter over the live nodes.
func (c *takeoverCluster) total(name, label string) float64 {
	var sum float64
	for i := range c.procs {
		sum += c.counter(i, name, label)
	}
	return sum
}

// metricValue sums the samples name{...label...} in takeoverMetrics
// output (label "" matches every sample of name).
func metricValue(metrics, name, label string) float64 {
	var sum float64
	for _, line := range strings.Split(metrics, "\n") {
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, label) {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		if v, err := strconv.ParseFloat(line[sp+1:], 64); err == nil {
			sum += v
		}
	}
	return sum
}

// noFailures fails the test if a live node counted a failed takeover
// (baton_takeover_failures_total, any reason).
func (c *takeoverCluster) noFailures() {
	c.t.Helper()
	if n := c.total("failures_total", ""); n != 0 {
		c.t.Errorf("%v takeovers failed", n)
	}
}

// clientResets returns the client namespace's Tcp EstabResets counter:
// connections that went from ESTABLISHED (or CLOSE-WAIT) straight to
// CLOSED, which is what a RST received (or sent by an abortive close) does.
// Take it before and after a scenario, before closing the connections.
func clientResets(t *testing.T, l *lab.Lab) uint64 {
	t.Helper()
	var v uint64
	err := l.Client.Do(func() error {
		// thread-self: the namespace of this (locked) thread.
		b, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		var names []string
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) == 0 || f[0] != "Tcp:" {
				continue
			}
			if names == nil {
				names = f
				continue
			}
			for i, n := range names {
				if n == "EstabResets" && i < len(f) {
					v, err = strconv.ParseUint(f[i], 10, 64)
					return err
				}
			}
		}
		return fmt.Errorf("no Tcp EstabResets in snmp")
	})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// portsTo returns n client ports, from first up, whose flows to the
// anycast IPv4 address and dport the router sends to node target (-1: any
// node).
func portsTo(t *testing.T, l *lab.Lab, dport uint16, target, n, first int) []int {
	t.Helper()
	var ports []int
	for _, src := range sourcesTo(t, l, l.ClientAddr4, dport, target, n, first) {
		ports = append(ports, int(src.Port()))
	}
	return ports
}

// sourcesTo returns n client sockets of client (the lab client's IPv4 or
// IPv6 address), ports from first up, whose flows to the anycast address
// of the same family and dport the router sends to node target (-1: any
// node).
func sourcesTo(t *testing.T, l *lab.Lab, client netip.Addr, dport uint16, target, n, first int) []netip.AddrPort {
	t.Helper()
	var srcs []netip.AddrPort
	for port := first; len(srcs) < n; port++ {
		if port > 65535 {
			t.Fatalf("fewer than %d ports from %d go to node %d", n, first, target)
		}
		src := netip.AddrPortFrom(client, uint16(port))
		if target >= 0 && predictFrom(t, l, src, dport) != target {
			continue
		}
		srcs = append(srcs, src)
	}
	return srcs
}

// predict returns the node the router sends the flow from client port
// port to the anycast IPv4 address's dport to.
func predict(t *testing.T, l *lab.Lab, port int, dport uint16) int {
	t.Helper()
	return predictFrom(t, l, netip.AddrPortFrom(l.ClientAddr4, uint16(port)), dport)
}

// predictFrom returns the node the router sends the flow from client
// socket src to the anycast address of src's family and dport to.
func predictFrom(t *testing.T, l *lab.Lab, src netip.AddrPort, dport uint16) int {
	t.Helper()
	owner, err := l.PredictNode(src, anycastFor(l, src.Addr(), dport))
	if err != nil {
		t.Fatal(err)
	}
	return owner
}

// anycastFor returns the anycast address of client's family, port dport.
func anycastFor(l *lab.Lab, client netip.Addr, dport uint16) netip.AddrPort {
	if client.Is6() {
		return netip.AddrPortFrom(l.Anycast6, dport)
	}
	return netip.AddrPortFrom(l.Anycast4, dport)
}

// echoPort is the echo service's port.
const echoPort = 7

// echoSession is an interactive echo connection whose bytes are checked:
// the client sends bytes of the pattern of seed and expects them back.
type echoSession struct {
	net.Conn
	port       int
	seed       uint64
	sent, recv uint64
}

// dialEcho opens an echo session from client port port.
func dialEcho(t *testing.T, ctx context.Context, l *lab.Lab, port int) *echoSession {
	t.Helper()
	c, err := l.Client.Dial(ctx, "tcp4", netip.AddrPortFrom(l.Anycast4, echoPort).String(), port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &echoSession{Conn: c, port: port, seed: uint64(port) << 8}
}

// send writes the next n bytes of the session's pattern.
func (s *echoSession) send(n int) error {
	buf := make([]byte, n)
	services.FillPattern(s.seed, s.sent, buf)
	if _, err := s.Write(buf); err != nil {
		return fmt.Errorf("echo port %d: writing at %d: %w", s.port, s.sent, err)
	}
	s.sent += uint64(n)
	return nil
}

// expect reads n bytes and checks them against what was sent.
func (s *echoSession) expect(n int) error {
	got, want := make([]byte, n), make([]byte, n)
	if _, err := io.ReadFull(s, got); err != nil {
		return fmt.Errorf("echo port %d: reading at %d: %w", s.port, s.recv, err)
	}
	services.FillPattern(s.seed, s.recv, want)
	if i := firstDiff(got, want); i >= 0 {
		return fmt.Errorf("echo port %d: byte %d differs: got 0x%02x, want 0x%02x", s.port, s.recv+uint64(i), got[i], want[i])
	}
	s.recv += uint64(n)
	return nil
}

// readSome reads what arrives (at most len(buf) bytes) and checks it.
func (s *echoSession) readSome(buf []byte) error {
	n, err := s.Read(buf)
	want := make([]byte, n)
	services.FillPattern(s.seed, s.recv, want)
	if i := firstDiff(buf[:n], want); i >= 0 {
		return fmt.Errorf("echo port %d: byte %d differs: got 0x%02x, want 0x%02x", s.port, s.recv+uint64(i), buf[i], want[i])
	}
	s.recv += uint64(n)
	if err != nil {
		return fmt.Errorf("echo port %d: reading at %d: %w", s.port, s.recv, err)
	}
	return nil
}

// round sends n bytes and reads them back.
func (s *echoSession) round(n int) error {
	if err := s.send(n); err != nil {
		return err
	}
	return s.expect(n)
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// stallReport logs what is known of the flow from client port when a
// download failed or stalled, so that a CI log is enough to study it: the
// client socket's TCP state (ss) and every node's log lines naming the
// flow (the takeover clusters run at debug level).
func stallReport(t *testing.T, l *lab.Lab, port int) {
	t.Helper()
	if l == nil {
		return
	}
	ss := exec.Command("ip", "netns", "exec", l.Client.Name, "ss", "-tinoem", "sport", "= :"+strconv.Itoa(port))
	if out, err := ss.CombinedOutput(); err == nil {
		t.Logf("client socket of port %d:\n%s", port, out)
	}
	// The client's TCP counters that say why segments were dropped
	// (PAWS, out of window, ...), not reset by nstat (-s).
	nst := exec.Command("ip", "netns", "exec", l.Client.Name, "nstat", "-asz", "TcpExtPAWSEstab", "TcpExtTCPACKSkippedPAWS",
		"TcpExtTCPACKSkippedSeq", "TcpExtTCPOFODrop", "TcpExtTCPRcvQDrop", "TcpExtTCPZeroWindowDrop", "TcpExtTCPDSACKRecv",
		"TcpExtTCPDSACKOldSent", "TcpExtTCPOFOQueue", "TcpInErrs", "TcpExtTCPRcvCoalesce", "TcpExtTCPWantZeroWindowAdv")
	if out, err := nst.CombinedOutput(); err == nil {
		t.Logf("client TCP counters:\n%s", out)
	}
	needle := fmt.Sprintf(":%d->", port)
	// Every node's copy of the flow (owner, epoch, positions, timestamps).
	for i := range l.Nodes {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		fl, err := localFlows(ctx, adminClient(t, l, i))
		cancel()
		for k, st := range fl {
			if strings.Contains(k, needle) {
				t.Logf("%s's copy: %v", lab.NodeName(i), st)
			}
		}
		if err != nil {
			t.Logf("%s's flows: %v", lab.NodeName(i), err)
		}
	}
	// Every node's takeover engine, tracker and gVisor endpoint view of
	// the flow (batond's /debug/flow).
	key := handoff.FlowKey{Client: netip.AddrPortFrom(l.ClientAddr4, uint16(port)), Anycast: netip.AddrPortFrom(l.Anycast4, streamPort)}
	for i := range l.Nodes {
		t.Logf("%s /debug/flow:\n%s", lab.NodeName(i), debugFlow(l, i, key))
	}
	// Every node's device and link counters (write errors, drops).
	for i := range l.Nodes {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		m := nodeMetrics(ctx, l, i)
		cancel()
		var lines []string
		for _, line := range strings.Split(m, "\n") {
			if (strings.HasPrefix(line, "baton_tun_") || strings.HasPrefix(line, "baton_link_") || strings.HasPrefix(line, "baton_hook_")) &&
				!strings.HasSuffix(line, " 0") {
				lines = append(lines, line)
			}
		}
		t.Logf("%s device counters:\n%s", lab.NodeName(i), strings.Join(lines, "\n"))
	}
	logs, _ := filepath.Glob(filepath.Join(l.LogDir, "*batond-n*.log"))
	for _, path := range logs {
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		var lines []string
		for _, line := range strings.Split(string(b), "\n") {
			// The flow's lines, and every warning or error.
			if strings.Contains(line, needle) || strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
				lines = append(lines, line)
			}
		}
		if len(lines) > 200 {
			lines = append(lines[:100], append([]string{"..."}, lines[len(lines)-100:]...)...)
		}
		t.Logf("%s, lines naming the flow of port %d, warnings and errors:\n%s", filepath.Base(path), port, strings.Join(lines, "\n"))
	}
}

// debugFlow fetches node i's /debug/flow view of k.
func debugFlow(l *lab.Lab, i int, k handoff.FlowKey) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := l.Node(i).Dial(ctx, "tcp4", "127.0.0.1:9470", 0)
	if err != nil {
		return err.Error()
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /debug/flow?key="+url.QueryEscape(k.String())+" HTTP/1.0\r\n\r\n"); err != nil {
		return err.Error()
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.Status + "\n" + string(b)
}
