package main

// This file reports `batonlab bench`: machine facts, the results table, the
// JSON file and the profile's top functions.

import (
	"bufio"
	"bytes"
	"context"
	"debug/buildinfo"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Machine describes where the figures were taken.
type Machine struct {
	CPU      string `json:"cpu"`
	Cores    int    `json:"cores"`
	Kernel   string `json:"kernel"`
	Go       string `json:"go"` // batonlab's, which also runs the kernel-side server
	Hostname string `json:"hostname,omitempty"`
}

// jfloat is a float64 that encodes NaN and infinities as JSON null.
type jfloat float64

func (f jfloat) MarshalJSON() ([]byte, error) {
	x := float64(f)
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return []byte("null"), nil
	}
	return json.Marshal(x)
}

func machineFacts() Machine {
	m := Machine{CPU: cpuModel(), Cores: runtime.NumCPU(), Go: runtime.Version()}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	m.Hostname, _ = os.Hostname()
	return m
}

// cpuModel returns the first "model name" of /proc/cpuinfo.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// binaryInfo returns the VCS revision (with "+dirty" for modified trees)
// and the Go version batond was built with, if recorded.
func binaryInfo(path string) (rev, goVersion string) {
	bi, err := buildinfo.ReadFile(path)
	if err != nil {
		return "", ""
	}
	dirty := false
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if rev != "" && dirty {
		rev += "+dirty"
	}
	return rev, bi.GoVersion
}

func printMachine(r *Results) {
	m := r.Machine
	fmt.Printf("batonlab bench: %s, %d cores, Linux %s, %s, MTU %d, %v per run, %d runs per server\n",
		m.CPU, m.Cores, m.Kernel, m.Go, r.Config.MTU, time.Duration(r.Config.DurationS*float64(time.Second)), r.Config.Runs)
	if r.Config.BatondRevision != "" || r.Config.BatondGo != "" {
		fmt.Printf("batond %s (revision %s, %s)\n", r.Config.Batond, orDash(r.Config.BatondRevision), orDash(r.Config.BatondGo))
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// printResults prints the summary table, then the takeover table.
func printResults(r *Results) {
	if r.Takeover != nil {
		defer func() {
			if r.Config.Only != onlyTakeover {
				fmt.Println()
			}
			printTakeover(r.Takeover)
		}()
	}
	if r.Config.Only == onlyTakeover {
		fmt.Printf("machine: %s, %d cores, Linux %s, %s; batond crashes (must be 0): %d\n\n", r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel, r.Machine.Go, len(r.Crashes))
		return
	}
	t := resultsTable(r)
	m := r.Machine
	if r.Config.Only != onlyReplication {
		fmt.Printf("Baton (TUN device: %s) vs Linux kernel, same path (client -> router -> node), same stream service code\n",
			strings.Join(r.Config.TUNs, ", "))
	}
	if r.Replication != nil {
		fmt.Printf("Replication: one node serving every connection, with its flows replicated to 2 peers vs the same node without replication (TUN device %s)\n",
			r.Replication.TUN)
	}
	fmt.Printf("machine: %s, %d cores, Linux %s, %s; MTU %d\n\n", m.CPU, m.Cores, m.Kernel, m.Go, r.Config.MTU)
	fmt.Print(t.String())
}

// resultsTable builds the summary table: the figure, batond with each TUN
// device, the kernel, the ratio of each device to the kernel, the target;
// then the replication figures under their own sub-header (with
// replication, without, ratio, target). With -only replication the table
// has the replication figures alone.
func resultsTable(r *Results) *table {
	if r.Config.Only == onlyReplication {
		head := replHeader(1)
		t := newTable(head...).alignRight(1, 2, 3)
		if rr := r.Replication; rr != nil {
			addReplRows(t, rr, 1)
		}
		if m := r.Memory; m != nil {
			addMemRows(t, m, 1)
		}
		t.add("batond crashes (must be 0)", fmt.Sprint(len(r.Crashes)))
		return t
	}
	tuns := r.Config.TUNs
	head := []string{"figure"}
	for _, t := range tuns {
		head = append(head, "baton "+t)
	}
	head = append(head, "kernel")
	for _, t := range tuns {
		head = append(head, t+"/kernel")
	}
	head = append(head, "target")
	right := make([]int, 0, 2*len(tuns)+1)
	for i := 1; i <= 2*len(tuns)+1; i++ {
		right = append(right, i)
	}
	t := newTable(head...).alignRight(right...)
	// row adds a figure: one cell per device, the kernel's, one ratio per
	// device, the target.
	row := func(figure string, baton []string, kernel string, ratios []string, target string) {
		cells := append([]string{figure}, pad(baton, len(tuns))...)
		cells = append(cells, kernel)
		cells = append(cells, pad(ratios, len(tuns))...)
		t.add(append(cells, target)...)
	}
	for _, s := range append(slices.Clone(r.Single), r.Flows...) {
		var baton, ratios, runs, verdicts []string
		for _, b := range s.Baton {
			baton = append(baton, fmtFloat(b.Median, 2))
			ratios = append(ratios, fmtRatio(float64(b.Ratio)))
			runs = append(runs, joinFloats(b.Gbps, 2))
			v := "met"
			if !b.MeetsTarget {
				v = "MISSED"
			}
			verdicts = append(verdicts, b.TUN+" "+v)
		}
		target := fmt.Sprintf(">= %.1fx: %s", s.Target, strings.Join(verdicts, ", "))
		if s.Target == 0 {
			target = "-"
		} else if s.MTU == 0 && r.Config.MTU != 1500 {
			target += " (target is for MTU 1500)"
		}
		row(figureName(s, r.Config.MTU), baton, fmtFloat(s.KernelMedian, 2), ratios, target)
		row("  runs", runs, joinFloats(s.KernelGbps, 2), nil, "")
	}
	if c := r.Conns; c != nil {
		var rate, ratios, failed, tw, lat []string
		for _, b := range c.Baton {
			rate = append(rate, fmtFloat(b.PerSec, 0))
			ratios = append(ratios, fmtRatio(float64(b.Ratio)))
			failed = append(failed, fmt.Sprint(b.Failures))
			tw = append(tw, okOrFailed(b.TimeWaitReconnect))
			lat = append(lat, fmtFloat(b.P50ms, 2)+" / "+fmtFloat(b.P99ms, 2))
		}
		k := c.Kernel
		row(fmt.Sprintf("new connections/s %s (%d workers)", c.Family, c.Workers), rate, fmtFloat(k.PerSec, 0), ratios, "-")
		row("  failed connections (must be 0)", failed, fmt.Sprint(k.Failures), nil, "")
		row("  reconnect from a port in server TIME-WAIT", tw, okOrFailed(k.TimeWaitReconnect), nil, "")
		row("  exchange latency p50 / p99, ms", lat, fmtFloat(k.P50ms, 2)+" / "+fmtFloat(k.P99ms, 2), nil, "")
	}
	if lt := r.Latency; lt != nil {
		var p50, p99, ratios []string
		for _, b := range lt.Baton {
			p50 = append(p50, fmtFloat(b.P50, 0))
			p99 = append(p99, fmtFloat(b.P99, 0))
			ratios = append(ratios, fmtRatio(float64(b.Ratio)))
		}
		row(fmt.Sprintf("request/response %d B %s, p50 µs (median of %d; ratio: higher is slower)", lt.Size, lt.Family, len(lt.Kernel.P50us)),
			p50, fmtFloat(lt.Kernel.P50, 0), ratios, "-")
		row("  p99 µs", p99, fmtFloat(lt.Kernel.P99, 0), nil, "")
	}
	crashes := make([]string, len(tuns))
	for i, tun := range tuns {
		n := 0
		for _, c := range r.Crashes {
			if strings.Contains(c, "(TUN "+tun+")") {
				n++
			}
		}
		crashes[i] = fmt.Sprint(n)
	}
	row("batond crashes (must be 0)", crashes, "", nil, "")
	if rr := r.Replication; rr != nil {
		t.section(replHeader(len(tuns))...)
		addReplRows(t, rr, len(tuns))
	}
	if m := r.Memory; m != nil {
		addMemRows(t, m, len(tuns))
	}
	return t
}

// replCells places a replication row in a table laid out for n TUN
// devices: figure, with replication under the first device, without under
// the kernel, the ratio under the first device's ratio, the target last.
func replCells(n int, figure, with, without, ratio, target string) []string {
	cells := make([]string, 2*n+3)
	cells[0], cells[1], cells[n+1], cells[n+2], cells[2*n+2] = figure, with, without, ratio, target
	return cells
}

func replHeader(n int) []string {
	return replCells(n, "replication (3 nodes, every flow on n1, replicas n2 n3; TUN water)",
		"with 2 replicas", "without", "with/without", "target")
}

// addReplRows adds the replication figures to t (laid out for n devices).
func addReplRows(t *table, rr *ReplResults, n int) {
	row := func(figure, with, without, ratio, target string) {
		t.add(replCells(n, figure, with, without, ratio, target)...)
	}
	if c := rr.Conns; c != nil {
		var runsW, runsWo, p50W, p50Wo, p99W, p99Wo, cpuOW, cpuXW, cpuOWo, cpuXWo []float64
		var failW, failWo int64
		var openMin, hs, rej, drop uint64
		for i := range c.Runs {
			run := &c.Runs[i]
			own, oth := run.cpuPerConn()
			if run.Replication {
				runsW, p50W, p99W = append(runsW, run.PerSec), append(p50W, run.P50ms), append(p99W, run.P99ms)
				cpuOW, cpuXW = append(cpuOW, own), append(cpuXW, oth)
				failW += run.Failures
				openMin += run.replicated()
				hs += run.Handshakes
				rej += run.Rejected
				drop += run.Dropped
			} else {
				runsWo, p50Wo, p99Wo = append(runsWo, run.PerSec), append(p50Wo, run.P50ms), append(p99Wo, run.P99ms)
				cpuOWo, cpuXWo = append(cpuOWo, own), append(cpuXWo, oth)
				failWo += run.Failures
			}
		}
		v := "met"
		if !c.MeetsTarget {
			v = "MISSED"
		}
		row(fmt.Sprintf("new connections/s %s via n1 (%d workers, median of %d)", c.Family, c.Workers, len(runsW)),
			fmtFloat(c.WithMedian, 0), fmtFloat(c.WithoutMedian, 0), fmtRatio(float64(c.Ratio)),
			fmt.Sprintf(">= %.1fx: %s", c.Target, v))
		row("  runs", joinFloats(runsW, 0), joinFloats(runsWo, 0), "", "")
		row("  failed connections (must be 0)", fmt.Sprint(failW), fmt.Sprint(failWo), "", "")
		row("  exchange latency p50 / p99, ms (median)", fmtFloat(median(p50W), 2)+" / "+fmtFloat(median(p99W), 2),
			fmtFloat(median(p50Wo), 2)+" / "+fmtFloat(median(p99Wo), 2), "", "")
		pct := "-"
		if hs > 0 {
			pct = fmt.Sprintf("%.0f%%", 100*float64(openMin)/float64(hs))
		}
		row("  flows sent to both replicas / handshakes, all runs", fmt.Sprintf("%d / %d (%s)", openMin, hs, pct), "-", "", "")
		row("  replication events rejected / dropped (must be 0)", fmt.Sprintf("%d / %d", rej, drop), "-", "", "")
		row("  batond CPU per connection, µs: n1 / n2+n3 (median)",
			fmtFloat(median(cpuOW), 0)+" / "+fmtFloat(median(cpuXW), 0), fmtFloat(median(cpuOWo), 0)+" / "+fmtFloat(median(cpuXWo), 0), "", "")
	}
	if v := rr.Visible; v != nil {
		verdict := "met"
		if !v.MeetsTarget {
			verdict = "MISSED"
		}
		d := func(x Dist) string {
			return fmtFloat(x.P50, 2) + " / " + fmtFloat(x.P90, 2) + " / " + fmtFloat(x.P99, 2) + " / " + fmtFloat(x.Max, 2)
		}
		row("new flow on both replicas after connect(), ms, p50 / p90 / p99 / max", d(v.BothMs), "-", "",
			fmt.Sprintf("p99 <= %.0f ms: %s", v.Target, verdict))
		row("  flows seen on both replicas (within 2 s)", fmt.Sprintf("%d/%d", v.Seen, v.Flows), "", "", "")
		row("  on the first replica, ms", d(v.FirstMs), "", "", "")
		row("  one poll (GetFlow RPC: the resolution), ms", d(v.PollMs), "", "", "")
		row("  owner-side ack lag p99, n1 -> n2 / n3 (ListPeers), ms",
			fmtFloat(v.AckLagP99ms["n2"], 2)+" / "+fmtFloat(v.AckLagP99ms["n3"], 2), "", "", "")
	}
}

// pad extends cells to n cells with empty ones.
func pad(cells []string, n int) []string {
	for len(cells) < n {
		cells = append(cells, "")
	}
	return cells
}

func okOrFailed(s string) string {
	if s == "ok" {
		return "ok"
	}
	return "FAILED"
}

func joinFloats(xs []float64, prec int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmtFloat(x, prec)
	}
	return strings.Join(s, " ")
}

func writeJSON(path string, r *Results) error {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, b.Bytes(), 0o644)
}

// pprofTop runs `go tool pprof -top` on the profile, sorted by flat and by
// cumulative time, and returns the lines; without `go` on PATH it returns
// how to view the profile instead.
func pprofTop(bin, profile string) (flat, cum []string, hint, toolErr string) {
	hint = "go tool pprof -top " + bin + " " + profile + "   (or -http=:8080 for a browser view)"
	goBin, err := exec.LookPath("go")
	if err != nil {
		return nil, nil, hint, "go not on PATH"
	}
	run := func(extra ...string) ([]string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		args := append([]string{"tool", "pprof", "-top", "-nodecount=15"}, extra...)
		args = append(args, bin, profile)
		var stdout, stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, goBin, args...)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("%v: %s", err, strings.TrimSpace(stderr.String()))
		}
		var lines []string
		for _, l := range strings.Split(strings.TrimRight(stdout.String(), "\n"), "\n") {
			// Drop the header lines that repeat the file's identity.
			if !strings.HasPrefix(l, "File: ") && !strings.HasPrefix(l, "Build ID: ") &&
				!strings.HasPrefix(l, "Type: ") && !strings.HasPrefix(l, "Time: ") {
				lines = append(lines, l)
			}
		}
		return lines, nil
	}
	if flat, err = run(); err != nil {
		return nil, nil, hint, err.Error()
	}
	if cum, err = run("-cum"); err != nil {
		return flat, nil, hint, err.Error()
	}
	return flat, cum, hint, ""
}

func printProfile(p *ProfileResult) {
	load := fmt.Sprintf("during a single-flow download at %.2f Gb/s", p.LoadGbps)
	if p.Load != "" {
		load = p.Load
	}
	fmt.Printf("\nbatond CPU profile, TUN device %s (%.0fs %s): %s\n", p.TUN, p.Seconds, load, p.File)
	if p.ToolError != "" {
		fmt.Printf("could not summarise it (%s); view it with:\n    %s\n", p.ToolError, p.ViewHint)
		return
	}
	fmt.Println("\ntop 15 by flat time:")
	for _, l := range p.TopFlat {
		fmt.Println("    " + l)
	}
	fmt.Println("\ntop 15 by cumulative time:")
	for _, l := range p.TopCum {
		fmt.Println("    " + l)
	}
	fmt.Printf("\nview it with: %s\n", p.ViewHint)
}

// figureName names a throughput row of the table.
func figureName(s SingleFlow, mtu int) string {
	what := "single-flow download"
	switch {
	case s.Kind == kindUpload:
		what = "single-flow upload"
	case s.Streams > 1:
		what = strconv.Itoa(s.Streams) + " parallel downloads"
	}
	if s.MTU != 0 {
		mtu = s.MTU
	}
	return fmt.Sprintf("%s %s MTU %d, Gb/s (median of %d)", what, s.Family, mtu, len(s.KernelGbps))
}

// addMemRows adds the memory figures to t (laid out for n devices): one
// column per flow count, under the first device and the kernel.
func addMemRows(t *table, m *MemResults, n int) {
	if len(m.Runs) == 0 {
		return
	}
	cols := []int{1, n + 1, n + 2, 2}[:min(len(m.Runs), 3)]
	cells := func(figure, target string, f func(p MemPoint) string) []string {
		c := make([]string, 2*n+3)
		c[0], c[2*n+2] = figure, target
		for i, p := range m.Runs[:len(cols)] {
			c[cols[i]] = f(p)
		}
		return c
	}
	b := func(x float64) string { return fmtFloat(x, 0) }
	t.section(cells("memory per idle flow, bytes (n1 serves and replicates to n2, n3)", "target", func(p MemPoint) string {
		return strconv.Itoa(p.Flows) + " flows"
	})...)
	t.add(cells("  connections opened / tracked by n1 / replicas on n2 (s)", "", func(p MemPoint) string {
		s := fmt.Sprintf("%d / %d / %d (%.0fs)", p.Opened, p.Tracked, p.Replicas, p.OpenS)
		if p.Note != "" {
			s += " *"
		}
		return s
	})...)
	t.add(cells("  (* not all opened or tracked in time: see the note in the JSON)", "", func(MemPoint) string { return "" })...)
	t.add(cells("  n1 RSS per tracked+replicated flow", "-", func(p MemPoint) string { return b(p.Owner.RSS) })...)
	t.add(cells("  n1 Go heap per flow: all / gVisor stack / services", "-", func(p MemPoint) string {
		return b(p.Owner.Heap) + " / " + b(p.Owner.GVisor) + " / " + b(p.Owner.Services)
	})...)
	t.add(cells("  n1 Baton state per flow (heap under handoff)", verdict(m.Runs, m.TargetBaton, func(p MemPoint) float64 { return p.Owner.Baton }), func(p MemPoint) string { return b(p.Owner.Baton) })...)
	t.add(cells("  n2 per replica-held flow: Go heap (handoff) / RSS", verdict(m.Runs, m.TargetReplica, func(p MemPoint) float64 { return p.Replica.Heap }), func(p MemPoint) string {
		return b(p.Replica.Heap) + " (" + b(p.Replica.Baton) + ") / " + b(p.Replica.RSS)
	})...)
}

// verdict is "<= limit: met" if every run's figure is within limit.
func verdict(runs []MemPoint, limit int, f func(MemPoint) float64) string {
	for _, p := range runs {
		if !p.Measured {
			return fmt.Sprintf("<= %d: not measured", limit)
		}
		if f(p) > float64(limit) {
			return fmt.Sprintf("<= %d: MISSED", limit)
		}
	}
	return fmt.Sprintf("<= %d: met", limit)
}
