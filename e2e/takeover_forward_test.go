package e2e

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// TestTakeoverForward (scenario e): with -takeover-policy echo=forward,
// http=forward the services are not moved off a live owner: a node the
// router sends their flows to tunnels the packets to the owner. An
// interactive echo session and a keep-alive HTTP session, every byte
// checked, run across rehashes that send both to other nodes, from one
// to another, and back to the owner; nothing is reset and the new nodes count the
// forwards (baton_takeover_total{kind="forward"}, packets forward_out on
// them and forward_in on the owner).
func TestTakeoverForward(t *testing.T) {
	t.Parallel()
	const (
		target = 0
		chunk  = 48 << 10
		rounds = 40
	)
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btke", 2, nil, "-takeover-policy", "echo=forward,http=forward")
	l := c.Lab

	resets := clientResets(t, l)
	echo := dialEcho(t, ctx, l, portsTo(t, l, echoPort, target, 1, 24000)[0])
	httpPort := portsTo(t, l, 80, target, 1, 24100)[0]
	h, err := dialHTTP(ctx, l.Client, "tcp4", hostPort(l.Anycast4, 80), httpPort)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	get := 0
	exchange := func(what string) {
		t.Helper()
		for range rounds {
			if err := echo.round(chunk); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
		// A response larger than the socket buffers: the client's acks
		// keep arriving on the new node while the owner sends.
		for range 3 {
			get++
			n, seed := uint64(4<<20+get*1000), uint64(get)
			status, body, err := h.get(fmt.Sprintf("/bytes?n=%d&seed=%d", n, seed))
			if err == nil && status != 200 {
				err = fmt.Errorf("status %d", status)
			}
			if err == nil {
				err = verifyBytes(body, n, seed)
			}
			if err != nil {
				t.Fatalf("%s: GET %d: %v", what, get, err)
			}
		}
	}
	exchange("before the rehash")

	for _, nexthops := range [][]int{{1, 2}, {2}, {1}, {0, 1, 2}} {
		if err := l.SetNexthops(nexthops); err != nil {
			t.Fatal(err)
		}
		to := []int{predict(t, l, echo.port, echoPort), predict(t, l, httpPort, 80)}
		t.Logf("nexthops %v: echo to %s, http to %s", nexthops, lab.NodeName(to[0]), lab.NodeName(to[1]))
		exchange(fmt.Sprintf("after SetNexthops(%v)", nexthops))
	}

	// The echo client half-closes: everything sent comes back, then EOF.
	if err := echo.send(chunk); err != nil {
		t.Fatal(err)
	}
	if err := echo.Conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := echo.expect(chunk); err != nil {
		t.Fatal(err)
	}
	if n, err := echo.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("echo after the half-close: %d bytes, %v (want EOF)", n, err)
	}
	noResets(t, l, resets)
	c.logMetrics()
	c.noFailures()

	if n := c.total("total", `kind="forward"`); n < 2 {
		t.Errorf("%v forward takeovers counted, want >= 2 (echo and http)", n)
	}
	if n := c.counter(target, "packets_total", `what="forward_in"`); n == 0 {
		t.Error("the owner received no forwarded packet")
	}
	if n := c.total("total", `kind="pull-migrate"`); n != 0 {
		t.Errorf("%v flows migrated under the forward policy", n)
	}
	t.Logf("echo: %d bytes each way; http: %d responses", echo.recv, get)
}

// TestTakeoverForwardOwnerDies: an echo session under the forward policy
// is tunnelled by n2 to its owner n1 when n1 is killed with SIGKILL. The
// session is caught up (every byte sent came back, and the replicas hold
// that state), so echo can resume from the replicated state: n1's
// designated replica restores it (push), and n2 either serves it (it is
// the designated replica) or forwards to the one that is. Every byte after
// the crash is checked too, and nothing is reset.
func TestTakeoverForwardOwnerDies(t *testing.T) {
	t.Parallel()
	const (
		target = 0
		chunk  = 32 << 10
		rounds = 20
	)
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btkg", 2, nil, "-takeover-policy", "echo=forward")
	l := c.Lab

	resets := clientResets(t, l)
	echo := dialEcho(t, ctx, l, portsTo(t, l, echoPort, target, 1, 26000)[0])
	exchange := func(what string) {
		t.Helper()
		for range rounds {
			if err := echo.round(chunk); err != nil {
				t.Fatalf("%s: %v", what, err)
			}
		}
	}
	exchange("on the owner")
	if err := l.SetNexthops([]int{1}); err != nil {
		t.Fatal(err)
	}
	exchange("forwarded by n2")

	// The replicas hold the caught-up state before the owner dies.
	key := handoff.FlowKey{Client: netip.AddrPortFrom(l.ClientAddr4, uint16(echo.port)), Anycast: netip.AddrPortFrom(l.Anycast4, echoPort)}
	if err := waitFor(ctx, time.Minute, func() error {
		for _, i := range []int{1, 2} {
			resp, err := c.admins[i].GetFlow(ctx, &batonv1.GetFlowRequest{Key: key.Proto(), LocalOnly: true})
			if err != nil {
				return err
			}
			s := resp.Flow.GetState()
			if s.GetOwner() != lab.NodeName(target) || s.GetServerAckedBytes() != echo.sent || s.GetClientAckedBytes() != echo.recv {
				return fmt.Errorf("%s holds owner %s, input %d, output %d acked; want %s, %d, %d", lab.NodeName(i),
					s.GetOwner(), s.GetServerAckedBytes(), s.GetClientAckedBytes(), lab.NodeName(target), echo.sent, echo.recv)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("replicas not caught up: %v", err)
	}

	if err := c.procs[target].Kill(); err != nil {
		t.Fatal(err)
	}
	if err := l.SetNexthops([]int{1, 2}); err != nil {
		t.Fatal(err)
	}
	t.Logf("after the crash the router sends the session to %s", lab.NodeName(predict(t, l, echo.port, echoPort)))
	_ = echo.SetDeadline(time.Now().Add(time.Minute))
	exchange("after the owner died")
	noResets(t, l, resets)
	c.logMetrics()
	c.noFailures()
	if n := c.total("total", `kind="push"`) + c.total("total", `kind="pull-restore"`); n < 1 {
		t.Error("the session was not restored from its replicas")
	}
	t.Logf("echo: %d bytes each way", echo.recv)
}
