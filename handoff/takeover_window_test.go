package handoff

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

// A crash while the client's receive window is closed: the client stopped
// reading (its window fell to zero, the owner probes it), starts reading
// again just as the owner dies, and its packets then reach a node other
// than the dead owner's designated replica. The designated replica pushes
// the flow with no client packet in hand (it assumes a window), the other
// node claims it from there moments later (push, then claim). The
// download must finish exactly, without a reset (CI saw it stall once in
// the lab).
func TestTakeoverCrashClosedWindow(t *testing.T) {
	for _, tc := range []struct {
		name       string
		routeDelay time.Duration // from the kill to the route change
		gso        bool          // the nodes' devices take GSO segments
		closed     time.Duration // how long the window stays closed
	}{
		{"route-at-once", 0, false, 300 * time.Millisecond},
		{"route-after-2ms", 2 * time.Millisecond, false, 300 * time.Millisecond},
		{"route-after-20ms", 20 * time.Millisecond, false, 300 * time.Millisecond},
		{"gso-route-after-2ms", 2 * time.Millisecond, true, 300 * time.Millisecond},
		// Zero-window probes back off past a second: the replica's
		// newest server timestamp is older than the owner's clock by
		// more than the takeover's timestamp margin.
		{"closed-4s", 0, false, 4 * time.Second},
		{"closed-4s-route-after-2ms", 2 * time.Millisecond, false, 4 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTkLab(t, tkConfig{nodes: 3, gso: tc.gso})
			l.enableClientSACK()
			ctx := testCtx(t)
			d := l.startDownload(ctx, tkDst4, tkSize, 21)
			hold := int64(tkSize / 3)
			d.conn.limit.Store(hold)
			d.waitBytes(t, hold)
			// The window is closed and the replicas know where the client is.
			des := l.nodes[0].e.designated(d.key, "n1")
			di, oi := l.node(des), 3-l.node(des)
			eventually(t, "the replica at the client's position", func() bool {
				st, ok := l.nodes[di].r.Store().Lookup(d.key)
				own, ok2 := l.nodes[0].tr.Lookup(d.key)
				return ok && ok2 && st.ClientAckedBytes == own.ClientAckedBytes && st.ClientAckedBytes > uint64(hold)
			})
			time.Sleep(tc.closed) // zero-window probes
			d.conn.limit.Store(0)
			l.kill(0)
			if tc.routeDelay > 0 {
				time.Sleep(tc.routeDelay)
			}
			l.route.Store(int32(oi))
			l.finishExact(t, d)
		})
	}
}

// slowResume delays a restored connection's service, so that the new
// owner's stack sends nothing for a while after the restore.
type slowResume struct {
	services.Resumable
	delay time.Duration
}

func (s slowResume) ResumeConn(ctx context.Context, conn net.Conn, r services.Resume) error {
	time.Sleep(s.delay)
	return s.Resumable.ResumeConn(ctx, conn, r)
}

// A restored flow's state must say what timestamp clock its new stack
// runs, from the restore on, before the stack sent anything: a node that
// claims the flow then derives its own clock from it, and a Linux client
// drops segments whose TSval went backwards (PAWS). The state used to keep
// the replica's TSval but the restore's time, which put a claimer's clock
// behind the pushed node's by the replica's age plus the margin; the
// client, still holding TSvals of the dead owner that the replica never
// got, dropped everything the claimer sent until its clock caught up (the
// push-then-claim stall CI saw in the lab).
func TestTakeoverRestoredTimestampClock(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 3, service: func() services.TCPService {
		return slowResume{Resumable: services.NewStream(), delay: 300 * time.Millisecond}
	}})
	ctx := testCtx(t)
	d := l.startDownload(ctx, tkDst4, tkSize, 23)
	d.waitBytes(t, tkSize/4)
	des := l.nodes[0].e.designated(d.key, "n1")
	di := l.node(des)
	eventually(t, "the flow replicated", func() bool {
		st, ok := l.nodes[di].r.Store().Lookup(d.key)
		return ok && st.ClientAckedBytes > 0
	})
	l.kill(0)
	l.route.Store(int32(di))
	// Right after the restore: nothing sent yet (the service waits).
	var s1 *batonv1.FlowState
	eventually(t, des+" restored the flow", func() bool {
		st, ok := l.nodes[di].tr.Lookup(d.key)
		if ok {
			s1 = st
		}
		return ok
	})
	// Once the new stack sent data, its real clock is in the state.
	var s2 *batonv1.FlowState
	eventually(t, des+" sent data", func() bool {
		st, ok := l.nodes[di].tr.Lookup(d.key)
		if ok && st.ServerSentBytes > s1.ServerSentBytes && st.ServerTsval != s1.ServerTsval {
			s2 = st
			return true
		}
		return false
	})
	elapsed := uint32((s2.UpdatedUnixNano - s1.UpdatedUnixNano) / int64(time.Millisecond))
	predicted := s1.ServerTsval + elapsed
	// A claimer adds tsMargin to the prediction: it must cover the error
	// (the restore's scheduling delay with the state right; the replica's
	// age plus tsMargin itself with it wrong).
	if behind := int32(s2.ServerTsval - predicted); behind > tsMargin/2 {
		t.Fatalf("the restored state predicts TSval %d at %d ms after the restore, the stack sent %d: %d ms behind", predicted, elapsed, s2.ServerTsval, behind)
	}
	if err := d.wait(t); err != nil {
		t.Fatalf("download: %v", err)
	}
	l.noPAWSDrops(t)
}

// The lab's PAWS watch counts exactly the data segments whose TSval went
// backwards on their flow.
func TestTkPAWSWatch(t *testing.T) {
	srv := netip.MustParseAddrPort("203.0.113.1:9000")
	cli := netip.MustParseAddrPort("198.51.100.2:40000")
	seg := func(tsval uint32, data bool) []byte {
		p := tcpPacket{src: srv, dst: cli, seq: 1, ack: 1, flags: header.TCPFlagAck, window: 100, opts: tsOption(tsval, 0)}
		if data {
			p.payload = []byte("xyz")
		}
		return p.build()
	}
	p := &tkPAWS{newest: map[uint16]uint32{}}
	for _, c := range []struct {
		ts   uint32
		data bool
		want uint64
	}{
		{1000, true, 0},
		{1000, true, 0},       // same clock tick
		{1500, false, 0},      // newer
		{1200, false, 0},      // an old pure ACK: not counted
		{1400, true, 1},       // older data: counted
		{1<<32 - 10, true, 2}, // far older (wraps backwards)
		{1600, true, 2},
	} {
		p.note("n1", seg(c.ts, c.data))
		if got := p.backwards.Load(); got != c.want {
			t.Fatalf("after TSval %d (data %v): %d backwards, want %d", c.ts, c.data, got, c.want)
		}
	}
}

// A push that reads the dead owner's replica just before a claim restores
// the flow here and hands it over must not restore it again from that
// stale copy: the new owner holds it at a higher epoch, and two nodes
// would send for it (seen in a lab stall: the designated replica restored
// the flow a second time 8 ms after handing it over).
func TestTakeoverStalePushAfterHandOver(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 3})
	ctx := testCtx(t)
	d := l.startDownload(ctx, tkDst4, tkSize, 29)
	d.waitBytes(t, tkSize/4)
	des := l.nodes[0].e.designated(d.key, "n1")
	di, oi := l.node(des), 3-l.node(des)
	var stale *batonv1.FlowState
	eventually(t, "the flow replicated", func() bool {
		st, ok := l.nodes[di].r.Store().Lookup(d.key)
		stale = st
		return ok && st.ClientAckedBytes > 0
	})
	l.kill(0)
	l.route.Store(int32(oi)) // the other survivor claims it from the designated replica
	eventually(t, l.nodes[oi].name+" owns the flow", func() bool {
		_, owned := l.nodes[oi].tr.Epoch(d.key)
		return owned
	})
	before := l.nodes[di].e.Stats().Takeovers
	if run := l.nodes[di].e.startPush(d.key, stale); run != nil {
		<-run.done
		t.Errorf("%s pushed the flow again from the dead owner's replica after handing it over", des)
	}
	if _, owned := l.nodes[di].tr.Epoch(d.key); owned {
		t.Errorf("%s owns the flow again", des)
	}
	if err := d.wait(t); err != nil {
		t.Fatalf("download: %v", err)
	}
	if n := l.resets(); n != 0 {
		t.Fatalf("client got %d resets", n)
	}
	after := l.nodes[di].e.Stats().Takeovers
	if after[HowPush]+after[HowPullRestore] != before[HowPush]+before[HowPullRestore] {
		t.Errorf("%s restored the flow again: takeovers %v -> %v", des, before, after)
	}
	l.noPAWSDrops(t)
}
