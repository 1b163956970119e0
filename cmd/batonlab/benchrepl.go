package main

// This file is the replication part of `batonlab bench`: what replicating
// every flow's state to 2 peers costs the node that serves the flows, and
// how soon a new flow's state is on its replicas.
//
// The lab has 3 nodes in cluster mode (lab.EnableCluster(2): every node
// peers with the other two over mutual TLS), and the router's ECMP set is
// restricted to node 0 (lab.SetNexthops([]int{0})): every connection lands
// on n1, whose 2 replicas are then n2 and n3. batond runs with the default
// TUN device (water).
//
//   - Connection rate with and without replication: the same client loop
//     as the kernel comparison (connLoop: connect, "1 1\n", read the 1-byte
//     answer to EOF, close) against n1, which runs either with the cluster
//     flags or without them (same lab, same binary, same node; n2 and n3
//     keep running in both cases). n1 is restarted before every run so
//     each run starts from a fresh process; the runs alternate (with,
//     without, then without, with, ...). The flow tracker runs in both
//     cases (batond always tracks flows): the difference is replication
//     alone. How many flows reached the replicas comes from n1's counters
//     (OPEN events sent to each peer, events rejected and dropped).
//   - Replica visibility: flows opened one at a time through n1; from the
//     moment the client's connect() returns, n2 and n3 are polled back to
//     back with GetFlow{local_only} over their admin sockets until the flow
//     is on both. n1 is not polled: its CPU is what replicates the flow.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

const (
	replNodes    = 3
	replReplicas = 2
	// targetReplConnRatio is the target for the connection rate
	// with replication over the rate without.
	targetReplConnRatio = 0.9
	// targetReplVisibleP99 is the target for a new flow's state to
	// be on its replicas (p99).
	targetReplVisibleP99 = 5 * time.Millisecond
	// replVisFirstPort is the first source port of the visibility flows,
	// below the client's ephemeral range.
	replVisFirstPort = 20001
	// replVisTimeout bounds the wait for one flow to reach its replicas.
	replVisTimeout = 2 * time.Second
	// replTUN is the TUN device of the replication figures.
	replTUN = tunWater
)

// ReplResults are the replication figures.
type ReplResults struct {
	TUN      string          `json:"tun"`
	Nodes    int             `json:"nodes"`
	Replicas int             `json:"replicas"`
	Lab      string          `json:"lab"`
	Setup    string          `json:"setup"`
	Conns    *ReplConnRate   `json:"conn_rate,omitempty"`
	Visible  *ReplVisibility `json:"replica_visibility,omitempty"`
}

// ReplConnRate is the connection rate through n1 with and without
// replication.
type ReplConnRate struct {
	Family        string        `json:"family"`
	Server        string        `json:"server"`
	Workers       int           `json:"workers"`
	Baseline      string        `json:"baseline"`
	Runs          []ReplConnRun `json:"runs"` // in the order they ran
	WithMedian    float64       `json:"with_replication_median_conns_per_s"`
	WithoutMedian float64       `json:"without_replication_median_conns_per_s"`
	Ratio         jfloat        `json:"ratio"`
	Target        float64       `json:"target_ratio"`
	MeetsTarget   bool          `json:"meets_target"`
}

// ReplConnRun is one connection-rate run.
type ReplConnRun struct {
	Replication bool     `json:"replication"`
	Round       int      `json:"round"`
	Conns       int64    `json:"conns"`
	Failures    int64    `json:"failures"`
	PerSec      float64  `json:"conns_per_s"`
	P50ms       float64  `json:"latency_p50_ms"`
	P99ms       float64  `json:"latency_p99_ms"`
	Errors      []string `json:"errors,omitempty"`
	// Handshakes is how many flows n1's tracker saw complete a handshake
	// during the run (baton_flows_opened_total).
	Handshakes uint64 `json:"tracker_handshakes"`
	// Per peer, from n1: OPEN and CLOSE events sent (metrics), all events
	// sent (ListPeers events_sent); with replication only.
	OpenSent   map[string]uint64 `json:"open_events_sent,omitempty"`
	CloseSent  map[string]uint64 `json:"close_events_sent,omitempty"`
	EventsSent map[string]uint64 `json:"events_sent,omitempty"`
	Rejected   uint64            `json:"events_rejected"`
	Dropped    uint64            `json:"events_dropped"`
	// CPU time of each batond during the run, ms.
	CPUms map[string]float64 `json:"batond_cpu_ms"`
}

// Dist is a latency distribution in milliseconds.
type Dist struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

func newDist(sorted []time.Duration) Dist {
	d := Dist{N: len(sorted)}
	if len(sorted) > 0 {
		d.P50, d.P90, d.P99 = ms(percentile(sorted, 50)), ms(percentile(sorted, 90)), ms(percentile(sorted, 99))
		d.Max = ms(sorted[len(sorted)-1])
	}
	return d
}

// ReplVisibility is the time for a new flow's state to be on its replicas.
type ReplVisibility struct {
	Flows    int    `json:"flows"`
	Server   string `json:"server"`
	Method   string `json:"method"`
	Seen     int    `json:"seen_on_both_replicas"`
	TimedOut int    `json:"timed_out"`
	// From connect() returning to the flow being on both replicas, and on
	// the first of them.
	BothMs  Dist `json:"both_replicas_ms"`
	FirstMs Dist `json:"first_replica_ms"`
	// PollMs is the duration of one GetFlow poll: the resolution of the
	// figures above.
	PollMs Dist `json:"poll_rpc_ms"`
	// AckLagP99ms is n1's ListPeers lag_p99 per peer after the run: from
	// the replicator taking a change to the peer's ack.
	AckLagP99ms map[string]float64 `json:"owner_ack_lag_p99_ms"`
	Target      float64            `json:"target_p99_ms"`
	MeetsTarget bool               `json:"meets_target"`
}

// clusterFlags are batond's peer network flags (each takes a value), which
// lab.BatondArgs adds once the lab is a cluster.
var clusterFlags = map[string]bool{
	"-peer-listen": true, "-peers": true, "-replicas": true,
	"-tls-ca": true, "-tls-cert": true, "-tls-key": true, "-peer-insecure": false,
}

// withoutClusterFlags returns args without the peer network flags.
func withoutClusterFlags(args []string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, _, hasValue := strings.Cut(a, "=")
		if takesValue, ok := clusterFlags[name]; ok {
			if takesValue && !hasValue {
				i++ // skip the value
			}
			continue
		}
		out = append(out, a)
	}
	return out
}

// replLab is the 3-node cluster lab of the replication figures.
type replLab struct {
	l       *lab.Lab
	bin     string
	base    []string // batond arguments for every node
	procs   []*lab.Proc
	admins  []*adminConn
	cluster bool // n1 runs with the cluster flags
	crashes []string
}

// benchReplication measures the replication figures in their own lab and
// records them in res.
func benchReplication(ctx context.Context, o benchOpts, res *Results) (err error) {
	fmt.Printf("\nreplication: %d-node cluster lab (%d replicas per flow, mutual TLS), router ECMP restricted to n1, batond TUN device %s\n",
		replNodes, replReplicas, replTUN)
	l, err := newLab(ctx, replNodes, false)
	if err != nil {
		return err
	}
	rl := &replLab{l: l, bin: o.batond, base: []string{"-pprof", "-mtu", strconv.Itoa(o.mtu)}, procs: make([]*lab.Proc, replNodes), crashes: []string{}}
	keep := true
	defer func() {
		closeAdmins(rl.admins)
		res.Crashes = append(res.Crashes, rl.crashes...)
		if len(rl.crashes) > 0 {
			res.LogDirs = append(res.LogDirs, l.LogDir)
		}
		if cerr := closeLab(l, keep); cerr != nil && err == nil {
			err = cerr
		}
	}()
	if err := rl.start(ctx, o); err != nil {
		return err
	}
	rr := &ReplResults{
		TUN: replTUN, Nodes: replNodes, Replicas: replReplicas, Lab: l.Name,
		Setup: "3 nodes, lab.EnableCluster(2) (every node peers with the other two, mutual TLS), router ECMP set = n1 only (lab.SetNexthops([]int{0})): every connection is n1's, its replicas are n2 and n3; batond TUN device water",
	}
	res.Replication = rr
	if rr.Conns, err = rl.connRate(ctx, o); err != nil {
		return err
	}
	if rr.Visible, err = rl.visibility(ctx, o); err != nil {
		return err
	}
	if o.profile > 0 && o.writes() {
		pr, err := rl.profile(ctx, o)
		if err != nil {
			return fmt.Errorf("profile of n1 with replication: %w", err)
		}
		res.Profile = append(res.Profile, *pr)
	}
	if len(o.memFlows) > 0 {
		if res.Memory, err = rl.memory(ctx, o); err != nil {
			return err
		}
	}
	keep = len(rl.crashes) > 0
	return nil
}

// start makes rl's lab a cluster whose router sends everything to n1,
// starts batond on every node and waits for the peer links.
func (r *replLab) start(ctx context.Context, o benchOpts) error {
	l := r.l
	if o.mtu != 1500 {
		if err := setLabMTU(l, o.mtu); err != nil {
			return err
		}
	}
	if err := l.EnableCluster(replReplicas); err != nil {
		return err
	}
	if err := l.SetNexthops([]int{0}); err != nil {
		return err
	}
	procs, err := startNodes(ctx, l, o.batond, r.base...)
	if err != nil {
		return err
	}
	copy(r.procs, procs)
	r.cluster = true
	if r.admins, err = dialAdmins(l); err != nil {
		return err
	}
	if err := waitPeersUp(ctx, r.admins, 30*time.Second); err != nil {
		return err
	}
	fmt.Printf("    peer links up; router: 192.0.2.1/32 via n1 only\n")
	return nil
}

// restartN1 stops n1's batond and starts it again, with the cluster flags
// or without them, and waits until it is ready: the peer links up (with),
// or its admin API answering with no peers (without).
func (r *replLab) restartN1(ctx context.Context, cluster bool) error {
	if p := r.procs[0]; p != nil && !p.Exited() {
		if err := p.Stop(); err != nil {
			return fmt.Errorf("stopping n1: %w", err)
		}
	}
	var p *lab.Proc
	var err error
	if cluster {
		p, err = r.l.StartBatond(ctx, r.bin, 0, r.base...)
	} else {
		p, err = startStandalone(ctx, r.l, r.bin, 0, r.base...)
	}
	if err != nil {
		return err
	}
	r.procs[0], r.cluster = p, cluster
	// A fresh connection: the old one may be backing off from the
	// restart.
	r.admins[0].Close()
	if r.admins[0], err = dialAdmin(r.l, 0); err != nil {
		return err
	}
	if cluster {
		return waitPeersUp(ctx, r.admins, 30*time.Second)
	}
	if err := waitStandalone(ctx, r.admins[0], 10*time.Second); err != nil {
		return err
	}
	if r.l.Routing == lab.RoutingBGP {
		// The router routes to n1 again only once it has announced.
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := r.l.WaitAnnounced(wctx, 0); err != nil {
			return fmt.Errorf("n1 without cluster flags: %w", err)
		}
	}
	return nil
}

// startStandalone starts batond on node index i with the lab's arguments
// minus the peer network flags, and waits for its anycast routes.
func startStandalone(ctx context.Context, l *lab.Lab, bin string, i int, extra ...string) (*lab.Proc, error) {
	args := withoutClusterFlags(l.BatondArgs(bin, i, extra...))
	p, err := l.Nodes[i].Start("batond-"+lab.NodeName(i), args, nil)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ready := make(chan error, 1)
	go func() { ready <- l.WaitRoute(wctx, i, lab.TUNName) }()
	select {
	case err = <-ready:
	case <-p.Done():
		cancel()
		<-ready
		err = errors.New("exited at start")
	}
	if err != nil {
		p.Kill() //nolint:errcheck
		return nil, fmt.Errorf("batond %s without cluster flags: %w\n%s", lab.NodeName(i), err, p.Log())
	}
	return p, nil
}

// waitStandalone waits for a node's admin API and checks that it has no
// peers (no replication).
func waitStandalone(ctx context.Context, a *adminConn, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		rctx, rcancel := context.WithTimeout(ctx, time.Second)
		resp, err := a.ListPeers(rctx, &batonv1.ListPeersRequest{})
		rcancel()
		if err == nil {
			if len(resp.Peers) > 0 || resp.Replicas != 0 {
				return fmt.Errorf("%s started without cluster flags still has %d peers, %d replicas", a.node, len(resp.Peers), resp.Replicas)
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: admin API: %w", a.node, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// check notices a batond that died, records why, and restarts it.
func (r *replLab) check(ctx context.Context, after string) error {
	for i, p := range r.procs {
		if !p.Exited() {
			continue
		}
		why := crashSummary(p)
		r.crashes = append(r.crashes, fmt.Sprintf("after %s (TUN %s) on %s of the replication lab: %s", after, replTUN, lab.NodeName(i), why))
		fmt.Printf("WARNING: batond %s died after %s: %s\n    log: %s\n", lab.NodeName(i), after, why, p.LogPath())
		if i == 0 {
			if err := r.restartN1(ctx, r.cluster); err != nil {
				return err
			}
			continue
		}
		np, err := r.l.StartBatond(ctx, r.bin, i, r.base...)
		if err != nil {
			return fmt.Errorf("restarting %s: %w", lab.NodeName(i), err)
		}
		r.procs[i] = np
		if r.cluster {
			if err := waitPeersUp(ctx, r.admins, 30*time.Second); err != nil {
				return err
			}
		}
	}
	return nil
}

// connRate runs the connection-rate loop through n1, -runs times with
// replication and -runs times without, alternating.
func (r *replLab) connRate(ctx context.Context, o benchOpts) (*ReplConnRate, error) {
	server := netip.AddrPortFrom(r.l.Anycast4, streamPort)
	cr := &ReplConnRate{
		Family: "IPv4", Server: server.String(), Workers: o.workers,
		Baseline: "n1 restarted without the peer network flags (same lab, node and binary; flow tracker on; n2 and n3 running)",
		Target:   targetReplConnRatio,
	}
	var with, without []float64
	for round := 0; round < o.runs; round++ {
		modes := []bool{true, false}
		if round%2 == 1 {
			slices.Reverse(modes)
		}
		for _, repl := range modes {
			if err := r.restartN1(ctx, repl); err != nil {
				return nil, err
			}
			run, err := r.connRun(ctx, o, server, repl, round)
			if err != nil {
				return nil, err
			}
			cr.Runs = append(cr.Runs, *run)
			if repl {
				with = append(with, run.PerSec)
			} else {
				without = append(without, run.PerSec)
			}
			printReplRun(run, o.runs)
			if err := settle(ctx); err != nil {
				return nil, err
			}
			if err := r.check(ctx, fmt.Sprintf("replication conn-rate run %d (replication %v)", round+1, repl)); err != nil {
				return nil, err
			}
		}
	}
	cr.WithMedian, cr.WithoutMedian = median(with), median(without)
	cr.Ratio = jfloat(ratio(cr.WithMedian, cr.WithoutMedian))
	cr.MeetsTarget = float64(cr.Ratio) >= cr.Target
	return cr, nil
}

// counters is what connRun reads before and after a run.
type counters struct {
	m     metricSet
	peers *batonv1.ListPeersResponse
	cpu   []time.Duration
}

func (r *replLab) counters(ctx context.Context) (*counters, error) {
	c := &counters{cpu: make([]time.Duration, len(r.procs))}
	for i, p := range r.procs {
		d, err := procCPU(p.PID())
		if err != nil {
			return nil, fmt.Errorf("%s CPU time: %w", lab.NodeName(i), err)
		}
		c.cpu[i] = d
	}
	var err error
	if c.m, err = scrapeMetrics(ctx, r.l.Nodes[0]); err != nil {
		return nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if c.peers, err = r.admins[0].ListPeers(rctx, &batonv1.ListPeersRequest{}); err != nil {
		return nil, fmt.Errorf("n1: ListPeers: %w", err)
	}
	return c, nil
}

// waitQueuesEmpty waits (at most 5 s) until n1 has no event queued for any
// peer, so that the run's events are counted as sent.
func (r *replLab) waitQueuesEmpty(ctx context.Context) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		m, err := scrapeMetrics(ctx, r.l.Nodes[0])
		if err != nil {
			return err
		}
		if m.sum("baton_replication_queue_events") == 0 || time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (r *replLab) connRun(ctx context.Context, o benchOpts, server netip.AddrPort, repl bool, round int) (*ReplConnRun, error) {
	before, err := r.counters(ctx)
	if err != nil {
		return nil, err
	}
	res, _ := connLoop(ctx, r.l.Client, server, o.workers, o.duration, connFirstPort)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if repl {
		if err := r.waitQueuesEmpty(ctx); err != nil {
			return nil, err
		}
	}
	after, err := r.counters(ctx)
	if err != nil {
		return nil, err
	}
	run := &ReplConnRun{
		Replication: repl, Round: round + 1,
		Conns: res.Conns, Failures: res.Failures, PerSec: res.PerSecond(), Errors: res.Errors,
		P50ms: ms(percentile(res.Latency, 50)), P99ms: ms(percentile(res.Latency, 99)),
		Handshakes: delta(after.m.sum("baton_flows_opened_total"), before.m.sum("baton_flows_opened_total")),
		CPUms:      map[string]float64{},
	}
	for i := range r.procs {
		run.CPUms[lab.NodeName(i)] = ms(after.cpu[i] - before.cpu[i])
	}
	if repl {
		run.OpenSent, run.CloseSent, run.EventsSent = map[string]uint64{}, map[string]uint64{}, map[string]uint64{}
		for _, p := range after.peers.Peers {
			name := p.Name
			ev := "baton_replication_events_sent_total"
			run.OpenSent[name] = delta(after.m.sum(ev, "peer", name, "kind", "open"), before.m.sum(ev, "peer", name, "kind", "open"))
			run.CloseSent[name] = delta(after.m.sum(ev, "peer", name, "kind", "close"), before.m.sum(ev, "peer", name, "kind", "close"))
			var sent0, rej0, drop0 uint64
			if b := peerByName(before.peers, name); b != nil {
				sent0, rej0, drop0 = b.EventsSent, b.EventsRejected, b.EventsDropped
			}
			run.EventsSent[name] = p.EventsSent - sent0
			run.Rejected += p.EventsRejected - rej0
			run.Dropped += p.EventsDropped - drop0
		}
	}
	return run, nil
}

func delta(after, before float64) uint64 {
	if after < before {
		return 0
	}
	return uint64(after - before)
}

// replicated is the fewest OPEN events sent to one peer in a run: the
// flows that reached every replica.
func (run *ReplConnRun) replicated() uint64 {
	var n uint64
	first := true
	for _, v := range run.OpenSent {
		if first || v < n {
			n, first = v, false
		}
	}
	return n
}

// cpuPerConn is the CPU time per completed connection, µs, of n1 and of
// the other nodes together.
func (run *ReplConnRun) cpuPerConn() (owner, others float64) {
	if run.Conns == 0 {
		return 0, 0
	}
	for name, v := range run.CPUms {
		if name == lab.NodeName(0) {
			owner += v
		} else {
			others += v
		}
	}
	n := float64(run.Conns)
	return owner * 1000 / n, others * 1000 / n
}

func printReplRun(run *ReplConnRun, runs int) {
	mode := "without replication"
	if run.Replication {
		mode = "with 2 replicas    "
	}
	fmt.Printf("replication conn rate run %d/%d %s %8.0f conn/s (%d in %.1fs, %d failed, p50 %.2f ms, p99 %.2f ms)\n",
		run.Round, runs, mode, run.PerSec, run.Conns, float64(run.Conns)/max(run.PerSec, 1e-9), run.Failures, run.P50ms, run.P99ms)
	for _, e := range run.Errors {
		fmt.Printf("    error: %s\n", e)
	}
	own, oth := run.cpuPerConn()
	fmt.Printf("    n1 tracker: %d handshakes; batond CPU per connection: n1 %.0f µs, n2+n3 %.0f µs\n", run.Handshakes, own, oth)
	if run.Replication {
		fmt.Printf("    replicated: OPEN events sent n2 %d, n3 %d (CLOSE n2 %d, n3 %d; all events n2 %d, n3 %d); rejected %d, dropped %d\n",
			run.OpenSent["n2"], run.OpenSent["n3"], run.CloseSent["n2"], run.CloseSent["n3"],
			run.EventsSent["n2"], run.EventsSent["n3"], run.Rejected, run.Dropped)
	}
}

// visibility opens -repl-flows flows through n1 one at a time and measures
// when each is on the owner and on both replicas.
func (r *replLab) visibility(ctx context.Context, o benchOpts) (*ReplVisibility, error) {
	// A fresh n1 with replication, so that its lag window holds this
	// measurement only.
	if err := r.restartN1(ctx, true); err != nil {
		return nil, err
	}
	server := netip.AddrPortFrom(r.l.Anycast4, streamPort)
	v := &ReplVisibility{
		Flows: o.replFlows, Server: server.String(),
		Method: "one connection at a time from source port " + strconv.Itoa(replVisFirstPort) + " up; the clock starts when the client's connect() returns; " +
			"n2 and n3 are each polled back to back (one goroutine each) with GetFlow{local_only} over their admin unix sockets until they hold the flow as a replica owned by n1 (n1 is not polled); " +
			"the connection then does the \"1 1\\n\" exchange and closes",
		Target: ms(targetReplVisibleP99), AckLagP99ms: map[string]float64{},
	}
	fmt.Printf("replica visibility: %d flows through n1, one at a time...\n", o.replFlows)
	var both, first, polls []time.Duration
	req := services.StreamRequest(1, 1)
	var want [1]byte
	services.FillPattern(1, 0, want[:])
	err := r.l.Client.Do(func() error {
		buf := make([]byte, 64)
		for i := 0; i < o.replFlows && ctx.Err() == nil; i++ {
			port := replVisFirstPort + i
			key := handoff.FlowKey{Client: netip.AddrPortFrom(r.l.ClientAddr4, uint16(port)), Anycast: server}.Proto()
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			conn, err := portDialer(port).DialContext(dctx, "tcp4", server.String())
			cancel()
			if err != nil {
				return fmt.Errorf("visibility flow %d (port %d): %w", i+1, port, err)
			}
			t0 := time.Now()
			got, rpcs := r.pollFlow(ctx, key, t0)
			polls = append(polls, rpcs...)
			conn.SetDeadline(time.Now().Add(5 * time.Second)) //nolint:errcheck
			xerr := exchange(conn, req, want[0], buf)
			conn.Close()
			if xerr != nil {
				return fmt.Errorf("visibility flow %d (port %d): %w", i+1, port, xerr)
			}
			if got[0] < 0 || got[1] < 0 {
				v.TimedOut++
				continue
			}
			v.Seen++
			both = append(both, max(got[0], got[1]))
			first = append(first, min(got[0], got[1]))
		}
		return ctx.Err()
	})
	if err != nil {
		return nil, err
	}
	for _, s := range [][]time.Duration{both, first, polls} {
		slices.Sort(s)
	}
	v.BothMs, v.FirstMs, v.PollMs = newDist(both), newDist(first), newDist(polls)
	v.MeetsTarget = v.TimedOut == 0 && v.Seen > 0 && v.BothMs.P99 <= v.Target
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	peers, err := r.admins[0].ListPeers(rctx, &batonv1.ListPeersRequest{})
	if err != nil {
		return nil, fmt.Errorf("n1: ListPeers: %w", err)
	}
	for _, p := range peers.Peers {
		v.AckLagP99ms[p.Name] = ms(time.Duration(p.LagP99Nano))
	}
	fmt.Printf("replica visibility: %d/%d flows on both replicas; after connect(): p50 %.2f p90 %.2f p99 %.2f max %.2f ms; poll RPC p50 %.3f ms; n1 ack lag p99 n2 %.2f n3 %.2f ms\n",
		v.Seen, v.Flows, v.BothMs.P50, v.BothMs.P90, v.BothMs.P99, v.BothMs.Max, v.PollMs.P50,
		v.AckLagP99ms["n2"], v.AckLagP99ms["n3"])
	return v, r.check(ctx, "the replica visibility flows")
}

// pollFlow polls n2 and n3 with GetFlow{local_only} for key, each back to
// back, until both hold a replica owned by n1, or replVisTimeout. It
// returns, per replica, the time from t0 to the answer that showed the
// flow (-1 if none did), and the duration of every poll.
func (r *replLab) pollFlow(ctx context.Context, key *batonv1.FlowKey, t0 time.Time) (got [replNodes - 1]time.Duration, rpcs []time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, replVisTimeout)
	defer cancel()
	owner := lab.NodeName(0)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range got {
		got[i] = -1
		a := r.admins[i+1]
		wg.Go(func() {
			req := &batonv1.GetFlowRequest{Key: key, LocalOnly: true}
			var mine []time.Duration
			defer func() {
				mu.Lock()
				rpcs = append(rpcs, mine...)
				mu.Unlock()
			}()
			for ctx.Err() == nil {
				s := time.Now()
				resp, err := a.GetFlow(ctx, req)
				now := time.Now()
				if ctx.Err() != nil {
					return
				}
				mine = append(mine, now.Sub(s))
				if err == nil && len(resp.Copies) > 0 && resp.Copies[0].GetState().GetOwner() == owner {
					got[i] = now.Sub(t0)
					return
				}
			}
		})
	}
	wg.Wait()
	return got, rpcs
}

// profile takes a CPU profile of n1 (with replication) during an extra
// connection-rate run, saved as <name>.replication.cpu.pprof next to the
// JSON results.
func (r *replLab) profile(ctx context.Context, o benchOpts) (*ProfileResult, error) {
	if err := r.restartN1(ctx, true); err != nil {
		return nil, err
	}
	file := strings.TrimSuffix(o.out, ".json") + ".replication.cpu.pprof"
	server := netip.AddrPortFrom(r.l.Anycast4, streamPort)
	lead := 500 * time.Millisecond
	done := make(chan connResult, 1)
	go func() {
		res, _ := connLoop(ctx, r.l.Client, server, o.workers, lead+o.profile+time.Second, connFirstPort)
		done <- res
	}()
	select {
	case <-time.After(lead):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	fmt.Printf("profiling batond n1 (with 2 replicas) for %v during a connection-rate run...\n", o.profile)
	secs := int(o.profile.Round(time.Second) / time.Second)
	if err := fetchProfile(ctx, r.l.Nodes[0], secs, file); err != nil {
		return nil, err
	}
	res := <-done
	pr := &ProfileResult{TUN: replTUN, File: file, Seconds: float64(secs),
		Load: fmt.Sprintf("of n1 replicating to n2 and n3, during a connection-rate run: %d workers, %.0f conn/s, %d failed", o.workers, res.PerSecond(), res.Failures)}
	fmt.Printf("profile saved to %s (%.0f conn/s meanwhile)\n", file, res.PerSecond())
	pr.TopFlat, pr.TopCum, pr.ViewHint, pr.ToolError = pprofTop(o.batond, file)
	if err := settle(ctx); err != nil {
		return nil, err
	}
	return pr, r.check(ctx, "the profiled connection-rate run")
}
