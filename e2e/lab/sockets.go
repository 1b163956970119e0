package lab

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Dial opens a real kernel socket inside the namespace and connects it to
// addr ("ip:port", an IP literal: name resolution would run on other
// threads) over network ("tcp", "tcp4", "tcp6", "udp", ...).
//
// localPort 0 lets the kernel choose an ephemeral port. A non-zero localPort
// binds that source port (with SO_REUSEADDR, so a port left in TIME_WAIT by
// an earlier connection of the same test can be bound again), which fixes
// the flow's 5-tuple and therefore the node ECMP sends it to.
func (ns *NS) Dial(ctx context.Context, network, addr string, localPort int) (net.Conn, error) {
	d := net.Dialer{}
	if localPort != 0 {
		la, err := localAddrFor(network, localPort)
		if err != nil {
			return nil, err
		}
		d.LocalAddr = la
		d.Control = reuseAddr
	}
	var c net.Conn
	err := ns.Do(func() error {
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("lab: dial %s %s from %s: %w", network, addr, ns.Name, err)
	}
	return c, nil
}

// DialUDP is Dial for UDP, returning the concrete *net.UDPConn.
func (ns *NS) DialUDP(ctx context.Context, network, addr string, localPort int) (*net.UDPConn, error) {
	c, err := ns.Dial(ctx, network, addr, localPort)
	if err != nil {
		return nil, err
	}
	u, ok := c.(*net.UDPConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("lab: DialUDP: network %q is not UDP", network)
	}
	return u, nil
}

// Listen opens a kernel stream listener inside the namespace ("tcp", "tcp4",
// "tcp6", "unix"). address ":80" listens on every address of the namespace.
func (ns *NS) Listen(ctx context.Context, network, address string) (net.Listener, error) {
	var l net.Listener
	err := ns.Do(func() error {
		var err error
		l, err = (&net.ListenConfig{}).Listen(ctx, network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("lab: listen %s %s in %s: %w", network, address, ns.Name, err)
	}
	return l, nil
}

// ListenTCP is Listen for TCP, returning the concrete *net.TCPListener.
func (ns *NS) ListenTCP(ctx context.Context, network, address string) (*net.TCPListener, error) {
	l, err := ns.Listen(ctx, network, address)
	if err != nil {
		return nil, err
	}
	t, ok := l.(*net.TCPListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("lab: ListenTCP: network %q is not TCP", network)
	}
	return t, nil
}

// ListenPacket opens a kernel packet socket inside the namespace ("udp",
// "udp4", "udp6", "ip4:icmp", "ip6:ipv6-icmp", ...).
func (ns *NS) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := ns.Do(func() error {
		var err error
		pc, err = (&net.ListenConfig{}).ListenPacket(ctx, network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("lab: listen %s %s in %s: %w", network, address, ns.Name, err)
	}
	return pc, nil
}

// ListenUDP is ListenPacket for UDP, returning the concrete *net.UDPConn.
func (ns *NS) ListenUDP(ctx context.Context, network, address string) (*net.UDPConn, error) {
	pc, err := ns.ListenPacket(ctx, network, address)
	if err != nil {
		return nil, err
	}
	u, ok := pc.(*net.UDPConn)
	if !ok {
		pc.Close()
		return nil, fmt.Errorf("lab: ListenUDP: network %q is not UDP", network)
	}
	return u, nil
}

func localAddrFor(network string, port int) (net.Addr, error) {
	if port < 0 || port > 65535 {
		return nil, fmt.Errorf("lab: bad local port %d", port)
	}
	var ip netip.Addr // unspecified: the kernel picks the source address
	switch network {
	case "tcp4", "udp4":
		ip = netip.IPv4Unspecified()
	case "tcp6", "udp6":
		ip = netip.IPv6Unspecified()
	}
	switch network {
	case "tcp", "tcp4", "tcp6":
		if !ip.IsValid() {
			return net.ResolveTCPAddr(network, ":"+strconv.Itoa(port))
		}
		return net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(port))), nil
	case "udp", "udp4", "udp6":
		if !ip.IsValid() {
			return net.ResolveUDPAddr(network, ":"+strconv.Itoa(port))
		}
		return net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(port))), nil
	}
	return nil, fmt.Errorf("lab: local port needs a tcp or udp network, not %q", network)
}

func reuseAddr(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	})
	if err != nil {
		return err
	}
	return serr
}
