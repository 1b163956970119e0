// Command batonlab runs Baton's network-namespace lab (package e2e/lab) from
// the command line. It needs root.
//
//	batonlab demo   anycast downloads spread over N batond nodes by ECMP,
//	                every byte verified, each flow on the node predicted,
//	                each flow's replicas checked (the nodes form a cluster),
//	                then the busiest node killed: its flows taken over,
//	                a per-flow timeline and a throughput plot (SVG)
//	batonlab bench  Baton vs the Linux kernel on the same lab path:
//	                single-flow throughput, new connections per second,
//	                and a CPU profile of batond; then what replication
//	                costs: conn/s with vs without it, replica visibility;
//	                then takeovers: drain, failing check, kill -9
//	batonlab up     a live lab (a cluster) to poke at until Ctrl-C
//	batonlab help   usage
//
// Every subcommand builds its own lab (namespaces <prefix><hex>-c, -r,
// -n1..), starts processes only through the lab (which kills them by PID),
// and tears everything down when it ends, also on SIGINT or SIGTERM.
//
// Files: main.go (dispatch, prerequisites, signals, lab bring-up), client.go
// (download helpers shared by the demos and the benchmark), admin.go
// (batond's admin API, metrics and CPU time, from the host), cluster.go
// (the cluster of demo and up, and the demo's replication check), demo.go,
// bench.go and benchreport.go (Baton vs the kernel, the report),
// benchrepl.go (the replication figures), bench_takeover.go and
// bench_takeover_report.go (the takeover figures), streamflow.go (a
// verified endless download), flowrec.go (per-flow arrival recordings),
// histo.go (Prometheus histogram quantiles), demo_failover.go (the demo's
// failover: kill -9, timeline, plot), svg.go (the plot), up.go, format.go
// (pure formatting and parsing helpers).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/baton-anycast/baton/e2e/lab"
)

func main() { os.Exit(run(os.Args[1:])) }

// Exit statuses.
const (
	exitOK      = 0
	exitFailure = 1 // a prerequisite is missing, or the run failed
	exitUsage   = 2 // bad command line
	exitSignal  = 130
)

type command struct {
	name, args, summary string
	run                 func(args []string) int
}

var commands []command

func init() {
	commands = []command{
		{"demo", "[-batond PATH] [-nodes 3] [-flows 12] [-size 250MB] [-v6] [-standalone] [-failover=true] [-failover-at 0.6] [-out DIR]",
			"downloads from the client over ECMP to N nodes (a cluster: 2 replicas per flow), verified, checked against the predicted node and the cluster view; then the busiest node is killed (kill -9) mid-transfer, its flows are taken over and finish intact: per-flow timeline and a throughput plot (SVG)", runDemo},
		{"bench", "[-batond PATH] [-out docs/bench/latest.json] [-duration 10s] [-mtu 1500] [-only kernel|replication|takeover] [-takeover-flows 24]",
			"Baton vs the kernel on the same path: single-flow Gb/s, new conn/s, batond CPU profile; replication: conn/s with vs without, replica visibility; takeover: drain, failing check and kill -9 of a serving node (latency, stalls, withdrawal, throughput after vs before)", runBench},
		{"up", "[-batond PATH] [-nodes 3] [-standalone]",
			"build a lab, start the nodes (a cluster), print how to use them, wait for Ctrl-C", runUp},
		{"help", "[COMMAND]", "this text, or a command's flags", runHelp},
	}
}

func run(args []string) int {
	if len(args) == 0 {
		usage(os.Stdout)
		return exitOK
	}
	name := args[0]
	switch name {
	case "-h", "-help", "--help":
		name = "help"
	}
	if name == holdCommand { // hidden: the memory benchmark's connection holder
		return runHold(args[1:])
	}
	for _, c := range commands {
		if c.name == name {
			return c.run(args[1:])
		}
	}
	fmt.Fprintf(os.Stderr, "batonlab: unknown command %q (known: %s; see batonlab help)\n", name, commandNames())
	return exitUsage
}

func commandNames() string {
	var names []string
	for _, c := range commands {
		names = append(names, c.name)
	}
	return strings.Join(names, ", ")
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: batonlab COMMAND [flags]   (needs root: it builds network namespaces)")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "commands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-6s %s\n         %s\n", c.name, c.args, c.summary)
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Sizes take B, KB, MB, GB (powers of 1000) or KiB, MiB, GiB; MB/s is 10^6 bytes/s.")
	fmt.Fprintln(w, "`batonlab help COMMAND` lists a command's flags.")
}

func runHelp(args []string) int {
	if len(args) == 0 {
		usage(os.Stdout)
		return exitOK
	}
	for _, c := range commands {
		if c.name == args[0] && c.name != "help" {
			return c.run([]string{"-h"})
		}
	}
	fmt.Fprintf(os.Stderr, "batonlab help: unknown command %q (known: %s)\n", args[0], commandNames())
	return exitUsage
}

// newFlagSet returns a flag set whose errors are returned, not printed, so
// parseFlags can turn them into one line.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("batonlab "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// errHelp is returned by the argument parsers for -h.
var errHelp = flag.ErrHelp

// parseFlags parses args into fs. It refuses positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (flags only)", fs.Arg(0))
	}
	return nil
}

// usageResult turns a parser error into the exit status: usage text on
// stdout and 0 for -h, one line on stderr and 2 otherwise.
func usageResult(fs *flag.FlagSet, cmd string, err error) int {
	if errors.Is(err, errHelp) {
		for _, c := range commands {
			if c.name == cmd {
				fmt.Printf("usage: batonlab %s %s\n  %s\n\nflags:\n", c.name, c.args, c.summary)
			}
		}
		fs.SetOutput(os.Stdout)
		fs.PrintDefaults()
		return exitOK
	}
	fmt.Fprintf(os.Stderr, "batonlab %s: %v\n", cmd, err)
	return exitUsage
}

// defaultBatond is bin/batond next to the batonlab binary (make build puts
// both in bin/), else ./bin/batond.
func defaultBatond() string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "batond")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p
		}
	}
	return filepath.Join("bin", "batond")
}

// checkPrereqs returns one line per missing prerequisite of the lab:
// privileges, /dev/net/tun, a writable /run, the batond binary (when
// batond != ""), and the kernel's multipath hash policy 3.
func checkPrereqs(batond string) []string {
	var missing []string
	if !hasLabCaps() {
		missing = append(missing, "privileges: CAP_NET_ADMIN and CAP_SYS_ADMIN are needed to build network namespaces (run as root, e.g. sudo)")
	} else if os.Geteuid() != 0 {
		missing = append(missing, "privileges: e2e/lab also insists on euid 0 (capabilities alone are not accepted); run as root")
	}
	if st, err := os.Stat("/dev/net/tun"); err != nil {
		missing = append(missing, "/dev/net/tun: "+errText(err)+" (load the tun module, or pass --device /dev/net/tun to the container)")
	} else if st.Mode()&os.ModeCharDevice == 0 {
		missing = append(missing, "/dev/net/tun: not a character device")
	}
	if err := writableDir("/run"); err != nil {
		missing = append(missing, "/run: not writable ("+errText(err)+"); the lab bind-mounts its namespaces under /run/netns")
	}
	if batond != "" {
		if err := executable(batond); err != nil {
			missing = append(missing, "batond binary "+batond+": "+errText(err)+" (run `make build`, or pass -batond PATH)")
		}
	}
	for _, f := range []string{"fib_multipath_hash_policy", "fib_multipath_hash_fields"} {
		if _, err := os.Stat("/proc/sys/net/ipv4/" + f); err != nil {
			missing = append(missing, "kernel: /proc/sys/net/ipv4/"+f+" "+errText(err)+
				" (ECMP by L4 5-tuple needs fib_multipath_hash_policy=3, Linux >= 5.12 with CONFIG_IP_ROUTE_MULTIPATH)")
		}
	}
	return missing
}

// reportMissing prints the missing prerequisites, one per line, and
// returns true if there were any.
func reportMissing(cmd string, missing []string) bool {
	for _, m := range missing {
		fmt.Fprintf(os.Stderr, "batonlab %s: missing: %s\n", cmd, m)
	}
	return len(missing) > 0
}

func errText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	if errors.Is(err, os.ErrNotExist) {
		return "does not exist"
	}
	return err.Error()
}

// hasLabCaps reports whether the effective capability set holds
// CAP_NET_ADMIN and CAP_SYS_ADMIN.
func hasLabCaps() bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return os.Geteuid() == 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			var caps uint64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%x", &caps); err != nil {
				return false
			}
			need := uint64(1)<<unix.CAP_NET_ADMIN | uint64(1)<<unix.CAP_SYS_ADMIN
			return caps&need == need
		}
	}
	return false
}

func writableDir(dir string) error {
	st, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		return errors.New("not a directory")
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err == nil && sfs.Flags&unix.ST_RDONLY != 0 {
		return errors.New("read-only file system")
	}
	return unix.Access(dir, unix.W_OK)
}

func executable(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return errors.New("not a regular file")
	}
	if err := unix.Access(path, unix.X_OK); err != nil {
		return errors.New("not executable")
	}
	return nil
}

// signalContext returns a context cancelled by the first SIGINT or SIGTERM.
// Later signals only print that teardown is under way: a second Ctrl-C must
// not kill batonlab before it has removed its namespaces. stop ends the
// signal handling.
func signalContext(cmd string) (ctx context.Context, stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		first := true
		for {
			select {
			case sig := <-sigs:
				if first {
					fmt.Fprintf(os.Stderr, "\nbatonlab %s: %v: stopping and tearing the lab down\n", cmd, sig)
					cancel()
					first = false
				} else {
					fmt.Fprintf(os.Stderr, "batonlab %s: still tearing down, please wait\n", cmd)
				}
			case <-done:
				return
			}
		}
	}()
	var once sync.Once
	return ctx, func() {
		once.Do(func() {
			signal.Stop(sigs)
			close(done)
			cancel()
		})
	}
}

// failed reports a command's error and returns its exit status: 130 if a
// signal interrupted the command (the error is then only a consequence).
func failed(ctx context.Context, cmd string, err error) int {
	if ctx.Err() != nil {
		fmt.Fprintf(os.Stderr, "batonlab %s: interrupted\n", cmd)
		return exitSignal
	}
	fmt.Fprintf(os.Stderr, "batonlab %s: %v\n", cmd, err)
	return exitFailure
}

// labLogf prints the lab's notes on stderr.
func labLogf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "note: "+format+"\n", args...)
}

// newLab builds a lab and prints its namespaces.
func newLab(ctx context.Context, nodes int, ipv6 bool) (*lab.Lab, error) {
	l, err := lab.New(ctx, lab.Config{Nodes: nodes, DisableIPv6: !ipv6, Logf: labLogf})
	if err != nil {
		return nil, err
	}
	fmt.Printf("lab %s: client %s, router %s, nodes", l.Name, l.Client.Name, l.Router.Name)
	for _, n := range l.Nodes {
		fmt.Printf(" %s", n.Name)
	}
	fmt.Printf("\n    routing: %s", l.Routing)
	if l.Routing == "bgp" {
		fmt.Printf(" (BIRD in %s peers with every node; nodes announce the anycast prefixes with GoBGP)", l.Router.Name)
	}
	fmt.Printf("\n    logs in %s\n", l.LogDir)
	return l, nil
}

// startNodes starts batond on every node of l, in parallel, and prints one
// line per node.
func startNodes(ctx context.Context, l *lab.Lab, batond string, extra ...string) ([]*lab.Proc, error) {
	procs := make([]*lab.Proc, len(l.Nodes))
	errs := make([]error, len(l.Nodes))
	var wg sync.WaitGroup
	for i := range l.Nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			procs[i], errs[i] = l.StartBatond(ctx, batond, i, extra...)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	for i, p := range procs {
		n := l.Nodes[i]
		fmt.Printf("batond %s: pid %d in %s, eth0 %s", lab.NodeName(i), p.PID(), n.Name, n.Addr4)
		if n.Addr6.IsValid() {
			fmt.Printf(" %s", n.Addr6)
		}
		fmt.Println()
	}
	return procs, nil
}

// closeLab tears l down, says so, and checks that none of its /run/netns
// entries is left. keepLogs false removes the log directory.
func closeLab(l *lab.Lab, keepLogs bool) error {
	nprocs := len(l.Procs())
	err := l.Close()
	var left []string
	if ents, rerr := os.ReadDir("/run/netns"); rerr == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), l.Name+"-") {
				left = append(left, e.Name())
			}
		}
	}
	if len(left) > 0 {
		err = errors.Join(err, fmt.Errorf("namespaces left in /run/netns: %s (remove with `ip netns del NAME`)", strings.Join(left, " ")))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "batonlab: teardown of lab %s: %v\n    logs kept in %s\n", l.Name, err, l.LogDir)
		return err
	}
	msg := fmt.Sprintf("lab %s torn down: %d process(es) ended (batond and the router's bird), %d namespaces removed", l.Name, nprocs, len(l.Namespaces()))
	if keepLogs {
		msg += ", logs kept in " + l.LogDir
	} else {
		os.RemoveAll(l.LogDir)
	}
	fmt.Println(msg)
	return nil
}

// crashSummary describes how a batond process ended: its exit status and,
// for a Go panic, the panic line and the first frame in Baton's code.
func crashSummary(p *lab.Proc) string {
	var parts []string
	if st, err := p.Wait(context.Background()); err != nil {
		parts = append(parts, err.Error())
	} else if st != nil {
		parts = append(parts, st.String())
	}
	lines := strings.Split(p.Log(), "\n")
	// The log is appended to by every batond started under the same name:
	// the last panic is this process's.
	for i := len(lines) - 1; i >= 0; i-- {
		line := lines[i]
		if !strings.HasPrefix(line, "panic: ") && !strings.HasPrefix(line, "fatal error: ") {
			continue
		}
		parts = append(parts, strings.TrimSpace(line))
		for _, f := range lines[i+1:] {
			if f = strings.TrimSpace(f); strings.HasPrefix(f, "/") && strings.Contains(f, ".go:") &&
				!strings.Contains(f, "/go/pkg/mod/") && !strings.Contains(f, "/src/runtime/") {
				parts = append(parts, "at "+strings.Fields(f)[0])
				break
			}
		}
		break
	}
	return strings.Join(parts, "; ")
}
