package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// adminClient connects to node i's admin socket.
func adminClient(t *testing.T, l *lab.Lab, i int) batonv1.AdminClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+l.AdminSocket(i), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return batonv1.NewAdminClient(conn)
}

// localFlows returns node i's own table: owned flows and replicas, by key.
func localFlows(ctx context.Context, c batonv1.AdminClient) (map[string]*batonv1.FlowState, error) {
	out := map[string]*batonv1.FlowState{}
	req := &batonv1.ListFlowsRequest{LocalOnly: true, PageSize: 1000}
	for {
		resp, err := c.ListFlows(ctx, req)
		if err != nil {
			return nil, err
		}
		for _, f := range resp.Flows {
			k, err := handoff.KeyFromProto(f.State.Key)
			if err != nil {
				return nil, err
			}
			out[k.String()] = f.State
		}
		if resp.NextPageToken == "" {
			return out, nil
		}
		req.PageToken = resp.NextPageToken
	}
}

// waitFor polls cond every 50 ms until it returns nil or the bounded wait
// ends; it returns cond's last error.
func waitFor(ctx context.Context, d time.Duration, cond func() error) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		err := cond()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// echoFlow is an open echo connection and the node that owns it.
type echoFlow struct {
	key   handoff.FlowKey
	owner int
	conn  net.Conn
}

// openEchoFlows opens n echo connections from distinct ports, each
// exchanging msg once, and keeps them open. Ports the router would send to
// node index avoid (a dead node; -1 for none) are skipped.
func openEchoFlows(t *testing.T, ctx context.Context, l *lab.Lab, n, firstPort int, msg string, avoid int) []echoFlow {
	t.Helper()
	dst := netip.AddrPortFrom(l.Anycast4, 7)
	var ports, owners []int
	for port := firstPort; len(ports) < n; port++ {
		owner, err := l.PredictNode(netip.AddrPortFrom(l.ClientAddr4, uint16(port)), dst)
		if err != nil {
			t.Fatal(err)
		}
		if owner != avoid {
			ports, owners = append(ports, port), append(owners, owner)
		}
	}
	flows := make([]echoFlow, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		port, owner := ports[i], owners[i]
		wg.Go(func() {
			src := netip.AddrPortFrom(l.ClientAddr4, uint16(port))
			c, err := l.Client.Dial(ctx, "tcp4", dst.String(), port)
			if err != nil {
				errs <- fmt.Errorf("port %d: %v", port, err)
				return
			}
			t.Cleanup(func() { c.Close() })
			if _, err := io.WriteString(c, msg); err != nil {
				errs <- err
				return
			}
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
				errs <- fmt.Errorf("port %d: echo %q %v", port, buf, err)
				return
			}
			flows[i] = echoFlow{key: handoff.FlowKey{Client: src, Anycast: dst}, owner: owner, conn: c}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return flows
}

// checkReplicated checks that every flow is held by its owner and by every
// other node (3 nodes, 2 replicas), with identical handshake state and the
// positions of msgLen bytes each way.
func checkReplicated(ctx context.Context, l *lab.Lab, admins []batonv1.AdminClient, flows []echoFlow, msgLen uint32) error {
	tables := make([]map[string]*batonv1.FlowState, len(admins))
	for i, a := range admins {
		t, err := localFlows(ctx, a)
		if err != nil {
			return fmt.Errorf("%s: %v", lab.NodeName(i), err)
		}
		tables[i] = t
	}
	for _, f := range flows {
		ks := f.key.String()
		own, ok := tables[f.owner][ks]
		if !ok {
			return fmt.Errorf("%s: owner %s does not have it", ks, lab.NodeName(f.owner))
		}
		if own.Owner != lab.NodeName(f.owner) || own.Phase != batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED || own.Service != "echo" {
			return fmt.Errorf("%s: owner's state: owner %s phase %s service %q", ks, own.Owner, own.Phase, own.Service)
		}
		if got := own.ClientAck - own.ServerIsn - 1; got != msgLen {
			return fmt.Errorf("%s: client acked %d bytes, want %d", ks, got, msgLen)
		}
		if got := own.ServerAck - own.ClientIsn - 1; got != msgLen {
			return fmt.Errorf("%s: server acked %d bytes, want %d", ks, got, msgLen)
		}
		for i, tbl := range tables {
			if i == f.owner {
				continue
			}
			r, ok := tbl[ks]
			if !ok {
				return fmt.Errorf("%s: replica %s does not have it", ks, lab.NodeName(i))
			}
			if r.Owner != own.Owner || r.ClientIsn != own.ClientIsn || r.ServerIsn != own.ServerIsn ||
				r.ClientAck != own.ClientAck || r.ServerAck != own.ServerAck || r.Epoch != own.Epoch ||
				r.ClientWindowScale != own.ClientWindowScale || r.ServerWindowScale != own.ServerWindowScale ||
				r.Timestamps != own.Timestamps || r.Sack != own.Sack || r.ClientSyn.GetMss() != own.ClientSyn.GetMss() {
				return fmt.Errorf("%s: replica on %s differs from the owner's state", ks, lab.NodeName(i))
			}
		}
	}
	return nil
}

// TestReplicationCluster runs 3 nodes with mutual TLS: 100 connections
// appear on their replicas with the owner's state; a node killed and
// restarted is resynced; a peer with a certificate from another CA is
// refused and injects nothing.
func TestReplicationCluster(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l := buildLab(t, ctx, 3, "btr")
	if err := l.EnableCluster(2); err != nil {
		t.Fatal(err)
	}
	procs := make([]*lab.Proc, 3)
	var err error
	admins := make([]batonv1.AdminClient, 3)
	for i := range 3 {
		if procs[i], err = l.StartBatond(ctx, batond, i); err != nil {
			t.Fatal(err)
		}
		admins[i] = adminClient(t, l, i)
	}
	if err := waitPeersUp(ctx, admins); err != nil {
		t.Fatal(err)
	}

	const msg = "replicate me"
	flows := openEchoFlows(t, ctx, l, 100, 30000, msg, -1)
	if err := waitFor(ctx, 30*time.Second, func() error {
		return checkReplicated(ctx, l, admins, flows, uint32(len(msg)))
	}); err != nil {
		t.Fatalf("after opening 100 flows: %v", err)
	}
	// The cluster view on any node shows all 100 with owner and replicas.
	resp, err := admins[1].ListFlows(ctx, &batonv1.ListFlowsRequest{PageSize: 1000, Service: "echo"})
	if err != nil {
		t.Fatal(err)
	}
	if resp.Total != 100 || len(resp.UnreachablePeers) != 0 {
		t.Fatalf("cluster view: %d flows, unreachable %v", resp.Total, resp.UnreachablePeers)
	}
	for _, f := range resp.Flows {
		if len(f.Replicas) != 2 || f.Replicas[0] == f.State.Owner || f.Replicas[1] == f.State.Owner {
			t.Fatalf("flow owned by %s has replicas %v", f.State.Owner, f.Replicas)
		}
	}

	// Kill node 3 and restart it: its own connections die with it (their
	// replicas elsewhere are dropped by its resync), it gets back every
	// flow the others own, including flows opened while it was down.
	if err := procs[2].Kill(); err != nil {
		t.Fatal(err)
	}
	procs[2].Wait(ctx)
	var survivors []echoFlow
	for _, f := range flows {
		if f.owner != 2 {
			survivors = append(survivors, f)
		}
	}
	survivors = append(survivors, openEchoFlows(t, ctx, l, 30, 31000, msg, 2)...)
	if procs[2], err = l.StartBatond(ctx, batond, 2); err != nil {
		t.Fatal(err)
	}
	if err := waitFor(ctx, 30*time.Second, func() error {
		if err := checkReplicated(ctx, l, admins, survivors, uint32(len(msg))); err != nil {
			return err
		}
		for i := range 2 {
			tbl, err := localFlows(ctx, admins[i])
			if err != nil {
				return err
			}
			for ks, st := range tbl {
				if st.Owner == "n3" {
					return fmt.Errorf("%s still holds %s of the restarted n3", lab.NodeName(i), ks)
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("after restarting n3: %v", err)
	}

	// An intruder with a certificate for "n2" from another CA cannot talk
	// to n1's peer port, so it cannot inject a flow.
	foreign := filepath.Join(l.LogDir, "foreign-pki")
	if err := handoff.GenerateLabPKI(foreign, []string{"n2"}); err != nil {
		t.Fatal(err)
	}
	fm, err := handoff.LoadTLS(filepath.Join(foreign, "ca.pem"), filepath.Join(foreign, "n2.pem"), filepath.Join(foreign, "n2-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	fake := handoff.FlowKey{Client: netip.MustParseAddrPort("198.51.100.2:999"), Anycast: netip.MustParseAddrPort("192.0.2.1:7")}
	conn, err := grpc.NewClient(l.PeerAddr(0).String(),
		grpc.WithTransportCredentials(credentials.NewTLS(fm.Client("n1"))),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return l.Client.Dial(ctx, "tcp4", addr, 0)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ictx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	stream, err := batonv1.NewPeerClient(conn).Replicate(ictx)
	if err == nil {
		err = stream.Send(&batonv1.FlowBatch{Sender: "n2", Seq: 1, Events: []*batonv1.FlowEvent{{
			Kind: batonv1.FlowEvent_KIND_OPEN,
			State: &batonv1.FlowState{Key: fake.Proto(), Owner: "n2", Epoch: 9, Service: "echo",
				Phase: batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED},
		}}})
		if err == nil {
			_, err = stream.Recv()
		}
	}
	if err == nil {
		t.Fatal("a peer with a certificate from another CA was able to replicate")
	}
	if !strings.Contains(err.Error(), "certificate") && !strings.Contains(err.Error(), "tls") {
		t.Logf("intruder refused with: %v", err)
	}
	tbl, err := localFlows(ctx, admins[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := tbl[fake.String()]; ok {
		t.Fatal("the intruder's flow reached n1's table")
	}
}

// waitPeersUp waits until every node sees every peer link up.
func waitPeersUp(ctx context.Context, admins []batonv1.AdminClient) error {
	return waitFor(ctx, 30*time.Second, func() error {
		for i, a := range admins {
			resp, err := a.ListPeers(ctx, &batonv1.ListPeersRequest{})
			if err != nil {
				return err
			}
			for _, p := range resp.Peers {
				if !p.Up {
					return fmt.Errorf("%s sees %s down: %s", lab.NodeName(i), p.Name, p.LastError)
				}
			}
		}
		return nil
	})
}
