package handoff

// Takeover end to end, in process: real gVisor stacks, real replication,
// a gVisor client checking every byte and counting the resets it gets.

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
	"github.com/baton-anycast/baton/stack/stacktest"
)

const tkSize = 48 << 20

var (
	tkDst4 = netip.AddrPortFrom(stacktest.Anycast4, tkStreamPort)
	tkDst6 = netip.AddrPortFrom(stacktest.Anycast6, tkStreamPort)
)

// (a) A live migration A->B mid-download completes exactly, zero RST.
func TestTakeoverLiveMigration(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 3})
	l.enableClientSACK()
	ctx := testCtx(t)
	d := l.startDownload(ctx, tkDst4, tkSize, 11)
	d.waitBytes(t, tkSize/3)
	l.route.Store(1)
	if err := d.wait(t); err != nil {
		l.logStats()
		t.Fatalf("download: %v", err)
	}
	l.logStats()
	if n := l.resets(); n != 0 {
		t.Fatalf("client got %d resets", n)
	}
	if got := l.nodes[1].e.Stats().Takeovers[HowPullMigrate]; got != 1 {
		t.Fatalf("n2 pull-migrations: %d, want 1", got)
	}
}

// migrate runs one download through flips: route goes to flips[i] once
// the client has (i+1)/(len(flips)+1) of the bytes.
func (l *tkLab) migrate(t *testing.T, dst netip.AddrPort, size uint64, flips []int, afterFlip func(i int)) {
	t.Helper()
	ctx := testCtx(t)
	d := l.startDownload(ctx, dst, size, uint64(len(flips))*7+3)
	for i, to := range flips {
		d.waitBytes(t, int64(size)*int64(i+1)/int64(len(flips)+1))
		l.route.Store(int32(to))
		if afterFlip != nil {
			afterFlip(i)
		}
	}
	l.finishExact(t, d)
}

// (b) A->B->A, and several flips over three nodes.
func TestTakeoverFlips(t *testing.T) {
	t.Run("ABA", func(t *testing.T) {
		l := newTkLab(t, tkConfig{nodes: 2})
		l.enableClientSACK()
		l.migrate(t, tkDst4, tkSize, []int{1, 0}, nil)
		if got := l.sum(func(s TakeoverStats) uint64 { return s.Takeovers[HowPullMigrate] }); got != 2 {
			t.Fatalf("pull-migrations: %d, want 2", got)
		}
	})
	t.Run("seven", func(t *testing.T) {
		l := newTkLab(t, tkConfig{nodes: 3})
		l.enableClientSACK()
		l.migrate(t, tkDst4, 2*tkSize, []int{1, 2, 0, 2, 1, 0, 1}, nil)
		if got := l.sum(func(s TakeoverStats) uint64 { return s.Takeovers[HowPullMigrate] }); got < 7 {
			t.Fatalf("pull-migrations: %d, want 7", got)
		}
	})
}

// (f) IPv6, and (a) over segmentation offload (GSO segments with partial
// checksums through the translation).
func TestTakeoverIPv6AndGSO(t *testing.T) {
	t.Run("ipv6", func(t *testing.T) {
		l := newTkLab(t, tkConfig{nodes: 3})
		l.enableClientSACK()
		l.migrate(t, tkDst6, tkSize, []int{1, 2}, nil)
	})
	t.Run("gso", func(t *testing.T) {
		l := newTkLab(t, tkConfig{nodes: 2, gso: true})
		l.enableClientSACK()
		l.migrate(t, tkDst4, tkSize, []int{1, 0}, nil)
	})
}

// (g) Timestamps off, SACK off, and both.
func TestTakeoverOptions(t *testing.T) {
	for _, c := range []struct {
		name     string
		ts, sack bool
	}{{"no-ts", false, true}, {"no-sack", true, false}, {"neither", false, false}} {
		t.Run(c.name, func(t *testing.T) {
			l := newTkLab(t, tkConfig{nodes: 2})
			l.setClientSACK(c.sack)
			if !c.ts {
				f := stripTS
				l.rewrite.Store(&f)
			}
			l.migrate(t, tkDst4, tkSize, []int{1, 0}, nil)
			st, ok := l.nodes[0].tr.Lookup(l.onlyFlow(t))
			if !ok {
				t.Fatal("flow not tracked on n1 after the flips")
			}
			if st.Timestamps != c.ts || st.Sack != c.sack {
				t.Fatalf("flow has timestamps %v sack %v, want %v %v", st.Timestamps, st.Sack, c.ts, c.sack)
			}
		})
	}
}

// onlyFlow returns the key of the one flow some live node tracks.
func (l *tkLab) onlyFlow(t *testing.T) FlowKey {
	t.Helper()
	var keys []FlowKey
	for _, n := range l.nodes {
		if n.killed {
			continue
		}
		n.tr.Owned(func(st *batonv1.FlowState) bool {
			k, _ := KeyFromProto(st.Key)
			keys = append(keys, k)
			return true
		})
	}
	if len(keys) != 1 {
		t.Fatalf("%d flows tracked, want 1", len(keys))
	}
	return keys[0]
}

// (h) 2% loss both ways after each takeover.
func TestTakeoverLoss(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 3})
	l.enableClientSACK()
	rng := rand.New(rand.NewPCG(1, 2))
	var mu sync.Mutex
	lossy := func(pkt []byte) bool {
		mu.Lock()
		defer mu.Unlock()
		return rng.IntN(100) >= 2
	}
	l.migrate(t, tkDst4, 16<<20, []int{1, 2}, func(i int) {
		if i == 0 {
			l.rewrite.Store(&lossy)
			for _, n := range l.nodes {
				n.tap.lossPPM.Store(20000)
			}
		}
	})
	var lost uint64
	for _, n := range l.nodes {
		lost += n.tap.lost.Load()
	}
	t.Logf("dropped %d node->client packets, %d client->node packets", lost, l.sw.Dropped())
	if lost == 0 || l.sw.Dropped() == 0 {
		t.Fatal("no loss happened")
	}
}

// (c) The owner crashes mid-download while the client only receives: its
// flow's designated replica pushes it at once; with the route on the
// other survivor, that one then claims it from the designated replica.
func TestTakeoverCrash(t *testing.T) {
	for _, toDesignated := range []bool{false, true} {
		name := "route-to-other"
		if toDesignated {
			name = "route-to-designated"
		}
		t.Run(name, func(t *testing.T) {
			l := newTkLab(t, tkConfig{nodes: 3})
			l.enableClientSACK()
			ctx := testCtx(t)
			d := l.startDownload(ctx, tkDst4, tkSize, 5)
			d.waitBytes(t, tkSize/3)
			// Replicated by now (the client acked a third of the stream).
			eventually(t, "the flow replicated with its checkpoint", func() bool {
				st, ok := l.nodes[1].r.Store().Lookup(d.key)
				return ok && st.Checkpoint != nil && st.ClientAckedBytes > 0
			})
			des := l.nodes[0].e.designated(d.key, "n1")
			di, oi := l.node(des), 3-l.node(des)
			l.kill(0)
			if toDesignated {
				l.route.Store(int32(di))
			} else {
				l.route.Store(int32(oi))
			}
			l.finishExact(t, d)
			// The designated replica restores the flow exactly once: by a
			// push, or by a pull if a client packet reached it before it
			// saw the owner die (then the push joins the pull).
			ds := l.nodes[di].e.Stats()
			if got := ds.Takeovers[HowPush] + ds.Takeovers[HowPullRestore]; got != 1 {
				t.Fatalf("designated %s restored the flow %d times (%v), want 1", des, got, ds.Takeovers)
			}
			other := l.nodes[oi].e.Stats()
			if !toDesignated && other.Takeovers[HowPullMigrate] != 1 {
				t.Fatalf("%s pull-migrated %d flows, want 1", l.nodes[oi].name, other.Takeovers[HowPullMigrate])
			}
			if other.Takeovers[HowPush]+other.Takeovers[HowPullRestore] != 0 {
				t.Fatalf("the non-designated %s restored the flow itself", l.nodes[oi].name)
			}
		})
	}
}

// (d) The owner dies and the service cannot resume (its state has no
// checkpoint but the request was acknowledged): the client gets a reset,
// and the metrics say why.
func TestTakeoverCannotResume(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 3, noCheckpoint: map[string]bool{"n1": true}})
	ctx := testCtx(t)
	d := l.startDownload(ctx, tkDst4, tkSize, 9)
	d.waitBytes(t, tkSize/4)
	eventually(t, "the flow replicated", func() bool {
		st, ok := l.nodes[1].r.Store().Lookup(d.key)
		return ok && st.ClientAckedBytes > 0
	})
	l.kill(0)
	l.route.Store(1)
	err := d.wait(t)
	l.logStats()
	if err == nil {
		t.Fatal("download completed without a checkpoint")
	}
	t.Logf("client: %v", err)
	if l.resets() == 0 {
		t.Fatal("the client got no reset")
	}
	if n := l.sum(func(s TakeoverStats) uint64 { return s.Failures[reasonCannotResume] }); n == 0 {
		t.Fatal("no cannot_resume failure counted")
	}
	if n := l.sum(func(s TakeoverStats) uint64 { return s.RSTs[reasonCannotResume] }); n == 0 {
		t.Fatal("no cannot_resume reset counted")
	}
}

// (e) A flow nobody in the cluster knows (it was opened on a node outside
// it) reaching a node: the stack resets it, as it always did, counted as
// unknown.
func TestTakeoverUnknownFlow(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 2, solo: true})
	ctx := testCtx(t)
	l.route.Store(2) // the standalone node
	d := l.startDownload(ctx, tkDst4, tkSize, 13)
	d.waitBytes(t, tkSize/4)
	l.route.Store(0)
	err := d.wait(t)
	l.logStats()
	if err == nil {
		t.Fatal("download of an unknown flow completed")
	}
	t.Logf("client: %v", err)
	if l.resets() == 0 {
		t.Fatal("the client got no reset")
	}
	s := l.nodes[0].e.Stats()
	if s.Unknown != 1 || s.RSTs[reasonUnknown] != 1 {
		t.Fatalf("n1 counted %d unknown flows, %d unknown resets; want 1, 1", s.Unknown, s.RSTs[reasonUnknown])
	}
	if len(s.Takeovers) != 0 {
		t.Fatalf("n1 took over an unknown flow: %v", s.Takeovers)
	}
}

// Policy "forward": the flow stays on its owner, the node that gets its
// packets tunnels them there; the owner records it in the history. An
// owner whose state cannot be handed over exactly (no checkpoint) keeps
// the flow the same way under the default policy (second chance).
func TestTakeoverForward(t *testing.T) {
	for _, c := range []struct {
		name string
		cfg  tkConfig
	}{
		{"policy", tkConfig{nodes: 2, policy: func(string) Policy { return PolicyForward }}},
		{"cannot-resume", tkConfig{nodes: 2, noCheckpoint: map[string]bool{"n1": true}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newTkLab(t, c.cfg)
			l.enableClientSACK()
			l.migrate(t, tkDst4, tkSize/2, []int{1}, nil)
			s := l.nodes[1].e.Stats()
			if s.Takeovers[HowForward] != 1 || s.Takeovers[HowPullMigrate] != 0 {
				t.Fatalf("n2 takeovers %v, want one forward", s.Takeovers)
			}
			if s.Packets["forward_out"] == 0 || l.nodes[0].e.Stats().Packets["forward_in"] == 0 {
				t.Fatal("no packet forwarded")
			}
		})
	}
}

// The ownership history and epochs after A -> B -> A, as batonctl flow
// shows them, and the positions the tracker reports.
func TestTakeoverHistory(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 2})
	ctx := testCtx(t)
	d := l.startDownload(ctx, tkDst4, tkSize, 17)
	d.waitBytes(t, tkSize/3)
	l.route.Store(1)
	d.waitBytes(t, 2*tkSize/3)
	l.route.Store(0)
	eventually(t, "n1 to own the flow again", func() bool {
		_, ok := l.nodes[0].tr.Lookup(d.key)
		return ok
	})
	st, _ := l.nodes[0].tr.Lookup(d.key)
	var hows []string
	for _, h := range st.History {
		hows = append(hows, fmt.Sprintf("%s@%d:%s", h.Node, h.Epoch, h.How))
	}
	if got, want := strings.Join(hows, " "), "n1@1:open n2@2:pull-migrate n1@3:pull-migrate"; got != want {
		t.Fatalf("history %q, want %q", got, want)
	}
	if st.Epoch != 3 {
		t.Fatalf("epoch %d, want 3", st.Epoch)
	}
	// The resumed service publishes its checkpoint again, at the output
	// offset it resumed at. It does so from its own goroutine once it has
	// the restored connection, which may be after the tracker took the
	// flow (the snapshot above may still carry the previous owner's).
	at := st.History[2].AtOffset // checked against what was sent below
	var cur *batonv1.FlowState
	eventually(t, "the resumed service's checkpoint", func() bool {
		cur, _ = l.nodes[0].tr.Lookup(d.key)
		return cur != nil && cur.CheckpointOffset == at
	})
	if string(cur.Checkpoint) != services.StreamRequest(tkSize, 17) {
		t.Fatalf("checkpoint %q at %d: want the request at output offset %d", cur.Checkpoint, cur.CheckpointOffset, at)
	}
	if err := d.wait(t); err != nil {
		t.Fatal(err)
	}
	if l.resets() != 0 {
		t.Fatal("resets")
	}
	if h := st.History[2]; h.AtOffset == 0 || h.AtOffset > st.ServerSentBytes {
		t.Fatalf("restore offset %d (sent %d)", h.AtOffset, st.ServerSentBytes)
	}
	if n1 := l.nodes[1]; n1.tr.Has(d.key) {
		t.Fatal("n2 still tracks the flow it handed back")
	}
}

// A node that learns through replication that another node owns one of
// its flows at a higher epoch stops emitting for it and aborts it
// silently.
func TestTakeoverFenceByEpoch(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 2})
	ctx := testCtx(t)
	d := l.startDownload(ctx, tkDst4, tkSize, 19)
	d.waitBytes(t, tkSize/4)
	st, ok := l.nodes[0].tr.Lookup(d.key)
	if !ok {
		t.Fatal("flow not tracked")
	}
	st.Owner, st.Epoch = "n2", st.Epoch+5
	l.route.Store(-1) // nobody really owns it elsewhere: keep the client's packets away
	// A client packet routed before the blackhole and judged after the
	// state change would find the flow moved and start a takeover back,
	// which n2 (owner in name only) can only answer with a reset.
	l.quiesceTo(t, 0)
	l.nodes[0].e.foreignState(st)
	if l.nodes[0].tr.Has(d.key) {
		t.Fatal("n1 still tracks the flow")
	}
	// n1 sends nothing more: the download stalls without a reset.
	n := d.conn.n.Load()
	time.Sleep(300 * time.Millisecond)
	if d.conn.n.Load() > n+4<<20 {
		t.Fatalf("n1 kept sending: %d -> %d bytes", n, d.conn.n.Load())
	}
	if l.resets() != 0 {
		t.Fatal("the fenced flow was reset")
	}
	if s := l.nodes[0].e.Stats(); s.Packets["fenced"] == 0 {
		t.Fatalf("nothing fenced: %v", s.Packets)
	}
}

// Every goroutine of the engines (takeovers, forwarders, membership
// watch, sweeps) stops on Close.
func TestTakeoverCloseStopsGoroutines(t *testing.T) {
	done := leakCheck(t)
	func() {
		l := newTkLab(t, tkConfig{nodes: 3, policy: func(string) Policy { return PolicyForward }})
		ctx := testCtx(t)
		d := l.startDownload(ctx, tkDst4, 8<<20, 23)
		d.waitBytes(t, 2<<20)
		l.route.Store(1)
		if err := d.wait(t); err != nil {
			t.Fatal(err)
		}
		if l.nodes[1].e.Stats().Takeovers[HowForward] != 1 {
			t.Fatal("not forwarded")
		}
		l.close()
	}()
	done()
}
