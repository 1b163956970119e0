package main

// This file is the memory part of `batonlab bench`, in the replication lab
// (3 nodes, every flow on n1, replicas n2 and n3): for each count of
// -mem-flows, n1 is restarted (fresh process, replication on, -max-flows
// above the count), then that many idle connections are opened to the
// stream service (connect only, no request: the service waits for the
// request line with a 256-byte reader, the least any service holds) from
// several client addresses (198.51.100.17-23, added to the client and
// routed by the router; one holder process per address, 15000 connections
// each: the open-file limit here is 20000 and cannot be raised), and held
// while n1's tracker counts them and its replication queues drain. Before
// and after, for n1 and n2: RSS (/proc/PID/status VmRSS) and a Go heap
// profile taken after a GC (/debug/pprof/heap?gc=1), summed four ways with
// `go tool pprof`: everything, the samples allocated under Baton's handoff
// package (flow tracker, replicator, replica store: Baton's own per-flow
// state), those under gVisor's tcpip packages but not under handoff (the
// stack's endpoints), and those under the services. Per flow = (after -
// before) / connections. The service closes a connection that sent no
// request after 60 s, so a count is measured right after it opens; the
// tracked count is checked (a shortfall is reported in the note).

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/baton-anycast/baton/e2e/lab"
)

const (
	// targetBatonPerFlow is the target for Baton's state per
	// tracked and replicated flow beyond gVisor's endpoint, bytes.
	targetBatonPerFlow = 1024
	// targetReplicaPerFlow is the target per replica-held flow, bytes.
	targetReplicaPerFlow = 512
)

// memClientAddrs are the extra client source addresses of the memory runs.
var memClientAddrs = func() []netip.Addr {
	var out []netip.Addr
	for i := byte(17); i <= 24; i++ {
		out = append(out, netip.AddrFrom4([4]byte{198, 51, 100, i}))
	}
	return out
}()

// MemResults are the memory figures.
type MemResults struct {
	Method string     `json:"method"`
	Runs   []MemPoint `json:"runs"`
	// Targets, bytes per flow.
	TargetBaton   int `json:"target_baton_state_per_flow_bytes"`
	TargetReplica int `json:"target_replica_per_flow_bytes"`
}

// MemPoint is one count of idle connections.
type MemPoint struct {
	Flows   int `json:"flows"`
	Opened  int `json:"opened"`
	Tracked int `json:"n1_tracked"`
	// Replicas is n2's count of replica-held flows owned by n1, the
	// divisor of the replica figures (Tracked is n1's).
	Replicas int     `json:"n2_replicas"`
	OpenS    float64 `json:"open_s"`
	// Measured is false when the connections could not all be opened or
	// sampled: Note says why.
	Measured bool   `json:"measured"`
	Note     string `json:"note,omitempty"`
	// Per flow, bytes: n1 (owner) and n2 (replica).
	Owner   MemPerFlow `json:"owner_n1"`
	Replica MemPerFlow `json:"replica_n2"`
}

// MemPerFlow is one node's memory growth per flow, bytes.
type MemPerFlow struct {
	RSS    float64 `json:"rss"`
	Heap   float64 `json:"go_heap_inuse"`
	Baton  float64 `json:"heap_under_handoff"`
	GVisor float64 `json:"heap_under_gvisor_not_handoff"`
	// Services is the heap under the services (their buffers).
	Services float64 `json:"heap_under_services"`
}

type memSample struct{ rss, heap, baton, gvisor, svc float64 }

// memory measures the memory figures.
func (r *replLab) memory(ctx context.Context, o benchOpts) (*MemResults, error) {
	if err := addClientAddrs(r.l); err != nil {
		return nil, err
	}
	base := r.base
	defer func() { r.base = base }()
	r.base = append(append([]string(nil), base...), "-max-flows", strconv.Itoa(2*slicesMax(o.memFlows)))
	mr := &MemResults{TargetBaton: targetBatonPerFlow, TargetReplica: targetReplicaPerFlow,
		Method: "n1 restarted (replication to n2, n3 on), N connections opened to the echo service from 198.51.100.17-24 and held idle; RSS and Go heap (profile after GC, split by go tool pprof -focus: handoff package = Baton's state, gvisor tcpip not handoff = the stack) before and after, per flow"}
	server := netip.AddrPortFrom(r.l.Anycast4, streamPort)
	for _, n := range o.memFlows {
		if err := r.restartN1(ctx, true); err != nil {
			return nil, err
		}
		if err := settle(ctx); err != nil {
			return nil, err
		}
		before, err := r.memSamples(ctx, o, fmt.Sprintf("%d-before", n))
		if err != nil {
			return nil, err
		}
		t0 := time.Now()
		holders, err := startHolders(r.l, server, n)
		p := MemPoint{Flows: n}
		if err == nil {
			err = r.waitHeld(ctx, holders, t0, &p)
		}
		var counts memCounts
		if err == nil {
			err = r.waitQueuesEmpty(ctx)
		}
		if err == nil {
			counts, err = r.memCounts(ctx)
		}
		var after [2]memSample
		if err == nil {
			err = r.waitQueuesEmpty(ctx)
		}
		if err == nil {
			after, err = r.memSamples(ctx, o, fmt.Sprintf("%d-after", n))
		}
		if err == nil && (counts.tracked <= 0 || counts.replicas <= 0) {
			err = fmt.Errorf("n1 tracks %d flows, n2 holds %d replicas", counts.tracked, counts.replicas)
		}
		for _, h := range holders {
			h.Kill() //nolint:errcheck // by PID; its connections close with it
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			// Recorded, not fatal: the other figures stand.
			p.Note = err.Error()
			fmt.Printf("WARNING: memory, %d flows, not measured: %s\n", n, err)
			mr.Runs = append(mr.Runs, p)
			if err := sleepCtx(ctx, 2*time.Second); err != nil {
				return nil, err
			}
			if err := r.check(ctx, fmt.Sprintf("memory, %d flows", n)); err != nil {
				return nil, err
			}
			continue
		}
		p.Measured = true
		p.Tracked, p.Replicas = counts.tracked, counts.replicas
		per := func(i int) MemPerFlow {
			f := float64(counts.tracked)
			if i == 1 {
				f = float64(counts.replicas)
			}
			return MemPerFlow{RSS: (after[i].rss - before[i].rss) / f, Heap: (after[i].heap - before[i].heap) / f,
				Baton: (after[i].baton - before[i].baton) / f, GVisor: (after[i].gvisor - before[i].gvisor) / f,
				Services: (after[i].svc - before[i].svc) / f}
		}
		p.Owner, p.Replica = per(0), per(1)
		fmt.Printf("memory %d idle flows (opened %d in %.1fs, n1 tracks %d, n2 holds %d): per flow n1 RSS %.0f B, heap %.0f B (handoff %.0f B, gVisor %.0f B); n2 RSS %.0f B, heap %.0f B (handoff %.0f B)\n",
			n, p.Opened, p.OpenS, p.Tracked, p.Replicas, p.Owner.RSS, p.Owner.Heap, p.Owner.Baton, p.Owner.GVisor, p.Replica.RSS, p.Replica.Heap, p.Replica.Baton)
		mr.Runs = append(mr.Runs, p)
		if err := sleepCtx(ctx, 2*time.Second); err != nil { // the closes reach n1
			return nil, err
		}
		if err := r.check(ctx, fmt.Sprintf("memory, %d flows", n)); err != nil {
			return nil, err
		}
	}
	return mr, nil
}

func slicesMax(xs []int) int {
	m := 0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}

// memSamples takes n1's and n2's RSS and heap figures.
func (r *replLab) memSamples(ctx context.Context, o benchOpts, tag string) ([2]memSample, error) {
	var out [2]memSample
	dir, err := os.MkdirTemp("", "batonlab-heap-")
	if err != nil {
		return out, err
	}
	defer os.RemoveAll(dir)
	for i := range out {
		file := filepath.Join(dir, fmt.Sprintf("%s-%s.heap.pprof", lab.NodeName(i), tag))
		if err := fetchPprof(ctx, r.l.Nodes[i], "heap?gc=1", file); err != nil {
			return out, fmt.Errorf("heap profile of %s: %w", lab.NodeName(i), err)
		}
		rss, err := procRSS(r.procs[i].PID())
		if err != nil {
			return out, err
		}
		s := memSample{rss: float64(rss)}
		for _, f := range []struct {
			dst  *float64
			args []string
		}{
			{&s.heap, nil},
			{&s.baton, []string{"-focus=baton/handoff"}},
			{&s.gvisor, []string{"-focus=gvisor/pkg/tcpip", "-ignore=baton/handoff"}},
			{&s.svc, []string{"-focus=baton/stack/services"}},
		} {
			if *f.dst, err = heapInuse(o.batond, file, f.args...); err != nil {
				return out, err
			}
		}
		out[i] = s
	}
	return out, nil
}

// heapInuse sums the in-use bytes of a heap profile (restricted by the
// extra pprof flags) with `go tool pprof -top`.
func heapInuse(bin, file string, extra ...string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	args := append([]string{"tool", "pprof", "-top", "-sample_index=inuse_space", "-nodecount=1000000", "-nodefraction=0", "-edgefraction=0"}, extra...)
	out, err := exec.CommandContext(ctx, "go", append(args, bin, file)...).CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("go tool pprof %s: %v: %s", file, err, strings.TrimSpace(lastLine(string(out))))
	}
	return parsePprofShown(string(out))
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

var shownRE = regexp.MustCompile(`Showing nodes accounting for ([0-9.]+)([kMGT]?B)?,`)

// parsePprofShown returns the bytes of pprof -top's "Showing nodes
// accounting for X, ..." line (0 when the filters leave no sample).
func parsePprofShown(out string) (float64, error) {
	m := shownRE.FindStringSubmatch(out)
	if m == nil {
		if strings.Contains(out, "No samples") || strings.Contains(out, "no samples") {
			return 0, nil
		}
		return 0, fmt.Errorf("pprof output without a total: %q", lastLine(out))
	}
	x, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, err
	}
	mult := map[string]float64{"": 1, "B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}[m[2]]
	return x * mult, nil
}

// procRSS returns a process's resident set size in bytes.
func procRSS(pid int) (int64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	return parseVmRSS(bufio.NewScanner(f))
}

// parseVmRSS finds "VmRSS: N kB" in /proc/PID/status.
func parseVmRSS(sc *bufio.Scanner) (int64, error) {
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("VmRSS: %q", v)
			}
			n, err := strconv.ParseInt(f[0], 10, 64)
			return n << 10, err
		}
	}
	return 0, errors.New("no VmRSS in /proc/PID/status")
}

// addClientAddrs adds memClientAddrs to the client's eth0 and routes them
// from the router to the client (once per lab).
func addClientAddrs(l *lab.Lab) error {
	h := l.Client.Netlink()
	link, err := h.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("client eth0: %w", err)
	}
	for _, a := range memClientAddrs {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(32, 32)}}
		if err := h.AddrReplace(link, addr); err != nil {
			return fmt.Errorf("client address %s: %w", a, err)
		}
	}
	rh := l.Router.Netlink()
	rl, err := rh.LinkByName("to-c")
	if err != nil {
		return fmt.Errorf("router to-c: %w", err)
	}
	_, dst, _ := net.ParseCIDR("198.51.100.16/28")
	rt := &netlink.Route{LinkIndex: rl.Attrs().Index, Dst: dst, Gw: l.ClientAddr4.AsSlice()}
	if err := rh.RouteReplace(rt); err != nil {
		return fmt.Errorf("router route 198.51.100.16/28: %w", err)
	}
	return nil
}

// holdCommand is the hidden batonlab command that holds idle connections
// for the memory figures in a process of its own (the open-file limit of
// one process, 20000 here, is below the largest count): batonlab
// bench-hold SERVER SRC N opens N connections from SRC, prints "ready
// OPENED", and holds them until it is killed.
const holdCommand = "bench-hold"

// holdPerProc is the most connections one holder opens.
const holdPerProc = 15000

func runHold(args []string) int {
	if len(args) != 3 {
		fmt.Fprintln(os.Stderr, "batonlab bench-hold: want SERVER SRC N")
		return exitUsage
	}
	server, err1 := netip.ParseAddrPort(args[0])
	src, err2 := netip.ParseAddr(args[1])
	n, err3 := strconv.Atoi(args[2])
	if err := errors.Join(err1, err2, err3); err != nil {
		fmt.Fprintln(os.Stderr, "batonlab bench-hold:", err)
		return exitUsage
	}
	conns, err := openIdle(context.Background(), server, src, n, 24)
	if err != nil {
		fmt.Fprintln(os.Stderr, "batonlab bench-hold:", err)
		return exitFailure
	}
	fmt.Printf("ready %d\n", len(conns))
	select {}
}

// startHolders starts holders in the client namespace for n connections
// to server (holdPerProc each, one source address each).
func startHolders(l *lab.Lab, server netip.AddrPort, n int) ([]*lab.Proc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	var procs []*lab.Proc
	total := n
	for i := 0; n > 0; i++ {
		if i >= len(memClientAddrs) {
			return procs, fmt.Errorf("more than %d connections", len(memClientAddrs)*holdPerProc)
		}
		k := min(n, holdPerProc)
		n -= k
		p, err := l.Client.Start(fmt.Sprintf("hold-%d-%d", total, i), []string{self, holdCommand, server.String(), memClientAddrs[i].String(), strconv.Itoa(k)}, nil)
		if err != nil {
			return procs, err
		}
		procs = append(procs, p)
	}
	return procs, nil
}

// memWindow is how long after the first connection the figures are taken
// at the latest: the stream service closes a connection that sent no
// request after 60 s.
const memWindow = 45 * time.Second

// waitHeld waits until every holder has opened its connections and n1
// tracks them all, or until memWindow after t0 (p.Note says so then), and
// records the connections opened and the time taken in p.
func (r *replLab) waitHeld(ctx context.Context, holders []*lab.Proc, t0 time.Time, p *MemPoint) error {
	for {
		opened, all := 0, true
		for _, h := range holders {
			m := readyRE.FindStringSubmatch(h.Log())
			if m == nil {
				all = false
				if h.Exited() {
					return fmt.Errorf("connection holder exited: %s", lastLine(h.Log()))
				}
				continue
			}
			k, _ := strconv.Atoi(m[1])
			opened += k
		}
		m, err := scrapeMetrics(ctx, r.l.Nodes[0])
		if err != nil {
			return err
		}
		tracked := int(m.sum("baton_flows_tracked"))
		p.Opened, p.OpenS = opened, time.Since(t0).Seconds()
		if all && tracked >= opened {
			return nil
		}
		if time.Since(t0) > memWindow {
			if !all {
				p.Opened = max(opened, tracked) // the holders still opening have not said how many
			}
			p.Note = fmt.Sprintf("measured %v after the first connection with %d tracked (holders done: %v): the service closes a connection without a request after 60 s", memWindow, tracked, all)
			fmt.Printf("WARNING: memory: %s\n", p.Note)
			return nil
		}
		if err := sleepCtx(ctx, 200*time.Millisecond); err != nil {
			return err
		}
	}
}

type memCounts struct{ tracked, replicas int }

// memCounts reads n1's tracked flows and n2's replicas of n1's flows.
func (r *replLab) memCounts(ctx context.Context) (memCounts, error) {
	var c memCounts
	m1, err := scrapeMetrics(ctx, r.l.Nodes[0])
	if err != nil {
		return c, err
	}
	m2, err := scrapeMetrics(ctx, r.l.Nodes[1])
	if err != nil {
		return c, err
	}
	c.tracked = int(m1.sum("baton_flows_tracked"))
	c.replicas = int(m2.sum("baton_replication_replica_flows", "owner", "n1"))
	return c, nil
}

var readyRE = regexp.MustCompile(`(?m)^ready (\d+)$`)

// openIdle opens n connections to server from src (kernel-chosen ports)
// with workers dialers, and returns them open. More than 1% failed dials
// is an error (the connections are closed then).
func openIdle(ctx context.Context, server netip.AddrPort, src netip.Addr, n, workers int) ([]net.Conn, error) {
	var (
		next     atomic.Int64
		failures atomic.Int64
		mu       sync.Mutex
		conns    = make([]net.Conn, 0, n)
		firstErr error
		wg       sync.WaitGroup
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []net.Conn
			for ctx.Err() == nil && failures.Load() <= int64(n/100) {
				i := next.Add(1) - 1
				if i >= int64(n) {
					break
				}
				// A dial that times out (a SYN dropped by a busy server)
				// is tried again, twice.
				d := net.Dialer{Timeout: 10 * time.Second, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}}
				var c net.Conn
				var err error
				for try := 0; try < 3 && ctx.Err() == nil; try++ {
					if c, err = d.DialContext(ctx, "tcp4", server.String()); err == nil {
						break
					}
				}
				if err != nil {
					failures.Add(1)
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				mine = append(mine, c)
			}
			mu.Lock()
			conns = append(conns, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if err := ctx.Err(); err != nil || failures.Load() > int64(n/100) {
		for _, c := range conns {
			c.Close()
		}
		if err == nil {
			err = fmt.Errorf("%d of %d connections failed, first: %v", failures.Load(), n, firstErr)
		}
		return nil, err
	}
	return conns, nil
}
