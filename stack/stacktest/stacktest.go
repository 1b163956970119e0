// Package stacktest runs Baton nodes in one process for tests: a client host
// (a plain gVisor stack standing in for a Linux client), several nodes (each
// a Baton stack on a tun.Fake), and a Switch between them that plays the
// router: it picks which node receives each client packet, and that choice
// can change while connections run (a rehash, a drain, a dead node).
//
// It must not be imported by production code.
package stacktest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/baton-anycast/baton/tun"
)

// Addresses used by the in-process lab (documentation ranges).
var (
	ClientAddr4  = netip.MustParseAddr("198.51.100.2")
	ClientAddr6  = netip.MustParseAddr("2001:db8:100::2")
	Anycast4     = netip.MustParseAddr("192.0.2.1")
	Anycast6     = netip.MustParseAddr("2001:db8:a::1")
	AnycastNets  = []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("2001:db8:a::1/128")}
	clientNIC    = tcpip.NICID(1)
	channelDepth = 4096
)

// Client is a gVisor stack with the client addresses, standing in for the
// client host.
type Client struct {
	Stack *stack.Stack
	ep    *channel.Endpoint
}

// NewClient builds a client stack with MTU mtu.
func NewClient(mtu uint32) (*Client, error) {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	ep := channel.New(channelDepth, mtu, "")
	if err := s.CreateNIC(clientNIC, ep); err != nil {
		return nil, fmt.Errorf("client NIC: %s", err)
	}
	for _, a := range []netip.Addr{ClientAddr4, ClientAddr6} {
		proto, bits := ipv4.ProtocolNumber, 24
		if a.Is6() {
			proto, bits = ipv6.ProtocolNumber, 64
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix()}
		pa.AddressWithPrefix.PrefixLen = bits
		if err := s.AddProtocolAddress(clientNIC, pa, stack.AddressProperties{}); err != nil {
			return nil, fmt.Errorf("client address %v: %s", a, err)
		}
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: clientNIC},
		{Destination: header.IPv6EmptySubnet, NIC: clientNIC},
	})
	return &Client{Stack: s, ep: ep}, nil
}

// DialTCP opens a TCP connection from the client to dst.
func (c *Client) DialTCP(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	proto := ipv4.ProtocolNumber
	if dst.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	return gonet.DialContextTCP(ctx, c.Stack, tcpip.FullAddress{
		Addr: tcpip.AddrFromSlice(dst.Addr().AsSlice()), Port: dst.Port(),
	}, proto)
}

// DialTCPFrom opens a TCP connection from a fixed client port.
func (c *Client) DialTCPFrom(ctx context.Context, port uint16, dst netip.AddrPort) (net.Conn, error) {
	proto, src := ipv4.ProtocolNumber, ClientAddr4
	if dst.Addr().Is6() {
		proto, src = ipv6.ProtocolNumber, ClientAddr6
	}
	var wq waiter.Queue
	ep, err := c.Stack.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if err != nil {
		return nil, fmt.Errorf("endpoint: %s", err)
	}
	ep.SocketOptions().SetReuseAddress(true)
	if err := ep.Bind(tcpip.FullAddress{Addr: tcpip.AddrFromSlice(src.AsSlice()), Port: port}); err != nil {
		ep.Close()
		return nil, fmt.Errorf("bind port %d: %s", port, err)
	}
	entry, notify := waiter.NewChannelEntry(waiter.WritableEvents)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	err = ep.Connect(tcpip.FullAddress{Addr: tcpip.AddrFromSlice(dst.Addr().AsSlice()), Port: dst.Port()})
	if _, ok := err.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ctx.Done():
			ep.Close()
			return nil, ctx.Err()
		case <-notify:
		}
		err = ep.LastError()
	}
	if err != nil {
		ep.Close()
		return nil, fmt.Errorf("connect: %s", err)
	}
	return gonet.NewTCPConn(&wq, ep), nil
}

// DialUDP opens a connected UDP socket from the client to dst.
func (c *Client) DialUDP(dst netip.AddrPort) (net.Conn, error) {
	proto := ipv4.ProtocolNumber
	if dst.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	return gonet.DialUDP(c.Stack, nil, &tcpip.FullAddress{
		Addr: tcpip.AddrFromSlice(dst.Addr().AsSlice()), Port: dst.Port(),
	}, proto)
}

// Close destroys the client stack.
func (c *Client) Close() {
	c.ep.Close()
	c.Stack.Destroy()
}

// Switch connects one Client to several node devices. Every client packet
// goes to the node Route picks; every packet a node writes goes to the
// client. Tests change Route while traffic runs.
type Switch struct {
	client *Client
	nodes  []*tun.Fake

	route   atomic.Pointer[func(pkt []byte) int]
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	dropped atomic.Uint64 // client packets routed to no node (index < 0)
	// ToNode counts client packets delivered to each node.
	ToNode []atomic.Uint64
}

// NewSwitch wires client to nodes. The default route sends everything to
// node 0.
func NewSwitch(client *Client, nodes ...*tun.Fake) *Switch {
	ctx, cancel := context.WithCancel(context.Background())
	sw := &Switch{client: client, nodes: nodes, cancel: cancel, ToNode: make([]atomic.Uint64, len(nodes))}
	sw.SetRoute(func([]byte) int { return 0 })
	sw.wg.Add(1 + len(nodes))
	go sw.fromClient(ctx)
	for _, n := range nodes {
		go sw.toClient(ctx, n)
	}
	return sw
}

// SetRoute replaces the routing function: it returns the index of the node
// that gets a client packet, or -1 to drop it (a blackhole).
func (sw *Switch) SetRoute(f func(pkt []byte) int) { sw.route.Store(&f) }

// Dropped returns the number of client packets routed nowhere.
func (sw *Switch) Dropped() uint64 { return sw.dropped.Load() }

func (sw *Switch) fromClient(ctx context.Context) {
	defer sw.wg.Done()
	for {
		pkt := sw.client.ep.ReadContext(ctx)
		if pkt == nil {
			return
		}
		data := pkt.ToView().AsSlice()
		b := append([]byte(nil), data...)
		pkt.DecRef()
		i := (*sw.route.Load())(b)
		if i < 0 || i >= len(sw.nodes) {
			sw.dropped.Add(1)
			continue
		}
		sw.ToNode[i].Add(1)
		if err := sw.nodes[i].Deliver(ctx, b); err != nil {
			if ctx.Err() != nil {
				return
			}
			// A closed node (a dead node in the test) drops the packet.
			sw.dropped.Add(1)
		}
	}
}

func (sw *Switch) toClient(ctx context.Context, n *tun.Fake) {
	defer sw.wg.Done()
	for {
		b, err := n.Receive(ctx)
		if err != nil {
			return
		}
		proto := ipv4.ProtocolNumber
		if len(b) > 0 && b[0]>>4 == 6 {
			proto = ipv6.ProtocolNumber
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
		sw.client.ep.InjectInbound(proto, pkt)
		pkt.DecRef()
	}
}

// Close stops the switch goroutines.
func (sw *Switch) Close() {
	sw.cancel()
	sw.wg.Wait()
}
