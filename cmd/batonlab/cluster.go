package main

// This file is the cluster side of `batonlab demo` and `batonlab up`: the
// nodes peer with each other (lab.EnableCluster) and replicate every
// flow's state to 2 of them; the demo asks the nodes' admin APIs, while
// the downloads run, which node owns each flow and which nodes hold its
// replicas, and checks the answers.

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// defaultReplicas is the replicas per flow of the demo's and up's cluster.
const defaultReplicas = 2

// clusterReplicas is the replicas per flow for a lab of n nodes: 2, or
// fewer when there are not enough other nodes; 0 (no cluster) for one.
func clusterReplicas(n int) int { return min(defaultReplicas, n-1) }

// startCluster makes l a cluster (before batond starts) and says so. It
// returns the replicas per flow, 0 if the lab has a single node.
func startCluster(l *lab.Lab) (int, error) {
	k := clusterReplicas(len(l.Nodes))
	if k < 1 {
		fmt.Println("cluster: a single node has no peers; running it standalone")
		return 0, nil
	}
	if err := l.EnableCluster(k); err != nil {
		return 0, err
	}
	fmt.Printf("cluster: every node peers with the others on eth0 port %d over mutual TLS (lab PKI in %s), %d replica(s) per flow\n",
		lab.PeerPort, l.ClusterInfo().PKIDir, k)
	return k, nil
}

// connectCluster dials every node's admin socket and waits for the peer
// links.
func connectCluster(ctx context.Context, l *lab.Lab) ([]*adminConn, error) {
	as, err := dialAdmins(l)
	if err != nil {
		return nil, err
	}
	t := time.Now()
	if err := waitPeersUp(ctx, as, 30*time.Second); err != nil {
		closeAdmins(as)
		return nil, err
	}
	fmt.Printf("peer links up (%d nodes, each sees the others) in %.1fs\n", len(as), time.Since(t).Seconds())
	return as, nil
}

// clusterView is what the nodes said about the flows at one instant.
type clusterView struct {
	At     time.Duration // since the downloads started
	Err    error
	Nodes  int
	K      int
	Server netip.AddrPort
	Client netip.Addr
	// Per node: its cluster-wide view (ListFlows) and its own table
	// (ListFlows local_only: owned flows and replicas held), by flow key.
	Cluster []map[string]*batonv1.FlowEntry
	Local   []map[string]*batonv1.FlowEntry
	// Per download (by index): in flight when the view was taken, and the
	// node serving it then.
	InFlight []bool
	Node     []int
}

// takeClusterView asks every node for its cluster view and its own table.
func takeClusterView(ctx context.Context, as []*adminConn, ds []*Download, k int, client netip.Addr, at time.Duration) *clusterView {
	v := &clusterView{At: at, Nodes: len(as), K: k, Client: client,
		InFlight: make([]bool, len(ds)), Node: make([]int, len(ds))}
	for i, d := range ds {
		v.Server = d.Server
		v.Node[i] = d.Node()
		v.InFlight[i] = !d.Done() && v.Node[i] >= 0
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	byKey := func(es []*batonv1.FlowEntry) map[string]*batonv1.FlowEntry {
		m := map[string]*batonv1.FlowEntry{}
		for _, e := range es {
			if k, err := handoff.KeyFromProto(e.GetState().GetKey()); err == nil {
				m[k.String()] = e
			}
		}
		return m
	}
	for _, a := range as {
		cl, unreachable, err := listFlows(ctx, a, &batonv1.ListFlowsRequest{Service: "http"})
		if err == nil && len(unreachable) > 0 {
			err = fmt.Errorf("%s: peers unreachable for ListFlows: %s", a.node, strings.Join(unreachable, ", "))
		}
		if err != nil {
			v.Err = err
			return v
		}
		loc, _, err := listFlows(ctx, a, &batonv1.ListFlowsRequest{Service: "http", LocalOnly: true})
		if err != nil {
			v.Err = err
			return v
		}
		v.Cluster = append(v.Cluster, byKey(cl))
		v.Local = append(v.Local, byKey(loc))
	}
	return v
}

// key is download d's flow key.
func (v *clusterView) key(d *Download) string {
	return handoff.FlowKey{Client: netip.AddrPortFrom(v.Client, uint16(d.LocalPort)), Anycast: v.Server}.String()
}

// check returns download i's replicas as its owner's ListFlows reports
// them, and what is wrong, "" if nothing: the flow must be in every node's
// cluster view owned by the node serving it, with K distinct replicas
// other than the owner, each holding the flow in its own table.
func (v *clusterView) check(i int, d *Download) (replicas []string, problem string) {
	owner := v.Node[i]
	if v.Err != nil || owner < 0 || owner >= v.Nodes {
		return nil, "no view"
	}
	ks, name := v.key(d), lab.NodeName(owner)
	e, ok := v.Cluster[owner][ks]
	if !ok {
		return nil, "not in " + name + "'s ListFlows"
	}
	replicas = slices.Clone(e.Replicas)
	if got := e.GetState().GetOwner(); got != name {
		return replicas, fmt.Sprintf("owner %q, served by %s", got, name)
	}
	uniq := slices.Compact(slices.Sorted(slices.Values(replicas)))
	if len(replicas) != v.K || len(uniq) != v.K || slices.Contains(replicas, name) {
		return replicas, fmt.Sprintf("replicas %v, want %d other nodes", replicas, v.K)
	}
	var missing []string
	for _, r := range replicas {
		j := nodeIndex(r, v.Nodes)
		if j < 0 {
			return replicas, "unknown replica " + r
		}
		if c, ok := v.Local[j][ks]; !ok || c.GetState().GetOwner() != name {
			missing = append(missing, r)
		}
	}
	if len(missing) > 0 {
		return replicas, strings.Join(missing, ", ") + " holds no copy"
	}
	for j := range v.Nodes {
		if c, ok := v.Cluster[j][ks]; !ok || c.GetState().GetOwner() != name {
			return replicas, "not in " + lab.NodeName(j) + "'s cluster view"
		}
	}
	return replicas, ""
}

// replicationSummary prints the demo's replication line and returns
// whether every flow in flight checked out. peers are the nodes' ListPeers
// answers (nil entries for nodes that did not answer).
func replicationSummary(v *clusterView, ds []*Download, peers []*batonv1.ListPeersResponse, wall time.Duration) bool {
	if v == nil {
		fmt.Println("FAILED: replication: the cluster view was never taken (the downloads ended before 50%?)")
		return false
	}
	if v.Err != nil {
		fmt.Printf("FAILED: replication: cluster view at %.1fs: %v\n", v.At.Seconds(), v.Err)
		return false
	}
	inFlight, good := 0, 0
	for i, d := range ds {
		if !v.InFlight[i] {
			continue
		}
		inFlight++
		if _, p := v.check(i, d); p == "" {
			good++
		}
	}
	var lags []string
	var events, bytes, dropped, rejected uint64
	for i, p := range peers {
		if p == nil {
			lags = append(lags, lab.NodeName(i)+" ?")
			continue
		}
		lags = append(lags, fmt.Sprintf("%s %s ms", p.Node, fmtFloat(ms(maxLagP99(p)), 2)))
		for _, x := range p.Peers {
			events += x.EventsSent
			bytes += x.BytesSent
			dropped += x.EventsDropped
			rejected += x.EventsRejected
		}
	}
	ok := inFlight > 0 && good == inFlight
	verdict := "OK"
	if !ok {
		verdict = "FAILED"
	}
	fmt.Printf("%s: replication: %d/%d flows in flight at %.1fs seen in every node's cluster view, owned by the node serving them, with %d replica(s) holding their state; replica lag p99 (ListPeers, worst peer, last minute): %s\n",
		verdict, good, inFlight, v.At.Seconds(), v.K, strings.Join(lags, ", "))
	fmt.Printf("    replication traffic, all nodes: %d events (%.0f/s over the downloads), %s sent over the peer links; %d events dropped, %d rejected\n",
		events, float64(events)/max(wall.Seconds(), 1e-9), formatSize(bytes), dropped, rejected)
	return ok
}

// listAllPeers asks every node for its peers; nil for a node that did not
// answer.
func listAllPeers(ctx context.Context, as []*adminConn) []*batonv1.ListPeersResponse {
	out := make([]*batonv1.ListPeersResponse, len(as))
	for i, a := range as {
		rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		out[i], _ = a.ListPeers(rctx, &batonv1.ListPeersRequest{})
		cancel()
	}
	return out
}
