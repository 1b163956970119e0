package lab

// This file starts real batond processes on the lab's nodes.

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"time"
)

// TUNName is the TUN interface batond creates on every lab node.
const TUNName = "any0"

// NodeName is the batond node name of node index i ("n1" for index 0).
func NodeName(i int) string { return "n" + strconv.Itoa(i+1) }

// AdminSocket is the admin socket path of node index i's batond.
func (l *Lab) AdminSocket(i int) string {
	return filepath.Join(l.LogDir, NodeName(i)+".sock")
}

// BatondArgs returns the command line for batond on node index i: the
// lab's anycast addresses, TUN TUNName, the admin socket in the log
// directory, metrics on the node's loopback, a drain timeout shorter than
// Proc.Stop's grace, in BGP mode the announcer's flags (announce bgp to
// the router, passive), followed by extra.
func (l *Lab) BatondArgs(bin string, i int, extra ...string) []string {
	anycast := l.Anycast4.String() + "/32"
	if l.IPv6 {
		anycast += "," + l.Anycast6.String() + "/128"
	}
	args := []string{bin,
		"-node", NodeName(i),
		"-anycast", anycast,
		"-tun", TUNName,
		"-admin", "unix:" + l.AdminSocket(i),
		"-metrics", "127.0.0.1:9470",
		// SIGTERM waits at most this long for the node's flows to go,
		// under Proc.Stop's grace before SIGKILL.
		"-drain-timeout", (termGrace - time.Second).String(),
	}
	if l.cluster != nil {
		args = append(args, l.clusterArgs(i)...)
	}
	if l.Routing == RoutingBGP {
		args = append(args, l.bgpArgs(i)...)
	}
	return append(args, extra...)
}

// StartBatond starts batond (binary bin) on node index i with BatondArgs and
// waits until it is ready: its TUN is up and the anycast routes point into
// it, and in BGP mode the router routes to it (its checks passed and it
// announced; unless SetNexthops keeps the node out). If the process exits
// first, the error carries the end of its log. StartBatondUnannounced does
// not wait for the router.
func (l *Lab) StartBatond(ctx context.Context, bin string, i int, extra ...string) (*Proc, error) {
	if i < 0 || i >= len(l.Nodes) {
		return nil, fmt.Errorf("lab: no node index %d", i)
	}
	p, err := l.Nodes[i].Start("batond-"+NodeName(i), l.BatondArgs(bin, i, extra...), nil)
	if err != nil {
		return nil, err
	}
	if err := l.waitBatond(ctx, p, i); err != nil {
		_ = p.Kill()
		return nil, err
	}
	if l.bird != nil && l.allowedByRouter(i) {
		if err := l.waitAnnouncedOrExit(ctx, p, i); err != nil {
			_ = p.Kill()
			return nil, err
		}
	}
	return p, nil
}

func (l *Lab) waitBatond(ctx context.Context, p *Proc, i int) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ready := make(chan error, 1)
	go func() { ready <- l.WaitRoute(ctx, i, TUNName) }()
	select {
	case err := <-ready:
		if err != nil {
			return fmt.Errorf("lab: batond on %s not ready: %w\n%s", NodeName(i), err, p.Log())
		}
		return nil
	case <-p.Done():
		cancel()
		<-ready
		return errors.New("lab: batond on " + NodeName(i) + " exited at start:\n" + p.Log())
	}
}
