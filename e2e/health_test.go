package e2e

// End-to-end tests of health checks and BGP announcement: a BIRD router
// (the lab's default routing), real batond processes that announce with
// their embedded BGP speaker, and a real Linux client. Every wait is
// bounded; measured times are logged (and reported by
// BenchmarkWithdrawal), never asserted.
//
// The scenarios with flows that must survive are elsewhere: (a) with
// downloads and echo sessions in health_flows_test.go, (b) the rolling
// restart and (c) kill -9 with flows in restart_test.go. Here: the
// announcement side of each.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// Fast checks for the tests: every 100 ms, up after 2 passes, down after
// 3 failures.
const (
	checkInterval = 100 * time.Millisecond
	checkRise     = 2
	checkFall     = 3
)

// overridePath is node i's check override file (TESTING AID).
func overridePath(l *lab.Lab, i int) string {
	return filepath.Join(l.LogDir, lab.NodeName(i)+"-check-override")
}

// setOverride writes node i's override file ("" clears it).
func setOverride(t testing.TB, l *lab.Lab, i int, content string) {
	t.Helper()
	if err := os.WriteFile(overridePath(l, i), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// healthArgs are batond's extra flags in these tests.
func healthArgs(l *lab.Lab, i int, extra ...string) []string {
	return append([]string{
		"-check-interval", checkInterval.String(),
		"-check-rise", fmt.Sprint(checkRise), "-check-fall", fmt.Sprint(checkFall),
		"-check-override-file", overridePath(l, i),
	}, extra...)
}

// families are the lab's address families.
func families(l *lab.Lab) []string {
	if l.IPv6 {
		return []string{"ip4", "ip6"}
	}
	return []string{"ip4"}
}

// waitNexthops waits (bounded) until both families route to exactly
// nodes, and returns when that happened.
func waitNexthops(t testing.TB, ctx context.Context, l *lab.Lab, nodes ...int) time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, fam := range families(l) {
		if err := l.WaitNexthops(ctx, fam, nodes); err != nil {
			sessions, _ := l.RouterSessions(context.Background())
			t.Fatalf("%v (router sessions %v)", err, sessions)
		}
	}
	return time.Now()
}

// startHealthLab builds a BGP lab with n nodes, each running batond with
// the fast checks and announced.
func startHealthLab(t *testing.T, ctx context.Context, n int, prefix string) (*lab.Lab, []*lab.Proc) {
	t.Helper()
	l := buildLab(t, ctx, n, prefix)
	if l.Routing != lab.RoutingBGP {
		t.Fatalf("lab routing %q, want the default %q", l.Routing, lab.RoutingBGP)
	}
	procs := make([]*lab.Proc, n)
	for i := range n {
		p, err := l.StartBatond(ctx, batond, i, healthArgs(l, i)...)
		if err != nil {
			t.Fatal(err)
		}
		procs[i] = p
	}
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	waitNexthops(t, ctx, l, all...)
	return l, procs
}

// waitNodeState returns the node's health once its state is want. The
// node publishes a state once its announcer call returned, so the router
// can act on the UPDATE (and a test see the route change) a moment before
// the state says so (CI saw "unhealthy" with the route already back).
func waitNodeState(t testing.TB, ctx context.Context, c batonv1.AdminClient, want batonv1.NodeState) *batonv1.HealthResponse {
	t.Helper()
	var h *batonv1.HealthResponse
	if err := waitFor(ctx, 30*time.Second, func() error {
		if h = getHealth(t, ctx, c); h.State != want {
			return fmt.Errorf("state %v", h.State)
		}
		return nil
	}); err != nil {
		t.Fatalf("node state %v never came: %v", want, err)
	}
	return h
}

func getHealth(t testing.TB, ctx context.Context, c batonv1.AdminClient) *batonv1.HealthResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	h, err := c.Health(ctx, &batonv1.HealthRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// scrapeHealth returns node i's baton_check_*, baton_announced,
// baton_bgp_* and baton_node_state samples (metrics on the node's
// loopback).
func scrapeHealth(t *testing.T, ctx context.Context, l *lab.Lab, i int) string {
	t.Helper()
	c, err := l.Node(i).Dial(ctx, "tcp4", "127.0.0.1:9470", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		for _, p := range []string{"baton_check_", "baton_announced", "baton_bgp_", "baton_node_state"} {
			if strings.HasPrefix(sc.Text(), p) {
				out = append(out, sc.Text())
			}
		}
	}
	if resp.StatusCode != 200 || sc.Err() != nil {
		t.Fatalf("metrics: %s %v", resp.Status, sc.Err())
	}
	return strings.Join(out, "\n")
}

// hasSamples fails unless every sample is in metrics.
func hasSamples(t *testing.T, metrics string, samples ...string) {
	t.Helper()
	for _, s := range samples {
		if !strings.Contains(metrics, s) {
			t.Fatalf("metrics lack %q:\n%s", s, metrics)
		}
	}
}

func findCheck(h *batonv1.HealthResponse, name string) *batonv1.CheckStatus {
	for _, c := range h.Checks {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// whoamiFrom asks http /whoami over a connection from the client's source
// port and returns the answer and the node PredictNode names for it.
func whoamiFrom(t *testing.T, ctx context.Context, l *lab.Lab, port int) (string, int) {
	t.Helper()
	dst := netip.AddrPortFrom(l.Anycast4, 80)
	want, err := l.PredictNode(netip.AddrPortFrom(l.ClientAddr4, uint16(port)), dst)
	if err != nil {
		t.Fatal(err)
	}
	h, err := dialHTTP(ctx, l.Client, "tcp4", dst.String(), port)
	if err != nil {
		t.Fatalf("port %d: %v", port, err)
	}
	defer h.Close()
	_, who, err := h.getString("/whoami")
	if err != nil {
		t.Fatalf("port %d: %v", port, err)
	}
	return strings.TrimSpace(who), want
}

// TestHealthCheckFailureWithdraws is scenario (a) for the announcement: a
// service check of n2 starts failing, n2 withdraws after the fall
// threshold (the router loses its nexthop, the client's new connections
// go to the others), and announces again after the rise threshold once
// the check passes.
func TestHealthCheckFailureWithdraws(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l, _ := startHealthLab(t, ctx, 3, "bth")
	n2 := adminClient(t, l, 1)
	if h := waitNodeState(t, ctx, n2, batonv1.NodeState_NODE_STATE_SERVING); h.Announcer != "bgp" ||
		len(h.BgpSessions) != 1 || h.BgpSessions[0].State != "established" || h.BgpSessions[0].RoutesAdvertised != uint64(len(families(l))) {
		t.Fatalf("n2 before: %v", h)
	}

	t0 := time.Now()
	setOverride(t, l, 1, "http fail\n")
	t1 := waitNexthops(t, ctx, l, 0, 2)
	t.Logf("check failing -> n2 withdrawn from the router's FIB: %s (fall %d x interval %s, then BGP)",
		t1.Sub(t0).Round(time.Millisecond), checkFall, checkInterval)

	h := waitNodeState(t, ctx, n2, batonv1.NodeState_NODE_STATE_UNHEALTHY)
	c := findCheck(h, "http")
	if h.State != batonv1.NodeState_NODE_STATE_UNHEALTHY || c == nil || c.State != batonv1.CheckState_CHECK_STATE_DOWN ||
		c.FailRun < checkFall || c.Override != "fail" {
		t.Fatalf("n2 after the failure: state %v, http check %v", h.State, c)
	}
	for _, a := range h.Announcements {
		if a.Announced {
			t.Fatalf("n2 still announces %s", a.Prefix)
		}
	}
	if s := h.BgpSessions[0]; s.State != "established" || s.RoutesAdvertised != 0 {
		t.Fatalf("n2's session after the withdrawal: %v", s)
	}
	if !strings.Contains(strings.Join(h.Problems, ";"), "check http down") {
		t.Fatalf("problems %q", h.Problems)
	}
	hasSamples(t, scrapeHealth(t, ctx, l, 1),
		`baton_check_up{check="http",critical="true",kind="http",node="n2"} 0`,
		`baton_check_state{check="http",node="n2",state="down"} 1`,
		`baton_check_up{check="tun",critical="true",kind="tun",node="n2"} 1`,
		`baton_announced{announcer="bgp",node="n2",prefix="192.0.2.1/32"} 0`,
		`baton_bgp_session_up{neighbor="203.0.113.5",node="n2"} 1`,
		`baton_bgp_routes_advertised{neighbor="203.0.113.5",node="n2"} 0`,
		`baton_node_state{node="n2",state="NODE_STATE_UNHEALTHY"} 1`)
	// New connections only reach n1 and n3, where the router sends them.
	for port := 42000; port < 42012; port++ {
		who, want := whoamiFrom(t, ctx, l, port)
		if who == "n2" || who != lab.NodeName(want) {
			t.Fatalf("port %d served by %s, router sends it to %s", port, who, lab.NodeName(want))
		}
	}

	t2 := time.Now()
	setOverride(t, l, 1, "")
	t3 := waitNexthops(t, ctx, l, 0, 1, 2)
	t.Logf("check passing -> n2 announced again: %s (rise %d x interval %s, then BGP)",
		t3.Sub(t2).Round(time.Millisecond), checkRise, checkInterval)
	h = waitNodeState(t, ctx, n2, batonv1.NodeState_NODE_STATE_SERVING)
	if c := findCheck(h, "http"); h.State != batonv1.NodeState_NODE_STATE_SERVING || c.State != batonv1.CheckState_CHECK_STATE_UP ||
		c.OkRun < checkRise || c.Override != "" {
		t.Fatalf("n2 after recovery: %v, http %v", h.State, c)
	}
	m := scrapeHealth(t, ctx, l, 1)
	hasSamples(t, m,
		`baton_check_up{check="http",critical="true",kind="http",node="n2"} 1`,
		`baton_announced{announcer="bgp",node="n2",prefix="192.0.2.1/32"} 1`,
		`baton_bgp_session_state{neighbor="203.0.113.5",node="n2",state="established"} 1`,
		`baton_node_state{node="n2",state="NODE_STATE_SERVING"} 1`,
		`baton_check_attempts_total{check="http",node="n2",result="fail"}`)
	if l.IPv6 {
		hasSamples(t, m, `baton_announced{announcer="bgp",node="n2",prefix="2001:db8:a::1/128"} 1`,
			fmt.Sprintf(`baton_bgp_routes_advertised{neighbor="203.0.113.5",node="n2"} %d`, len(families(l))))
	}
	// batonctl health shows it all, as a table and as JSON.
	admin := "unix:" + l.AdminSocket(1)
	out, _, code := runCtl(t, "-admin", admin, "health")
	for _, want := range []string{"serving", "CHECK", "http", "GET /healthz", "tun", "PREFIX", "192.0.2.1/32", "yes",
		"BGP NEIGHBOR", "203.0.113.5", "established", "announcer    bgp"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("batonctl health lacks %q:\n%s", want, out)
		}
	}
	out, _, code = runCtl(t, "-admin", admin, "-o", "json", "health")
	var js struct {
		State         string `json:"state"`
		Announcements []struct {
			Prefix    string `json:"prefix"`
			Announced bool   `json:"announced"`
		} `json:"announcements"`
		BgpSessions []struct {
			State string `json:"state"`
		} `json:"bgpSessions"`
		Checks []struct {
			Name  string `json:"name"`
			State string `json:"state"`
			Rise  int    `json:"rise"`
		} `json:"checks"`
	}
	if err := json.Unmarshal([]byte(out), &js); err != nil || code != 0 {
		t.Fatalf("health -o json: %v\n%s", err, out)
	}
	if js.State != "NODE_STATE_SERVING" || len(js.Announcements) != len(families(l)) || !js.Announcements[0].Announced ||
		len(js.BgpSessions) != 1 || js.BgpSessions[0].State != "established" || len(js.Checks) != 5 {
		t.Fatalf("health -o json: %+v", js)
	}
	for _, c := range js.Checks {
		if c.State != "CHECK_STATE_UP" || c.Rise != checkRise {
			t.Fatalf("health -o json: check %+v", c)
		}
	}
}

// TestKillDropsNexthop is scenario (c) for the router: kill -9 of a node
// and the router drops its nexthop (the kernel closes the BGP socket);
// the restarted node is announced again.
func TestKillDropsNexthop(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l, procs := startHealthLab(t, ctx, 3, "btk9")
	t0 := time.Now()
	if err := procs[2].Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t1 := waitNexthops(t, ctx, l, 0, 1)
	t.Logf("kill -9 of n3 -> nexthop gone from the router's FIB: %s", t1.Sub(t0).Round(time.Microsecond))
	for port := 43000; port < 43008; port++ {
		if who, want := whoamiFrom(t, ctx, l, port); who == "n3" || who != lab.NodeName(want) {
			t.Fatalf("port %d served by %s, want %s", port, who, lab.NodeName(want))
		}
	}
	t2 := time.Now()
	if _, err := l.StartBatond(ctx, batond, 2, healthArgs(l, 2)...); err != nil {
		t.Fatal(err)
	}
	t3 := waitNexthops(t, ctx, l, 0, 1, 2)
	t.Logf("restart of n3 -> announced again: %s", t3.Sub(t2).Round(time.Millisecond))
}

// TestStartingNodeAttractsNoTraffic is scenario (d): a node whose service
// check fails from the start is up (TUN, routes, BGP session established)
// but not announced, so the router sends it nothing; once the check
// passes it is announced and serves.
func TestStartingNodeAttractsNoTraffic(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l := buildLab(t, ctx, 2, "bts")
	if _, err := l.StartBatond(ctx, batond, 0, healthArgs(l, 0)...); err != nil {
		t.Fatal(err)
	}
	setOverride(t, l, 1, "http fail\n")
	if _, err := l.StartBatondUnannounced(ctx, batond, 1, healthArgs(l, 1)...); err != nil {
		t.Fatal(err)
	}
	n2 := adminClient(t, l, 1)
	// Wait until n2 has everything it needs but the http check: every
	// other check up, http down, the BGP session established.
	err := waitFor(ctx, 30*time.Second, func() error {
		h := getHealth(t, ctx, n2)
		for _, c := range h.Checks {
			want := batonv1.CheckState_CHECK_STATE_UP
			if c.Name == "http" {
				want = batonv1.CheckState_CHECK_STATE_DOWN
			}
			if c.State != want {
				return fmt.Errorf("check %s is %v", c.Name, c.State)
			}
		}
		if len(h.BgpSessions) != 1 || h.BgpSessions[0].State != "established" {
			return fmt.Errorf("sessions %v", h.BgpSessions)
		}
		if h.State != batonv1.NodeState_NODE_STATE_STARTING {
			return fmt.Errorf("state %v", h.State)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("n2 not ready but for http: %v", err)
	}
	// The router has no nexthop for n2, and the client reaches n1 only.
	for _, fam := range families(l) {
		if nh, err := l.Nexthops(fam); err != nil || !slices.Equal(nh, []int{0}) {
			t.Fatalf("%s nexthops %v %v while n2 is starting", fam, nh, err)
		}
	}
	for port := 44000; port < 44008; port++ {
		if who, _ := whoamiFrom(t, ctx, l, port); who != "n1" {
			t.Fatalf("port %d served by %s while n2 is starting", port, who)
		}
	}
	t0 := time.Now()
	setOverride(t, l, 1, "")
	t1 := waitNexthops(t, ctx, l, 0, 1)
	t.Logf("n2's check passing -> announced: %s", t1.Sub(t0).Round(time.Millisecond))
	served := map[string]bool{}
	for port := 44100; port < 44116; port++ {
		who, want := whoamiFrom(t, ctx, l, port)
		if who != lab.NodeName(want) {
			t.Fatalf("port %d served by %s, router sends it to %s", port, who, lab.NodeName(want))
		}
		served[who] = true
	}
	if !served["n2"] {
		t.Fatalf("n2 served none of 16 connections after it was announced: %v", served)
	}
}

// TestDrainWithdraws: batonctl drain withdraws the node's announcement
// (drained: it owns no flow), undrain announces it again.
func TestDrainWithdraws(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l, _ := startHealthLab(t, ctx, 2, "btd")
	admin := "unix:" + l.AdminSocket(0)
	t0 := time.Now()
	if out, errOut, code := runCtl(t, "-admin", admin, "drain"); code != 0 || !strings.Contains(out, "drain") {
		t.Fatalf("drain: %d %s %s", code, out, errOut)
	}
	t1 := waitNexthops(t, ctx, l, 1)
	t.Logf("batonctl drain -> n1 withdrawn from the router's FIB: %s", t1.Sub(t0).Round(time.Microsecond))
	err := waitFor(ctx, 10*time.Second, func() error {
		if h := getHealth(t, ctx, adminClient(t, l, 0)); h.State != batonv1.NodeState_NODE_STATE_DRAINED {
			return fmt.Errorf("state %v %v", h.State, h.Problems)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if out, _, _ := runCtl(t, "-admin", admin, "health"); !strings.Contains(out, "drained") || !strings.Contains(out, " no ") {
		t.Fatalf("health while drained:\n%s", out)
	}
	if out, errOut, code := runCtl(t, "-admin", admin, "undrain"); code != 0 || !strings.Contains(out, "serving") {
		t.Fatalf("undrain: %d %s %s", code, out, errOut)
	}
	waitNexthops(t, ctx, l, 0, 1)
}

// TestSIGTERMWithdrawsThenWaitsForFlows: SIGTERM withdraws at once, then
// batond waits until it owns no flow (here, without a cluster to hand it
// to, the flow idles out) before it stops; with -drain-timeout 0 it stops
// at once even with a flow.
func TestSIGTERMWithdrawsThenWaitsForFlows(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l := buildLab(t, ctx, 2, "btt")
	p0, err := l.StartBatond(ctx, batond, 0, healthArgs(l, 0, "-drain-timeout", "2m", "-flow-idle-timeout", "5s")...)
	if err != nil {
		t.Fatal(err)
	}
	p1, err := l.StartBatond(ctx, batond, 1, healthArgs(l, 1, "-drain-timeout", "0")...)
	if err != nil {
		t.Fatal(err)
	}
	waitNexthops(t, ctx, l, 0, 1)
	// One open echo connection on each node.
	for _, owner := range []int{0, 1} {
		for port := 45000 + 100*owner; ; port++ {
			dst := netip.AddrPortFrom(l.Anycast4, 7)
			if n, err := l.PredictNode(netip.AddrPortFrom(l.ClientAddr4, uint16(port)), dst); err != nil || n != owner {
				continue
			}
			c, err := l.Client.Dial(ctx, "tcp4", dst.String(), port)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			buf := []byte("x")
			if _, err := c.Write(buf); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Read(buf); err != nil {
				t.Fatal(err)
			}
			break
		}
	}
	a0 := adminClient(t, l, 0)
	if h := getHealth(t, ctx, a0); h.OwnedFlows == 0 {
		t.Fatalf("n1 owns no flow: %v", h)
	}
	t0 := time.Now()
	if err := p0.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	t1 := waitNexthops(t, ctx, l, 1)
	t.Logf("SIGTERM -> n1 withdrawn from the router's FIB: %s", t1.Sub(t0).Round(time.Microsecond))
	if h := waitNodeState(t, ctx, a0, batonv1.NodeState_NODE_STATE_DRAINING); h.State != batonv1.NodeState_NODE_STATE_DRAINING ||
		!slices.Contains(h.Problems, "shutting down") || h.OwnedFlows == 0 {
		t.Fatalf("n1 after SIGTERM: %v %q, %d flows", h.State, h.Problems, h.OwnedFlows)
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	st, err := p0.Wait(wctx)
	if err != nil {
		t.Fatal(err)
	}
	log0 := p0.Log()
	if st.ExitCode() != 0 || !strings.Contains(log0, "withdrawn; draining before stopping") || !strings.Contains(log0, "drained: no flows left") {
		t.Fatalf("n1 exit %d, log:\n%s", st.ExitCode(), log0)
	}
	t.Logf("n1 stopped %s after SIGTERM (its flow idled out)", time.Since(t0).Round(time.Millisecond))

	if err := p1.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitNexthops(t, ctx, l)
	if st, err = p1.Wait(wctx); err != nil || st.ExitCode() != 0 {
		t.Fatalf("n2: %v %v", st, err)
	}
	if log1 := p1.Log(); !strings.Contains(log1, "drain timeout is 0: stopping with flows") {
		t.Fatalf("n2 log:\n%s", log1)
	}
}

// BenchmarkWithdrawal measures, in a 2-node BGP lab, the time from a
// node's failure (or drain) to the withdrawal of its nexthop from the
// router's FIB (both families), and reports the mean per kind (ms): kill9
// (the kernel closes the BGP socket), sigterm and drain (batonctl drain,
// including batonctl's own start), check-fail (a service check forced to
// fail: fall x interval, then BGP) and sigstop (a frozen node: the
// router's hold time).
// Run: go test -run '^$' -bench Withdrawal -benchtime 5x ./e2e/
func BenchmarkWithdrawal(b *testing.B) {
	for _, kind := range []string{"kill9", "sigterm", "drain", "check-fail", "sigstop"} {
		b.Run(kind, func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			l, err := lab.New(ctx, lab.Config{Nodes: 2, Prefix: "btb", Logf: b.Logf})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			if _, err := l.StartBatond(ctx, batond, 0, healthArgs(l, 0)...); err != nil {
				b.Fatal(err)
			}
			var total time.Duration
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				setOverride(b, l, 1, "")
				p, err := l.StartBatond(ctx, batond, 1, healthArgs(l, 1)...)
				if err != nil {
					b.Fatal(err)
				}
				waitNexthops(b, ctx, l, 0, 1)
				b.StartTimer()
				t0 := time.Now()
				switch kind {
				case "kill9":
					err = p.Signal(syscall.SIGKILL)
				case "sigterm":
					err = p.Signal(syscall.SIGTERM)
				case "sigstop": // frozen: the router's hold timer (lab.BGPHoldTime)
					err = p.Signal(syscall.SIGSTOP)
				case "check-fail":
					setOverride(b, l, 1, "http fail\n")
				case "drain":
					if out, cerr := exec.Command(batonctl, "-admin", "unix:"+l.AdminSocket(1), "drain").CombinedOutput(); cerr != nil {
						err = fmt.Errorf("drain: %v: %s", cerr, out)
					}
				}
				if err != nil {
					b.Fatal(err)
				}
				d := waitNexthops(b, ctx, l, 0).Sub(t0)
				total += d
				b.StopTimer()
				b.Logf("%s: withdrawn after %s", kind, d.Round(time.Microsecond))
				if err := p.Kill(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "ms/withdrawal")
		})
	}
}

// TestSetNexthopsBGP: in BGP mode SetNexthops filters which nodes'
// announcements the router uses; PredictNode follows the FIB BIRD
// installs, and real connections land where it says.
func TestSetNexthopsBGP(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l, procs := startHealthLab(t, ctx, 3, "btn")
	next := 46000 // fresh client ports: a used one lingers in TIME-WAIT
	check := func(want ...int) {
		t.Helper()
		for _, fam := range families(l) {
			if nh, err := l.Nexthops(fam); err != nil || !slices.Equal(nh, want) {
				t.Fatalf("%s nexthops %v %v, want %v", fam, nh, err, want)
			}
		}
		next += 12
		for port := next - 12; port < next; port++ {
			if who, pred := whoamiFrom(t, ctx, l, port); who != lab.NodeName(pred) || !slices.Contains(want, pred) {
				t.Fatalf("port %d: served by %s, predicted %s, nexthops %v", port, who, lab.NodeName(pred), want)
			}
		}
	}
	if err := l.SetNexthops([]int{0}); err != nil {
		t.Fatal(err)
	}
	check(0)
	if err := l.SetNexthops([]int{2, 1}); err != nil {
		t.Fatal(err)
	}
	check(1, 2)
	if err := l.SetNexthops(nil); err != nil {
		t.Fatal(err)
	}
	for _, fam := range families(l) {
		if nh, err := l.Nexthops(fam); err != nil || len(nh) != 0 {
			t.Fatalf("%s nexthops %v %v with none allowed", fam, nh, err)
		}
	}
	// A node the router keeps out stays out when it comes back...
	if err := l.SetNexthops([]int{0, 1}); err != nil {
		t.Fatal(err)
	}
	if err := procs[2].Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.StartBatond(ctx, batond, 2, healthArgs(l, 2)...); err != nil {
		t.Fatal(err)
	}
	err := waitFor(ctx, 20*time.Second, func() error {
		h := getHealth(t, ctx, adminClient(t, l, 2))
		if h.State != batonv1.NodeState_NODE_STATE_SERVING || len(h.BgpSessions) != 1 || h.BgpSessions[0].State != "established" {
			return fmt.Errorf("n3: %v %v", h.State, h.BgpSessions)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	check(0, 1)
	// ... and a node the router lets in but that does not announce is no
	// nexthop: SetNexthops returns with the FIB at the announcing ones.
	if err := procs[1].Kill(); err != nil {
		t.Fatal(err)
	}
	if err := l.SetNexthops([]int{0, 1, 2}); err != nil {
		t.Fatal(err)
	}
	check(0, 2)
}
