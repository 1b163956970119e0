package main

// This file is `batonlab up`: a live lab for poking at by hand. It builds
// the lab, starts batond on every node (as a cluster replicating every
// flow to 2 peers, unless -standalone), prints the namespaces, addresses,
// admin sockets and example commands, and waits for Ctrl-C or SIGTERM (or
// a node dying) to tear it down.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"

	"github.com/baton-anycast/baton/e2e/lab"
)

type upOpts struct {
	batond     string
	nodes      int
	standalone bool
}

func parseUpArgs(args []string) (upOpts, *flag.FlagSet, error) {
	var o upOpts
	fs := newFlagSet("up")
	fs.StringVar(&o.batond, "batond", defaultBatond(), "batond binary")
	fs.IntVar(&o.nodes, "nodes", defaultDemoNodes, "anycast nodes (1.."+fmt.Sprint(lab.MaxNodes)+")")
	fs.BoolVar(&o.standalone, "standalone", false, "run the nodes without the peer network (no replication; by default they form a cluster with 2 replicas per flow)")
	if err := parseFlags(fs, args); err != nil {
		return o, fs, err
	}
	switch {
	case o.nodes < 1 || o.nodes > lab.MaxNodes:
		return o, fs, fmt.Errorf("-nodes: %d out of range 1..%d", o.nodes, lab.MaxNodes)
	case o.batond == "":
		return o, fs, errors.New("-batond: empty path")
	}
	return o, fs, nil
}

func runUp(args []string) int {
	o, fs, err := parseUpArgs(args)
	if err != nil {
		return usageResult(fs, "up", err)
	}
	if reportMissing("up", checkPrereqs(o.batond)) {
		return exitFailure
	}
	ctx, stop := signalContext("up")
	defer stop()
	if err := up(ctx, o); err != nil {
		return failed(ctx, "up", err)
	}
	return exitOK
}

func up(ctx context.Context, o upOpts) (err error) {
	l, err := newLab(ctx, o.nodes, true)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := closeLab(l, true); cerr != nil && err == nil {
			err = cerr
		}
	}()
	k := 0
	if !o.standalone {
		if k, err = startCluster(l); err != nil {
			return err
		}
	}
	procs, err := startNodes(ctx, l, o.batond)
	if err != nil {
		return err
	}
	if k > 0 {
		admins, err := connectCluster(ctx, l)
		if err != nil {
			return err
		}
		closeAdmins(admins)
	}
	batonctl := filepath.Join(filepath.Dir(o.batond), "batonctl")
	if _, serr := os.Stat(batonctl); serr != nil {
		batonctl = "batonctl"
	}
	c := l.Client.Name
	fmt.Printf(`
lab %[1]s is up.

  client  %[2]s   eth0 %[3]s %[4]s
  router  %[5]s   ECMP (L4 hash, seed %[6]d) to 192.0.2.1/32 and 2001:db8:a::1/128
`, l.Name, c, l.ClientAddr4, l.ClientAddr6, l.Router.Name, l.HashSeed)
	for i, n := range l.Nodes {
		fmt.Printf("  node    %s  eth0 %s %s, batond %s pid %d\n          admin unix:%s  log %s\n",
			n.Name, n.Addr4, n.Addr6, lab.NodeName(i), procs[i].PID(), l.AdminSocket(i), procs[i].LogPath())
	}
	fmt.Printf(`
Services on the anycast addresses: http 80, stream 9000 ("<size> <seed>\n"),
echo 7, whoami udp/53. Try:

  ip netns exec %[1]s curl http://192.0.2.1/whoami
  ip netns exec %[1]s curl -g 'http://[2001:db8:a::1]/whoami'
  ip netns exec %[1]s curl -o /dev/null 'http://192.0.2.1/bytes?n=100000000&seed=7'
  for i in 1 2 3 4 5 6; do ip netns exec %[1]s curl -s http://192.0.2.1/whoami; done   # ECMP by source port
  ip netns exec %[2]s ip route show 192.0.2.1
  ip netns exec %[3]s ip route
  %[4]s -admin unix:%[5]s stats
  %[4]s -admin unix:%[5]s health
`, c, l.Router.Name, l.Nodes[0].Name, batonctl, l.AdminSocket(0))
	if k > 0 {
		fmt.Printf(`
The nodes replicate every flow's state to %[1]d peer(s). Keep a flow open and
look it up (any node's admin socket gives the cluster view):

  ip netns exec %[2]s curl -s -o /dev/null --limit-rate 100K --local-port 40000 'http://192.0.2.1/bytes?n=100000000&seed=1' &
  %[3]s -admin unix:%[4]s flows
  %[3]s -admin unix:%[4]s flows -local     # n1's own table: flows it owns, replicas it holds
  %[3]s -admin unix:%[4]s flow '%[5]s:40000->192.0.2.1:80'
  %[3]s -admin unix:%[4]s peers            # replication links: up, lag, flows, bytes
`, k, c, batonctl, l.AdminSocket(0), l.ClientAddr4)
		for i := 1; i < len(l.Nodes); i++ {
			fmt.Printf("  %s -admin unix:%s peers\n", batonctl, l.AdminSocket(i))
		}
	} else {
		fmt.Printf("\nThe nodes run standalone (-standalone): no peer network, no replication.\n")
	}
	fmt.Printf("\nCtrl-C (or SIGTERM) tears the lab down.\n")

	// Wait for a signal, or for a node to die (then say which and stop).
	cases := []reflect.SelectCase{{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(ctx.Done())}}
	for _, p := range procs {
		cases = append(cases, reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(p.Done())})
	}
	chosen, _, _ := reflect.Select(cases)
	if chosen > 0 {
		p := procs[chosen-1]
		return fmt.Errorf("%s exited; its log:\n%s", p, p.Log())
	}
	return nil
}
