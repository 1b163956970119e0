package handoff

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/stacktest"
)

// The queue of client packets held while flows are taken over is bounded
// per flow in packets and across flows in packets and in bytes (a client
// packet can be a 64 KiB segment with receive offload); what is over is
// dropped and counted, and taking a queue gives its room back.
func TestTakeoverQueueBounds(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 1})
	e := l.nodes[0].e
	h := &innerHook{e: e}
	const big = 60 << 10
	seg := func(port uint16, payload int) (*stack.Packet, tcpSegment) {
		p := tcpPacket{
			src: netip.AddrPortFrom(stacktest.ClientAddr4, port), dst: tkDst4,
			seq: 1, ack: 1, flags: header.TCPFlagAck, window: 100, payload: make([]byte, payload),
		}
		data := p.build()
		s, res := parseTCPSegment(data, true, e.prefixes)
		if res != tcpOK {
			t.Fatalf("test segment: %v", res)
		}
		return &stack.Packet{Dir: stack.Inbound, Data: data}, s
	}
	for _, tc := range []struct {
		name                  string
		perFlow, packets      int
		bytes                 int
		flows, each, payload  int
		wantQueued, wantBytes int64
	}{
		{"per-flow packets", 4, 1000, 1 << 30, 2, 10, 100, 8, 8 * (100 + 40)},
		{"all packets", 128, 5, 1 << 30, 3, 3, 100, 5, 5 * (100 + 40)},
		{"bytes", 128, 1000, 3 * (big + 40), 2, 4, big, 3, 3 * (big + 40)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.cfg.QueuePackets, e.cfg.MaxQueued, e.cfg.MaxQueuedBytes = tc.perFlow, tc.packets, tc.bytes
			dropped0 := e.Stats().Packets["queue_dropped"]
			var entries []*flowEntry
			for i := range tc.flows {
				port := uint16(41000 + i)
				k := FlowKey{Client: netip.AddrPortFrom(stacktest.ClientAddr4, port), Anycast: tkDst4}
				f, _ := e.entry(k, esRestoring) // restoring: queues without starting a pull
				entries = append(entries, f)
				for range tc.each {
					p, s := seg(port, tc.payload)
					h.enqueue(f, p, &s)
				}
			}
			if got := e.nQueued.Load(); got != tc.wantQueued {
				t.Errorf("queued %d packets, want %d", got, tc.wantQueued)
			}
			if got := e.qBytes.Load(); got != tc.wantBytes {
				t.Errorf("queued %d bytes, want %d", got, tc.wantBytes)
			}
			sent := int64(tc.flows * tc.each)
			if got := int64(e.Stats().Packets["queue_dropped"] - dropped0); got != sent-tc.wantQueued {
				t.Errorf("dropped %d, want %d", got, sent-tc.wantQueued)
			}
			for i, f := range entries {
				f.mu.Lock()
				if i%2 == 0 {
					e.takeQueueLocked(f)
				} else {
					e.clearQueueLocked(f)
				}
				f.mu.Unlock()
				e.drop(f)
			}
			if e.nQueued.Load() != 0 || e.qBytes.Load() != 0 {
				t.Errorf("after taking the queues: %d packets, %d bytes still counted", e.nQueued.Load(), e.qBytes.Load())
			}
		})
	}
}
