package health

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/osrg/gobgp/v3/pkg/packet/bgp"
)

// fakeRouter is the router side of one BGP session, speaking raw BGP
// messages to the announcer under test.
type fakeRouter struct {
	t    *testing.T
	conn net.Conn
}

func (r *fakeRouter) send(m *bgp.BGPMessage) {
	r.t.Helper()
	b, err := m.Serialize()
	if err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.conn.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

func (r *fakeRouter) read() *bgp.BGPMessage {
	r.t.Helper()
	hdr := make([]byte, bgp.BGP_HEADER_LENGTH)
	if _, err := io.ReadFull(r.conn, hdr); err != nil {
		r.t.Fatal(err)
	}
	n := int(binary.BigEndian.Uint16(hdr[16:18]))
	buf := append(hdr, make([]byte, n-len(hdr))...)
	if _, err := io.ReadFull(r.conn, buf[len(hdr):]); err != nil {
		r.t.Fatal(err)
	}
	m, err := bgp.ParseBGPMessage(buf)
	if err != nil {
		r.t.Fatal(err)
	}
	return m
}

// routes is what UPDATEs said: prefix -> next hop ("" once withdrawn).
type routes map[string]string

// readUpdates applies UPDATEs to rs until cond(rs) holds.
func (r *fakeRouter) readUpdates(rs routes, cond func(routes) bool) {
	r.t.Helper()
	for !cond(rs) {
		m := r.read()
		u, ok := m.Body.(*bgp.BGPUpdate)
		if !ok {
			if m.Header.Type == bgp.BGP_MSG_NOTIFICATION {
				r.t.Fatalf("notification: %+v", m.Body)
			}
			continue
		}
		nh := ""
		for _, a := range u.PathAttributes {
			switch a := a.(type) {
			case *bgp.PathAttributeNextHop:
				nh = a.Value.String()
			case *bgp.PathAttributeMpReachNLRI:
				for _, p := range a.Value {
					rs[p.String()] = a.Nexthop.String()
				}
			case *bgp.PathAttributeMpUnreachNLRI:
				for _, p := range a.Value {
					rs[p.String()] = ""
				}
			}
		}
		for _, p := range u.NLRI {
			rs[p.String()] = nh
		}
		for _, p := range u.WithdrawnRoutes {
			rs[p.String()] = ""
		}
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestBGPAnnounceWithdraw runs the bgp announcer against a raw BGP peer
// (iBGP, the announcer passive): nothing is announced at first, Advertise
// announces both prefixes with the configured next hops, Advertise(nil)
// withdraws them, and Status reports the session.
func TestBGPAnnounceWithdraw(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	port := freePort(t)
	const asn = 64512
	b, err := NewBGP(BGPConfig{
		ASN: asn, RouterID: netip.MustParseAddr("198.51.100.9"), ListenPort: port,
		NextHop4: netip.MustParseAddr("198.51.100.9"), NextHop6: netip.MustParseAddr("2001:db8:200:1::2"),
		HoldTime: 9 * time.Second, IPv4: true, IPv6: true, Logger: quiet,
		Neighbors: []BGPNeighbor{{Address: netip.MustParseAddr("127.0.0.1"), ASN: asn, Passive: true}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer b.Close(context.Background())

	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	r := &fakeRouter{t: t, conn: conn}
	caps := []bgp.ParameterCapabilityInterface{
		bgp.NewCapMultiProtocol(bgp.RF_IPv4_UC), bgp.NewCapMultiProtocol(bgp.RF_IPv6_UC),
		bgp.NewCapRouteRefresh(), bgp.NewCapFourOctetASNumber(asn),
	}
	r.send(bgp.NewBGPOpenMessage(asn, 30, "198.51.100.1", []bgp.OptionParameterInterface{bgp.NewOptionParameterCapability(caps)}))
	if m := r.read(); m.Header.Type != bgp.BGP_MSG_OPEN {
		t.Fatalf("first message type %d, want OPEN", m.Header.Type)
	}
	r.send(bgp.NewBGPKeepAliveMessage())
	go func() { // keep the session up while the test reads
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				if b, err := bgp.NewBGPKeepAliveMessage().Serialize(); err == nil {
					if _, err := conn.Write(b); err != nil {
						return
					}
				}
			}
		}
	}()
	// Established once the status says so.
	for {
		st := b.Status(ctx)
		if len(st.Sessions) == 1 && st.Sessions[0].State == "established" {
			s := st.Sessions[0]
			if s.HoldTime != 9*time.Second || s.PeerASN != asn || !s.Passive || s.Established.IsZero() {
				t.Fatalf("session %+v", s)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("session not established: %+v", st.Sessions)
		case <-time.After(10 * time.Millisecond):
		}
	}

	ps := []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("2001:db8:a::1/128")}
	if err := b.Advertise(ctx, ps); err != nil {
		t.Fatal(err)
	}
	rs := routes{}
	r.readUpdates(rs, func(rs routes) bool { return rs["192.0.2.1/32"] != "" && rs["2001:db8:a::1/128"] != "" })
	if rs["192.0.2.1/32"] != "198.51.100.9" || rs["2001:db8:a::1/128"] != "2001:db8:200:1::2" {
		t.Fatalf("announced %v", rs)
	}
	st := b.Status(ctx)
	got := []string{}
	for _, a := range st.Announced {
		got = append(got, a.Prefix.String()+" via "+a.NextHop.String())
	}
	if !slices.Equal(got, []string{"192.0.2.1/32 via 198.51.100.9", "2001:db8:a::1/128 via 2001:db8:200:1::2"}) {
		t.Fatalf("status announced %v", got)
	}
	if st.Sessions[0].Advertised != 2 {
		t.Fatalf("session advertised %d prefixes, want 2", st.Sessions[0].Advertised)
	}

	// Advertising the same set again sends nothing new; withdrawing one
	// family leaves the other.
	if err := b.Advertise(ctx, ps); err != nil {
		t.Fatal(err)
	}
	if err := b.Advertise(ctx, ps[:1]); err != nil {
		t.Fatal(err)
	}
	r.readUpdates(rs, func(rs routes) bool { return rs["2001:db8:a::1/128"] == "" })
	if rs["192.0.2.1/32"] == "" {
		t.Fatalf("IPv4 withdrawn too: %v", rs)
	}
	if err := b.Advertise(ctx, nil); err != nil {
		t.Fatal(err)
	}
	r.readUpdates(rs, func(rs routes) bool { return rs["192.0.2.1/32"] == "" })
	if st := b.Status(ctx); len(st.Announced) != 0 {
		t.Fatalf("still announced: %v", st.Announced)
	}

	// Close ends the session with a notification.
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	for {
		m := r.read()
		if m.Header.Type == bgp.BGP_MSG_NOTIFICATION {
			break
		}
	}
}
