package stack

// This file hands new TCP connections and UDP sessions to services.
//
// TCP goes through gVisor's tcp.Forwarder rather than one listener per port:
// the forwarder sees every SYN to every anycast address, hands us the
// 4-tuple before the handshake completes, and lets the handoff layer later
// recognise a synthetic SYN of a connection it is restoring. A port without
// a service gets a RST, as from a kernel with no listener.
//
// UDP goes through udp.Forwarder: it creates a connected endpoint per
// (client address, client port, anycast address, port), so a reply leaves
// from the exact anycast address the client asked, which a wildcard-bound
// socket could not guarantee with promiscuous addresses.

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/baton-anycast/baton/stack/services"
)

// ServiceStats are one service's counters.
type ServiceStats struct {
	Name     string
	Proto    string // "tcp" or "udp"
	Port     uint16
	Accepted uint64 // TCP connections or UDP sessions started
	Active   int64  // running now
	BytesIn  uint64 // payload bytes received from clients
	BytesOut uint64 // payload bytes sent to clients
}

// RefusedStats count what the stack turned away before any service saw it.
type RefusedStats struct {
	TCPNoService     uint64 // SYN to a port without a service: RST
	TCPHandshakeFail uint64 // handshake did not complete
	UDPNoService     uint64 // datagram to a port without a service: ICMP unreachable
	UDPSessionsFull  uint64 // datagram dropped: too many concurrent UDP sessions
}

type svcCounters struct {
	name, proto       string
	port              uint16
	accepted          atomic.Uint64
	active            atomic.Int64
	bytesIn, bytesOut atomic.Uint64
}

type serveStats struct {
	mu       sync.Mutex
	services map[string]*svcCounters // by proto/port

	tcpNoService, tcpHandshakeFail atomic.Uint64
	udpNoService, udpSessionsFull  atomic.Uint64
}

func (s *serveStats) counters(name, proto string, port uint16) *svcCounters {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.services == nil {
		s.services = make(map[string]*svcCounters)
	}
	key := proto + "/" + name
	c := s.services[key]
	if c == nil {
		c = &svcCounters{name: name, proto: proto, port: port}
		s.services[key] = c
	}
	return c
}

// ServiceStats returns a snapshot of every service's counters.
func (st *Stack) ServiceStats() []ServiceStats {
	st.stats.mu.Lock()
	defer st.stats.mu.Unlock()
	out := make([]ServiceStats, 0, len(st.stats.services))
	for _, c := range st.stats.services {
		out = append(out, ServiceStats{
			Name: c.name, Proto: c.proto, Port: c.port,
			Accepted: c.accepted.Load(), Active: c.active.Load(),
			BytesIn: c.bytesIn.Load(), BytesOut: c.bytesOut.Load(),
		})
	}
	return out
}

// Refused returns the counts of connections and datagrams turned away.
func (st *Stack) Refused() RefusedStats {
	return RefusedStats{
		TCPNoService:     st.stats.tcpNoService.Load(),
		TCPHandshakeFail: st.stats.tcpHandshakeFail.Load(),
		UDPNoService:     st.stats.udpNoService.Load(),
		UDPSessionsFull:  st.stats.udpSessionsFull.Load(),
	}
}

// trackedConn is a served connection, kept so Close can stop it.
type trackedConn struct {
	cancel context.CancelFunc
}

// countingConn counts payload bytes for the service's stats and the bytes
// this connection's service has written (for checkpoints).
type countingConn struct {
	*gonet.TCPConn
	c       *svcCounters
	written atomic.Uint64
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.TCPConn.Read(b)
	c.c.bytesIn.Add(uint64(n))
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.TCPConn.Write(b)
	c.c.bytesOut.Add(uint64(n))
	c.written.Add(uint64(n))
	return n, err
}

// CheckpointSink receives the checkpoints services publish (see
// services.Checkpoint): the connection's client and anycast address, how
// many bytes the service had written to the connection when it published,
// and the data. It is called on the service's goroutine and must not block.
type CheckpointSink func(client, anycast netip.AddrPort, written uint64, data []byte)

// SetCheckpointSink installs the receiver of service checkpoints (the
// handoff layer). Connections accepted before the call have none.
func (st *Stack) SetCheckpointSink(f CheckpointSink) {
	st.mu.Lock()
	st.checkpoints = f
	st.mu.Unlock()
}

// track registers a connection; it returns nil when the stack is closing.
func (st *Stack) track(cancel context.CancelFunc) *trackedConn {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return nil
	}
	tc := &trackedConn{cancel: cancel}
	st.conns[tc] = struct{}{}
	st.wg.Add(1)
	return tc
}

func (st *Stack) untrack(tc *trackedConn) {
	st.mu.Lock()
	delete(st.conns, tc)
	st.mu.Unlock()
	st.wg.Done()
}

// acceptTCP is the tcp.Forwarder handler. It runs on its own goroutine per
// SYN (the forwarder starts it) and must call req.Complete exactly once.
func (st *Stack) acceptTCP(req *tcp.ForwarderRequest) {
	id := req.ID()
	st.mu.Lock()
	svc, closed := st.tcpSvc[id.LocalPort], st.closed
	st.mu.Unlock()
	if svc == nil || closed {
		st.stats.tcpNoService.Add(1)
		req.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, err := req.CreateEndpoint(&wq)
	if err != nil {
		st.stats.tcpHandshakeFail.Add(1)
		req.Complete(true)
		return
	}
	req.Complete(false)
	client := netip.AddrPortFrom(addrFromTCPIP(id.RemoteAddress.AsSlice()), id.RemotePort)
	anycast := netip.AddrPortFrom(addrFromTCPIP(id.LocalAddress.AsSlice()), id.LocalPort)
	st.serveConn(svc, client, anycast, gonet.NewTCPConn(&wq, ep))
}

// serveConn runs svc on conn until it returns, then closes conn.
func (st *Stack) serveConn(svc interface {
	Name() string
	ServeConn(context.Context, net.Conn) error
}, client, anycast netip.AddrPort, conn *gonet.TCPConn) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	port := anycast.Port()
	tc := st.track(cancel)
	if tc == nil {
		conn.Close()
		return
	}
	defer st.untrack(tc)
	c := st.stats.counters(svc.Name(), "tcp", port)
	c.accepted.Add(1)
	c.active.Add(1)
	defer c.active.Add(-1)
	// Cancelling the context unblocks the service's pending I/O.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	cc := &countingConn{TCPConn: conn, c: c}
	st.mu.Lock()
	sink := st.checkpoints
	st.mu.Unlock()
	if sink != nil {
		ctx = services.WithCheckpoint(ctx, func(data []byte) {
			sink(client, anycast, cc.written.Load(), data)
		})
	}
	if err := svc.ServeConn(ctx, cc); err != nil && ctx.Err() == nil {
		st.log.Debug("connection ended with error", "service", svc.Name(),
			"client", conn.RemoteAddr().String(), "err", err)
	}
	_ = conn.Close()
}

// acceptUDP is the udp.Forwarder handler. It runs on the packet path, so it
// only starts a session goroutine; it returns false for a port without a
// service, which makes gVisor answer ICMP port unreachable.
func (st *Stack) acceptUDP(req *udp.ForwarderRequest) bool {
	id := req.ID()
	st.mu.Lock()
	svc, closed := st.udpSvc[id.LocalPort], st.closed
	st.mu.Unlock()
	if svc == nil || closed {
		st.stats.udpNoService.Add(1)
		return false
	}
	select {
	case st.udpSlots <- struct{}{}:
	default:
		st.stats.udpSessionsFull.Add(1)
		return true // dropped, counted
	}
	var wq waiter.Queue
	ep, err := req.CreateEndpoint(&wq)
	if err != nil {
		<-st.udpSlots
		st.stats.udpSessionsFull.Add(1)
		return true
	}
	conn := gonet.NewUDPConn(&wq, ep)
	go st.serveUDP(svc, id, conn)
	return true
}

func (st *Stack) serveUDP(svc interface {
	Name() string
	HandleDatagram(context.Context, netip.AddrPort, []byte) []byte
}, id stack.TransportEndpointID, conn *gonet.UDPConn) {
	defer func() { <-st.udpSlots }()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tc := st.track(cancel)
	if tc == nil {
		conn.Close()
		return
	}
	defer st.untrack(tc)
	c := st.stats.counters(svc.Name(), "udp", id.LocalPort)
	c.accepted.Add(1)
	c.active.Add(1)
	defer c.active.Add(-1)
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	from := netip.AddrPortFrom(addrFromTCPIP(id.RemoteAddress.AsSlice()), id.RemotePort)
	buf := make([]byte, 64<<10)
	for {
		_ = conn.SetReadDeadline(time.Now().Add(st.cfg.UDPIdle))
		n, err := conn.Read(buf)
		if err != nil {
			break
		}
		c.bytesIn.Add(uint64(n))
		if reply := svc.HandleDatagram(ctx, from, buf[:n]); reply != nil {
			if _, err := conn.Write(reply); err == nil {
				c.bytesOut.Add(uint64(len(reply)))
			}
		}
	}
	_ = conn.Close()
}

func addrFromTCPIP(b []byte) netip.Addr {
	a, _ := netip.AddrFromSlice(b)
	return a.Unmap()
}
