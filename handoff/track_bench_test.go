package handoff

import (
	"context"
	"net/netip"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/baton-anycast/baton/stack"
)

// trkBenchFlow establishes a flow with Linux-like options and returns
// pre-built packets that move its positions: server data segments of 1400
// bytes (outbound) and client acks with a SACK block (inbound).
func trkBenchFlow(b *testing.B, tr *Tracker, port uint16, n int) (out, in []stack.Packet) {
	c := trkConn4(b, tr, port, 1000, 0xfffff000)
	o := trkOpts{mss: 1460, hasWS: true, ws: 7, sackPerm: true, ts: true, tsval: 1}
	c.handshake(o, o)
	for i := 0; i < n; i++ {
		c.sTS++
		out = append(out, stack.Packet{Dir: stack.Outbound, Data: trkSeg{src: c.anycast, dst: c.client,
			seq: c.sNext, ack: c.cNext, flags: header.TCPFlagAck, payload: make([]byte, 1400),
			opts: trkOpts{ts: true, tsval: c.sTS, tsec: c.cTS}}.bytes()})
		c.sNext += 1400
		c.cTS++
		in = append(in, stack.Packet{Dir: stack.Inbound, Data: trkSeg{src: c.client, dst: c.anycast,
			seq: c.cNext, ack: c.sNext, flags: header.TCPFlagAck,
			opts: trkOpts{ts: true, tsval: c.cTS, tsec: c.sTS, sack: []header.SACKBlock{{Start: 1, End: 2}}}}.bytes()})
	}
	return out, in
}

// trkBenchTracker returns a tracker on the real clock with Run running, as
// in production (packets are stamped with Run's coarse clock).
func trkBenchTracker(b *testing.B) *Tracker {
	tr := NewTracker(TrackerConfig{Node: "n1", Prefixes: trkPrefixes, Now: time.Now,
		ServiceFor: func(uint16) string { return "stream" }})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { tr.Run(ctx); close(done) }()
	b.Cleanup(func() { cancel(); <-done })
	for tr.ticking.Load() == 0 {
		runtime.Gosched()
	}
	return tr
}

// BenchmarkTrackerOutbound: one server data segment of an established flow.
// Positions move only for the first pass over the packets; later passes
// replay them (the per-packet work is the same: parse, lock, compare).
func BenchmarkTrackerOutbound(b *testing.B) {
	tr := trkBenchTracker(b)
	out, _ := trkBenchFlow(b, tr, 40000, 4096)
	b.ReportAllocs()
	b.SetBytes(1400)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tr.Outbound(&out[i%len(out)])
	}
}

// BenchmarkTrackerInbound: one client ack (with timestamps and a SACK block)
// of an established flow.
func BenchmarkTrackerInbound(b *testing.B) {
	tr := trkBenchTracker(b)
	out, in := trkBenchFlow(b, tr, 40000, 4096)
	for i := range out {
		tr.Outbound(&out[i])
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		tr.Inbound(&in[i%len(in)])
	}
}

// BenchmarkTrackerMoving alternates data and acks that each move the flow's
// positions (the dirty path), taking changes every 1024 packets as
// replication would.
func BenchmarkTrackerMoving(b *testing.B) {
	tr := trkBenchTracker(b)
	const n = 1 << 14
	out, in := trkBenchFlow(b, tr, 40000, n)
	var dst []Change
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		j := i / 2 % n
		if j == 0 && i%2 == 0 {
			b.StopTimer()
			tr2 := trkBenchTracker(b)
			out, in = trkBenchFlow(b, tr2, 40000, n)
			tr = tr2
			b.StartTimer()
		}
		if i%2 == 0 {
			tr.Outbound(&out[j])
		} else {
			tr.Inbound(&in[j])
		}
		if i%1024 == 1023 {
			dst = tr.TakeChanges(dst[:0])
		}
	}
}

// BenchmarkTrackerParallel: every goroutine feeds its own flow, both ways.
func BenchmarkTrackerParallel(b *testing.B) {
	tr := trkBenchTracker(b)
	const flows = 256
	outs := make([][]stack.Packet, flows)
	ins := make([][]stack.Packet, flows)
	for f := 0; f < flows; f++ {
		outs[f], ins[f] = trkBenchFlow(b, tr, uint16(20000+f), 64)
	}
	var next atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		f := int(next.Add(1)-1) % flows
		i := 0
		for pb.Next() {
			if i%2 == 0 {
				tr.Outbound(&outs[f][i/2%64])
			} else {
				tr.Inbound(&ins[f][i/2%64])
			}
			i++
		}
	})
}

// BenchmarkTrackerIgnored: a packet outside the anycast prefixes (the cost
// every non-tracked packet pays).
func BenchmarkTrackerIgnored(b *testing.B) {
	tr := trkBenchTracker(b)
	p := stack.Packet{Dir: stack.Inbound, Data: trkSeg{src: netip.AddrPortFrom(trkClient4, 1),
		dst: netip.MustParseAddrPort("203.0.113.1:80"), flags: header.TCPFlagAck}.bytes()}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		tr.Inbound(&p)
	}
}
