package lab

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Link addressing. Node index i (0-based) uses link number I = i+1:
//
//	router to-nI  203.0.113.(4(I-1)+1)/30   2001:db8:200:I::1/64
//	node   eth0   203.0.113.(4(I-1)+2)/30   2001:db8:200:I::2/64
func newNode(ns *NS, i int) *Node {
	base := byte(4 * i)
	n := &Node{
		NS:         ns,
		Index:      i,
		Addr4:      netip.AddrFrom4([4]byte{203, 0, 113, base + 2}),
		Gateway4:   netip.AddrFrom4([4]byte{203, 0, 113, base + 1}),
		RouterLink: "to-n" + strconv.Itoa(i+1),
	}
	if ns.lab == nil || ns.lab.IPv6 {
		n.Addr6 = node6(i, 2)
		n.Gateway6 = node6(i, 1)
	}
	return n
}

func node6(i int, host byte) netip.Addr {
	a := [16]byte{0x20, 0x01, 0x0d, 0xb8, 0x02, 0x00, 0x00, byte(i + 1)}
	a[15] = host
	return netip.AddrFrom16(a)
}

// setupLinks creates the veth pairs and configures addresses. Every veth is
// created by a netlink socket living in the router namespace, with its peer
// placed directly into the other namespace (IFLA_NET_NS_FD): no interface
// ever exists in the host namespace. Because both ends are born inside
// fresh, private namespaces their final names cannot collide, so they are
// created with their final names and no rename is needed.
func (l *Lab) setupLinks() error {
	for _, ns := range l.namespaces() {
		if err := linkUp(ns, "lo"); err != nil {
			return err
		}
	}
	client := side{ns: l.Client, name: "eth0", addr4: l.ClientAddr4, addr6: l.ClientAddr6}
	router := side{ns: l.Router, name: "to-c",
		addr4: netip.MustParseAddr("198.51.100.1"),
		addr6: netip.MustParseAddr("2001:db8:100::1")}
	if !l.IPv6 {
		router.addr6 = netip.Addr{}
	}
	idx, err := l.vethPair(router, client, 30)
	if err != nil {
		return err
	}
	l.routerClientIdx = idx
	for _, n := range l.Nodes {
		r := side{ns: l.Router, name: n.RouterLink, addr4: n.Gateway4, addr6: n.Gateway6}
		e := side{ns: n.NS, name: "eth0", addr4: n.Addr4, addr6: n.Addr6}
		idx, err := l.vethPair(r, e, 30)
		if err != nil {
			return err
		}
		n.routerLinkIdx = idx
	}
	return nil
}

type side struct {
	ns           *NS
	name         string
	addr4, addr6 netip.Addr
}

// vethPair creates local<->peer, addresses both ends (v4 /bits4, v6 /64 with
// IFA_F_NODAD), brings them up and returns local's ifindex.
func (l *Lab) vethPair(local, peer side, bits4 int) (int, error) {
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: local.name},
		PeerName:      peer.name,
		PeerNamespace: netlink.NsFd(peer.ns.Handle()),
	}
	if err := local.ns.Netlink().LinkAdd(v); err != nil {
		return 0, fmt.Errorf("lab: veth %s/%s <-> %s/%s: %w", local.ns.Name, local.name, peer.ns.Name, peer.name, err)
	}
	idx := 0
	for i, s := range []side{local, peer} {
		link, err := s.ns.Netlink().LinkByName(s.name)
		if err != nil {
			return 0, fmt.Errorf("lab: %s/%s: %w", s.ns.Name, s.name, err)
		}
		if i == 0 {
			idx = link.Attrs().Index
		}
		if err := addAddr(s.ns, link, s.addr4, bits4); err != nil {
			return 0, err
		}
		if s.addr6.IsValid() {
			if err := addAddr(s.ns, link, s.addr6, 64); err != nil {
				return 0, err
			}
		}
		if err := s.ns.Netlink().LinkSetUp(link); err != nil {
			return 0, fmt.Errorf("lab: up %s/%s: %w", s.ns.Name, s.name, err)
		}
	}
	return idx, nil
}

func addAddr(ns *NS, link netlink.Link, ip netip.Addr, bits int) error {
	a := &netlink.Addr{IPNet: &net.IPNet{
		IP:   ip.AsSlice(),
		Mask: net.CIDRMask(bits, ip.BitLen()),
	}}
	if ip.Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := ns.Netlink().AddrAdd(link, a); err != nil {
		return fmt.Errorf("lab: addr %s/%d on %s/%s: %w", ip, bits, ns.Name, link.Attrs().Name, err)
	}
	return nil
}

func linkUp(ns *NS, name string) error {
	link, err := ns.Netlink().LinkByName(name)
	if err == nil {
		err = ns.Netlink().LinkSetUp(link)
	}
	if err != nil {
		return fmt.Errorf("lab: up %s/%s: %w", ns.Name, name, err)
	}
	return nil
}

// AddAddr assigns ip/bits to the interface named link inside the namespace
// (IPv6 with IFA_F_NODAD). Tests use it e.g. to put the anycast addresses on
// a node's lo so the kernel itself answers.
func (ns *NS) AddAddr(link string, ip netip.Addr, bits int) error {
	l, err := ns.Netlink().LinkByName(link)
	if err != nil {
		return fmt.Errorf("lab: %s/%s: %w", ns.Name, link, err)
	}
	return addAddr(ns, l, ip, bits)
}
