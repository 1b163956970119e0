// This file tests the UDP whoami service (whoami.go) and the catalog
// (catalog.go).

package services

import (
	"context"
	"net"
	"net/netip"
	"testing"
)

func TestWhoamiDatagram(t *testing.T) {
	w := NewWhoami("node-a")
	from := netip.MustParseAddrPort("192.0.2.1:5353")
	for _, req := range [][]byte{nil, {}, []byte("who?"), make([]byte, 1500)} {
		got := w.HandleDatagram(context.Background(), from, req)
		if string(got) != "node-a\n" {
			t.Fatalf("reply to %d bytes = %q", len(req), got)
		}
		got[0] = 'X' // the caller owns the reply
	}
	if got := w.HandleDatagram(context.Background(), from, nil); string(got) != "node-a\n" {
		t.Fatalf("reply changed to %q", got)
	}
}

func TestWhoamiUDPLoopback(t *testing.T) {
	srv, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Skipf("no loopback UDP: %v", err)
	}
	defer srv.Close()
	w := NewWhoami("node-u")
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := srv.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if reply := w.HandleDatagram(context.Background(), from, buf[:n]); reply != nil {
				srv.WriteToUDPAddrPort(reply, from)
			}
		}
	}()
	cli, err := net.DialUDP("udp", nil, srv.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	for _, req := range []string{"hello", ""} {
		if _, err := cli.Write([]byte(req)); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 100)
		n, err := cli.Read(buf)
		if err != nil || string(buf[:n]) != "node-u\n" {
			t.Fatalf("reply to %q: %q, %v", req, buf[:n], err)
		}
	}
}

func TestCatalog(t *testing.T) {
	c := Builtin()
	if got := c.Names(); len(got) != 4 || got[0] != "echo" || got[1] != "http" || got[2] != "stream" || got[3] != "whoami" {
		t.Fatalf("Names = %v", got)
	}
	for _, tc := range []struct {
		name string
		tr   Transport
	}{{"stream", TCP}, {"echo", TCP}, {"http", TCP}, {"whoami", UDP}} {
		e, err := c.Lookup(tc.name)
		if err != nil || e.Name != tc.name || e.Transport != tc.tr {
			t.Fatalf("Lookup(%q) = %+v, %v", tc.name, e, err)
		}
		svc, err := New(tc.name, "node")
		if err != nil {
			t.Fatal(err)
		}
		var name string
		switch s := svc.(type) {
		case TCPService:
			name = s.Name()
			if tc.tr != TCP {
				t.Errorf("%s: got a TCPService", tc.name)
			}
			if _, err := c.NewUDP(tc.name, "node"); err == nil {
				t.Errorf("NewUDP(%q) succeeded", tc.name)
			}
		case UDPService:
			name = s.Name()
			if tc.tr != UDP {
				t.Errorf("%s: got a UDPService", tc.name)
			}
			if _, err := c.NewTCP(tc.name, "node"); err == nil || err.Error() != `services: "whoami" is a udp service, not tcp` {
				t.Errorf("NewTCP(%q) = %v", tc.name, err)
			}
		default:
			t.Fatalf("%s: %T is neither", tc.name, svc)
		}
		if name != tc.name {
			t.Errorf("service %q calls itself %q", tc.name, name)
		}
	}
	const want = `services: unknown service "foo" (known: echo, http, stream, whoami)`
	if _, err := New("foo", "node"); err == nil || err.Error() != want {
		t.Errorf("New(foo) = %v, want %s", err, want)
	}
	if _, err := c.NewTCP("foo", "node"); err == nil || err.Error() != want {
		t.Errorf("NewTCP(foo) = %v", err)
	}
	if s, err := c.NewTCP("http", "n1"); err != nil || s.(*HTTP).node != "n1" {
		t.Errorf("NewTCP(http) = %v, %v", s, err)
	}
	if TCP.String() != "tcp" || UDP.String() != "udp" {
		t.Errorf("Transport strings: %v %v", TCP, UDP)
	}
}
