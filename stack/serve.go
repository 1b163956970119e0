package stack

// This file hands new TCP connections and UDP sessions to services.
//
// TCP goes through one gVisor listener per service port and family, bound
// to the wildcard address (with the NIC in promiscuous mode that covers
// every anycast address). A listener rather than gVisor's tcp.Forwarder
// because gVisor only lets a SYN reuse the 4-tuple of a connection in
// TIME-WAIT when a listener exists: with the forwarder alone such a SYN is
// dropped for the whole TIME-WAIT (60 s), where Linux accepts it (measured
// by batonlab bench: clients reusing source ports stalled). The forwarder is
// still installed, for SYNs to ports without a listener: it counts them and
// answers RST, as a kernel with no listener does.
//
// UDP goes through udp.Forwarder: it creates a connected endpoint per
// (client address, client port, anycast address, port), so a reply leaves
// from the exact anycast address the client asked, which a wildcard-bound
// socket could not guarantee with promiscuous addresses.

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
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
// services.Checkpoint): the connection's client and anycast address, the
// service's output offset when it published (bytes written since the start
// of the connection, on this node or before a restore), and the data. It is called on the service's goroutine and must not block.
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

// refuseTCP is the tcp.Forwarder handler: it only sees SYNs that no
// listener took, i.e. to ports without a service. It runs on its own
// goroutine per SYN and must call req.Complete exactly once.
func (st *Stack) refuseTCP(req *tcp.ForwarderRequest) {
	st.stats.tcpNoService.Add(1)
	req.Complete(true)
}

// ListenBacklog is each listener's accept queue. Linux's default somaxconn
// is 4096; a full queue makes gVisor answer SYNs with cookies.
const ListenBacklog = 4096

// listenTCP opens the IPv4 and IPv6 listeners for port and starts their
// accept loops. Called with st.mu held.
func (st *Stack) listenTCP(port uint16, svc services.TCPService) error {
	for _, proto := range []tcpip.NetworkProtocolNumber{ipv4.ProtocolNumber, ipv6.ProtocolNumber} {
		var wq waiter.Queue
		ep, terr := st.s.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
		if terr != nil {
			return fmt.Errorf("stack: tcp port %d: endpoint: %s", port, terr)
		}
		if proto == ipv6.ProtocolNumber {
			ep.SocketOptions().SetV6Only(true)
		}
		ep.SocketOptions().SetReuseAddress(true)
		if terr := ep.Bind(tcpip.FullAddress{Port: port}); terr != nil {
			ep.Close()
			return fmt.Errorf("stack: tcp port %d: bind: %s", port, terr)
		}
		if terr := ep.Listen(ListenBacklog); terr != nil {
			ep.Close()
			return fmt.Errorf("stack: tcp port %d: listen: %s", port, terr)
		}
		l := gonet.NewTCPListener(st.s, &wq, ep)
		st.listeners = append(st.listeners, l)
		st.wg.Add(1)
		go st.acceptLoop(l, svc)
	}
	return nil
}

// acceptLoop hands every connection l accepts to svc, until l is closed.
func (st *Stack) acceptLoop(l *gonet.TCPListener, svc services.TCPService) {
	defer st.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		conn := c.(*gonet.TCPConn)
		// The addresses are read now: after a reset RemoteAddr is nil.
		ra, _ := conn.RemoteAddr().(*net.TCPAddr)
		la, _ := conn.LocalAddr().(*net.TCPAddr)
		if ra == nil || la == nil {
			st.stats.tcpHandshakeFail.Add(1)
			conn.Close()
			continue
		}
		client, anycast := ra.AddrPort(), la.AddrPort()
		client = netip.AddrPortFrom(client.Addr().Unmap(), client.Port())
		anycast = netip.AddrPortFrom(anycast.Addr().Unmap(), anycast.Port())
		st.mu.Lock()
		rs := st.resumes
		st.mu.Unlock()
		if rs != nil {
			if r, ok := rs.TakeResume(client, anycast); ok {
				go st.resumeConn(svc, client, anycast, conn, r)
				continue
			}
		}
		go st.serveConn(svc, client, anycast, conn)
	}
}

// ResumeSource knows the connections the handoff layer is restoring: a
// connection accepted for one of them is a continued connection, served
// with services.Resumable.ResumeConn instead of ServeConn.
type ResumeSource interface {
	// TakeResume returns (and forgets) the resume information of the
	// connection client->anycast, if it is being restored.
	TakeResume(client, anycast netip.AddrPort) (services.Resume, bool)
}

// SetResumeSource installs the handoff layer's ResumeSource.
func (st *Stack) SetResumeSource(r ResumeSource) {
	st.mu.Lock()
	st.resumes = r
	st.mu.Unlock()
}

// resumeConn serves a restored connection. The handoff layer only restores
// connections of Resumable services; anything else is a bug, answered by
// closing the connection.
func (st *Stack) resumeConn(svc services.TCPService, client, anycast netip.AddrPort, conn *gonet.TCPConn, r services.Resume) {
	rs, ok := svc.(services.Resumable)
	if !ok {
		st.log.Error("restored a connection of a service that cannot resume", "service", svc.Name(), "client", client)
		conn.Close()
		return
	}
	// The service's output continues at r.OutputOffset: checkpoints count
	// from the start of the connection, not from the restore.
	st.serveWith(svc.Name(), client, anycast, conn, r.OutputOffset, func(ctx context.Context, c net.Conn) error {
		return rs.ResumeConn(ctx, c, r)
	})
}

// serveConn runs svc on conn until it returns, then closes conn.
func (st *Stack) serveConn(svc services.TCPService, client, anycast netip.AddrPort, conn *gonet.TCPConn) {
	st.serveWith(svc.Name(), client, anycast, conn, 0, svc.ServeConn)
}

// serveWith runs serve on conn with the service's accounting, checkpoint
// publisher and cancellation, then closes conn.
func (st *Stack) serveWith(name string, client, anycast netip.AddrPort, conn *gonet.TCPConn, written uint64, serve func(context.Context, net.Conn) error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	port := anycast.Port()
	tc := st.track(cancel)
	if tc == nil {
		conn.Close()
		return
	}
	defer st.untrack(tc)
	c := st.stats.counters(name, "tcp", port)
	c.accepted.Add(1)
	c.active.Add(1)
	defer c.active.Add(-1)
	// Cancelling the context unblocks the service's pending I/O.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	cc := &countingConn{TCPConn: conn, c: c}
	cc.written.Store(written)
	st.mu.Lock()
	sink := st.checkpoints
	st.mu.Unlock()
	if sink != nil {
		ctx = services.WithCheckpoint(ctx, func(data []byte) {
			sink(client, anycast, cc.written.Load(), data)
		})
	}
	if err := serve(ctx, cc); err != nil && ctx.Err() == nil {
		st.log.Debug("connection ended with error", "service", name,
			"client", client, "err", err)
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
