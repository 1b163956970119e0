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
// Baton is measured with each TUN device of -tun (both by default, side by
// side in one run): "water", the default device (bare IP packets, one
// write per packet), and "offload", batond -tun-offload (virtio header,
// gVisor's TCP writes 64 KiB segments that the kernel forwards whole).
// batond is restarted with the other device between runs; the runs of each
// round are interleaved (water, kernel, offload, then the reverse), so all
// three see the same machine conditions.
//
// Figures: single-flow download Gb/s (median of -runs rounds per server),
// new connections per second with a pool of workers, and a CPU profile of
// batond during a single-flow download with each device. The report is in
// benchreport.go. Then, in a 3-node cluster lab, what replication costs
// (benchrepl.go). -only kernel or -only replication measures one part.

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
	"slices"
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
	targetSingleFlow = 0.6
	// The TUN devices batond is measured with (-tun).
	tunWater   = "water"
	tunOffload = "offload"
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
	tuns     []string // tunWater and/or tunOffload, in measuring order
	// only is onlyKernel or onlyReplication to measure one part, "" for
	// both.
	only      string
	replFlows int // flows of the replica visibility figure
	// takeoverFlows are the flows of each takeover scenario.
	takeoverFlows int
	// parallel are the flow counts of the parallel download figures.
	parallel []int
	// bigMTU is the large MTU the single-flow figures are taken again
	// with (0: not).
	bigMTU int
	// memFlows are the idle-connection counts of the memory figures.
	memFlows []int
	outSet   bool
	// profileDir is where -only profiles writes its text reports.
	profileDir string
}

// The parts of the benchmark (-only).
const (
	onlyKernel      = "kernel"
	onlyReplication = "replication"
	onlyTakeover    = "takeover"
)

// writes reports whether the results (JSON and profiles) are written: not
// with -only unless -out is given.
func (o benchOpts) writes() bool { return o.only == "" || o.outSet }

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
	fs.DurationVar(&o.profile, "profile", 5*time.Second, "length of each batond CPU profile (0 skips them)")
	tun := fs.String("tun", "both", "TUN device(s) to measure batond with in the kernel comparison: water (default device), offload (batond -tun-offload) or both, side by side (the replication figures always use water)")
	fs.StringVar(&o.only, "only", "", "measure one part: kernel (Baton vs the kernel, profiles), replication (3-node cluster: conn/s with vs without replication, replica visibility) or takeover (3-node cluster: drain, failing check, kill -9 of the node serving the flows: takeover latency, client stalls, withdrawal and migration times, throughput after vs before), or profiles (CPU profiles of batond during the offload device's download and upload, the -big-mtu download, the connection rate with and without replication; text reports in -profile-dir; not part of the full run); -out is then written only if given")
	fs.IntVar(&o.replFlows, "repl-flows", 300, "flows opened one at a time for the replica visibility figure")
	fs.IntVar(&o.takeoverFlows, "takeover-flows", 24, "endless verified downloads on the failing node in each takeover scenario")
	par := fs.String("parallel", "8,64", "flow counts of the parallel download figures, comma-separated (empty: none)")
	fs.IntVar(&o.bigMTU, "big-mtu", 65000, "large MTU of every lab link and batond's TUN for a second set of single-flow figures (0: none)")
	fs.StringVar(&o.profileDir, "profile-dir", filepath.Join("docs", "bench", "profiles"), "-only profiles: directory of the text reports (go tool pprof -top of each profile)")
	mem := fs.String("mem-flows", "10000,100000", "idle connections of the memory figures, comma-separated (empty: none)")
	if err := parseFlags(fs, args); err != nil {
		return o, fs, err
	}
	var perr error
	if o.parallel, perr = parseIntList(*par, 1024); perr != nil {
		return o, fs, fmt.Errorf("-parallel: %w", perr)
	}
	if o.memFlows, perr = parseIntList(*mem, 500000); perr != nil {
		return o, fs, fmt.Errorf("-mem-flows: %w", perr)
	}
	if o.bigMTU != 0 && (o.bigMTU < 1500 || o.bigMTU > 65535) {
		return o, fs, fmt.Errorf("-big-mtu: %d out of range 1500..65535", o.bigMTU)
	}
	fs.Visit(func(f *flag.Flag) { o.outSet = o.outSet || f.Name == "out" })
	switch *tun {
	case "both":
		o.tuns = []string{tunWater, tunOffload}
	case tunWater, tunOffload:
		o.tuns = []string{*tun}
	default:
		return o, fs, fmt.Errorf("-tun: %q is not water, offload or both", *tun)
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
	case o.only != "" && o.only != onlyKernel && o.only != onlyReplication && o.only != onlyTakeover && o.only != onlyProfiles:
		return o, fs, fmt.Errorf("-only: %q is not %s, %s, %s or %s", o.only, onlyKernel, onlyReplication, onlyTakeover, onlyProfiles)
	case o.takeoverFlows < 1 || o.takeoverFlows > 500:
		return o, fs, fmt.Errorf("-takeover-flows: %d out of range 1..500", o.takeoverFlows)
	case o.replFlows < 1 || o.replFlows > 10000:
		return o, fs, fmt.Errorf("-repl-flows: %d out of range 1..10000", o.replFlows)
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
	Date    string       `json:"date"`
	Machine Machine      `json:"machine"`
	Config  BenchConfig  `json:"config"`
	Single  []SingleFlow `json:"single_flow"`
	// Flows are the other throughput figures: upload, parallel
	// downloads, the large MTU (bench_flows.go).
	Flows   []SingleFlow `json:"throughput,omitempty"`
	Latency *Latency     `json:"latency,omitempty"`
	// Memory are the idle-connection memory figures (bench_mem.go).
	Memory  *MemResults     `json:"memory,omitempty"`
	Conns   *ConnRate       `json:"conn_rate,omitempty"`
	Profile []ProfileResult `json:"profiles,omitempty"`
	// Replication are the cluster figures (benchrepl.go).
	Replication *ReplResults `json:"replication,omitempty"`
	// Takeover are the takeover figures (bench_takeover.go).
	Takeover *TakeoverResults `json:"takeover,omitempty"`
	// Crashes lists every time batond died during the run (it is then
	// restarted so the remaining figures can still be taken). Must be empty.
	Crashes []string `json:"batond_crashes"`
	// LogDirs are the log directories kept because of crashes.
	LogDirs []string `json:"-"`
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
	// TUNs are the devices batond was measured with: "water" (default)
	// and/or "offload" (-tun-offload).
	TUNs      []string `json:"tuns"`
	RunOrder  string   `json:"run_order"`
	Lab       string   `json:"lab"`
	Path      string   `json:"path"`
	ConnPorts string   `json:"conn_source_ports"`
	// Only is the part measured with -only ("" for both).
	Only string `json:"only,omitempty"`
}

// SingleFlow is the single-flow download figure for one address family.
type SingleFlow struct {
	Family string `json:"family"`
	// Kind is kindDownload (also when empty) or kindUpload; Streams the
	// flows at once (0 or 1: one); MTU the lab's MTU (0: the config's).
	Kind         string      `json:"kind,omitempty"`
	Streams      int         `json:"flows,omitempty"`
	MTU          int         `json:"mtu,omitempty"`
	BatonAddr    string      `json:"baton_addr"`
	KernelAddr   string      `json:"kernel_addr"`
	KernelGbps   []float64   `json:"kernel_gbps"`
	KernelMedian float64     `json:"kernel_median_gbps"`
	Baton        []BatonFlow `json:"baton"` // one per TUN device
	Target       float64     `json:"target_ratio"`
}

// BatonFlow is batond's single-flow figure with one TUN device.
type BatonFlow struct {
	TUN         string    `json:"tun"`
	Gbps        []float64 `json:"gbps"`
	Median      float64   `json:"median_gbps"`
	Ratio       jfloat    `json:"ratio"` // median / kernel median
	MeetsTarget bool      `json:"meets_target"`
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

// BatonConns is batond's connection-rate result with one TUN device.
type BatonConns struct {
	TUN string `json:"tun"`
	ConnSide
	Ratio jfloat `json:"ratio"` // conns/s / the kernel's
}

// ConnRate is the new-connections-per-second figure.
type ConnRate struct {
	Family  string       `json:"family"`
	Workers int          `json:"workers"`
	Baton   []BatonConns `json:"baton"`
	Kernel  ConnSide     `json:"kernel"`
}

// ProfileResult describes a CPU profile of batond.
type ProfileResult struct {
	TUN      string  `json:"tun"`
	File     string  `json:"file"`
	Seconds  float64 `json:"seconds"`
	LoadGbps float64 `json:"download_gbps_while_profiling,omitempty"`
	// Load describes the load other than a single-flow download.
	Load      string   `json:"load,omitempty"`
	TopFlat   []string `json:"top_flat,omitempty"`
	TopCum    []string `json:"top_cum,omitempty"`
	ViewHint  string   `json:"view,omitempty"`
	ToolError string   `json:"tool_error,omitempty"`
}

// roundOrder is the order of the servers in round k (0-based): the TUN
// devices in turn, reversed every other round, with the kernel after the
// first one ("water kernel offload", then "offload kernel water"), so that
// batond is restarted once per round and every server sees the others'
// conditions on both sides.
func roundOrder(tuns []string, k int) []string {
	order := append([]string(nil), tuns...)
	if k%2 == 1 {
		slices.Reverse(order)
	}
	return slices.Insert(order, 1, "kernel")
}

func bench(ctx context.Context, o benchOpts) (err error) {
	res := &Results{
		Date:    time.Now().UTC().Format(time.RFC3339),
		Machine: machineFacts(),
		Config: BenchConfig{
			Batond: o.batond, MTU: o.mtu, DurationS: o.duration.Seconds(), Runs: o.runs, Workers: o.workers,
			TUNs:      o.tuns,
			RunOrder:  "rounds of " + strings.Join(roundOrder(o.tuns, 0), ", ") + ", the TUN devices reversed every other round; batond restarted with the next device when it changes",
			Path:      "client netns -> router netns (veth, forwarding) -> node netns eth0; Baton: -> any0 TUN -> batond (gVisor); kernel: local TCP socket",
			ConnPorts: fmt.Sprintf("one new port per connection, %d..65535 in turn (no 4-tuple reused within a run below 64512 connections)", connFirstPort),
		},
	}
	res.Config.BatondRevision, res.Config.BatondGo = binaryInfo(o.batond)
	res.Crashes = []string{}
	if o.only != "" {
		res.Config.Only = o.only
	}
	printMachine(res)

	if o.only == "" || o.only == onlyKernel {
		if err := benchKernel(ctx, o, res); err != nil {
			return err
		}
	}
	if o.only == "" || o.only == onlyReplication {
		if err := benchReplication(ctx, o, res); err != nil {
			return err
		}
	}
	if o.only == "" || o.only == onlyTakeover {
		if err := benchTakeover(ctx, o, res); err != nil {
			return err
		}
	}
	if o.only == onlyProfiles {
		if err := benchProfiles(ctx, o, res); err != nil {
			return err
		}
	}

	fmt.Println()
	printResults(res)
	if o.only == "" || o.outSet {
		if err := writeJSON(o.out, res); err != nil {
			return err
		}
		fmt.Printf("\nresults written to %s\n", o.out)
	} else {
		fmt.Printf("\nresults not written (-only %s without -out)\n", o.only)
	}
	for i := range res.Profile {
		printProfile(&res.Profile[i])
	}
	if len(res.Crashes) > 0 {
		fmt.Printf("\nbatond CRASHED %d time(s) during the benchmark (restarted each time; figures are reported anyway):\n", len(res.Crashes))
		for _, c := range res.Crashes {
			fmt.Printf("    %s\n", c)
		}
		return fmt.Errorf("batond crashed %d time(s); see its logs in %s", len(res.Crashes), strings.Join(res.LogDirs, " "))
	}
	return nil
}

// benchKernel measures Baton against the kernel in a one-node lab, with
// the CPU profiles, and records the figures in res.
func benchKernel(ctx context.Context, o benchOpts, res *Results) (err error) {
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
	nd := &nodeDaemon{l: l, bin: o.batond, base: []string{"-pprof", "-mtu", strconv.Itoa(o.mtu)}, tun: o.tuns[0], crashes: []string{}}
	procs, err := startNodes(ctx, l, o.batond, nd.args()...)
	if err != nil {
		return err
	}
	nd.proc = procs[0]
	fmt.Printf("    with TUN device %s\n", nd.tun)
	defer func() {
		res.Crashes = append(res.Crashes, nd.crashes...)
		if len(nd.crashes) > 0 {
			res.LogDirs = append(res.LogDirs, l.LogDir)
		}
	}()
	node := l.Nodes[0]
	kaddrs := []netip.Addr{node.Addr4}
	if o.ipv6 {
		kaddrs = append(kaddrs, node.Addr6)
	}
	for _, ksvc := range []struct {
		port uint16
		svc  services.TCPService
	}{{streamPort, services.NewStream()}, {httpPort, services.NewHTTP(node.Name)}, {echoPort, services.NewEcho()}} {
		ks, err := startKernelServer(ctx, node, kaddrs, ksvc.port, ksvc.svc)
		if err != nil {
			return err
		}
		defer ks.Close()
		fmt.Printf("kernel %s server: %s, in %s, serving the same services code from batonlab\n", ksvc.svc.Name(), ks.Addrs(), node.Name)
	}
	fmt.Println()

	pairs := []serverPair{{"IPv4", netip.AddrPortFrom(l.Anycast4, streamPort), netip.AddrPortFrom(node.Addr4, streamPort)}}
	if o.ipv6 {
		pairs = append(pairs, serverPair{"IPv6", netip.AddrPortFrom(l.Anycast6, streamPort), netip.AddrPortFrom(node.Addr6, streamPort)})
	}
	kb := &kernelBench{o: o, l: l, nd: nd}
	for _, p := range pairs {
		sf, err := kb.throughput(ctx, SingleFlow{Family: p.family, MTU: o.mtu, Target: targetSingleFlow}, p, o.runs, kb.downloadFn())
		if err != nil {
			return err
		}
		res.Single = append(res.Single, sf)
	}
	httpPair := serverPair{"IPv4", netip.AddrPortFrom(l.Anycast4, httpPort), netip.AddrPortFrom(node.Addr4, httpPort)}
	if err := kb.flowFigures(ctx, httpPair, pairs[0], res); err != nil {
		return err
	}
	round := kb.round

	cr := &ConnRate{Family: "IPv4", Workers: o.workers}
	for _, server := range roundOrder(o.tuns, round) {
		name, addr := "kernel", pairs[0].kernel
		if server != "kernel" {
			if err := nd.use(ctx, server); err != nil {
				return err
			}
			name, addr = "baton/"+server, pairs[0].baton
		}
		r, lastPort := connLoop(ctx, l.Client, addr, o.workers, o.duration, connFirstPort)
		if err := ctx.Err(); err != nil {
			return err
		}
		tw := "ok"
		if err := twProbe(ctx, l.Client, addr, lastPort, 3*time.Second); err != nil {
			tw = err.Error()
		}
		side := ConnSide{
			Conns: r.Conns, Failures: r.Failures, PerSec: r.PerSecond(), Errors: r.Errors,
			P50ms: ms(percentile(r.Latency, 50)), P99ms: ms(percentile(r.Latency, 99)),
			TimeWaitReconnect: tw,
		}
		if server == "kernel" {
			cr.Kernel = side
		} else {
			cr.Baton = append(cr.Baton, BatonConns{TUN: server, ConnSide: side})
		}
		fmt.Printf("new connections IPv4 %-14s %-24s %8.0f conn/s (%d in %.1fs, %d failed, p50 %.2f ms, p99 %.2f ms)\n",
			name, addr, r.PerSecond(), r.Conns, r.Elapsed.Seconds(), r.Failures, side.P50ms, side.P99ms)
		for _, e := range r.Errors {
			fmt.Printf("    error: %s\n", e)
		}
		fmt.Printf("    reconnect from port %d (server side in TIME-WAIT): %s\n", lastPort, tw)
		if err := settle(ctx); err != nil {
			return err
		}
		if err := nd.check(ctx, "new connections "+name, true); err != nil {
			return err
		}
	}
	// Report the devices in -tun order.
	slices.SortStableFunc(cr.Baton, func(a, b BatonConns) int {
		return slices.Index(o.tuns, a.TUN) - slices.Index(o.tuns, b.TUN)
	})
	for i := range cr.Baton {
		cr.Baton[i].Ratio = jfloat(ratio(cr.Baton[i].PerSec, cr.Kernel.PerSec))
	}
	res.Conns = cr

	echo := serverPair{"IPv4", netip.AddrPortFrom(l.Anycast4, echoPort), netip.AddrPortFrom(node.Addr4, echoPort)}
	if res.Latency, err = kb.latency(ctx, echo); err != nil {
		return err
	}

	if o.profile > 0 && o.writes() {
		// Profile the device batond runs with first: one restart less.
		order := slices.Clone(o.tuns)
		if order[0] != nd.tun {
			slices.Reverse(order)
		}
		for i, t := range order {
			if err := nd.use(ctx, t); err != nil {
				return err
			}
			pr, err := profileBatond(ctx, l, pairs[0].baton, o, t)
			if err != nil {
				return fmt.Errorf("profile (TUN %s): %w", t, err)
			}
			res.Profile = append(res.Profile, *pr)
			if err := settle(ctx); err != nil {
				return err
			}
			if err := nd.check(ctx, "the profiled download (TUN "+t+")", i < len(order)-1); err != nil {
				return err
			}
		}
		slices.SortStableFunc(res.Profile, func(a, b ProfileResult) int {
			return slices.Index(o.tuns, a.TUN) - slices.Index(o.tuns, b.TUN)
		})
	}
	if o.bigMTU != 0 && o.bigMTU != o.mtu {
		kb.round = round
		if err := kb.bigMTUFigures(ctx, httpPair, pairs[0], o.bigMTU, res); err != nil {
			return err
		}
	}
	failed = len(nd.crashes) > 0
	return nil
}

// nodeDaemon is the benchmark's batond on node 0, running with the TUN
// device tun. use restarts it with another device; check notices a batond
// that died (say, on a client closing mid-stream), records why, and starts
// a new one so the remaining figures can still be measured.
type nodeDaemon struct {
	l       *lab.Lab
	bin     string
	base    []string // batond arguments for every device
	tun     string   // tunWater or tunOffload
	proc    *lab.Proc
	crashes []string
}

// args returns batond's extra arguments for the current device.
func (n *nodeDaemon) args() []string {
	a := slices.Clone(n.base)
	if n.tun == tunOffload {
		a = append(a, "-tun-offload")
	}
	return a
}

// use makes sure batond runs with TUN device tun, stopping it (SIGTERM)
// and starting it again with the device's arguments if needed.
func (n *nodeDaemon) use(ctx context.Context, tun string) error {
	if n.tun == tun && n.proc != nil && !n.proc.Exited() {
		return nil
	}
	if n.proc != nil && !n.proc.Exited() {
		if err := n.proc.Stop(); err != nil {
			return fmt.Errorf("stopping batond: %w", err)
		}
	}
	n.tun = tun
	p, err := n.l.StartBatond(ctx, n.bin, 0, n.args()...)
	if err != nil {
		return fmt.Errorf("starting batond with TUN %s: %w", tun, err)
	}
	n.proc = p
	fmt.Printf("    batond restarted with TUN device %s: pid %d\n", tun, p.PID())
	return nil
}

func (n *nodeDaemon) check(ctx context.Context, after string, restart bool) error {
	if !n.proc.Exited() {
		return nil
	}
	why := crashSummary(n.proc)
	n.crashes = append(n.crashes, "after "+after+" (TUN "+n.tun+"): "+why)
	fmt.Printf("WARNING: batond died after %s: %s\n    log: %s\n", after, why, n.proc.LogPath())
	if !restart {
		return nil
	}
	p, err := n.l.StartBatond(ctx, n.bin, 0, n.args()...)
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

func startKernelServer(ctx context.Context, node *lab.Node, addrs []netip.Addr, port uint16, svc services.TCPService) (*kernelServer, error) {
	ctx, cancel := context.WithCancel(ctx)
	ks := &kernelServer{cancel: cancel}
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
// next to the JSON results: <name>.cpu.pprof for the default TUN device,
// <name>.offload.cpu.pprof for the offload device.
func profileBatond(ctx context.Context, l *lab.Lab, server netip.AddrPort, o benchOpts, tun string) (*ProfileResult, error) {
	node := l.Nodes[0]
	file := strings.TrimSuffix(o.out, ".json") + ".cpu.pprof"
	if tun != tunWater {
		file = strings.TrimSuffix(o.out, ".json") + "." + tun + ".cpu.pprof"
	}
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
	fmt.Printf("profiling batond (TUN %s) for %v during a single-flow download...\n", tun, o.profile)
	secs := int(o.profile.Round(time.Second) / time.Second)
	if err := fetchProfile(ctx, node, secs, file); err != nil {
		return nil, err
	}
	d := <-dch
	if d.err != nil {
		return nil, fmt.Errorf("download while profiling: %w", d.err)
	}
	pr := &ProfileResult{TUN: tun, File: file, Seconds: float64(secs), LoadGbps: gbps(d.r.Bytes, d.r.Elapsed)}
	fmt.Printf("profile saved to %s (download ran at %.2f Gb/s meanwhile)\n", file, pr.LoadGbps)
	pr.TopFlat, pr.TopCum, pr.ViewHint, pr.ToolError = pprofTop(o.batond, file)
	return pr, nil
}

// fetchProfile fetches a CPU profile of secs seconds from the batond of
// node (/debug/pprof on the namespace's loopback, batond -pprof) and saves
// it in file.
func fetchProfile(ctx context.Context, node *lab.Node, secs int, file string) error {
	return fetchPprof(ctx, node, "profile?seconds="+strconv.Itoa(secs), file)
}

// fetchPprof saves /debug/pprof/<what> of node's batond in file.
func fetchPprof(ctx context.Context, node *lab.Node, what, file string) error {
	if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
		return err
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return node.Dial(ctx, "tcp", addr, 0)
		},
		DisableKeepAlives: true,
	}}
	url := "http://" + metricsAddr + "/debug/pprof/" + what
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(b)))
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("saving %s: %w", file, err)
	}
	return f.Close()
}
