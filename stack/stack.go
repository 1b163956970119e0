// Package stack runs Baton's userspace TCP/IP stack: a gVisor netstack with
// IPv4, IPv6, TCP, UDP and ICMP echo on top of a TUN device, the link endpoint
// between the two (link.go, the seam every packet crosses and where the
// handoff layer hooks in), and the dispatch of accepted connections and
// datagrams to Baton's services (serve.go).
//
// The packet path, inbound (client -> service):
//
//	kernel routes anycast dst into the TUN (tun/)
//	  -> Endpoint.readLoop: one goroutine per TUN queue reads a packet
//	  -> hook chain: AnycastFilter, then the handoff hooks (observe, rewrite,
//	     consume; see hook.go)
//	  -> gVisor DeliverNetworkPacket: IPv4/IPv6 -> TCP/UDP/ICMP
//	  -> new TCP flows: listener per service port -> Stack.acceptLoop -> service.ServeConn
//	     UDP datagrams: udp.Forwarder -> Stack.serveUDP -> service.HandleDatagram
//
// and back (service -> client): gonet.TCPConn.Write -> gVisor TCP ->
// Endpoint.WritePackets -> hook chain (outbound) -> tun.Device.Write (or
// WriteGSO, with a virtio header, on a device with segmentation offload) ->
// the kernel routes the packet to the client.
//
// This package must not know about peers, replication or takeover: the
// handoff layer sees packets only through Hooks and puts packets on the path
// only through the Injector.
package stack

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/baton-anycast/baton/stack/services"
	"github.com/baton-anycast/baton/tun"
)

// nicID is the only NIC of Baton's stack: the TUN device.
const nicID tcpip.NICID = 1

// TCP settings shared by every node. Nodes that may take over each other's
// connections must agree on them: the window scale a node offers follows from
// its receive buffer, and a takeover that changes the window scale forces
// every window field of the flow to be rescaled.
const (
	// CongestionControl is Reno: gVisor's long-standing default. CUBIC is
	// available but one gVisor-on-TUN deployment hit a cwnd overflow panic
	// with it, and on the sub-millisecond RTTs of an anycast edge to its
	// router the two behave alike.
	CongestionControl = "reno"

	// ReceiveBufferMin/Default/Max mirror Linux's tcp_rmem bounds (4 KiB,
	// with a 1 MiB starting point, up to 6 MiB). Receive-buffer moderation
	// (auto-tuning, like Linux) grows a connection's buffer within these
	// bounds. With moderation on, gVisor derives the window scale it offers
	// from the maximum (6 MiB: scale 7, measured), so every node with these
	// settings offers the same scale.
	ReceiveBufferMin     = 4 << 10
	ReceiveBufferDefault = 1 << 20
	ReceiveBufferMax     = 6 << 20

	// SendBufferMin/Default/Max: 1 MiB covers the bandwidth-delay product of
	// 10 Gb/s at 0.8 ms, far above what an edge node sees to its clients in
	// the lab; 4 MiB (Linux's tcp_wmem max) caps what one bulk flow pins.
	SendBufferMin     = 4 << 10
	SendBufferDefault = 1 << 20
	SendBufferMax     = 4 << 20

	// SACK is on: Linux clients offer it, it recovers several losses per
	// RTT, and the takeover work translates SACK blocks.
	SACK = true

	// RACK loss detection stays on (gVisor's default); turning it off was
	// reported to hurt uploads badly at high RTT.
	RACK = tcpip.TCPRACKLossDetection

	// Nagle stays off (gVisor's default, TCP_NODELAY semantics): services
	// write whole responses in large chunks, and echo wants low latency.
	Nagle = false

	// MaxInFlightHandshakes bounds the SYNs to ports without a service
	// that the TCP forwarder answers at once (one goroutine each, each
	// sending a RST), so a scan cannot spawn unbounded goroutines.
	MaxInFlightHandshakes = 1024

	// TimeWait is how long a closed connection lingers in TIME-WAIT: 60 s,
	// Linux's fixed value, so a reused 4-tuple behaves as with a kernel.
	TimeWait = 60 * time.Second
)

// Config configures a Stack.
type Config struct {
	// NodeName is given to services that answer with it.
	NodeName string
	// Prefixes are the anycast prefixes the stack terminates (IPv4 and/or
	// IPv6). Every address inside them is local to the stack.
	Prefixes []netip.Prefix
	// Logger receives the stack's logs; nil means slog.Default().
	Logger *slog.Logger
	// UDPSessions bounds the concurrent UDP sessions (remote address and
	// port pairs being answered); 0 means 4096.
	UDPSessions int
	// UDPIdle is how long a UDP session waits for another datagram before
	// it is closed; 0 means 2 s.
	UDPIdle time.Duration
}

// Stack is one node's userspace network stack.
type Stack struct {
	cfg    Config
	log    *slog.Logger
	s      *stack.Stack
	ep     *Endpoint
	filter *AnycastFilter

	mu     sync.Mutex
	tcpSvc map[uint16]services.TCPService
	udpSvc map[uint16]services.UDPService
	conns  map[*trackedConn]struct{}
	closed bool
	wg     sync.WaitGroup

	listeners   []*gonet.TCPListener
	udpSlots    chan struct{}
	stats       serveStats
	checkpoints CheckpointSink
	resumes     ResumeSource
}

// New builds a stack on dev. The stack owns dev from now on. Packets start
// flowing immediately; connections to ports without a service are reset
// until services are added with ServeTCP and ServeUDP.
func New(dev tun.Device, cfg Config) (*Stack, error) {
	if len(cfg.Prefixes) == 0 {
		return nil, errors.New("stack: no anycast prefixes")
	}
	for _, p := range cfg.Prefixes {
		if !p.IsValid() {
			return nil, fmt.Errorf("stack: invalid anycast prefix %v", p)
		}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.UDPSessions <= 0 {
		cfg.UDPSessions = 4096
	}
	if cfg.UDPIdle <= 0 {
		cfg.UDPIdle = 2 * time.Second
	}
	st := &Stack{
		cfg:      cfg,
		log:      cfg.Logger,
		filter:   NewAnycastFilter(cfg.Prefixes),
		tcpSvc:   make(map[uint16]services.TCPService),
		udpSvc:   make(map[uint16]services.UDPService),
		conns:    make(map[*trackedConn]struct{}),
		udpSlots: make(chan struct{}, cfg.UDPSessions),
	}
	st.s = stack.New(stack.Options{
		NetworkProtocols: []stack.NetworkProtocolFactory{
			ipv4.NewProtocol,
			// Zero options: no router solicitations, no SLAAC, no
			// link-local address, no MLD. The TUN is point-to-point and
			// the stack must not emit anything it was not asked to.
			ipv6.NewProtocol,
		},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
		// ICMP echo is answered by the network layer (ipv4/ipv6) itself;
		// no ICMP transport endpoints are needed for that.
	})
	if err := st.configureTCP(); err != nil {
		st.s.Destroy()
		return nil, err
	}
	st.ep = NewEndpoint(dev)
	st.ep.AddHook(st.filter)
	if err := st.s.CreateNICWithOptions(nicID, st.ep, stack.NICOptions{Name: dev.Name()}); err != nil {
		st.s.Destroy()
		return nil, fmt.Errorf("stack: create NIC: %s", err)
	}
	// Promiscuous: accept packets for any destination address, so every
	// address of every anycast prefix is local without listing them (a /64
	// could not be listed). Spoofing: send from those addresses although
	// none is assigned. AnycastFilter restricts both to the prefixes.
	if err := st.s.SetPromiscuousMode(nicID, true); err != nil {
		st.s.Destroy()
		return nil, fmt.Errorf("stack: promiscuous mode: %s", err)
	}
	if err := st.s.SetSpoofing(nicID, true); err != nil {
		st.s.Destroy()
		return nil, fmt.Errorf("stack: spoofing: %s", err)
	}
	if err := st.addAnycastAddresses(); err != nil {
		st.s.Destroy()
		return nil, err
	}
	// Every reply leaves through the TUN: the kernel routes it on.
	st.s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	fwd := tcp.NewForwarder(st.s, ReceiveBufferDefault, MaxInFlightHandshakes, st.refuseTCP)
	st.s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	ufwd := udp.NewForwarder(st.s, st.acceptUDP)
	st.s.SetTransportProtocolHandler(udp.ProtocolNumber, ufwd.HandlePacket)
	return st, nil
}

// MaxListedPrefixAddresses bounds how many addresses of one anycast prefix
// are assigned to the NIC one by one. Promiscuous mode makes every address
// of every prefix work for TCP and UDP, but gVisor treats such addresses as
// temporary and does not answer an IPv4 echo request sent to one; assigning
// them makes ping work. Anycast prefixes are normally single addresses (/32,
// /128) or small blocks; a larger prefix is served without IPv4 ping.
const MaxListedPrefixAddresses = 256

func (st *Stack) addAnycastAddresses() error {
	for _, p := range st.cfg.Prefixes {
		hostBits := p.Addr().BitLen() - p.Bits()
		if hostBits > 8 { // more than MaxListedPrefixAddresses
			st.log.Info("anycast prefix too large to list its addresses: TCP and UDP are served, IPv4 ping is not answered",
				"prefix", p.String())
			continue
		}
		proto := ipv4.ProtocolNumber
		if p.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		a := p.Masked().Addr()
		for i := 0; i < 1<<hostBits && p.Contains(a); i++ {
			pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddressWithPrefix{
				Address: tcpip.AddrFromSlice(a.AsSlice()), PrefixLen: p.Addr().BitLen()}}
			if err := st.s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
				return fmt.Errorf("stack: add anycast address %v: %s", a, err)
			}
			a = a.Next()
		}
	}
	return nil
}

func (st *Stack) configureTCP() error {
	opts := []tcpip.SettableTransportProtocolOption{
		ptr(tcpip.TCPSACKEnabled(SACK)),
		ptr(tcpip.TCPRecovery(RACK)),
		ptr(tcpip.TCPDelayEnabled(Nagle)),
		ptr(tcpip.CongestionControlOption(CongestionControl)),
		ptr(tcpip.TCPModerateReceiveBufferOption(true)),
		ptr(tcpip.TCPTimeWaitTimeoutOption(TimeWait)),
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: ReceiveBufferMin, Default: ReceiveBufferDefault, Max: ReceiveBufferMax},
		&tcpip.TCPSendBufferSizeRangeOption{Min: SendBufferMin, Default: SendBufferDefault, Max: SendBufferMax},
	}
	for _, o := range opts {
		if err := st.s.SetTransportProtocolOption(tcp.ProtocolNumber, o); err != nil {
			return fmt.Errorf("stack: tcp option %T: %s", o, err)
		}
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

// Endpoint returns the link endpoint: add hooks to it, inject through it.
func (st *Stack) Endpoint() *Endpoint { return st.ep }

// GVisor returns the underlying gVisor stack, for the handoff layer.
func (st *Stack) GVisor() *stack.Stack { return st.s }

// Filter returns the anycast filter (the first hook of the chain).
func (st *Stack) Filter() *AnycastFilter { return st.filter }

// Prefixes returns the anycast prefixes the stack terminates.
func (st *Stack) Prefixes() []netip.Prefix { return append([]netip.Prefix(nil), st.cfg.Prefixes...) }

// ServeTCP serves svc on TCP port on every anycast address.
func (st *Stack) ServeTCP(port uint16, svc services.TCPService) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if port == 0 {
		return fmt.Errorf("stack: service %s: port 0", svc.Name())
	}
	if old, ok := st.tcpSvc[port]; ok {
		return fmt.Errorf("stack: tcp port %d: both %s and %s", port, old.Name(), svc.Name())
	}
	if st.closed {
		return fmt.Errorf("stack: closed")
	}
	if err := st.listenTCP(port, svc); err != nil {
		return err
	}
	st.tcpSvc[port] = svc
	return nil
}

// ServeUDP serves svc on UDP port on every anycast address.
func (st *Stack) ServeUDP(port uint16, svc services.UDPService) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	if port == 0 {
		return fmt.Errorf("stack: service %s: port 0", svc.Name())
	}
	if old, ok := st.udpSvc[port]; ok {
		return fmt.Errorf("stack: udp port %d: both %s and %s", port, old.Name(), svc.Name())
	}
	st.udpSvc[port] = svc
	return nil
}

// Failed is closed when the stack can no longer read its device.
func (st *Stack) Failed() <-chan struct{} { return st.ep.Failed() }

// Close stops accepting, closes every connection (clients see RST: a
// stopped node does not finish its connections; draining is the handoff
// layer's business), closes the device and waits for every goroutine.
func (st *Stack) Close() {
	st.mu.Lock()
	if st.closed {
		st.mu.Unlock()
		return
	}
	st.closed = true
	for _, l := range st.listeners {
		l.Close()
	}
	conns := make([]*trackedConn, 0, len(st.conns))
	for c := range st.conns {
		conns = append(conns, c)
	}
	st.mu.Unlock()
	for _, c := range conns {
		c.cancel()
	}
	st.s.Close()
	st.ep.Close()
	// Wait for the readers before gVisor's Wait: that holds the stack's
	// lock while it waits for the link endpoint, and a reader still
	// delivering a packet may need that lock (to answer it), which would
	// deadlock (found under load by TestCloseStopsEverything).
	st.ep.Wait()
	st.wg.Wait()
	st.s.Wait()
}

// TCPServiceName returns the name of the service on TCP port, or "".
func (st *Stack) TCPServiceName(port uint16) string {
	st.mu.Lock()
	defer st.mu.Unlock()
	if s, ok := st.tcpSvc[port]; ok {
		return s.Name()
	}
	return ""
}
