package handoff

import (
	"context"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// With 3 nodes and k=2, every flow is on both other nodes; updates and
// closes follow.
func TestReplicationThreeNodes(t *testing.T) {
	t.Cleanup(leakCheck(t))
	c := newCluster(t, []string{"a", "b", "c"}, 2, nil)
	c.waitLive("a", "b", "c")
	a := c.nodes["a"]
	keys := keysRange(0, 300)
	a.src.Open(keys...)
	c.nodes["b"].src.Open(keysRange(1000, 1050)...)
	c.waitPlaced("a", c.names)
	c.waitPlaced("b", c.names)
	for _, n := range []string{"b", "c"} {
		if got := c.nodes[n].r.Store().Count("a"); got != 300 {
			t.Fatalf("%s holds %d of a's flows, want 300", n, got)
		}
	}

	a.src.Update(777, keys[:100]...)
	eventually(t, "updates on b and c", func() bool {
		for _, n := range []string{"b", "c"} {
			for _, k := range keys[:100] {
				st, ok := c.nodes[n].r.Store().Lookup(k)
				if !ok || st.ServerNextSeq != 777 {
					return false
				}
			}
		}
		return true
	})
	a.src.Close(keys[:150]...)
	c.waitPlaced("a", c.names)
	if got := c.nodes["c"].r.Store().Count("a"); got != 150 {
		t.Fatalf("c holds %d of a's flows after closes, want 150", got)
	}

	// Peer info and metrics on a.
	infos := a.r.Peers()
	if len(infos) != 2 || infos[0].Name != "b" || infos[1].Name != "c" {
		t.Fatalf("peers %v", infos)
	}
	for _, p := range infos {
		if !p.Up || p.EventsSent < 300+100+150 || p.BytesSent == 0 || p.BytesReceived == 0 ||
			p.FlowsSent != 150 || p.LastSeenUnixNano == 0 || p.LagNano <= 0 || p.LagP99Nano <= 0 {
			t.Errorf("peer info %v", p)
		}
	}
	if got := infos[0].FlowsHeld; got != 50 {
		t.Errorf("a holds %d of b's flows, want 50", got)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(a.r.Collector())
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		got[mf.GetName()] = mf
	}
	for _, name := range []string{"baton_replication_events_sent_total", "baton_replication_bytes_sent_total",
		"baton_replication_bytes_received_total", "baton_replication_lag_seconds", "baton_peer_up",
		"baton_replication_events_dropped_total", "baton_replication_replica_flows"} {
		if got[name] == nil {
			t.Errorf("metric %s missing", name)
		}
	}
	if h := got["baton_replication_lag_seconds"]; h != nil && h.Metric[0].GetHistogram().GetSampleCount() == 0 {
		t.Error("lag histogram empty")
	}
}

// 4 nodes, k=2: each flow is on exactly its two rendezvous replicas.
func TestReplicationFourNodesPlacement(t *testing.T) {
	t.Cleanup(leakCheck(t))
	c := newCluster(t, []string{"a", "b", "c", "d"}, 2, nil)
	c.waitLive(c.names...)
	c.nodes["a"].src.Open(keysRange(0, 400)...)
	c.nodes["d"].src.Open(keysRange(5000, 5200)...)
	c.waitPlaced("a", c.names)
	c.waitPlaced("d", c.names)
	// Not everything everywhere: each of b, c, d holds a strict subset.
	for _, n := range []string{"b", "c", "d"} {
		if got := c.nodes[n].r.Store().Count("a"); got == 0 || got == 400 {
			t.Errorf("%s holds %d of a's 400 flows", n, got)
		}
	}
	c.nodes["a"].src.Close(keysRange(0, 200)...)
	c.waitPlaced("a", c.names)
	if got := c.nodes["a"].r.Placement(testKey(300), "a"); len(got) != 2 || slices.Contains(got, "a") {
		t.Errorf("Placement %v", got)
	}
}

// A replica that restarts is resynced; an owner that restarts resyncs its
// replicas (flows it no longer has are dropped).
func TestReplicationRestart(t *testing.T) {
	t.Cleanup(leakCheck(t))
	c := newCluster(t, []string{"a", "b", "c"}, 2, nil)
	c.waitLive(c.names...)
	a := c.nodes["a"]
	a.src.Open(keysRange(0, 100)...)
	c.waitPlaced("a", c.names)

	// b down: opens and closes on a meanwhile.
	c.stop("b")
	c.waitLive("a", "c")
	a.src.Open(keysRange(100, 150)...)
	a.src.Close(keysRange(0, 30)...)
	c.waitPlaced("a", []string{"a", "c"})
	c.restart("b", nil)
	c.waitLive(c.names...)
	c.waitPlaced("a", c.names)
	if got := c.nodes["b"].r.Store().Count("a"); got != 120 {
		t.Fatalf("restarted b holds %d of a's flows, want 120", got)
	}

	// a down: b and c keep a's flows (for takeover).
	c.stop("a")
	c.waitLive("b", "c")
	for _, n := range []string{"b", "c"} {
		if got := c.nodes[n].r.Store().Count("a"); got != 120 {
			t.Fatalf("%s holds %d of a's flows while a is down, want 120", n, got)
		}
	}
	// a comes back with only part of its flows (and new ones): the resync
	// replaces what b and c hold from a.
	src := newFakeSource("a")
	src.Open(keysRange(30, 90)...)
	src.Open(keysRange(900, 910)...)
	c.restart("a", src)
	c.waitLive(c.names...)
	c.waitPlaced("a", c.names)
	for _, n := range []string{"b", "c"} {
		if got := c.nodes[n].r.Store().Count("a"); got != 70 {
			t.Fatalf("%s holds %d of a's flows after a's resync, want 70", n, got)
		}
		if _, ok := c.nodes[n].r.Store().Lookup(testKey(120)); ok {
			t.Fatalf("%s still holds a flow a no longer has", n)
		}
	}
}

// When a member goes down, the flows it held get a new replica (k copies
// again); when it comes back, flows move back and the extra copies go.
func TestReplicationMembershipChange(t *testing.T) {
	t.Cleanup(leakCheck(t))
	c := newCluster(t, []string{"a", "b", "c", "d", "e"}, 2, nil)
	c.waitLive(c.names...)
	c.nodes["a"].src.Open(keysRange(0, 500)...)
	c.waitPlaced("a", c.names)
	held := c.nodes["c"].r.Store().Count("a")
	if held == 0 {
		t.Fatal("c holds none of a's flows")
	}

	c.stop("c")
	live := []string{"a", "b", "d", "e"}
	c.waitLive(live...)
	c.waitPlaced("a", live) // every flow on exactly 2 of b, d, e
	total := 0
	for _, n := range []string{"b", "d", "e"} {
		total += c.nodes[n].r.Store().Count("a")
	}
	if total != 1000 {
		t.Fatalf("%d copies of a's 500 flows, want 1000", total)
	}

	c.restart("c", nil)
	c.waitLive(c.names...)
	c.waitPlaced("a", c.names) // back on c, gone from where c displaced them
	if got := c.nodes["c"].r.Store().Count("a"); got != held {
		t.Fatalf("c holds %d of a's flows after restart, want %d", got, held)
	}
}

// A node whose certificate comes from another CA cannot connect either way
// and injects nothing; the failed handshakes are counted.
func TestReplicationForeignCA(t *testing.T) {
	t.Cleanup(leakCheck(t))
	foreign := t.TempDir()
	if err := GenerateLabPKI(foreign, []string{"b"}); err != nil {
		t.Fatal(err)
	}
	c := newCluster(t, []string{"a", "b"}, 2, func(cfg *ReplicationConfig) {
		if cfg.Self == "b" {
			tm, err := LoadTLS(filepath.Join(foreign, "ca.pem"), filepath.Join(foreign, "b.pem"), filepath.Join(foreign, "b-key.pem"))
			if err != nil {
				t.Fatal(err)
			}
			cfg.TLS = tm
		}
	})
	a, b := c.nodes["a"], c.nodes["b"]
	a.src.Open(keysRange(0, 10)...)
	b.src.Open(keysRange(100, 110)...)
	eventually(t, "a to count failed handshakes from b", func() bool {
		return a.r.rejects.get("unknown", RejectTLSHandshake) >= 2
	})
	eventually(t, "both sides to record the failure", func() bool {
		return a.r.Peers()[0].LastError != "" && b.r.Peers()[0].LastError != ""
	})
	if a.r.Store().Len() != 0 || b.r.Store().Len() != 0 {
		t.Fatalf("stores: a %d, b %d; want empty", a.r.Store().Len(), b.r.Store().Len())
	}
	if a.r.Members().Up("b") || b.r.Members().Up("a") {
		t.Fatal("a peer with a foreign certificate is up")
	}
	if p := a.r.Peers()[0]; p.Up || p.EventsSent != 0 {
		t.Fatalf("a's view of b: %v", p)
	}
}

// Without TLS the sender field is trusted; replication works.
func TestReplicationInsecure(t *testing.T) {
	t.Cleanup(leakCheck(t))
	c := newCluster(t, []string{"a", "b"}, 2, func(cfg *ReplicationConfig) { cfg.Insecure = true })
	c.waitLive(c.names...)
	c.nodes["a"].src.Open(keysRange(0, 20)...)
	c.waitPlaced("a", c.names)
}

// A full queue drops events, and a resync repairs the loss.
func TestReplicationQueueOverflowResync(t *testing.T) {
	t.Cleanup(leakCheck(t))
	c := newCluster(t, []string{"a", "b"}, 1, func(cfg *ReplicationConfig) { cfg.QueueLen = 4 })
	c.waitLive(c.names...)
	eventually(t, "a's first resync to b", func() bool { return c.nodes["a"].r.links[0].resyncs.Load() == 1 })
	c.nodes["a"].src.Open(keysRange(0, 3000)...)
	c.waitPlaced("a", c.names)
	l := c.nodes["a"].r.links[0]
	if l.droppedFull.Load() == 0 || l.resyncs.Load() < 2 {
		t.Fatalf("dropped %d, resyncs %d: want drops and a second resync", l.droppedFull.Load(), l.resyncs.Load())
	}
	if p := c.nodes["a"].r.Peers()[0]; p.EventsDropped == 0 {
		t.Fatalf("peer info shows no drops: %v", p)
	}
}

func TestReplicationLookupAndListCluster(t *testing.T) {
	t.Cleanup(leakCheck(t))
	c := newCluster(t, []string{"a", "b", "c"}, 2, nil)
	c.waitLive(c.names...)
	c.nodes["a"].src.Open(keysRange(0, 5)...)
	c.nodes["b"].src.Open(keysRange(10, 13)...)
	c.waitPlaced("a", c.names)
	c.waitPlaced("b", c.names)

	ctx := context.Background()
	copies, unreachable := c.nodes["c"].r.LookupCluster(ctx, testKey(1))
	if len(unreachable) != 0 || len(copies) != 3 {
		t.Fatalf("copies %v unreachable %v", copies, unreachable)
	}
	for i, want := range []struct {
		node  string
		owned bool
	}{{"a", true}, {"b", false}, {"c", false}} {
		if copies[i].Node != want.node || copies[i].Owned != want.owned || copies[i].State.GetOwner() != "a" {
			t.Errorf("copy %d: %v, want node %s owned %v", i, copies[i], want.node, want.owned)
		}
	}
	if copies, _ := c.nodes["a"].r.LookupCluster(ctx, testKey(999)); len(copies) != 0 {
		t.Errorf("unknown flow: %v", copies)
	}

	var got []string
	unreachable = c.nodes["c"].r.ListCluster(ctx, func(node string, st *batonv1.FlowState) {
		k, _ := KeyFromProto(st.Key)
		got = append(got, node+" "+k.String())
	})
	if len(unreachable) != 0 || len(got) != 8 {
		t.Fatalf("ListCluster: %d flows %v, unreachable %v", len(got), got, unreachable)
	}
	sort.Strings(got)
	if !strings.HasPrefix(got[0], "a ") || !strings.HasPrefix(got[7], "b ") {
		t.Errorf("ListCluster nodes: %v", got)
	}

	c.stop("b")
	c.waitLive("a", "c")
	if unreachable := c.nodes["c"].r.ListCluster(ctx, func(string, *batonv1.FlowState) {}); !slices.Equal(unreachable, []string{"b"}) {
		t.Errorf("unreachable %v, want [b]", unreachable)
	}
	if _, unreachable := c.nodes["c"].r.LookupCluster(ctx, testKey(1)); !slices.Equal(unreachable, []string{"b"}) {
		t.Errorf("unreachable %v, want [b]", unreachable)
	}
}

func TestNewReplicationConfigErrors(t *testing.T) {
	dir := t.TempDir()
	if err := GenerateLabPKI(dir, []string{"a", "b"}); err != nil {
		t.Fatal(err)
	}
	tmB, err := LoadTLS(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "b.pem"), filepath.Join(dir, "b-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	base := func() ReplicationConfig {
		return ReplicationConfig{Self: "a", Peers: []Peer{{"b", "127.0.0.1:1"}}, Listen: "127.0.0.1:0", Prefixes: testPrefixes, Insecure: true}
	}
	src := newFakeSource("a")
	for _, c := range []struct {
		name string
		mod  func(*ReplicationConfig)
		want string
	}{
		{"no listen", func(c *ReplicationConfig) { c.Listen = "" }, "listen"},
		{"no prefixes", func(c *ReplicationConfig) { c.Prefixes = nil }, "prefixes"},
		{"no TLS", func(c *ReplicationConfig) { c.Insecure = false }, "TLS material required"},
		{"both", func(c *ReplicationConfig) { c.TLS = tmB }, "both set"},
		{"wrong cert", func(c *ReplicationConfig) { c.Insecure = false; c.TLS = tmB }, "do not include the node name"},
		{"negative replicas", func(c *ReplicationConfig) { c.Replicas = -1 }, "replicas"},
		{"peer is self", func(c *ReplicationConfig) { c.Peers = []Peer{{"a", "x:1"}} }, "itself"},
	} {
		cfg := base()
		c.mod(&cfg)
		if _, err := NewReplication(cfg, src); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.name, err, c.want)
		}
	}
	if _, err := NewReplication(base(), nil); err == nil {
		t.Error("nil source accepted")
	}
	r, err := NewReplication(base(), src)
	if err != nil {
		t.Fatal(err)
	}
	r.Close() // Close before Start is fine
	if r.Start() == nil {
		t.Error("Start after Close succeeded")
	}
}

// With the replica holding its acks back (ackDelay), one ack covers
// several batches: the owner releases them all, measures the lag of every
// flow they carried, and counts the peer's support (lease.go) from the
// send time of the newest covered batch, not from the ack's arrival.
func TestReplicationCumulativeAcks(t *testing.T) {
	old := ackDelay
	ackDelay = time.Second // below ackTimeout
	t.Cleanup(func() { ackDelay = old })
	t.Cleanup(leakCheck(t))
	c := newCluster(t, []string{"a", "b"}, 1, nil)
	c.waitLive("a", "b")
	a, l := c.nodes["a"], c.nodes["a"].r.links[0]
	lagCount := func() (n uint64) {
		l.window.mu.Lock()
		defer l.window.mu.Unlock()
		for i := range l.window.slots {
			n += l.window.slots[i].n
		}
		return n
	}
	support := func() time.Time {
		a.r.members.mu.Lock()
		defer a.r.members.mu.Unlock()
		return a.r.members.state["b"].support
	}
	poll := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !ok(); time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	// Let the session's first acks (resync) and a heartbeat's settle.
	time.Sleep(ackDelay + 100*time.Millisecond)
	lags0 := lagCount()
	// Five flows, each in a batch of its own (more than a coalesce window
	// apart): the first is acknowledged at once (the link was quiet), the
	// other four wait for the end of the ack interval.
	var firstSent, lastSent time.Time
	for i := range 5 {
		lastSent = time.Now()
		if i == 0 {
			firstSent = lastSent
		}
		a.src.Open(testKey(i))
		poll("flow on b", func() bool { return c.nodes["b"].r.Store().Count("a") == i+1 })
		if i == 0 {
			poll("the first ack", func() bool { return !support().Before(firstSent) })
		}
	}
	if s := support(); time.Since(firstSent) < ackDelay/2 && !s.Before(lastSent) {
		t.Fatalf("support %v after the flows (the last opened %v): the replica did not hold its ack", s, lastSent)
	}
	poll("the ack", func() bool { return !support().Before(lastSent) })
	acked := time.Now()
	if got := lagCount() - lags0; got != 5 {
		t.Fatalf("%d lags observed, want 5 (one per flow)", got)
	}
	if s := support(); s.After(lastSent.Add(ackDelay/2)) || !s.Before(acked) {
		t.Fatalf("support %v: want the newest batch's send time (last flow opened %v, acked by %v)", s, lastSent, acked)
	}
	if e := l.lastError(); e != "" {
		t.Fatalf("link error %q", e)
	}
}
