package lab

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// openPredictSocket opens the NETLINK_ROUTE socket, living in the router
// namespace, that PredictNode queries.
func (l *Lab) openPredictSocket() error {
	s, err := nl.GetNetlinkSocketAt(l.Router.Handle(), netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("lab: netlink socket in %s: %w", l.Router.Name, err)
	}
	tv := unix.NsecToTimeval(int64(termGrace))
	if err := s.SetReceiveTimeout(&tv); err != nil {
		s.Close()
		return err
	}
	if err := s.SetSendTimeout(&tv); err != nil {
		s.Close()
		return err
	}
	l.predMu.Lock()
	l.predSock = &nl.SocketHandle{Socket: s}
	l.predMu.Unlock()
	return nil
}

// PredictNode returns the index of the node to which the router's FIB sends
// the TCP flow src -> dst arriving from the client.
//
// For IPv4 this is the kernel's own answer to an RTM_GETROUTE with RTA_IIF
// (the router's to-c link), RTA_IP_PROTO, RTA_SPORT and RTA_DPORT: the
// equivalent of `ip route get DST from SRC iif to-c ipproto tcp sport S
// dport D` in the router namespace. The kernel builds a packet for that
// query and hashes it exactly as a forwarded one.
//
// IPv6 needs more: the kernel answers an IPv6 RTM_GETROUTE from the flow
// keys only, while a forwarded IPv6 packet (hash policy 3) gets the same
// hash passed through jhash_2words(hash, inner hash 0, 0), so `ip -6 route
// get` does not tell where forwarded flows go. PredictNode therefore
// computes the kernel's multipath hash itself (see ecmp6.go), checks on
// every call that its flow-key hash gives the kernel's RTM_GETROUTE answer,
// and returns the node the forwarding hash selects.
func (l *Lab) PredictNode(src, dst netip.AddrPort) (int, error) {
	return l.PredictFlow(unix.IPPROTO_TCP, src, dst)
}

// PredictFlow is PredictNode for any IP protocol with ports (e.g.
// unix.IPPROTO_UDP).
func (l *Lab) PredictFlow(proto uint8, src, dst netip.AddrPort) (int, error) {
	sa, da := src.Addr().Unmap(), dst.Addr().Unmap()
	if !sa.IsValid() || !da.IsValid() || sa.Is4() != da.Is4() {
		return -1, fmt.Errorf("lab: PredictFlow: bad flow %s -> %s", src, dst)
	}
	src, dst = netip.AddrPortFrom(sa, src.Port()), netip.AddrPortFrom(da, dst.Port())
	if da.Is4() {
		return l.routeGet(proto, src, dst)
	}
	return l.predict6(proto, src, dst)
}

// routeGet asks the router's kernel which node it routes the flow to, as if
// the packet came in on to-c.
func (l *Lab) routeGet(proto uint8, src, dst netip.AddrPort) (int, error) {
	sa, da := src.Addr(), dst.Addr()
	family, bits := unix.AF_INET, uint8(32)
	if da.Is6() {
		family, bits = unix.AF_INET6, 128
	}
	req := nl.NewNetlinkRequest(unix.RTM_GETROUTE, unix.NLM_F_REQUEST)
	msg := &nl.RtMsg{}
	msg.Family = uint8(family)
	msg.Dst_len = bits
	msg.Src_len = bits
	msg.Flags = unix.RTM_F_LOOKUP_TABLE
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.RTA_DST, da.AsSlice()))
	req.AddData(nl.NewRtAttr(unix.RTA_SRC, sa.AsSlice()))
	// As if forwarded: the packet comes in on the router's client link.
	req.AddData(nl.NewRtAttr(unix.RTA_IIF, nl.Uint32Attr(uint32(l.routerClientIdx))))
	req.AddData(nl.NewRtAttr(unix.RTA_IP_PROTO, nl.Uint8Attr(proto)))
	req.AddData(nl.NewRtAttr(unix.RTA_SPORT, nl.BEUint16Attr(src.Port())))
	req.AddData(nl.NewRtAttr(unix.RTA_DPORT, nl.BEUint16Attr(dst.Port())))

	l.predMu.Lock()
	sock := l.predSock
	if sock == nil {
		l.predMu.Unlock()
		return -1, errors.New("lab: closed")
	}
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: sock}
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWROUTE)
	l.predMu.Unlock()
	if err != nil {
		return -1, fmt.Errorf("lab: route get %s -> %s: %w", src, dst, err)
	}
	if len(msgs) == 0 {
		return -1, fmt.Errorf("lab: route get %s -> %s: empty answer", src, dst)
	}
	m := msgs[0]
	if len(m) < unix.SizeofRtMsg {
		return -1, fmt.Errorf("lab: route get %s -> %s: short answer", src, dst)
	}
	rt := nl.DeserializeRtMsg(m)
	if rt.Type != unix.RTN_UNICAST {
		return -1, fmt.Errorf("lab: route get %s -> %s: route type %d, not unicast", src, dst, rt.Type)
	}
	attrs, err := nl.ParseRouteAttr(m[rt.Len():])
	if err != nil {
		return -1, fmt.Errorf("lab: route get %s -> %s: %w", src, dst, err)
	}
	oif := -1
	var gw netip.Addr
	for _, a := range attrs {
		switch a.Attr.Type {
		case unix.RTA_OIF:
			if len(a.Value) >= 4 {
				oif = int(binary.NativeEndian.Uint32(a.Value))
			}
		case unix.RTA_GATEWAY:
			gw, _ = netip.AddrFromSlice(a.Value)
		}
	}
	for _, n := range l.Nodes {
		if n.routerLinkIdx == oif {
			if gw.IsValid() && gw != n.Addr4 && gw != n.Addr6 {
				return -1, fmt.Errorf("lab: route get %s -> %s: oif %s but gateway %s", src, dst, n.RouterLink, gw)
			}
			return n.Index, nil
		}
	}
	return -1, fmt.Errorf("lab: route get %s -> %s: oif %d gateway %v is no node", src, dst, oif, gw)
}
