package stack

// This file is Baton's link endpoint: the one place where packets cross
// between the TUN device and gVisor, and therefore the seam the handoff layer
// hooks into.
//
// Departures from the stock endpoints (link/channel, link/fdbased), and why:
//
//   - No outbound queue. channel.Endpoint queues outbound packets in a Go
//     channel and silently drops when it is full (a reported ~30% throughput
//     loss in gVisor-on-TUN deployments). WritePackets here writes each packet
//     to the device synchronously: a full kernel queue blocks the writing TCP
//     goroutine, which is exactly the backpressure TCP wants.
//   - No inbound queue either. Each TUN queue has one reader goroutine that
//     runs the hook chain and calls DeliverNetworkPacket itself, so a packet
//     is never parked in a userspace queue where it could be dropped. The
//     kernel's own TUN queue (txqueuelen) is the only buffer; its overflow
//     is counted by the kernel and exported through tun.Stats.
//   - One flat copy per packet. Hooks get the whole IP packet as one mutable
//     slice. Inbound, the device reads into a per-reader scratch buffer that
//     is copied once into a right-sized gVisor view (so a small packet does not
//     pin an MTU-sized chunk while it waits in a TCP receive queue). Outbound,
//     the stack's header and payload views are flattened once into a pooled
//     buffer, because rewriting gVisor's views in place could corrupt payload
//     chunks that TCP shares with its retransmit queue.
//   - No receive checksum offload. Packets forwarded into a TUN are not
//     checked by the kernel, so gVisor verifies every inbound checksum.
//   - Segmentation offload only when the device has it (tun.Config.Offload):
//     the endpoint then implements stack.GSOEndpoint with HostGSOSupported,
//     as link/fdbased does on a host socket, and gVisor's TCP hands it
//     segments of up to ~64 KiB with a partial checksum (every TCP segment
//     of such a connection: gVisor's host GSO always sets NeedsCsum). The
//     hook chain sees each as one packet (Packet.GSO says what it is), then
//     the device gets it with a virtio_net_hdr built as fdbased builds it,
//     with two differences: a TUN has no Ethernet header, so the checksum
//     starts right after the IP header; and the header is built from the
//     packet after the hooks (IP and TCP header lengths read from the
//     bytes), not from gVisor's GSOOptions, so a hook cannot make it lie.
//     UDP and ICMP keep full checksums (no TX checksum capability). Without
//     the option nothing changes: no GSO, every checksum complete.
//   - Receive offload with the same option: the device lets the kernel hand
//     it the client's TCP segments whole (up to 64 KiB, its TSO or GRO on
//     the way) and completes their partial checksums (tun/rxoffload.go), so
//     a reader reads into a tun.MaxReadPacket buffer and the hooks and
//     gVisor get one complete TCP segment where there were ~45 packets of
//     the MTU: one read, one pass through gVisor, one ACK. gVisor takes
//     segments larger than the MSS and the MTU on the way in (no MTU check
//     on receive; its own GRO, pkg/tcpip/stack/gro, makes such segments).
//     Hooks see them with a zero Packet.GSO, like any complete packet.

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/baton-anycast/baton/tun"
)

// LinkStats are the endpoint's packet counters. Drops by hooks are kept per
// hook in HookDrops (see Endpoint.HookDrops).
type LinkStats struct {
	RxPackets, RxBytes uint64 // delivered to the stack
	TxPackets, TxBytes uint64 // written to the device
	RxConsumed         uint64 // inbound packets a hook took over
	TxConsumed         uint64 // outbound packets a hook took over
	RxNotIP            uint64 // inbound packets that are not IPv4/IPv6
	TxErrors           uint64 // outbound packets the device failed to write
	Injected           uint64 // packets put on the path by an Injector
	// TxGSO counts the packets of TxPackets written as one GSO segment for
	// the kernel to cut (payload larger than the MSS).
	TxGSO uint64
}

// hookDrops counts drops per hook and direction.
type hookDrops struct {
	name string
	in   atomic.Uint64
	out  atomic.Uint64
}

type chain struct {
	hooks []Hook
	drops []*hookDrops
}

// Endpoint connects a tun.Device to a gVisor stack through the hook chain.
//
// It implements stack.LinkEndpoint and Injector.
type Endpoint struct {
	dev    tun.Device
	mtu    uint32
	queues int
	gso    bool // dev.GSO(): advertise host GSO to gVisor

	chain atomic.Pointer[chain]
	// allDrops keeps every hookDrops ever created, so counters survive
	// chain changes (Prometheus counters must never go backwards).
	dropsMu  sync.Mutex
	allDrops map[string]*hookDrops

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher

	readers   sync.WaitGroup
	closed    atomic.Bool
	closeOnce sync.Once

	outPool sync.Pool // *outBuf with mtu bytes (tun.MaxGSOPacket with GSO)

	rxPackets, rxBytes atomic.Uint64
	txPackets, txBytes atomic.Uint64
	txGSO              atomic.Uint64
	rxConsumed         atomic.Uint64
	txConsumed         atomic.Uint64
	rxNotIP, txErrors  atomic.Uint64
	injected           atomic.Uint64
	rxUnattached       atomic.Uint64
	readersStarted     atomic.Bool
	readErr            atomic.Pointer[error]
	failed             chan struct{} // closed when a reader fails
}

var _ stack.LinkEndpoint = (*Endpoint)(nil)
var _ stack.GSOEndpoint = (*Endpoint)(nil)
var _ Injector = (*Endpoint)(nil)

// NewEndpoint returns an endpoint for dev. The endpoint owns dev from now on:
// Close closes it. Reading starts when the stack attaches the endpoint.
func NewEndpoint(dev tun.Device) *Endpoint {
	e := &Endpoint{
		dev:      dev,
		mtu:      uint32(dev.MTU()),
		queues:   dev.Queues(),
		gso:      dev.GSO(),
		allDrops: make(map[string]*hookDrops),
		failed:   make(chan struct{}),
	}
	outSize := int(e.mtu)
	if e.gso {
		outSize = max(outSize, tun.MaxGSOPacket)
	}
	e.outPool.New = func() any {
		return &outBuf{data: make([]byte, outSize)}
	}
	e.chain.Store(&chain{})
	return e
}

// AddHook appends h to the hook chain. Hooks can be added while packets flow;
// each packet sees either the old or the new chain, never a mix.
func (e *Endpoint) AddHook(h Hook) {
	e.dropsMu.Lock()
	defer e.dropsMu.Unlock()
	old := e.chain.Load()
	d := e.allDrops[h.Name()]
	if d == nil {
		d = &hookDrops{name: h.Name()}
		e.allDrops[h.Name()] = d
	}
	next := &chain{
		hooks: append(append([]Hook(nil), old.hooks...), h),
		drops: append(append([]*hookDrops(nil), old.drops...), d),
	}
	e.chain.Store(next)
}

// HookDrops returns the number of packets each hook dropped, per direction.
func (e *Endpoint) HookDrops() map[string][2]uint64 {
	e.dropsMu.Lock()
	defer e.dropsMu.Unlock()
	out := make(map[string][2]uint64, len(e.allDrops))
	for name, d := range e.allDrops {
		out[name] = [2]uint64{d.in.Load(), d.out.Load()}
	}
	return out
}

// Stats returns a snapshot of the endpoint's counters.
func (e *Endpoint) Stats() LinkStats {
	return LinkStats{
		RxPackets:  e.rxPackets.Load(),
		RxBytes:    e.rxBytes.Load(),
		TxPackets:  e.txPackets.Load(),
		TxBytes:    e.txBytes.Load(),
		RxConsumed: e.rxConsumed.Load(),
		TxConsumed: e.txConsumed.Load(),
		RxNotIP:    e.rxNotIP.Load(),
		TxErrors:   e.txErrors.Load(),
		Injected:   e.injected.Load(),
		TxGSO:      e.txGSO.Load(),
	}
}

// Device returns the TUN device under the endpoint.
func (e *Endpoint) Device() tun.Device { return e.dev }

// Failed is closed when reading from the device failed for a reason other
// than Close (the device vanished, for instance); ReadError says why.
func (e *Endpoint) Failed() <-chan struct{} { return e.failed }

// ReadError returns the error that stopped the readers, or nil while they
// run or after a clean Close.
func (e *Endpoint) ReadError() error {
	if p := e.readErr.Load(); p != nil {
		return *p
	}
	return nil
}

// run passes p through the chain and reports whether it survived.
func (e *Endpoint) run(p *Packet) bool {
	c := e.chain.Load()
	n := len(c.hooks)
	for j := range n {
		// Hooks are layers: the first added is closest to the TUN, so it
		// sees inbound packets first and outbound packets last.
		i := j
		var v Verdict
		if p.Dir == Inbound {
			v = c.hooks[i].Inbound(p)
		} else {
			i = n - 1 - j
			v = c.hooks[i].Outbound(p)
		}
		switch v {
		case Pass:
			continue
		case Drop:
			if p.Dir == Inbound {
				c.drops[i].in.Add(1)
			} else {
				c.drops[i].out.Add(1)
			}
		case Consume:
			if p.Dir == Inbound {
				e.rxConsumed.Add(1)
			} else {
				e.txConsumed.Add(1)
			}
		}
		return false
	}
	return true
}

// readLoop reads queue q until the device is closed.
func (e *Endpoint) readLoop(q int) {
	defer e.readers.Done()
	// An offload device hands over TCP segments of up to 64 KiB (receive
	// offload, see the file comment).
	scratch := make([]byte, e.readSize())
	p := Packet{Dir: Inbound}
	for {
		n, err := e.dev.Read(q, scratch)
		if err != nil {
			if errors.Is(err, tun.ErrTruncated) {
				continue // counted by the device
			}
			if !errors.Is(err, tun.ErrClosed) && !e.closed.Load() {
				// A variable of its own: taking err's address would move
				// it to the heap, one allocation per packet read.
				rerr := fmt.Errorf("tun %s queue %d: read: %w", e.dev.Name(), q, err)
				if e.readErr.CompareAndSwap(nil, &rerr) {
					close(e.failed)
				}
			}
			return
		}
		p.Data = scratch[:n]
		if p.Version() == 0 {
			e.rxNotIP.Add(1)
			continue
		}
		if !e.run(&p) {
			continue
		}
		e.deliver(p.Data)
	}
}

// readSize is the read buffer a reader needs: the MTU, or with a GSO
// device the largest segment its receive offload may hand over.
func (e *Endpoint) readSize() int {
	if e.gso {
		return max(int(e.mtu), tun.MaxReadPacket)
	}
	return int(e.mtu)
}

// deliver copies data into a gVisor packet and hands it to the stack.
func (e *Endpoint) deliver(data []byte) {
	var proto tcpip.NetworkProtocolNumber
	switch data[0] >> 4 {
	case header.IPv4Version:
		proto = ipv4.ProtocolNumber
	case header.IPv6Version:
		proto = ipv6.ProtocolNumber
	default:
		e.rxNotIP.Add(1)
		return
	}
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		e.rxUnattached.Add(1)
		return
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		Payload: buffer.MakeWithView(buffer.NewViewWithData(data)),
	})
	e.rxPackets.Add(1)
	e.rxBytes.Add(uint64(len(data)))
	d.DeliverNetworkPacket(proto, pkt)
	pkt.DecRef()
}

// outBuf is what writing one outbound packet needs, pooled so that the
// path allocates nothing per packet: the flat copy of the packet, the
// Packet the hooks see (a hook keeps neither past its call: see Packet)
// and the one-slice vector handed to the device.
type outBuf struct {
	data []byte
	pkt  Packet
	iov  [1][]byte
}

// writeOne runs the outbound chain on pkt and writes it to the device.
func (e *Endpoint) writeOne(pkt *stack.PacketBuffer) tcpip.Error {
	size := pkt.Size()
	ob := e.outPool.Get().(*outBuf)
	defer e.putOut(ob)
	buf := ob.data
	if size > len(buf) {
		// Larger than the MTU without GSO (gVisor fragments to the MTU),
		// or than the largest GSO segment gVisor makes (GSOMaxSize):
		// neither happens.
		buf = make([]byte, size)
	}
	// The views from the packet's header offset on, as AsSlices gives
	// them, without AsSlices' allocation.
	vl, off := pkt.AsViewList()
	n := 0
	for v := vl.Front(); v != nil && n < size; v = v.Next() {
		s := v.AsSlice()
		if off >= len(s) {
			off -= len(s)
			continue
		}
		n += copy(buf[n:size], s[off:])
		off = 0
	}
	p := &ob.pkt
	*p = Packet{Dir: Outbound, Data: buf[:n], GSO: e.gsoInfo(pkt)}
	if !e.run(p) {
		return nil
	}
	return e.writeVec(p.Data, p.GSO, &ob.iov)
}

// putOut returns ob to the pool without references to what it carried.
func (e *Endpoint) putOut(ob *outBuf) {
	ob.pkt = Packet{}
	ob.iov[0] = nil
	e.outPool.Put(ob)
}

// gsoMaxSize is what the endpoint advertises as GSOMaxSize: 64 KiB, the
// gso_max_size of a Linux device (veth's), which is what link/fdbased is
// given on a host socket, and stack.GVisorGSOMaxSize. gVisor's TCP keeps
// the payload of a segment below it by its maximum header size
// (header.TCPTotalHeaderMaximumSize + 1: at most 65375 bytes), so a segment
// with its IP and TCP headers always fits tun.MaxGSOPacket.
const gsoMaxSize = 1 << 16

// GSOMaxSize implements stack.GSOEndpoint.GSOMaxSize: 64 KiB with a GSO
// device, 0 (no GSO) otherwise.
func (e *Endpoint) GSOMaxSize() uint32 {
	if e.gso {
		return gsoMaxSize
	}
	return 0
}

// SupportedGSO implements stack.GSOEndpoint.SupportedGSO: host GSO (the
// kernel cuts the segments) with a GSO device, none otherwise.
func (e *Endpoint) SupportedGSO() stack.SupportedGSO {
	if e.gso {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

// gsoInfo translates gVisor's GSO options of an outbound packet.
func (e *Endpoint) gsoInfo(pkt *stack.PacketBuffer) GSOInfo {
	if !e.gso {
		return GSOInfo{}
	}
	g := pkt.GSOOptions
	var t GSOType
	switch g.Type {
	case stack.GSOTCPv4:
		t = GSOTCPv4
	case stack.GSOTCPv6:
		t = GSOTCPv6
	default:
		return GSOInfo{}
	}
	return GSOInfo{Type: t, MSS: g.MSS, PartialChecksum: g.NeedsCsum}
}

// virtioHdr builds the virtio_net_hdr for a packet with GSO info g, as
// link/fdbased does for host GSO (see the file comment for the two
// differences): HdrLen is the IP and TCP header length; with a partial
// checksum, NEEDS_CSUM at CsumStart (the TCP header) + CsumOffset (16);
// with a payload larger than the MSS, the GSO type and GSOSize = MSS. ok is
// false when the packet does not match g (not TCP of the right IP version,
// or truncated headers): the packet cannot be finished and is dropped.
func virtioHdr(data []byte, g GSOInfo) (h tun.VirtioNetHdr, ok bool) {
	var l4 int
	var gsoType uint8
	switch {
	case g.Type == GSOTCPv4 && len(data) >= header.IPv4MinimumSize && data[0]>>4 == header.IPv4Version:
		ip := header.IPv4(data)
		if ip.Protocol() != uint8(header.TCPProtocolNumber) {
			return h, false
		}
		l4, gsoType = int(ip.HeaderLength()), tun.VirtioNetHdrGSOTCPv4
	case g.Type == GSOTCPv6 && len(data) >= header.IPv6MinimumSize && data[0]>>4 == header.IPv6Version:
		if header.IPv6(data).NextHeader() != uint8(header.TCPProtocolNumber) {
			return h, false
		}
		l4, gsoType = header.IPv6MinimumSize, tun.VirtioNetHdrGSOTCPv6
	default:
		return h, false
	}
	if l4 < header.IPv4MinimumSize || len(data) < l4+header.TCPMinimumSize {
		return h, false
	}
	thl := int(header.TCP(data[l4:]).DataOffset())
	if thl < header.TCPMinimumSize || l4+thl > len(data) {
		return h, false
	}
	h.HdrLen = uint16(l4 + thl)
	if g.PartialChecksum {
		h.Flags = tun.VirtioNetHdrFNeedsCsum
		h.CsumStart = uint16(l4)
		h.CsumOffset = header.TCPChecksumOffset
	}
	if g.MSS > 0 && len(data)-l4-thl > int(g.MSS) {
		h.GSOType = gsoType
		h.GSOSize = g.MSS
	}
	return h, true
}

// queueFor picks the device queue an outbound packet is written on. A
// multiqueue TUN steers a flow's inbound packets to the queue its packets
// were last written on (measured on Linux 6.18: 20 of 20 flows followed the
// write), so each flow must always be written on the same queue, and flows
// must be spread over the queues for their inbound packets to be spread over
// the readers. The hash covers addresses and ports.
func (e *Endpoint) queueFor(data []byte) int {
	if e.queues <= 1 {
		return 0
	}
	var key []byte
	var proto uint8
	var l4 int
	switch data[0] >> 4 {
	case header.IPv4Version:
		ip := header.IPv4(data)
		key, proto, l4 = data[12:20], ip.Protocol(), int(ip.HeaderLength())
	case header.IPv6Version:
		key, proto, l4 = data[8:40], data[6], header.IPv6MinimumSize
	}
	h := uint32(2166136261)
	for _, b := range key {
		h = (h ^ uint32(b)) * 16777619
	}
	if (proto == uint8(header.TCPProtocolNumber) || proto == uint8(header.UDPProtocolNumber)) && len(data) >= l4+4 {
		for _, b := range data[l4 : l4+4] {
			h = (h ^ uint32(b)) * 16777619
		}
	}
	return int(h % uint32(e.queues))
}

func (e *Endpoint) write(data []byte, g GSOInfo) tcpip.Error {
	var iov [1][]byte
	return e.writeVec(data, g, &iov)
}

// writeVec writes data to the device, with iov as the vector the device
// is given (the caller's, so that it need not be allocated per packet).
func (e *Endpoint) writeVec(data []byte, g GSOInfo, iov *[1][]byte) tcpip.Error {
	var err error
	gso := false
	iov[0] = data
	if g == (GSOInfo{}) {
		err = e.dev.Write(e.queueFor(data), iov[:])
	} else if h, ok := virtioHdr(data, g); !ok {
		e.txErrors.Add(1)
		return nil // lost like on a wire; TCP retransmits
	} else {
		gso = h.GSOType != tun.VirtioNetHdrGSONone
		err = e.dev.WriteGSO(e.queueFor(data), h, iov[:])
	}
	if err != nil {
		if errors.Is(err, tun.ErrClosed) {
			return &tcpip.ErrClosedForSend{}
		}
		e.txErrors.Add(1)
		return nil // lost like on a wire; TCP retransmits
	}
	e.txPackets.Add(1)
	e.txBytes.Add(uint64(len(data)))
	if gso {
		e.txGSO.Add(1)
	}
	return nil
}

// WritePackets implements stack.LinkWriter.WritePackets. It blocks while the
// device cannot take a packet (backpressure instead of drops).
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		if err := e.writeOne(pkt); err != nil {
			if n == 0 {
				return 0, err
			}
			break
		}
		n++
	}
	return n, nil
}

// InjectInbound implements Injector.InjectInbound.
func (e *Endpoint) InjectInbound(data []byte) error {
	if e.closed.Load() {
		return tun.ErrClosed
	}
	p := Packet{Dir: Inbound, Data: data}
	if p.Version() == 0 {
		return errors.New("stack: injected inbound packet is not IPv4 or IPv6")
	}
	e.injected.Add(1)
	e.deliver(data)
	return nil
}

// InjectOutbound implements Injector.InjectOutbound.
func (e *Endpoint) InjectOutbound(data []byte) error {
	p := Packet{Dir: Outbound, Data: data}
	if p.Version() == 0 {
		return errors.New("stack: injected outbound packet is not IPv4 or IPv6")
	}
	e.injected.Add(1)
	if err := e.write(data, GSOInfo{}); err != nil {
		return tun.ErrClosed
	}
	return nil
}

// MTU implements stack.NetworkLinkEndpoint.MTU.
func (e *Endpoint) MTU() uint32 { return e.mtu }

// SetMTU implements stack.NetworkLinkEndpoint.SetMTU. The MTU is the TUN
// device's and cannot change under a running stack; the call is ignored.
func (e *Endpoint) SetMTU(uint32) {}

// MaxHeaderLength implements stack.NetworkLinkEndpoint.MaxHeaderLength. A TUN
// carries bare IP packets: there is no link header.
func (*Endpoint) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.NetworkLinkEndpoint.LinkAddress. A TUN has no
// link address.
func (*Endpoint) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.NetworkLinkEndpoint.SetLinkAddress.
func (*Endpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.NetworkLinkEndpoint.Capabilities. None: see
// the file comment on checksums (segmentation offload is stack.GSOEndpoint,
// not a capability).
func (*Endpoint) Capabilities() stack.LinkEndpointCapabilities { return 0 }

// Attach implements stack.NetworkLinkEndpoint.Attach. The first attach starts
// one reader goroutine per device queue; detaching (nil) stops delivery but
// not reading (Close stops reading).
func (e *Endpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	e.dispatcher = d
	e.mu.Unlock()
	if d != nil && !e.closed.Load() && e.readersStarted.CompareAndSwap(false, true) {
		for q := 0; q < e.dev.Queues(); q++ {
			e.readers.Add(1)
			go e.readLoop(q)
		}
	}
}

// IsAttached implements stack.NetworkLinkEndpoint.IsAttached.
func (e *Endpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait implements stack.NetworkLinkEndpoint.Wait: it waits for the readers,
// which stop when the endpoint is closed.
func (e *Endpoint) Wait() { e.readers.Wait() }

// ARPHardwareType implements stack.NetworkLinkEndpoint.ARPHardwareType.
func (*Endpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.NetworkLinkEndpoint.AddHeader. No link header.
func (*Endpoint) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.NetworkLinkEndpoint.ParseHeader. No link header.
func (*Endpoint) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.NetworkLinkEndpoint.Close. It closes the device,
// which unblocks and stops the readers.
func (e *Endpoint) Close() {
	e.closeOnce.Do(func() {
		e.closed.Store(true)
		_ = e.dev.Close()
	})
}

// SetOnCloseAction implements stack.NetworkLinkEndpoint.SetOnCloseAction.
// The action (gVisor passes "remove the NIC", which closes this endpoint
// again) is not run: the endpoint is only ever closed by the stack itself,
// and a failed device is reported through Failed instead.
func (e *Endpoint) SetOnCloseAction(func()) {}
