package main

// This file is the failover part of `batonlab demo` (a cluster, unless
// -failover=false): once the downloads are past -failover-at of their
// bytes (after the half-way cluster view), the node serving the most
// unfinished flows is killed with SIGKILL. Its flows' replicas take them
// over (push, then pull-migrate when the router sends a flow to the other
// node), and the downloads finish, every byte verified. Then the demo
// prints a per-flow timeline: which node served which byte range (from
// the flows' ownership history, GetFlow, taken a few seconds after the
// kill while the flows still exist) and every stall the client saw (from
// its recording of arrivals), and writes throughput.svg (total and per
// node, the kill marked) and timeline.txt into the output directory.

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

const (
	// defaultFailoverAt is the fraction of all bytes received when the
	// node is killed (after the half-way cluster view).
	defaultFailoverAt = 0.6
	// failoverHistoryAfter is when the flows' ownership history is taken
	// after the kill.
	failoverHistoryAfter = 3 * time.Second
	// demoStall is the smallest gap listed as a stall in the timeline.
	demoStall = 50 * time.Millisecond
	// failoverWindow is where the timeline looks for the failover's
	// stall: the largest gap within it after the kill.
	failoverWindow = time.Second
	// plotStep is the plot's time resolution.
	plotStep = 250 * time.Millisecond
)

// failover is what happened when the demo killed a node.
type failover struct {
	Node     int
	PID      int
	At       time.Duration // since the downloads started
	Withdraw time.Duration // kill -> router without the node, 0 unknown
	Err      error
	// History per download index (nil: not asked, finished or unknown),
	// and the node each flow was on when the node was killed.
	History [][]*batonv1.OwnershipChange
	NodeAt  []int
}

// killBusiest kills (SIGKILL, by PID) the node serving the most
// unfinished downloads, waits for the router to drop it, then, after
// failoverHistoryAfter, takes every unfinished flow's ownership history
// from a live node.
func killBusiest(ctx context.Context, l *lab.Lab, procs []*lab.Proc, admins []*adminConn, ds []*Download, client netip.Addr, at time.Duration) *failover {
	f := &failover{At: at, Node: -1, NodeAt: make([]int, len(ds)), History: make([][]*batonv1.OwnershipChange, len(ds))}
	count := make([]int, len(l.Nodes))
	for i, d := range ds {
		f.NodeAt[i] = d.Node()
		if n := d.Node(); n >= 0 && n < len(count) && !d.Done() {
			count[n]++
		}
	}
	best := slices.Index(count, slices.Max(count))
	if count[best] == 0 {
		f.Err = fmt.Errorf("no flow in flight at %.1fs", at.Seconds())
		return f
	}
	f.Node, f.PID = best, procs[best].PID()
	var others []int
	for i := range l.Nodes {
		if i != best && !procs[i].Exited() {
			others = append(others, i)
		}
	}
	subscribed := time.Now()
	withdrawn := make(chan time.Time, 1)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	go func() {
		err := l.WaitNexthops(wctx, "ip4", others)
		t := time.Now()
		if err != nil {
			t = time.Time{}
		}
		withdrawn <- t
	}()
	time.Sleep(50 * time.Millisecond) // the watcher subscribes first
	t0 := time.Now()
	f.At += t0.Sub(subscribed)
	if err := procs[best].Kill(); err != nil {
		f.Err = err
		return f
	}
	if l.Routing != lab.RoutingBGP {
		if err := l.SetNexthops(others); err != nil {
			f.Err = err
			return f
		}
	}
	if t := <-withdrawn; !t.IsZero() {
		f.Withdraw = t.Sub(t0)
	}
	select {
	case <-ctx.Done():
		return f
	case <-time.After(failoverHistoryAfter):
	}
	asker := admins[others[0]]
	for i, d := range ds {
		if d.Done() {
			continue
		}
		hist, err := flowHistory(ctx, asker, client, d.LocalPort, d.Server)
		if err == nil {
			f.History[i] = hist
		}
	}
	return f
}

// segment is a part of a flow served by one node.
type segment struct {
	Node     string
	How      string // "open" for the first node
	From, To int64  // body byte range [From, To)
	Since    time.Duration
}

// flowSegments builds download d's byte ranges per node from its
// ownership history: each change's at_offset (server output offset,
// counted from the connection's first byte) minus the bytes before the
// body. Without a history, the flow was served by the node whoami named.
// origin is the recording's time origin.
func flowSegments(hist []*batonv1.OwnershipChange, servedBy string, bodyOffset, total int64, origin time.Time) []segment {
	segs := []segment{{Node: servedBy, How: "open", From: 0}}
	for _, h := range hist {
		if h.How == "open" || h.How == "" {
			if h.Node != "" {
				segs[0].Node = h.Node
			}
			continue
		}
		off := min(max(int64(h.AtOffset)-bodyOffset, 0), total)
		since := time.Unix(0, h.UnixNano).Sub(origin)
		last := &segs[len(segs)-1]
		if off < last.From {
			off = last.From
		}
		segs = append(segs, segment{Node: h.Node, How: h.How, From: off, Since: since})
	}
	for i := range segs {
		if i+1 < len(segs) {
			segs[i].To = segs[i+1].From
		} else {
			segs[i].To = total
		}
	}
	return segs
}

// nodeAt returns the node serving a flow at t (since origin).
func nodeAt(segs []segment, t time.Duration) string {
	n := segs[0].Node
	for _, s := range segs[1:] {
		if s.Since <= t {
			n = s.Node
		}
	}
	return n
}

// timelineLine is one flow's timeline: its byte ranges per node, the
// largest gap in the second after the kill (the failover's stall, for every flow: a
// flow that stayed put shares the cores with the takeovers), and the
// other stalls of at least demoStall.
func timelineLine(id, port int, segs []segment, rec recording, killAt time.Duration) string {
	var parts []string
	for _, s := range segs {
		p := fmt.Sprintf("%s %s..%s", s.Node, fmtMB(s.From), fmtMB(s.To))
		if s.How != "open" {
			p = fmt.Sprintf("%s (%s at %.2fs)", p, s.How, s.Since.Seconds())
		}
		parts = append(parts, p)
	}
	line := fmt.Sprintf("flow %2d port %d: %s", id, port, strings.Join(parts, " | "))
	end := rec.Last + time.Nanosecond
	if rec.Last < killAt {
		return line + fmt.Sprintf("\n        finished at %.2fs, before the kill; %s", rec.Last.Seconds(), otherStalls(rec.gapsIn(0, end, demoStall)))
	}
	fs := rec.largestGap(killAt, min(end, killAt+failoverWindow))
	var others []gap
	for _, g := range rec.gapsIn(0, end, demoStall) {
		if g != fs {
			others = append(others, g)
		}
	}
	return line + fmt.Sprintf("\n        stall at the failover: %.0f ms at %s (%.2fs..%.2fs); %s",
		ms(fs.Len()), fmtMB(fs.Offset), fs.From.Seconds(), fs.To.Seconds(), otherStalls(others))
}

// otherStalls summarises stalls: how many, the largest.
func otherStalls(gs []gap) string {
	if len(gs) == 0 {
		return fmt.Sprintf("no other stall >= %.0f ms", ms(demoStall))
	}
	big := gs[0]
	for _, g := range gs {
		if g.Len() > big.Len() {
			big = g
		}
	}
	return fmt.Sprintf("%d other stall(s) >= %.0f ms, the largest %.0f ms at %s (%.2fs)",
		len(gs), ms(demoStall), ms(big.Len()), fmtMB(big.Offset), big.From.Seconds())
}

// fmtMB prints a byte offset in MB with one decimal.
func fmtMB(n int64) string { return fmt.Sprintf("%.1fMB", float64(n)/1e6) }

// throughputSeries sums the recordings into plotStep steps: the total and
// one series per node, each flow's bytes going to the node serving it at
// the time (node(i, t)).
func throughputSeries(recs []recording, nodes []string, node func(i int, t time.Duration) string) []plotSeries {
	end := time.Duration(0)
	for _, r := range recs {
		end = max(end, time.Duration(len(r.Bins))*r.Bin)
	}
	steps := int((end + plotStep - 1) / plotStep)
	total := make([]float64, steps)
	per := make([][]float64, len(nodes))
	for j := range per {
		per[j] = make([]float64, steps)
	}
	for i, r := range recs {
		for b, n := range r.Bins {
			t := time.Duration(b) * r.Bin
			k := int(t / plotStep)
			if k >= steps {
				continue
			}
			v := float64(n) / 1e6 / plotStep.Seconds()
			total[k] += v
			if j := slices.Index(nodes, node(i, t)); j >= 0 {
				per[j][k] += v
			}
		}
	}
	colors := []string{"#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"}
	out := []plotSeries{{Name: "all flows", Color: "black", Values: total, Width: 2.5}}
	for j, n := range nodes {
		out = append(out, plotSeries{Name: "served by " + n, Color: colors[j%len(colors)], Values: per[j]})
	}
	return out
}

// failoverReport prints the failover summary and the per-flow timeline,
// writes the plot and the timeline into dir, and tells whether every flow
// of the killed node finished verified.
func failoverReport(f *failover, ds []*Download, origin time.Time, nodes int, dir string) bool {
	fmt.Println()
	if f == nil {
		fmt.Println("FAILED: failover: the downloads ended before the kill point (progress is sampled every second); use a larger -size")
		return false
	}
	if f.Err != nil {
		fmt.Printf("FAILED: failover: %v\n", f.Err)
		return false
	}
	victim := lab.NodeName(f.Node)
	moved, movedOK, rehashed := 0, 0, 0
	var stalls []time.Duration
	var b strings.Builder
	recs := make([]recording, len(ds))
	segs := make([][]segment, len(ds))
	for i, d := range ds {
		recs[i] = d.Rec.snapshot()
		segs[i] = flowSegments(f.History[i], d.ServedBy, d.BodyOffset, d.Received(), origin)
		onVictim := f.NodeAt[i] == f.Node && f.History[i] != nil
		if onVictim {
			moved++
			if d.Verified {
				movedOK++
			}
			stalls = append(stalls, recs[i].largestGap(f.At, min(recs[i].Last+time.Nanosecond, f.At+failoverWindow)).Len())
		}
		if !onVictim && len(segs[i]) > 1 {
			rehashed++
		}
		fmt.Fprintln(&b, timelineLine(d.ID, d.LocalPort, segs[i], recs[i], f.At))
	}
	slices.Sort(stalls)
	withdraw := "?"
	if f.Withdraw > 0 {
		withdraw = fmt.Sprintf("%.1f ms", ms(f.Withdraw))
	}
	fmt.Printf("failover: kill -9 of %s (pid %d) at %.1fs with %d flow(s) in flight on it; the router dropped it %s later\n",
		victim, f.PID, f.At.Seconds(), moved, withdraw)
	fmt.Printf("per-flow timeline (node: body bytes served; how it got the flow, when; the gaps the client saw; times since the downloads started):\n")
	fmt.Print(b.String())

	ok := moved > 0 && movedOK == moved
	verdict := "OK"
	if !ok {
		verdict = "FAILED"
	}
	d := newDist(stalls)
	fmt.Printf("%s: failover: %d/%d flows of %s taken over and verified byte by byte and by SHA-256; their largest stall in the second after the kill p50 %.0f ms, max %.0f ms\n",
		verdict, movedOK, moved, victim, d.P50, d.Max)
	if rehashed > 0 {
		fmt.Printf("    and %d flow(s) of live nodes moved too: the router's hash-threshold ECMP remaps part of the hash space when a nexthop goes; they were claimed live (pull-migrate)\n", rehashed)
	}

	// The plot and the timeline file.
	names := make([]string, nodes)
	for i := range names {
		names[i] = lab.NodeName(i)
	}
	series := throughputSeries(recs, names, func(i int, t time.Duration) string { return nodeAt(segs[i], t) })
	markers := []plotMarker{{At: f.At, Label: "kill -9 " + victim, Color: "red"}}
	svg := plotSVG(plotSpec{
		Title:  fmt.Sprintf("batonlab demo: %d downloads over %d nodes, %s killed at %.1fs", len(ds), nodes, victim, f.At.Seconds()),
		YLabel: "MB/s (received by the client)", Step: plotStep, Series: series, Markers: markers,
	})
	if err := os.MkdirAll(dir, 0o755); err != nil {
		fmt.Printf("FAILED: output directory: %v\n", err)
		return false
	}
	svgPath, txtPath := filepath.Join(dir, "throughput.svg"), filepath.Join(dir, "timeline.txt")
	if err := os.WriteFile(svgPath, []byte(svg), 0o644); err != nil {
		fmt.Printf("FAILED: %v\n", err)
		return false
	}
	if err := os.WriteFile(txtPath, []byte(b.String()), 0o644); err != nil {
		fmt.Printf("FAILED: %v\n", err)
		return false
	}
	fmt.Printf("throughput over time (the kill marked): %s\ntimeline: %s\n", svgPath, txtPath)
	return ok
}
