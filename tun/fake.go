// fake.go: Fake, an in-memory Device for unit tests and in-process
// multi-stack tests. It works on every OS and needs no privileges.

package tun

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// Fake is an in-memory Device. Baton's side uses the Device methods; the test
// plays the kernel with Deliver (a packet for Baton to Read) and Receive (the
// next packet Baton wrote).
//
// Both directions are bounded queues of depth packets and both block when
// full, never drop: Deliver blocks while the chosen read queue is full, and
// Baton's Write blocks while depth written packets wait for the test to
// Receive them. A test that never drains Receive therefore stalls the stack's
// writers, exactly as it should notice. Close unblocks everything with
// ErrClosed.
//
// Unlike the kernel, Fake never drops, so KernelTxDropped and KernelRxDropped
// stay zero; the other counters follow the same rules as the real device.
//
// A Fake made by NewFakeGSO plays an offload device: GSO() is true and
// WriteGSO takes large TCP segments and partial checksums, checking the
// header as the kernel would (a header it refuses is an error for the
// writer). Receive then returns what the kernel would put on the wire
// (SegmentGSO: complete checksums, GSO segments cut to MSS-sized packets);
// ReceiveGSO returns the packet as written with its header. Use one or the
// other on a Fake.
type Fake struct {
	name string
	mtu  int
	gso  bool

	rx     []chan rxPkt  // per queue: packets for Baton's Read
	tx     chan txPkt    // packets Baton wrote, oldest first
	txFree chan []byte   // recycled MTU-sized buffers, so Write does not allocate
	rr     atomic.Uint32 // round robin for non-IP packets

	// wire holds the rest of a GSO packet Receive has cut into wire
	// packets.
	wireMu sync.Mutex
	wire   [][]byte

	closed    atomic.Bool
	done      chan struct{}
	closeOnce sync.Once

	c counters
}

var _ Device = (*Fake)(nil)

// rxPkt is one packet for Baton to read, with the virtio header the kernel
// hands an offload device with it (zero but for DeliverGSO).
type rxPkt struct {
	hdr VirtioNetHdr
	buf []byte
}

// txPkt is one packet Baton wrote, with the virtio header it was written
// with (zero for Write).
type txPkt struct {
	hdr VirtioNetHdr
	buf []byte
}

// NewFake returns a Fake with the given name, MTU, number of queues and
// queue depth (in packets). It panics on non-positive arguments: it is a test
// helper, and a zero depth would deadlock the first Write.
func NewFake(name string, mtu, queues, depth int) *Fake {
	if mtu <= 0 || queues <= 0 || depth <= 0 {
		panic(fmt.Sprintf("tun.NewFake(%q, %d, %d, %d): mtu, queues and depth must be positive", name, mtu, queues, depth))
	}
	f := &Fake{
		name:   name,
		mtu:    mtu,
		rx:     make([]chan rxPkt, queues),
		tx:     make(chan txPkt, depth),
		txFree: make(chan []byte, depth),
		done:   make(chan struct{}),
		c:      make(counters, queues),
	}
	for i := range f.rx {
		f.rx[i] = make(chan rxPkt, depth)
	}
	for range depth {
		// Allocated lazily by the first Write that takes it, then reused.
		f.txFree <- nil
	}
	return f
}

// NewFakeGSO is NewFake for a Fake that plays an offload device (see Fake).
func NewFakeGSO(name string, mtu, queues, depth int) *Fake {
	f := NewFake(name, mtu, queues, depth)
	f.gso = true
	return f
}

// Name returns the name given to NewFake.
func (f *Fake) Name() string { return f.name }

// MTU returns the MTU given to NewFake.
func (f *Fake) MTU() int { return f.mtu }

// Queues returns the number of queues.
func (f *Fake) Queues() int { return len(f.rx) }

// Read implements Device.
func (f *Fake) Read(q int, buf []byte) (int, error) {
	if uint(q) >= uint(len(f.rx)) {
		return 0, badQueue(f.name, q, len(f.rx))
	}
	if len(buf) == 0 {
		return 0, io.ErrShortBuffer
	}
	if f.closed.Load() {
		return 0, ErrClosed
	}
	c := &f.c[q].rx
	for {
		var p rxPkt
		select {
		case p = <-f.rx[q]:
		case <-f.done:
			return 0, ErrClosed
		}
		n := copy(buf, p.buf)
		if n < len(p.buf) {
			c.errors.Add(1)
			return n, ErrTruncated
		}
		if p.hdr != (VirtioNetHdr{}) {
			// As the real device: finish the packet, or drop it.
			gso, err := finishRx(p.hdr, buf[:n])
			if err != nil {
				c.errors.Add(1)
				continue
			}
			if gso {
				c.gso.Add(1)
			}
		}
		c.ok(n)
		return n, nil
	}
}

// Write implements Device. It blocks while depth packets wait for Receive.
func (f *Fake) Write(q int, pkt [][]byte) error {
	return f.write(q, VirtioNetHdr{}, pkt)
}

// GSO implements Device: true for a Fake made by NewFakeGSO.
func (f *Fake) GSO() bool { return f.gso }

// WriteGSO implements Device. On a Fake made by NewFakeGSO the header is
// checked against the packet as the kernel would (and a little more
// strictly: see checkVirtioNetHdr); a refused header is a failed write
// (TxErrors) returning the reason.
func (f *Fake) WriteGSO(q int, hdr VirtioNetHdr, pkt [][]byte) error {
	return f.write(q, hdr, pkt)
}

func (f *Fake) write(q int, hdr VirtioNetHdr, pkt [][]byte) error {
	if uint(q) >= uint(len(f.rx)) {
		return badQueue(f.name, q, len(f.rx))
	}
	if f.closed.Load() {
		return ErrClosed
	}
	c := &f.c[q].tx
	total := 0
	for _, s := range pkt {
		total += len(s)
	}
	zero := hdr == VirtioNetHdr{}
	switch {
	case !zero && !f.gso:
		c.errors.Add(1)
		return ErrNoGSO
	case total == 0, zero && total > f.mtu, total > MaxGSOPacket:
		c.errors.Add(1)
		return ErrPacketSize
	}
	var buf []byte
	select {
	case buf = <-f.txFree:
	case <-f.done:
		return ErrClosed
	}
	if buf == nil {
		buf = make([]byte, 0, f.mtu)
	}
	buf = buf[:0]
	for _, s := range pkt {
		buf = append(buf, s...)
	}
	if !zero {
		if _, err := checkVirtioNetHdr(hdr, buf, f.mtu); err != nil {
			f.txFree <- buf // never blocks: the buffer came from there
			c.errors.Add(1)
			return err
		}
	}
	// Never blocks: there are only depth buffers and tx holds depth.
	f.tx <- txPkt{hdr, buf}
	c.ok(total)
	return nil
}

// Stats implements Device. Kernel counters are always zero.
func (f *Fake) Stats() Stats { return f.c.snapshot() }

// Close implements Device: pending and later calls on either side return
// ErrClosed. It is idempotent.
func (f *Fake) Close() error {
	f.closeOnce.Do(func() {
		f.closed.Store(true)
		close(f.done)
	})
	return nil
}

// Deliver plays the kernel routing pkt into the device: it copies pkt into
// the read queue chosen by the packet's flow (see FlowQueue), blocking while
// that queue is full, until ctx is done or the device is closed.
func (f *Fake) Deliver(ctx context.Context, pkt []byte) error {
	return f.DeliverTo(ctx, f.FlowQueue(pkt), pkt)
}

// DeliverTo is Deliver onto an explicit queue.
func (f *Fake) DeliverTo(ctx context.Context, q int, pkt []byte) error {
	return f.deliver(ctx, q, VirtioNetHdr{}, pkt)
}

// DeliverGSO plays the kernel handing an offload device (NewFakeGSO) pkt
// with the virtio header hdr, as the real device's receive offload does: a
// TCP segment larger than the MTU (a GSO type, up to MaxReadPacket bytes)
// and/or a partial checksum (NEEDS_CSUM: the checksum field holds the
// pseudo-header sum). Read then finishes the packet as the real device's
// does (the checksum completed, the header stripped) or drops it, counting
// an error, when hdr does not describe it. The queue is Deliver's.
func (f *Fake) DeliverGSO(ctx context.Context, hdr VirtioNetHdr, pkt []byte) error {
	if !f.gso {
		return fmt.Errorf("tun: fake %s: DeliverGSO on a device without GSO", f.name)
	}
	return f.deliver(ctx, f.FlowQueue(pkt), hdr, pkt)
}

func (f *Fake) deliver(ctx context.Context, q int, hdr VirtioNetHdr, pkt []byte) error {
	if uint(q) >= uint(len(f.rx)) {
		return badQueue(f.name, q, len(f.rx))
	}
	limit := f.mtu
	if hdr.GSOType != VirtioNetHdrGSONone {
		limit = MaxReadPacket
	}
	if len(pkt) == 0 || len(pkt) > limit {
		return fmt.Errorf("tun: fake %s: cannot deliver a %d-byte packet (MTU %d)", f.name, len(pkt), f.mtu)
	}
	if f.closed.Load() {
		return ErrClosed
	}
	cp := rxPkt{hdr, bytes.Clone(pkt)}
	select {
	case f.rx[q] <- cp:
		return nil
	case <-f.done:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Receive plays the kernel taking the next packet Baton wrote (on any queue,
// in write order) and putting it on the wire. It returns a copy the caller
// owns, blocking until a packet is written, ctx is done or the device is
// closed. A packet written with a virtio header comes out as SegmentGSO
// makes it: complete checksums, and a GSO packet as several packets, returned
// by this and the following calls.
func (f *Fake) Receive(ctx context.Context) ([]byte, error) {
	if f.closed.Load() {
		return nil, ErrClosed
	}
	f.wireMu.Lock()
	if len(f.wire) > 0 {
		pkt := f.wire[0]
		f.wire[0] = nil
		f.wire = f.wire[1:]
		f.wireMu.Unlock()
		return pkt, nil
	}
	f.wireMu.Unlock()
	hdr, pkt, err := f.ReceiveGSO(ctx)
	if err != nil || hdr == (VirtioNetHdr{}) {
		return pkt, err
	}
	// WriteGSO checked the header: SegmentGSO cannot fail.
	segs, err := SegmentGSO(hdr, pkt, f.mtu)
	if err != nil {
		return nil, fmt.Errorf("tun: fake %s: %w", f.name, err)
	}
	f.wireMu.Lock()
	f.wire = append(f.wire, segs[1:]...)
	f.wireMu.Unlock()
	return segs[0], nil
}

// ReceiveGSO is Receive without playing the wire: it returns the next packet
// exactly as Baton wrote it, with the virtio header it was written with
// (zero for Write).
func (f *Fake) ReceiveGSO(ctx context.Context) (VirtioNetHdr, []byte, error) {
	if f.closed.Load() {
		return VirtioNetHdr{}, nil, ErrClosed
	}
	select {
	case p := <-f.tx:
		pkt := bytes.Clone(p.buf)
		f.txFree <- p.buf
		return p.hdr, pkt, nil
	case <-f.done:
		return VirtioNetHdr{}, nil, ErrClosed
	case <-ctx.Done():
		return VirtioNetHdr{}, nil, ctx.Err()
	}
}

// FlowQueue returns the queue Deliver uses for pkt. Like the kernel's
// multiqueue TUN it keeps a flow on one queue and is symmetric (both
// directions of a flow map to the same queue): it hashes (FNV-1a) the
// address pair and, for unfragmented TCP, UDP and SCTP, the port pair, with
// each pair put in a canonical order, plus the protocol. IPv6 extension
// headers are not walked (ports are then left out). Packets that are not
// IPv4 or IPv6 go round robin. The mapping differs from the kernel's (which
// is seeded randomly at boot); tests must not depend on which queue a flow
// gets, only on it being stable.
func (f *Fake) FlowQueue(pkt []byte) int {
	n := uint32(len(f.rx))
	if n == 1 {
		return 0
	}
	h, ok := flowHash(pkt)
	if !ok {
		h = f.rr.Add(1)
	}
	return int(h % n)
}

func flowHash(pkt []byte) (uint32, bool) {
	if len(pkt) < 1 {
		return 0, false
	}
	var src, dst, ports []byte
	var proto byte
	switch pkt[0] >> 4 {
	case 4:
		ihl := int(pkt[0]&0x0f) * 4
		if len(pkt) < 20 || ihl < 20 {
			return 0, false
		}
		proto, src, dst = pkt[9], pkt[12:16], pkt[16:20]
		fragmented := pkt[6]&0x3f != 0 || pkt[7] != 0 // MF flag or offset
		if !fragmented && len(pkt) >= ihl+4 {
			ports = pkt[ihl : ihl+4]
		}
	case 6:
		if len(pkt) < 40 {
			return 0, false
		}
		proto, src, dst = pkt[6], pkt[8:24], pkt[24:40]
		if len(pkt) >= 44 {
			ports = pkt[40:44]
		}
	default:
		return 0, false
	}
	switch proto {
	case 6, 17, 132: // TCP, UDP, SCTP: ports first in the header
	default:
		ports = nil
	}
	var sp, dp []byte
	if ports != nil {
		sp, dp = ports[0:2], ports[2:4]
	}
	// Canonical order of the two endpoints makes the hash symmetric.
	if c := bytes.Compare(src, dst); c > 0 || (c == 0 && bytes.Compare(sp, dp) > 0) {
		src, dst, sp, dp = dst, src, dp, sp
	}
	h := uint32(2166136261)
	for _, part := range [...][]byte{src, dst, sp, dp, {proto}} {
		for _, b := range part {
			h = (h ^ uint32(b)) * 16777619
		}
	}
	return h, true
}

func badQueue(name string, q, n int) error {
	return fmt.Errorf("tun: %s: queue %d out of range 0..%d", name, q, n-1)
}
