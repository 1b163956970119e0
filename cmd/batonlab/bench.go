package main

// This file is `batonlab bench`: Baton against the Linux kernel on the same
// lab path (client -> router -> node eth0), with the same service code and
// the same client code.
//
//   - Baton: batond on the node terminates 192.0.2.1 / 2001:db8:a::1 on its
//     TUN with the gVisor stack and serves `stream` on port 9000.
//   - Kernel: a plain kernel TCP listener in the same node namespace, on
//     the node's eth0 address port 9000, served by services.NewStream() in
//     goroutines of this process.
//
// Figures: single-flow download Gb/s (median of -runs alternating runs per
// server), new connections per second with a pool of workers, and a CPU
// profile of batond during a single-flow download. The report is in
// benchreport.go.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/stack/services"
)

const (
	streamPort = 9000
	// targetSingleFlow is the target for single-flow throughput,
	// as a fraction of the kernel's, at MTU 1500.
	targetSingleFlow = 0.5
	// metricsAddr is where lab.BatondArgs puts batond's metrics (and, with
	// -pprof, /debug/pprof), on the node namespace's loopback.
	metricsAddr = "127.0.0.1:9470"
	// connFirstPort is the first source port of the connection-rate runs;
	// each connection binds the next one (see connLoop).
	connFirstPort = 1024
)

type benchOpts struct {
	batond   string
	out      string
	duration time.Duration
	mtu      int
	runs     int
	workers  int
	ipv6     bool
	profile  time.Duration
}

func parseBenchArgs(args []string) (benchOpts, *flag.FlagSet, error) {
	var o benchOpts
	fs := newFlagSet("bench")
	fs.StringVar(&o.batond, "batond", defaultBatond(), "batond binary")
	fs.StringVar(&o.out, "out", filepath.Join("docs", "bench", "latest.json"), "JSON results file (the CPU profile goes next to it as <name>.cpu.pprof)")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "length of each measurement run")
	fs.IntVar(&o.mtu, "mtu", 1500, "MTU of every lab link and of batond's TUN")
	fs.IntVar(&o.runs, "runs", 3, "single-flow runs per server (alternating); the median is reported")
	fs.IntVar(&o.workers, "workers", 8, "concurrent workers in the connection-rate runs")
	fs.BoolVar(&o.ipv6, "v6", true, "also measure single-flow throughput over IPv6")
	fs.DurationVar(&o.profile, "profile", 5*time.Second, "length of the batond CPU profile (0 skips it)")
	if err := parseFlags(fs, args); err != nil {
		return o, fs, err
	}
	minMTU := 576
	if o.ipv6 {
		minMTU = 1280
	}
	switch {
	case o.duration < time.Second || o.duration > time.Hour:
		return o, fs, fmt.Errorf("-duration: %v out of range 1s..1h", o.duration)
	case o.mtu < minMTU || o.mtu > 65535:
		return o, fs, fmt.Errorf("-mtu: %d out of range %d..65535", o.mtu, minMTU)
	case o.runs < 1 || o.runs > 99:
		return o, fs, fmt.Errorf("-runs: %d out of range 1..99", o.runs)
	case o.workers < 1 || o.workers > 1024:
		return o, fs, fmt.Errorf("-workers: %d out of range 1..1024", o.workers)
	case o.profile < 0 || o.profile > 10*time.Minute:
		return o, fs, fmt.Errorf("-profile: %v out of range 0..10m", o.profile)
	case o.profile > 0 && o.profile < time.Second:
		return o, fs, fmt.Errorf("-profile: %v is shorter than the 1s profile resolution", o.profile)
	case o.out == "":
		return o, fs, errors.New("-out: empty path")
	case !strings.HasSuffix(o.out, ".json"):
		return o, fs, fmt.Errorf("-out: %q should end in .json", o.out)
	case o.batond == "":
		return o, fs, errors.New("-batond: empty path")
	}
	return o, fs, nil
}

func runBench(args []string) int {
	o, fs, err := parseBenchArgs(args)
	if err != nil {
		return usageResult(fs, "bench", err)
	}
	if reportMissing("bench", checkPrereqs(o.batond)) {
		return exitFailure
	}
	ctx, stop := signalContext("bench")
	defer stop()
	if err := bench(ctx, o); err != nil {
		return failed(ctx, "bench", err)
	}
	return exitOK
}

// Results is what bench measures; it is written as JSON to -out.
type Results struct {
	Date    string         `json:"date"`
	Machine Machine        `json:"machine"`
	Config  BenchConfig    `json:"config"`
	Single  []SingleFlow   `json:"single_flow"`
	Conns   *ConnRate      `json:"conn_rate,omitempty"`
	Profile *ProfileResult `json:"profile,omitempty"`
	// Crashes lists every time batond died during the run (it is then
	// restarted so the remaining figures can still be taken). Must be empty.
	Crashes []string `json:"batond_crashes"`
}

// BenchConfig records how the figures were taken.
type BenchConfig struct {
	Batond         string  `json:"batond"`
	BatondRevision string  `json:"batond_revision,omitempty"`
	BatondGo       string  `json:"batond_go,omitempty"`
	MTU            int     `json:"mtu"`
	DurationS      float64 `json:"run_duration_s"`
	Runs           int     `json:"runs_per_server"`
	Workers        int     `json:"conn_workers"`
	Lab            string  `json:"lab"`
	Path           string  `json:"path"`
	ConnPorts      string  `json:"conn_source_ports"`
}

// SingleFlow is the single-flow download figure for one address family.
type SingleFlow struct {
	Family       string    `json:"family"`
	BatonAddr    string    `json:"baton_addr"`
	KernelAddr   string    `json:"kernel_addr"`
	BatonGbps    []float64 `json:"baton_gbps"`
	KernelGbps   []float64 `json:"kernel_gbps"`
	BatonMedian  float64   `json:"baton_median_gbps"`
	KernelMedian float64   `json:"kernel_median_gbps"`
	Ratio        float64   `json:"ratio"`
	Target       float64   `json:"target_ratio"`
	MeetsTarget  bool      `json:"meets_target"`
}

// ConnSide is one server's connection-rate result.
type ConnSide struct {
	Conns    int64    `json:"conns"`
	Failures int64    `json:"failures"`
	PerSec   float64  `json:"conns_per_s"`
	P50ms    float64  `json:"latency_p50_ms"`
	P99ms    float64  `json:"latency_p99_ms"`
	Errors   []string `json:"errors,omitempty"`
	// TimeWaitReconnect is "ok" if a new connection from a source port
	// whose previous connection the server still holds in TIME-WAIT
	// succeeded, else the error (see twProbe).
	TimeWaitReconnect string `json:"time_wait_reconnect"`
}

// ConnRate is the new-connections-per-second figure.
type ConnRate struct {
	Family  string   `json:"family"`
	Workers int      `json:"workers"`
	Baton   ConnSide `json:"baton"`
	Kernel  ConnSide `json:"kernel"`
	Ratio   float64  `json:"ratio"`
}

// ProfileResult describes the CPU profile of batond.
type ProfileResult struct {
	File      string   `json:"file"`
	Seconds   float64  `json:"seconds"`
	LoadGbps  float64  `json:"download_gbps_while_profiling"`
	TopFlat   []string `json:"top_flat,omitempty"`
	TopCum    []string `json:"top_cum,omitempty"`
	ViewHint  string   `json:"view,omitempty"`
	ToolError string   `json:"tool_error,omitempty"`
}

func bench(ctx context.Context, o benchOpts) (err error) {
	res := &Results{
		Date:    time.Now().UTC().Format(time.RFC3339),
		Machine: machineFacts(),
		Config: BenchConfig{
			Batond: o.batond, MTU: o.mtu, DurationS: o.duration.Seconds(), Runs: o.runs, Workers: o.workers,
			Path:      "client netns -> router netns (veth, forwarding) -> node netns eth0; Baton: -> any0 TUN -> batond (gVisor); kernel: local TCP socket",
			ConnPorts: fmt.Sprintf("one new port per connection, %d..65535 in turn (no 4-tuple reused within a run below 64512 connections)", connFirstPort),
		},
	}
	res.Config.BatondRevision, res.Config.BatondGo = binaryInfo(o.batond)
	printMachine(res)

	l, err := newLab(ctx, 1, o.ipv6)
	if err != nil {
		return err
	}
	failed := true
	defer func() {
		if cerr := closeLab(l, failed); cerr != nil && err == nil {
			err = cerr
		}
	}()
	res.Config.Lab = l.Name
	if o.mtu != 1500 {
		if err := setLabMTU(l, o.mtu); err != nil {
			return err
		}
	}
	nd := &nodeDaemon{l: l, bin: o.batond, extra: []string{"-pprof", "-mtu", strconv.Itoa(o.mtu)}}
	procs, err := startNodes(ctx, l, o.batond, nd.extra...)
	if err != nil {
		return err
	}
	nd.proc = procs[0]
	res.Crashes = []string{}
	defer func() { res.Crashes = nd.crashes }()
	node := l.Nodes[0]
	kaddrs := []netip.Addr{node.Addr4}
	if o.ipv6 {
		kaddrs = append(kaddrs, node.Addr6)
	}
	ks, err := startKernelServer(ctx, node, kaddrs, streamPort)
	if err != nil {
		return err
	}
	defer ks.Close()
	fmt.Printf("kernel stream server: %s, in %s, serving services.NewStream() from batonlab\n\n", ks.Addrs(), node.Name)

	type pair struct {
		family        string
		baton, kernel netip.AddrPort
	}
	pairs := []pair{{"IPv4", netip.AddrPortFrom(l.Anycast4, streamPort), netip.AddrPortFrom(node.Addr4, streamPort)}}
	if o.ipv6 {
		pairs = append(pairs, pair{"IPv6", netip.AddrPortFrom(l.Anycast6, streamPort), netip.AddrPortFrom(node.Addr6, streamPort)})
	}
	for _, p := range pairs {
		sf := SingleFlow{Family: p.family, BatonAddr: p.baton.String(), KernelAddr: p.kernel.String(), Target: targetSingleFlow}
		for r := 1; r <= o.runs; r++ {
			for _, side := range []struct {
				name string
				addr netip.AddrPort
				out  *[]float64
			}{{"baton", p.baton, &sf.BatonGbps}, {"kernel", p.kernel, &sf.KernelGbps}} {
				dr, err := discardStream(ctx, l.Client, side.addr, uint64(r), o.duration)
				if err != nil {
					return fmt.Errorf("single flow %s %s run %d: %w", p.family, side.name, r, err)
				}
				g := gbps(dr.Bytes, dr.Elapsed)
				*side.out = append(*side.out, g)
				fmt.Printf("single flow %s run %d/%d %-6s %-24s %6.2f Gb/s (%s in %.1fs)\n",
					p.family, r, o.runs, side.name, side.addr, g, formatSize(uint64(dr.Bytes)), dr.Elapsed.Seconds())
				if err := settle(ctx); err != nil {
					return err
				}
				if err := nd.check(ctx, fmt.Sprintf("single flow %s %s run %d", p.family, side.name, r), true); err != nil {
					return err
				}
			}
		}
		sf.BatonMedian, sf.KernelMedian = median(sf.BatonGbps), median(sf.KernelGbps)
		sf.Ratio = ratio(sf.BatonMedian, sf.KernelMedian)
		sf.MeetsTarget = sf.Ratio >= sf.Target
		res.Single = append(res.Single, sf)
	}

	cr := &ConnRate{Family: "IPv4", Workers: o.workers}
	for _, side := range []struct {
		name string
		addr netip.AddrPort
		out  *ConnSide
	}{{"baton", pairs[0].baton, &cr.Baton}, {"kernel", pairs[0].kernel, &cr.Kernel}} {
		r, lastPort := connLoop(ctx, l.Client, side.addr, o.workers, o.duration, connFirstPort)
		if err := ctx.Err(); err != nil {
			return err
		}
		tw := "ok"
		if err := twProbe(ctx, l.Client, side.addr, lastPort, 3*time.Second); err != nil {
			tw = err.Error()
		}
		*side.out = ConnSide{
			Conns: r.Conns, Failures: r.Failures, PerSec: r.PerSecond(), Errors: r.Errors,
			P50ms: ms(percentile(r.Latency, 50)), P99ms: ms(percentile(r.Latency, 99)),
			TimeWaitReconnect: tw,
		}
		fmt.Printf("new connections IPv4 %-6s %-24s %8.0f conn/s (%d in %.1fs, %d failed, p50 %.2f ms, p99 %.2f ms)\n",
			side.name, side.addr, r.PerSecond(), r.Conns, r.Elapsed.Seconds(), r.Failures, side.out.P50ms, side.out.P99ms)
		for _, e := range r.Errors {
			fmt.Printf("    error: %s\n", e)
		}
		fmt.Printf("    reconnect from port %d (server side in TIME-WAIT): %s\n", lastPort, tw)
		if err := settle(ctx); err != nil {
			return err
		}
		if err := nd.check(ctx, "new connections "+side.name, true); err != nil {
			return err
		}
	}
	cr.Ratio = ratio(cr.Baton.PerSec, cr.Kernel.PerSec)
	res.Conns = cr

	if o.profile > 0 {
		pr, err := profileBatond(ctx, l, pairs[0].baton, o)
		if err != nil {
			return fmt.Errorf("profile: %w", err)
		}
		res.Profile = pr
		if err := settle(ctx); err != nil {
			return err
		}
		if err := nd.check(ctx, "the profiled download", false); err != nil {
			return err
		}
	}
	res.Crashes = nd.crashes

	fmt.Println()
	printResults(res)
	if err := writeJSON(o.out, res); err != nil {
		return err
	}
	fmt.Printf("\nresults written to %s\n", o.out)
	if res.Profile != nil {
		printProfile(res.Profile)
	}
	if len(res.Crashes) > 0 {
		fmt.Printf("\nbatond CRASHED %d time(s) during the benchmark (restarted each time; figures are reported anyway):\n", len(res.Crashes))
		for _, c := range res.Crashes {
			fmt.Printf("    %s\n", c)
		}
		return fmt.Errorf("batond crashed %d time(s); see its log in %s", len(res.Crashes), l.LogDir)
	}
	failed = false
	return nil
}

// nodeDaemon is the benchmark's batond on node 0. check notices a batond
// that died (say, on a client closing mid-stream), records why, and starts
// a new one so the remaining figures can still be measured.
type nodeDaemon struct {
	l       *lab.Lab
	bin     string
	extra   []string
	proc    *lab.Proc
	crashes []string
}

func (n *nodeDaemon) check(ctx context.Context, after string, restart bool) error {
	if !n.proc.Exited() {
		return nil
	}
	why := crashSummary(n.proc)
	n.crashes = append(n.crashes, "after "+after+": "+why)
	fmt.Printf("WARNING: batond died after %s: %s\n    log: %s\n", after, why, n.proc.LogPath())
	if !restart {
		return nil
	}
	p, err := n.l.StartBatond(ctx, n.bin, 0, n.extra...)
	if err != nil {
		return fmt.Errorf("restarting batond: %w", err)
	}
	n.proc = p
	fmt.Printf("    restarted batond: pid %d\n", p.PID())
	return nil
}

// settle pauses between runs so that the previous run's connection is gone
// on both ends before the next one starts.
func settle(ctx context.Context) error {
	t := time.NewTimer(500 * time.Millisecond)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// setLabMTU sets the MTU of every veth in the lab (both ends of every
// link), through the lab's netlink handles.
func setLabMTU(l *lab.Lab, mtu int) error {
	type link struct {
		ns   *lab.NS
		name string
	}
	links := []link{{l.Client, "eth0"}, {l.Router, "to-c"}}
	for _, n := range l.Nodes {
		links = append(links, link{l.Router, n.RouterLink}, link{n.NS, "eth0"})
	}
	for _, k := range links {
		h := k.ns.Netlink()
		nl, err := h.LinkByName(k.name)
		if err == nil {
			err = h.LinkSetMTU(nl, mtu)
		}
		if err != nil {
			return fmt.Errorf("-mtu %d: %s/%s: %w", mtu, k.ns.Name, k.name, err)
		}
	}
	fmt.Printf("MTU %d set on every lab link\n", mtu)
	return nil
}

// kernelServer serves the stream service on kernel sockets of a node
// namespace, from goroutines of this process.
type kernelServer struct {
	lns    []net.Listener
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startKernelServer(ctx context.Context, node *lab.Node, addrs []netip.Addr, port uint16) (*kernelServer, error) {
	ctx, cancel := context.WithCancel(ctx)
	ks := &kernelServer{cancel: cancel}
	svc := services.NewStream()
	for _, a := range addrs {
		ln, err := node.Listen(ctx, "tcp", netip.AddrPortFrom(a, port).String())
		if err != nil {
			ks.Close()
			return nil, err
		}
		ks.lns = append(ks.lns, ln)
		ks.wg.Add(1)
		go func() {
			defer ks.wg.Done()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				ks.wg.Add(1)
				go func() {
					defer ks.wg.Done()
					svc.ServeConn(ctx, c) //nolint:errcheck // clients hang up mid-stream by design
					c.Close()
				}()
			}
		}()
	}
	return ks, nil
}

// Addrs lists the listening addresses.
func (ks *kernelServer) Addrs() string {
	var s []string
	for _, ln := range ks.lns {
		s = append(s, ln.Addr().String())
	}
	return strings.Join(s, " ")
}

// Close stops accepting, ends the connections and waits for the goroutines,
// so that no socket keeps the node namespace alive after the lab is closed.
func (ks *kernelServer) Close() {
	ks.cancel()
	for _, ln := range ks.lns {
		ln.Close()
	}
	ks.wg.Wait()
}

// profileBatond downloads from batond while it fetches a CPU profile from
// batond's /debug/pprof (on the node namespace's loopback), and saves it
// next to the JSON results.
func profileBatond(ctx context.Context, l *lab.Lab, server netip.AddrPort, o benchOpts) (*ProfileResult, error) {
	node := l.Nodes[0]
	file := strings.TrimSuffix(o.out, ".json") + ".cpu.pprof"
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return nil, err
	}
	lead := 500 * time.Millisecond // let the download reach steady state first
	type dl struct {
		r   discardResult
		err error
	}
	dch := make(chan dl, 1)
	go func() {
		r, err := discardStream(ctx, l.Client, server, 99, lead+o.profile+time.Second)
		dch <- dl{r, err}
	}()
	select {
	case <-time.After(lead):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	fmt.Printf("profiling batond for %v during a single-flow download...\n", o.profile)
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return node.Dial(ctx, "tcp", addr, 0)
		},
		DisableKeepAlives: true,
	}}
	secs := int(o.profile.Round(time.Second) / time.Second)
	url := "http://" + metricsAddr + "/debug/pprof/profile?seconds=" + strconv.Itoa(secs)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(b)))
	}
	f, err := os.Create(file)
	if err != nil {
		return nil, err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return nil, fmt.Errorf("saving %s: %w", file, err)
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	d := <-dch
	if d.err != nil {
		return nil, fmt.Errorf("download while profiling: %w", d.err)
	}
	pr := &ProfileResult{File: file, Seconds: float64(secs), LoadGbps: gbps(d.r.Bytes, d.r.Elapsed)}
	fmt.Printf("profile saved to %s (download ran at %.2f Gb/s meanwhile)\n", file, pr.LoadGbps)
	pr.TopFlat, pr.TopCum, pr.ViewHint, pr.ToolError = pprofTop(o.batond, file)
	return pr, nil
}
