package main

// This file is `batonlab demo`: N batond nodes behind an ECMP router, F
// concurrent verified downloads from the client, each on its own TCP
// connection and source port, each checked to land on the node the router's
// hash predicts. The nodes run as a cluster (unless -standalone): every
// flow's state is replicated to 2 other nodes, which the demo checks
// through the nodes' admin APIs half-way through the downloads
// (cluster.go); then, past -failover-at of the bytes, it kills the node
// serving the most flows and shows them taken over (demo_failover.go).

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
)

// Demo defaults: 12 flows x 250 MB = 3 GB over 3 nodes. On a 2-core machine
// (AMD EPYC, kernel 6.18) the three batond processes, the kernel's
// forwarding and the client's verification share the two cores. Standalone
// (-standalone) they move 120-140 MB/s in total (one flow alone through one
// node: about 75 MB/s, verified): the transfer takes 21-25 s (200 MB per
// flow took 17-19 s). As a cluster (the default) every node also
// replicates its flows' state to 2 others, some 12-13k events/s and ~125 MB
// over the peer links for the 3 GB, on the same cores: 83-100 MB/s, 30-36 s.
// Use -size to scale it.
const (
	defaultDemoNodes = 3
	defaultDemoFlows = 12
	defaultDemoSize  = 250e6

	// demoFirstPort is the first source port tried. Ports below the
	// kernel's ephemeral range cannot collide with other client sockets.
	demoFirstPort = 20001
	httpPort      = 80
)

type demoOpts struct {
	batond string
	nodes  int
	flows  int
	size   uint64
	ipv6   bool
	// standalone runs the nodes without the peer network (no
	// replication).
	standalone bool
	// failover kills the busiest node at failoverAt of the bytes (a
	// cluster only); outDir receives the plot and the timeline.
	failover   bool
	failoverAt float64
	outDir     string
}

func parseDemoArgs(args []string) (demoOpts, *flag.FlagSet, error) {
	o := demoOpts{}
	fs := newFlagSet("demo")
	size := sizeFlag(defaultDemoSize)
	fs.StringVar(&o.batond, "batond", defaultBatond(), "batond binary")
	fs.IntVar(&o.nodes, "nodes", defaultDemoNodes, "anycast nodes (1.."+fmt.Sprint(lab.MaxNodes)+")")
	fs.IntVar(&o.flows, "flows", defaultDemoFlows, "concurrent downloads, one TCP connection and source port each (1..1000)")
	fs.Var(&size, "size", "bytes per download (e.g. 100MB, 1GiB)")
	fs.BoolVar(&o.ipv6, "v6", false, "download over IPv6 (2001:db8:a::1) instead of IPv4 (192.0.2.1)")
	fs.BoolVar(&o.standalone, "standalone", false, "run the nodes without the peer network (no replication; by default they form a cluster with 2 replicas per flow)")
	fs.BoolVar(&o.failover, "failover", true, "kill -9 the node serving the most flows mid-transfer (cluster only), then print each flow's timeline and plot the throughput")
	fs.Float64Var(&o.failoverAt, "failover-at", defaultFailoverAt, "fraction of all bytes received when the node is killed (after the half-way cluster view)")
	fs.StringVar(&o.outDir, "out", "", "directory for the failover's throughput.svg and timeline.txt (default: $TMPDIR/batonlab-demo-<lab name>)")
	h := fs
	if err := parseFlags(fs, args); err != nil {
		return o, h, err
	}
	o.size = uint64(size)
	switch {
	case o.nodes < 1 || o.nodes > lab.MaxNodes:
		return o, h, fmt.Errorf("-nodes: %d out of range 1..%d", o.nodes, lab.MaxNodes)
	case o.flows < 1 || o.flows > 1000:
		return o, h, fmt.Errorf("-flows: %d out of range 1..1000", o.flows)
	case o.size > 1<<40:
		return o, h, fmt.Errorf("-size: %s exceeds the server's limit of 1TiB", formatSize(o.size))
	case o.batond == "":
		return o, h, errors.New("-batond: empty path")
	case o.failoverAt < 0.5 || o.failoverAt >= 1:
		return o, h, fmt.Errorf("-failover-at: %v out of range 0.5..1 (the cluster view is taken at half-way)", o.failoverAt)
	}
	if o.standalone || o.nodes < 2 {
		o.failover = false
	}
	return o, h, nil
}

func runDemo(args []string) int {
	o, h, err := parseDemoArgs(args)
	if err != nil {
		return usageResult(h, "demo", err)
	}
	if reportMissing("demo", checkPrereqs(o.batond)) {
		return exitFailure
	}
	ctx, stop := signalContext("demo")
	defer stop()
	ok, err := demo(ctx, o)
	if err != nil {
		return failed(ctx, "demo", err)
	}
	if !ok {
		return exitFailure
	}
	return exitOK
}

func demo(ctx context.Context, o demoOpts) (ok bool, err error) {
	family, server := "IPv4", netip.AddrPortFrom(lab.Anycast4, httpPort)
	if o.ipv6 {
		family, server = "IPv6", netip.AddrPortFrom(lab.Anycast6, httpPort)
	}
	fmt.Printf("batonlab demo: %d nodes, %d flows x %s over %s to http://%s\n",
		o.nodes, o.flows, formatSize(o.size), family, server)
	t0 := time.Now()
	l, err := newLab(ctx, o.nodes, true)
	if err != nil {
		return false, err
	}
	defer func() {
		if cerr := closeLab(l, !ok); cerr != nil && err == nil {
			err = cerr
		}
	}()
	k := 0
	if !o.standalone {
		if k, err = startCluster(l); err != nil {
			return false, err
		}
	}
	procs, err := startNodes(ctx, l, o.batond)
	if err != nil {
		return false, err
	}
	var admins []*adminConn
	if k > 0 {
		if admins, err = connectCluster(ctx, l); err != nil {
			return false, err
		}
		defer closeAdmins(admins)
	}
	clientAddr := l.ClientAddr4
	if o.ipv6 {
		clientAddr = l.ClientAddr6
	}
	predict := func(port int) (int, error) {
		return l.PredictNode(netip.AddrPortFrom(clientAddr, uint16(port)), server)
	}
	ports, pred, err := choosePorts(o.flows, o.nodes, demoFirstPort, 20000, predict)
	if err != nil {
		return false, fmt.Errorf("choosing source ports: %w", err)
	}
	fmt.Printf("lab ready in %.1fs. Source ports %d..%d, picked so that the router's ECMP hash (predicted with lab.PredictNode) spreads the flows evenly\n",
		time.Since(t0).Seconds(), ports[0], ports[len(ports)-1])

	ds := make([]*Download, o.flows)
	start := time.Now()
	for i := range ds {
		ds[i] = &Download{
			ID: i + 1, Server: server, LocalPort: ports[i], Size: o.size,
			Seed: uint64(ports[i]), Predicted: pred[i], Nodes: o.nodes,
			Rec: newFlowRecorder(start),
		}
	}
	done := make(chan struct{})
	go func() {
		runDownloads(ctx, l.Client, ds)
		close(done)
	}()
	// Half-way through, ask the nodes which flows they own and replicate.
	var view *clusterView
	viewDone := make(chan struct{})
	viewStarted := false
	var onHalf func(time.Duration)
	if k > 0 {
		onHalf = func(at time.Duration) {
			viewStarted = true
			go func() {
				defer close(viewDone)
				view = takeClusterView(ctx, admins, ds, k, clientAddr, at)
			}()
		}
	}
	// Past -failover-at, kill the busiest node (after the view).
	var fo *failover
	foDone := make(chan struct{})
	foStarted := false
	var onFail func(time.Duration)
	if o.failover && k > 0 {
		onFail = func(at time.Duration) {
			foStarted = true
			go func() {
				defer close(foDone)
				if viewStarted {
					<-viewDone
				}
				fo = killBusiest(ctx, l, procs, admins, ds, clientAddr, time.Since(start))
			}()
		}
	}
	showProgress(ds, o.nodes, done, onHalf, o.failoverAt, onFail)
	wall := time.Since(start)
	if viewStarted {
		<-viewDone
	}
	if foStarted {
		<-foDone
	}

	fmt.Println()
	if ctx.Err() != nil {
		var got int64
		for _, d := range ds {
			got += d.Received()
		}
		fmt.Printf("interrupted after %.1fs, %s received; no report\n", wall.Seconds(), formatSize(uint64(got)))
		return false, ctx.Err()
	}
	ok = report(ds, o.nodes, wall, view)
	if k > 0 {
		if viewStarted {
			ok = replicationSummary(view, ds, listAllPeers(ctx, admins), wall) && ok
		} else {
			fmt.Println("replication: the downloads ended before half-way was sampled (progress is sampled every second): no cluster view; use a larger -size")
		}
	}
	if o.failover && k > 0 {
		dir := o.outDir
		if dir == "" {
			dir = filepath.Join(os.TempDir(), "batonlab-demo-"+l.Name)
		}
		ok = failoverReport(fo, ds, start, o.nodes, dir) && ok
	}
	for i, p := range procs {
		if fo != nil && i == fo.Node {
			continue // killed on purpose
		}
		if p.Exited() {
			fmt.Printf("FAILED: batond %s died during the demo: %s (log %s)\n", lab.NodeName(i), crashSummary(p), p.LogPath())
			ok = false
		}
	}
	return ok, nil
}

// showProgress prints one line per second until done is closed: total and
// per-node MB/s, flows finished and bytes so far. On a terminal the line is
// rewritten in place. onHalf, if not nil, is called once, on the first
// tick with at least half of the bytes received, with the time since the
// start.
func showProgress(ds []*Download, nodes int, done <-chan struct{}, onHalf func(time.Duration), failAt float64, onFail func(time.Duration)) {
	tty := isTerminal(os.Stdout)
	tl := newTimeline(ds)
	var want uint64
	for _, d := range ds {
		want += d.Size
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-done:
			if tty {
				fmt.Println()
			}
			return
		case <-tick.C:
		}
		s := tl.Take()
		total, per := tl.Rates(nodes)
		var got int64
		for _, b := range s.Bytes {
			got += b
		}
		if onHalf != nil && uint64(got) >= want/2 {
			onHalf(s.At)
			onHalf = nil
		}
		if onFail != nil && float64(got) >= failAt*float64(want) {
			onFail(s.At)
			onFail = nil
		}
		finished := 0
		for _, d := range ds {
			if d.Done() {
				finished++
			}
		}
		var b strings.Builder
		fmt.Fprintf(&b, "[%3.0fs] %7.1f MB/s |", s.At.Seconds(), total)
		for i, r := range per {
			fmt.Fprintf(&b, " %s %6.1f", lab.NodeName(i), r)
		}
		fmt.Fprintf(&b, " | %d/%d flows done, %s of %s", finished, len(ds), formatSize(uint64(got)), formatSize(want))
		if tty {
			fmt.Printf("\r%s\x1b[K", b.String())
		} else {
			fmt.Println(b.String())
		}
	}
}

// report prints the per-flow table and the per-node summary and tells
// whether every flow was verified and served by its predicted node. With a
// cluster view, the table shows each flow's replicas as its owner listed
// them then (replicationSummary judges them).
func report(ds []*Download, nodes int, wall time.Duration, view *clusterView) bool {
	head := []string{"flow", "client port", "predicted", "served by"}
	if view != nil {
		head = append(head, fmt.Sprintf("replicas at %.0fs", view.At.Seconds()))
	}
	head = append(head, "bytes", "MB/s", "verified")
	t := newTable(head...).alignRight(0, 1, len(head)-3, len(head)-2)
	type agg struct {
		flows       int
		bytes       int64
		first, last time.Time
	}
	per := make([]agg, nodes)
	var failed, misrouted int
	var total int64
	for i, d := range ds {
		predicted := "?"
		if d.Predicted >= 0 {
			predicted = lab.NodeName(d.Predicted)
		}
		served := d.ServedBy
		if served == "" {
			served = "-"
		}
		verified := "ok"
		if !d.Verified {
			verified = "FAILED"
			failed++
		}
		if d.ServedBy != "" && d.Node() != d.Predicted {
			verified += " (not the predicted node)"
			misrouted++
		}
		cells := []string{fmt.Sprint(d.ID), fmt.Sprint(d.LocalPort), predicted, served}
		if view != nil {
			cells = append(cells, replicaCell(view, i, d))
		}
		t.add(append(cells, fmt.Sprint(d.Received()), fmtFloat(mbps(d.Received(), d.Elapsed()), 1), verified)...)
		total += d.Received()
		if n := d.Node(); n >= 0 && n < nodes {
			a := &per[n]
			a.flows++
			a.bytes += d.Received()
			if !d.BodyStart.IsZero() && (a.first.IsZero() || d.BodyStart.Before(a.first)) {
				a.first = d.BodyStart
			}
			if d.End.After(a.last) {
				a.last = d.End
			}
		}
	}
	fmt.Print(t.String())
	fmt.Println()

	nt := newTable("node", "flows", "bytes", "MB/s").alignRight(1, 2, 3)
	for i, a := range per {
		nt.add(lab.NodeName(i), fmt.Sprint(a.flows), fmt.Sprint(a.bytes), fmtFloat(mbps(a.bytes, a.last.Sub(a.first)), 1))
	}
	nt.add("all", fmt.Sprint(len(ds)), fmt.Sprint(total), fmtFloat(mbps(total, wall), 1))
	fmt.Print(nt.String())
	fmt.Println("(node MB/s: its bytes over the time from its first flow's start to its last flow's end)")
	fmt.Println()

	for _, d := range ds {
		if d.Err != nil {
			fmt.Printf("flow %d (port %d): %v\n", d.ID, d.LocalPort, d.Err)
		}
	}
	if failed == 0 && misrouted == 0 {
		fmt.Printf("OK: %d/%d flows verified byte by byte and by SHA-256, each served by the node ECMP was predicted to pick; %s in %.1fs\n",
			len(ds), len(ds), formatSize(uint64(total)), wall.Seconds())
		return true
	}
	fmt.Printf("FAILED: %d flow(s) not verified, %d served by a node other than predicted\n", failed, misrouted)
	return false
}

// replicaCell is download i's replicas in the report: the nodes its owner
// listed, and what is wrong with them if anything.
func replicaCell(v *clusterView, i int, d *Download) string {
	if v.Err != nil {
		return "?"
	}
	if !v.InFlight[i] {
		return "- (not in flight)"
	}
	replicas, problem := v.check(i, d)
	cell := strings.Join(replicas, " ")
	if cell == "" {
		cell = "-"
	}
	if problem != "" {
		cell += " (FAILED: " + problem + ")"
	}
	return cell
}
