package main

// This file is `batonlab bench -only profiles`: a CPU profile of batond
// during each load whose figure misses its target, with the same load on
// the kernel (or without replication) measured right after it in the same
// lab, so that each profile comes with its figure side by side:
//
//   - one-node lab, TUN offload (-tun-offload), IPv4: single-flow download
//     and upload at the base MTU, then single-flow download at -big-mtu;
//   - the 3-node replication lab (benchrepl.go): the connection-rate loop
//     through n1 with replication to n2 and n3 (profiles of n1 and n2 at
//     once) and without (n1 restarted without the peer network flags).
//
// The binary profiles go to a temporary directory (printed); the text
// reports (`go tool pprof -top`, flat and cumulative) to -profile-dir.

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/stack/services"
)

const onlyProfiles = "profiles"

// profTarget is one batond to profile during a load: its node and the
// name of its profile.
type profTarget struct {
	node *lab.Node
	name string
}

// profiler runs loads while profiling and writes the reports.
type profiler struct {
	o      benchOpts
	binDir string // binary profiles
}

// during runs load for the profile's length plus a lead-in and a tail,
// profiles every target meanwhile, and writes each target's text report
// with what (the load) and figure (what the load achieved) at its top.
// The kernel's (or the baseline's) figure is appended by the caller with
// note.
func (p *profiler) during(ctx context.Context, targets []profTarget, what string, load func(dur time.Duration) (string, error)) (figure string, err error) {
	lead := 500 * time.Millisecond
	secs := int(p.o.profile.Round(time.Second) / time.Second)
	type result struct {
		fig string
		err error
	}
	done := make(chan result, 1)
	go func() {
		f, err := load(lead + p.o.profile + time.Second)
		done <- result{f, err}
	}()
	select {
	case <-time.After(lead):
	case <-ctx.Done():
		return "", ctx.Err()
	}
	fmt.Printf("profiling %d batond(s) for %ds: %s...\n", len(targets), secs, what)
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	for i, t := range targets {
		wg.Go(func() { errs[i] = fetchProfile(ctx, t.node, secs, filepath.Join(p.binDir, t.name+".cpu.pprof")) })
	}
	wg.Wait()
	r := <-done
	for _, e := range errs {
		if e != nil {
			return "", e
		}
	}
	if r.err != nil {
		return "", fmt.Errorf("%s: %w", what, r.err)
	}
	fmt.Printf("    %s\n", r.fig)
	for _, t := range targets {
		if err := p.report(t.name, what, r.fig); err != nil {
			return "", err
		}
	}
	return r.fig, settle(ctx)
}

// report writes <profile-dir>/<name>.txt: the load, its figure, the load
// average, then the top entries by flat and by cumulative time.
func (p *profiler) report(name, what, figure string) error {
	bin := filepath.Join(p.binDir, name+".cpu.pprof")
	var b bytes.Buffer
	fmt.Fprintf(&b, "batond CPU profile: %s\n", what)
	fmt.Fprintf(&b, "measured during the profile: %s\n", figure)
	if la, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Fprintf(&b, "load average at the end (1, 5, 15 min): %s\n", strings.Join(strings.Fields(string(la))[:3], " "))
	}
	fmt.Fprintf(&b, "binary: %s (revision %s)\n", p.o.batond, binRevision(p.o.batond))
	goBin, lerr := exec.LookPath("go")
	if lerr != nil {
		fmt.Fprintf(&b, "\n(go not on PATH: go tool pprof -top %s %s)\n", p.o.batond, bin)
	}
	for _, mode := range [][]string{{"-top", "-nodecount=30"}, {"-top", "-cum", "-nodecount=40"}} {
		if lerr != nil {
			break
		}
		args := append([]string{"tool", "pprof"}, mode...)
		args = append(args, p.o.batond, bin)
		out, err := exec.Command(goBin, args...).Output()
		if err != nil {
			return fmt.Errorf("go tool pprof %s: %w", strings.Join(mode, " "), err)
		}
		fmt.Fprintf(&b, "\n$ go tool pprof %s bin/batond %s.cpu.pprof\n", strings.Join(mode, " "), name)
		for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
			if !strings.HasPrefix(l, "File: ") && !strings.HasPrefix(l, "Build ID: ") {
				b.WriteString(l + "\n")
			}
		}
	}
	file := filepath.Join(p.o.profileDir, name+".txt")
	if err := os.MkdirAll(p.o.profileDir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(file, b.Bytes(), 0o644)
}

// note appends a line (the baseline's figure) to a profile's report.
func (p *profiler) note(name, line string) error {
	file := filepath.Join(p.o.profileDir, name+".txt")
	b, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	i := bytes.IndexByte(b, '\n')
	j := i + 1 + bytes.IndexByte(b[i+1:], '\n')
	out := append(append(append([]byte(nil), b[:j+1]...), line+"\n"...), b[j+1:]...)
	return os.WriteFile(file, out, 0o644)
}

func binRevision(bin string) string {
	rev, _ := binaryInfo(bin)
	if rev == "" {
		return "unknown"
	}
	return rev
}

// benchProfiles is -only profiles.
func benchProfiles(ctx context.Context, o benchOpts, res *Results) error {
	if o.profile <= 0 {
		return fmt.Errorf("-only %s needs -profile > 0", onlyProfiles)
	}
	dir, err := os.MkdirTemp("", "baton-profiles-")
	if err != nil {
		return err
	}
	p := &profiler{o: o, binDir: dir}
	fmt.Printf("binary profiles in %s, reports in %s\n", dir, o.profileDir)
	if err := p.dataPath(ctx, res); err != nil {
		return err
	}
	return p.replication(ctx, res)
}

// dataPath profiles the offload device's single-flow download and upload,
// then the download at the large MTU, each next to the kernel's figure.
func (p *profiler) dataPath(ctx context.Context, res *Results) (err error) {
	o := p.o
	l, err := newLab(ctx, 1, false)
	if err != nil {
		return err
	}
	failed := true
	defer func() {
		if cerr := closeLab(l, failed); cerr != nil && err == nil {
			err = cerr
		}
	}()
	if o.mtu != 1500 {
		if err := setLabMTU(l, o.mtu); err != nil {
			return err
		}
	}
	nd := &nodeDaemon{l: l, bin: o.batond, base: []string{"-pprof", "-mtu", strconv.Itoa(o.mtu)}, tun: tunOffload, crashes: []string{}}
	procs, err := startNodes(ctx, l, o.batond, nd.args()...)
	if err != nil {
		return err
	}
	nd.proc = procs[0]
	defer func() { res.Crashes = append(res.Crashes, nd.crashes...) }()
	node := l.Nodes[0]
	for _, ksvc := range []struct {
		port uint16
		svc  services.TCPService
	}{{streamPort, services.NewStream()}, {httpPort, services.NewHTTP(node.Name)}} {
		ks, err := startKernelServer(ctx, node, []netip.Addr{node.Addr4}, ksvc.port, ksvc.svc)
		if err != nil {
			return err
		}
		defer ks.Close()
	}
	down := serverPair{"IPv4", netip.AddrPortFrom(l.Anycast4, streamPort), netip.AddrPortFrom(node.Addr4, streamPort)}
	up := serverPair{"IPv4", netip.AddrPortFrom(l.Anycast4, httpPort), netip.AddrPortFrom(node.Addr4, httpPort)}
	download := func(addr netip.AddrPort) func(time.Duration) (string, error) {
		return func(d time.Duration) (string, error) {
			r, err := discardStream(ctx, l.Client, addr, 7, d)
			return fmt.Sprintf("download %s: %.2f Gb/s", addr, gbps(r.Bytes, r.Elapsed)), err
		}
	}
	upload := func(addr netip.AddrPort) func(time.Duration) (string, error) {
		return func(d time.Duration) (string, error) {
			b, err := uploadHTTP(ctx, l.Client, addr, d)
			return fmt.Sprintf("upload %s: %.2f Gb/s", addr, gbps(b, d)), err
		}
	}
	type job struct {
		name, what string
		baton      func(time.Duration) (string, error)
		kernel     func(time.Duration) (string, error)
	}
	jobs := func(mtu int) []job {
		if mtu != o.mtu {
			return []job{{fmt.Sprintf("download-mtu%d-offload", mtu), fmt.Sprintf("single-flow download IPv4, MTU %d, TUN offload", mtu), download(down.baton), download(down.kernel)}}
		}
		return []job{
			{"download-offload", fmt.Sprintf("single-flow download IPv4, MTU %d, TUN offload", mtu), download(down.baton), download(down.kernel)},
			{"upload-offload", fmt.Sprintf("single-flow upload IPv4 (pipelined 256 KiB POSTs), MTU %d, TUN offload", mtu), upload(up.baton), upload(up.kernel)},
		}
	}
	run := func(mtu int) error {
		for _, j := range jobs(mtu) {
			fig, err := p.during(ctx, []profTarget{{node, j.name}}, j.what, j.baton)
			if err != nil {
				return err
			}
			if err := nd.check(ctx, j.what, true); err != nil {
				return err
			}
			kfig, err := j.kernel(o.duration)
			if err != nil {
				return fmt.Errorf("kernel %s: %w", j.what, err)
			}
			fmt.Printf("    kernel, right after: %s\n", kfig)
			if err := p.note(j.name, "the kernel, same lab, right after: "+kfig+" (Baton: "+fig+")"); err != nil {
				return err
			}
			if err := settle(ctx); err != nil {
				return err
			}
		}
		return nil
	}
	if err := run(o.mtu); err != nil {
		return err
	}
	if o.bigMTU != 0 && o.bigMTU != o.mtu {
		if err := setLabMTU(l, o.bigMTU); err != nil {
			return err
		}
		nd.base[2] = strconv.Itoa(o.bigMTU)
		if err := nd.proc.Stop(); err != nil {
			return err
		}
		nd.proc = nil
		if err := nd.use(ctx, tunOffload); err != nil {
			return err
		}
		if err := run(o.bigMTU); err != nil {
			return err
		}
	}
	failed = len(nd.crashes) > 0
	return nil
}

// replication profiles n1 during the connection-rate loop with replication
// (and its replica n2 at the same time), then without.
func (p *profiler) replication(ctx context.Context, res *Results) (err error) {
	o := p.o
	l, err := newLab(ctx, replNodes, false)
	if err != nil {
		return err
	}
	rl := &replLab{l: l, bin: o.batond, base: []string{"-pprof", "-mtu", strconv.Itoa(o.mtu)}, procs: make([]*lab.Proc, replNodes), crashes: []string{}}
	defer func() {
		closeAdmins(rl.admins)
		res.Crashes = append(res.Crashes, rl.crashes...)
		if cerr := closeLab(l, len(rl.crashes) > 0); cerr != nil && err == nil {
			err = cerr
		}
	}()
	if err := rl.start(ctx, o); err != nil {
		return err
	}
	server := netip.AddrPortFrom(l.Anycast4, streamPort)
	conns := func(d time.Duration) (string, error) {
		r, _ := connLoop(ctx, l.Client, server, o.workers, d, connFirstPort)
		return fmt.Sprintf("%.0f conn/s (%d workers, %d failed)", r.PerSecond(), o.workers, r.Failures), ctx.Err()
	}
	var figs [2]string
	for i, repl := range []bool{true, false} {
		if err := rl.restartN1(ctx, repl); err != nil {
			return err
		}
		targets := []profTarget{{l.Nodes[0], "connrate-repl-n1"}, {l.Nodes[1], "connrate-repl-n2"}}
		what := "new connections/s IPv4 through n1, replicating to n2 and n3 (TUN water)"
		if !repl {
			targets = targets[:1]
			targets[0].name = "connrate-norepl-n1"
			what = "new connections/s IPv4 through n1, without replication (TUN water)"
		}
		if figs[i], err = p.during(ctx, targets, what, conns); err != nil {
			return err
		}
		if err := rl.check(ctx, what); err != nil {
			return err
		}
	}
	for _, name := range []string{"connrate-repl-n1", "connrate-repl-n2"} {
		if err := p.note(name, "without replication, next run: "+figs[1]); err != nil {
			return err
		}
	}
	return p.note("connrate-norepl-n1", "with replication, previous run: "+figs[0])
}
