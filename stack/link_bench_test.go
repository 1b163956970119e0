package stack

import (
	"sync"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/baton-anycast/baton/tun"
)

// benchDevice is a TUN device for the endpoint's benchmarks: writes are
// discarded, reads return pkt until n reads were served, then block until
// Close.
type benchDevice struct {
	mtu    int
	gso    bool
	pkt    []byte
	mu     sync.Mutex
	n      int
	served chan struct{} // closed when n reads were served
	closed chan struct{}
}

func newBenchDevice(mtu int, gso bool) *benchDevice {
	return &benchDevice{mtu: mtu, gso: gso, served: make(chan struct{}), closed: make(chan struct{})}
}

func (d *benchDevice) Name() string { return "bench0" }
func (d *benchDevice) MTU() int     { return d.mtu }
func (d *benchDevice) Queues() int  { return 1 }
func (d *benchDevice) GSO() bool    { return d.gso }
func (d *benchDevice) Read(_ int, buf []byte) (int, error) {
	d.mu.Lock()
	if d.n == 0 {
		d.mu.Unlock()
		<-d.closed
		return 0, tun.ErrClosed
	}
	d.n--
	if d.n == 0 {
		close(d.served)
	}
	d.mu.Unlock()
	return copy(buf, d.pkt), nil
}
func (d *benchDevice) Write(int, [][]byte) error                      { return nil }
func (d *benchDevice) WriteGSO(int, tun.VirtioNetHdr, [][]byte) error { return nil }
func (d *benchDevice) Stats() tun.Stats                               { return tun.Stats{} }
func (d *benchDevice) Close() error                                   { close(d.closed); return nil }

// readHook reads what a tracker reads of every packet.
type readHook struct{ sum uint32 }

func (h *readHook) Name() string { return "bench-read" }
func (h *readHook) Inbound(p *Packet) Verdict {
	h.sum += uint32(p.Data[0]) + uint32(len(p.Data))
	return Pass
}
func (h *readHook) Outbound(p *Packet) Verdict {
	h.sum += uint32(p.Data[0]) + uint32(len(p.Data))
	return Pass
}

// discardDispatcher takes delivered packets and drops them.
type discardDispatcher struct{}

func (discardDispatcher) DeliverNetworkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer) {}
func (discardDispatcher) DeliverLinkPacket(tcpip.NetworkProtocolNumber, *stack.PacketBuffer)    {}

// BenchmarkEndpointWrite is the outbound path of one TCP segment, as gVisor
// hands it over (headers and payload in separate views): the flattening
// copy, the hook chain (one reading hook) and the device write. 1448: a
// full segment at MTU 1500 (12 bytes of TCP options); 65000: a GSO segment on the offload device.
func BenchmarkEndpointWrite(b *testing.B) {
	for _, c := range []struct {
		name    string
		payload int
		gso     bool
	}{{"mss1448", 1448, false}, {"gso65000", 65000, true}} {
		b.Run(c.name, func(b *testing.B) {
			e := NewEndpoint(newBenchDevice(1500, c.gso))
			e.AddHook(&readHook{})
			raw := gsoPacket(false, 0, 12, c.payload)
			hdrLen := header.IPv4MinimumSize + header.TCPMinimumSize + 12
			payload := buffer.MakeWithData(raw[hdrLen:])
			defer payload.Release()
			b.SetBytes(int64(len(raw)))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
					ReserveHeaderBytes: hdrLen,
					Payload:            payload.Clone(),
				})
				copy(pkt.TransportHeader().Push(hdrLen-header.IPv4MinimumSize), raw[header.IPv4MinimumSize:hdrLen])
				copy(pkt.NetworkHeader().Push(header.IPv4MinimumSize), raw[:header.IPv4MinimumSize])
				if c.gso {
					pkt.GSOOptions = stack.GSO{Type: stack.GSOTCPv4, NeedsCsum: true, MSS: 1448}
				}
				var l stack.PacketBufferList
				l.PushBack(pkt)
				if n, err := e.WritePackets(l); n != 1 || err != nil {
					b.Fatalf("WritePackets: %d, %v", n, err)
				}
				l.DecRef()
			}
		})
	}
}

// BenchmarkEndpointRead is the inbound path of one 1500-byte packet: the
// device read, the hook chain (one reading hook) and the copy into a gVisor
// packet handed to the stack (which drops it here).
func BenchmarkEndpointRead(b *testing.B) {
	d := newBenchDevice(1500, false)
	d.pkt = gsoPacket(false, 0, 12, 1448)
	d.n = b.N
	e := NewEndpoint(d)
	e.AddHook(&readHook{})
	b.SetBytes(int64(len(d.pkt)))
	b.ReportAllocs()
	b.ResetTimer()
	e.Attach(discardDispatcher{})
	<-d.served
	b.StopTimer()
	e.Close()
	e.Wait()
	if got := e.Stats().RxPackets; got != uint64(b.N) {
		b.Fatalf("delivered %d packets, want %d", got, b.N)
	}
}

var _ = ipv4.ProtocolNumber
