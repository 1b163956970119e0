package main

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/baton-anycast/baton/handoff"
)

// startRepl starts an insecure replication of node self (listening on
// 127.0.0.1) with peers.
func startRepl(t *testing.T, self string, lis net.Listener, peers []handoff.Peer) *handoff.Replication {
	t.Helper()
	prefixes := []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32")}
	tr := handoff.NewTracker(handoff.TrackerConfig{Node: self, Prefixes: prefixes})
	r, err := handoff.NewReplication(handoff.ReplicationConfig{Self: self, Peers: peers, Listen: lis.Addr().String(),
		Replicas: 1, Prefixes: prefixes, Insecure: true}, tr)
	if err != nil {
		t.Fatal(err)
	}
	lis.Close() // Start listens on the address again
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}

func listenLocal(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// waitProbe waits (bounded) until probe passes.
func waitProbe(t *testing.T, probe func(context.Context) error) {
	t.Helper()
	var err error
	for range 200 {
		if err = probe(context.Background()); err == nil {
			return
		}
		time.Sleep(25 * time.Millisecond)
	}
	t.Fatalf("join check still failing: %v", err)
}

// The join check passes once every peer link is up, or failed because the
// peer is not running, and then stays up.
func TestJoinCheck(t *testing.T) {
	t.Run("peer up", func(t *testing.T) {
		l1, l2 := listenLocal(t), listenLocal(t)
		a1, a2 := l1.Addr().String(), l2.Addr().String()
		r1 := startRepl(t, "n1", l1, []handoff.Peer{{Name: "n2", Addr: a2}})
		d := &daemon{cfg: &Config{}, repl: r1}
		d.cfg.Cluster.Peers = []PeerConfig{{Name: "n2", Address: a2}}
		spec := d.joinCheck()
		if spec == nil || spec.Name != checkJoin || !spec.Critical {
			t.Fatalf("join check %+v", spec)
		}
		// n2's address accepts TCP (l2's backlog) but answers nothing yet.
		if err := spec.Probe(context.Background()); err == nil {
			t.Fatal("join check passed before the peer answered")
		}
		r2 := startRepl(t, "n2", l2, []handoff.Peer{{Name: "n1", Addr: a1}})
		waitProbe(t, spec.Probe) // up, or a dial in startRepl's gap failed: both let it join
		for range 200 {
			if r2.Peers()[0].Up && r1.Peers()[0].Up {
				return
			}
			time.Sleep(25 * time.Millisecond)
		}
		t.Fatalf("peers not up: %+v", r1.Peers()[0])
	})
	t.Run("peer not running", func(t *testing.T) {
		l1, l2 := listenLocal(t), listenLocal(t)
		a2 := l2.Addr().String()
		l2.Close() // nothing listens: connection refused
		r1 := startRepl(t, "n1", l1, []handoff.Peer{{Name: "n2", Addr: a2}})
		d := &daemon{cfg: &Config{}, repl: r1}
		spec := d.joinCheck()
		waitProbe(t, spec.Probe)
		if err := spec.Probe(context.Background()); err != nil {
			t.Fatalf("join check failed again: %v", err)
		}
	})
	t.Run("no cluster", func(t *testing.T) {
		if spec := (&daemon{cfg: &Config{}}).joinCheck(); spec != nil {
			t.Fatalf("join check without a cluster: %+v", spec)
		}
	})
}

func TestDepartSettle(t *testing.T) {
	for _, c := range []struct{ drain, want time.Duration }{
		{30 * time.Second, time.Second}, {2 * time.Second, 500 * time.Millisecond}, {0, 0},
	} {
		if got := departSettle(c.drain); got != c.want {
			t.Errorf("departSettle(%s) = %s, want %s", c.drain, got, c.want)
		}
	}
}
