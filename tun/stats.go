// stats.go: the lock-free per-queue counters behind Stats, shared by the
// real device and the fake so both count exactly the same way.

package tun

import (
	"sync/atomic"

	"golang.org/x/sys/cpu"
)

// Counting rules, identical for every Device in this package:
//   - a packet read or written whole counts one packet and its bytes;
//   - a truncated read, a failed read, a write rejected with ErrPacketSize,
//     a short write and a failed write count one error (and no bytes);
//   - calls refused before touching a packet (ErrClosed, a bad queue index,
//     an empty read buffer) count nothing: no packet was lost at the device.
//
// dirCounters counts one direction of one queue. Each queue is normally
// driven by its own reader and writer goroutines, so every direction gets
// its own cache line: a shared line would bounce between cores on every
// packet even though no counter is actually shared.
type dirCounters struct {
	_       cpu.CacheLinePad
	packets atomic.Uint64
	bytes   atomic.Uint64
	errors  atomic.Uint64
	gso     atomic.Uint64 // rx: packets read with a GSO header (counted in packets too)
}

func (c *dirCounters) ok(n int) {
	c.packets.Add(1)
	c.bytes.Add(uint64(n))
}

// queueCounters holds both directions of one queue.
type queueCounters struct {
	rx dirCounters // read by Baton
	tx dirCounters // written by Baton
	_  cpu.CacheLinePad
}

// counters has one entry per queue; Stats sums them.
type counters []queueCounters

// snapshot sums the queues. Each counter is read atomically, but the set is
// not a consistent cut: a packet in flight may be counted in one field and
// not yet in another, which is fine for monitoring.
func (c counters) snapshot() Stats {
	var s Stats
	for i := range c {
		q := &c[i]
		s.RxPackets += q.rx.packets.Load()
		s.RxBytes += q.rx.bytes.Load()
		s.RxErrors += q.rx.errors.Load()
		s.RxGSO += q.rx.gso.Load()
		s.TxPackets += q.tx.packets.Load()
		s.TxBytes += q.tx.bytes.Load()
		s.TxErrors += q.tx.errors.Load()
	}
	return s
}
