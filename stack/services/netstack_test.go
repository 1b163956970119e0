// This file runs the TCP services over gVisor's netstack (through the gonet
// adapter), the connections they serve in production: half-close, deadlines
// and cancellation must work on *gonet.TCPConn as on *net.TCPConn.

package services

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	gvloopback "gvisor.dev/gvisor/pkg/tcpip/link/loopback"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// netstackServe serves svc on a gVisor stack with one loopback NIC and
// returns a dial function for it and the channel of ServeConn results.
func netstackServe(t *testing.T, ctx context.Context, svc TCPService) (func() *gonet.TCPConn, <-chan error) {
	t.Helper()
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
	})
	if err := s.CreateNIC(1, gvloopback.New()); err != nil {
		t.Fatal(err)
	}
	addr := tcpip.AddrFrom4([4]byte{10, 0, 0, 1})
	if err := s.AddProtocolAddress(1, tcpip.ProtocolAddress{
		Protocol:          ipv4.ProtocolNumber,
		AddressWithPrefix: addr.WithPrefix(),
	}, stack.AddressProperties{}); err != nil {
		t.Fatal(err)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: addr.WithPrefix().Subnet(), NIC: 1}})

	full := tcpip.FullAddress{NIC: 1, Addr: addr, Port: 7000}
	ln, err := gonet.ListenTCP(s, full, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 10)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				err := svc.ServeConn(ctx, c)
				c.Close()
				errs <- err
			}(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		s.Close()
		s.Wait()
	})
	return func() *gonet.TCPConn {
		c, err := gonet.DialTCP(s, full, ipv4.ProtocolNumber)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}, errs
}

func TestNetstackStream(t *testing.T) {
	dial, errs := netstackServe(t, context.Background(), NewStream())
	for _, tc := range []struct{ size, seed, offset uint64 }{{0, 1, 0}, {1<<20 + 5, 2, 0}, {3 << 20, 3, 1<<20 + 1}} {
		c := dial()
		io.WriteString(c, StreamRequestAt(tc.size, tc.seed, tc.offset))
		if n, ok, err := ReadStreamAt(c, tc.size, tc.seed, tc.offset); !ok {
			t.Fatalf("%+v: %d, %v", tc, n, err)
		}
		c.Close()
		if err := <-errs; err != nil {
			t.Fatalf("%+v: ServeConn: %v", tc, err)
		}
	}
	c := dial()
	io.WriteString(c, "1 2 3\n")
	if got, err := io.ReadAll(c); err != nil || string(got) != "ERR offset exceeds size\n" {
		t.Fatalf("malformed: %q, %v", got, err)
	}
	c.Close() // else the server lingers, waiting for our EOF
	if err := <-errs; err == nil {
		t.Fatal("ServeConn returned nil for a refused request")
	}
}

func TestNetstackEchoHTTP(t *testing.T) {
	dial, errs := netstackServe(t, context.Background(), NewEcho())
	c := dial()
	want := pattern(5, 0, 1<<20)
	go func() { c.Write(want); c.CloseWrite() }()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != string(want) {
		t.Fatalf("echo: %d bytes, %v", len(got), err)
	}
	if err := <-errs; err != nil {
		t.Fatal(err)
	}

	dial, errs = netstackServe(t, context.Background(), NewHTTP("gvisor"))
	c = dial()
	br := bufio.NewReader(c)
	for i := range 3 {
		io.WriteString(c, get(BytesPath(100000, uint64(i))))
		resp, body := readResp(t, br, "GET")
		if resp.StatusCode != 200 || string(body) != string(pattern(uint64(i), 0, 100000)) {
			t.Fatalf("request %d: %s, %d bytes", i, resp.Status, len(body))
		}
	}
	io.WriteString(c, get("/whoami", "Connection: close\r\n"))
	if _, body := readResp(t, br, "GET"); string(body) != "gvisor\n" {
		t.Fatalf("whoami: %q", body)
	}
	c.Close()
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
}

func TestNetstackCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	dial, errs := netstackServe(t, ctx, NewStream())
	c := dial()
	io.WriteString(c, StreamRequest(MaxStreamSize, 1))
	if _, err := io.ReadFull(c, make([]byte, 1<<20)); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-errs; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeConn = %v, want context.Canceled", err)
	}
}
