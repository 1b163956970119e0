package stack_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
	"github.com/baton-anycast/baton/stack/stacktest"
	"github.com/baton-anycast/baton/tun"
)

// node is one Baton stack on a fake TUN with the built-in services.
type node struct {
	dev *tun.Fake
	st  *stack.Stack
}

func newNode(t *testing.T, name string) *node {
	t.Helper()
	return newNodeOn(t, name, tun.NewFake("any0", 1500, 1, 256))
}

// newNodeOn is newNode on a given fake device.
func newNodeOn(t *testing.T, name string, dev *tun.Fake) *node {
	t.Helper()
	st, err := stack.New(dev, stack.Config{NodeName: name, Prefixes: stacktest.AnycastNets})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []struct {
		name string
		port uint16
	}{{"stream", 9000}, {"echo", 7}, {"http", 80}} {
		svc, err := services.Builtin().NewTCP(s.name, name)
		if err != nil {
			t.Fatal(err)
		}
		if err := st.ServeTCP(s.port, svc); err != nil {
			t.Fatal(err)
		}
	}
	who, _ := services.Builtin().NewUDP("whoami", name)
	if err := st.ServeUDP(53, who); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	return &node{dev: dev, st: st}
}

// lab is a client and one node behind a switch.
func newLab(t *testing.T) (*stacktest.Client, *node) {
	t.Helper()
	c, err := stacktest.NewClient(1500)
	if err != nil {
		t.Fatal(err)
	}
	n := newNode(t, "n1")
	sw := stacktest.NewSwitch(c, n.dev)
	t.Cleanup(func() { sw.Close(); c.Close() })
	return c, n
}

// checkStream downloads size bytes of seed from the stream service and
// checks every byte.
func checkStream(t *testing.T, c *stacktest.Client, addr netip.Addr, size, seed uint64) {
	t.Helper()
	conn, err := c.DialTCP(ctxT(t), netip.AddrPortFrom(addr, 9000))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, services.StreamRequest(size, seed)); err != nil {
		t.Fatal(err)
	}
	got, ok, err := services.ReadStream(conn, size, seed)
	if err != nil || !ok || uint64(got) != size {
		t.Fatalf("stream: got %d bytes, ok=%v, err=%v", got, ok, err)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestServicesOverStack(t *testing.T) {
	c, n := newLab(t)
	for _, addr := range []netip.Addr{stacktest.Anycast4, stacktest.Anycast6} {
		t.Run("stream/"+addr.String(), func(t *testing.T) { checkStream(t, c, addr, 3<<20+17, 42) })
		t.Run("echo/"+addr.String(), func(t *testing.T) {
			conn, err := c.DialTCP(ctxT(t), netip.AddrPortFrom(addr, 7))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			msg := strings.Repeat("baton echo ", 10000)
			go io.WriteString(conn, msg)
			buf := make([]byte, len(msg))
			if _, err := io.ReadFull(conn, buf); err != nil {
				t.Fatal(err)
			}
			if string(buf) != msg {
				t.Fatal("echo returned different bytes")
			}
		})
		t.Run("http/"+addr.String(), func(t *testing.T) {
			conn, err := c.DialTCP(ctxT(t), netip.AddrPortFrom(addr, 80))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			br := bufio.NewReader(conn)
			for i, tc := range []struct{ path, want string }{
				{"/whoami", "n1\n"},
				{"/healthz", "ok\n"},
				{"/bytes?n=100000&seed=9", string(pattern(9, 100000))},
			} {
				fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: x\r\n\r\n", tc.path)
				body := readHTTPBody(t, br)
				if sha256.Sum256(body) != sha256.Sum256([]byte(tc.want)) {
					t.Fatalf("request %d %s: body of %d bytes differs", i, tc.path, len(body))
				}
			}
		})
		t.Run("whoami/"+addr.String(), func(t *testing.T) {
			conn, err := c.DialUDP(netip.AddrPortFrom(addr, 53))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := conn.Write([]byte("who?")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 100)
			k, err := conn.Read(buf)
			if err != nil || string(buf[:k]) != "n1\n" {
				t.Fatalf("whoami: %q, %v", buf[:k], err)
			}
		})
	}
	st := n.st.ServiceStats()
	if len(st) != 4 {
		t.Fatalf("service stats: %+v", st)
	}
}

func pattern(seed, n uint64) []byte {
	b := make([]byte, n)
	services.FillPattern(seed, 0, b)
	return b
}

func readHTTPBody(t *testing.T, br *bufio.Reader) []byte {
	t.Helper()
	n := -1
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			break
		}
		if v, ok := strings.CutPrefix(line, "Content-Length: "); ok {
			fmt.Sscan(v, &n)
		}
	}
	if n < 0 {
		t.Fatal("no Content-Length")
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(br, body); err != nil {
		t.Fatal(err)
	}
	return body
}

func TestNoServiceIsReset(t *testing.T) {
	c, n := newLab(t)
	_, err := c.DialTCP(ctxT(t), netip.AddrPortFrom(stacktest.Anycast4, 4444))
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("dial to a port without service: %v, want connection refused", err)
	}
	if got := n.st.Refused().TCPNoService; got != 1 {
		t.Fatalf("TCPNoService = %d, want 1", got)
	}
}

// icmpEcho builds an ICMP or ICMPv6 echo request from the client to dst.
func icmpEcho(src, dst netip.Addr, id uint16) []byte {
	payload := []byte("baton-ping")
	if dst.Is4() {
		b := make([]byte, header.IPv4MinimumSize+header.ICMPv4MinimumSize+len(payload))
		ip := header.IPv4(b)
		ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(header.ICMPv4ProtocolNumber),
			SrcAddr: tcpip.AddrFrom4(src.As4()), DstAddr: tcpip.AddrFrom4(dst.As4())})
		ip.SetChecksum(^ip.CalculateChecksum())
		icmp := header.ICMPv4(b[header.IPv4MinimumSize:])
		icmp.SetType(header.ICMPv4Echo)
		icmp.SetIdent(id)
		icmp.SetSequence(1)
		copy(icmp.Payload(), payload)
		icmp.SetChecksum(^checksum.Checksum(icmp, 0))
		return b
	}
	b := make([]byte, header.IPv6MinimumSize+header.ICMPv6EchoMinimumSize+len(payload))
	ip := header.IPv6(b)
	ip.Encode(&header.IPv6Fields{PayloadLength: uint16(len(b) - header.IPv6MinimumSize), TransportProtocol: header.ICMPv6ProtocolNumber,
		HopLimit: 64, SrcAddr: tcpip.AddrFrom16(src.As16()), DstAddr: tcpip.AddrFrom16(dst.As16())})
	icmp := header.ICMPv6(b[header.IPv6MinimumSize:])
	icmp.SetType(header.ICMPv6EchoRequest)
	icmp.SetIdent(id)
	icmp.SetSequence(1)
	copy(icmp.Payload(), payload)
	icmp.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp,
		Src: tcpip.AddrFrom16(src.As16()), Dst: tcpip.AddrFrom16(dst.As16())}))
	return b
}

func TestPingAndAnycastFilter(t *testing.T) {
	n := newNode(t, "n1")
	ctx := ctxT(t)
	cases := []struct {
		name      string
		src, dst  netip.Addr
		wantReply bool
	}{
		{"v4 anycast", stacktest.ClientAddr4, stacktest.Anycast4, true},
		{"v6 anycast", stacktest.ClientAddr6, stacktest.Anycast6, true},
		{"v4 other address", stacktest.ClientAddr4, netip.MustParseAddr("192.0.2.2"), false},
		{"v6 other address", stacktest.ClientAddr6, netip.MustParseAddr("2001:db8:a::2"), false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := n.st.Endpoint().HookDrops()["anycast-filter"][0]
			if err := n.dev.Deliver(ctx, icmpEcho(tc.src, tc.dst, uint16(i))); err != nil {
				t.Fatal(err)
			}
			rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			reply, err := n.dev.Receive(rctx)
			if !tc.wantReply {
				if err == nil {
					t.Fatalf("got a reply for a non-anycast destination: % x", reply)
				}
				if after := n.st.Endpoint().HookDrops()["anycast-filter"][0]; after != before+1 {
					t.Fatalf("anycast-filter drops %d -> %d, want +1", before, after)
				}
				return
			}
			if err != nil {
				t.Fatalf("no echo reply: %v", err)
			}
			p := stack.Packet{Data: reply}
			src, dst, _ := p.Addrs()
			if src != tc.dst || dst != tc.src {
				t.Fatalf("reply %v -> %v, want %v -> %v", src, dst, tc.dst, tc.src)
			}
		})
	}
}

// recorder is a test hook that counts, drops, consumes or rewrites.
type recorder struct {
	name    string
	in, out atomic.Int64
	verdict func(p *stack.Packet) stack.Verdict
}

func (r *recorder) Name() string { return r.name }
func (r *recorder) Inbound(p *stack.Packet) stack.Verdict {
	r.in.Add(1)
	if r.verdict != nil {
		return r.verdict(p)
	}
	return stack.Pass
}
func (r *recorder) Outbound(p *stack.Packet) stack.Verdict {
	r.out.Add(1)
	if r.verdict != nil {
		return r.verdict(p)
	}
	return stack.Pass
}

func TestHookChain(t *testing.T) {
	ctx := ctxT(t)
	ping := icmpEcho(stacktest.ClientAddr4, stacktest.Anycast4, 7)
	cases := []struct {
		name         string
		verdict      func(p *stack.Packet) stack.Verdict
		wantReply    bool
		wantDrops    uint64
		wantConsumed uint64
	}{
		{"observe", nil, true, 0, 0},
		{"drop inbound", func(p *stack.Packet) stack.Verdict {
			if p.Dir == stack.Inbound {
				return stack.Drop
			}
			return stack.Pass
		}, false, 1, 0},
		{"consume inbound", func(p *stack.Packet) stack.Verdict {
			if p.Dir == stack.Inbound {
				return stack.Consume
			}
			return stack.Pass
		}, false, 0, 1},
		{"drop outbound", func(p *stack.Packet) stack.Verdict {
			if p.Dir == stack.Outbound {
				return stack.Drop
			}
			return stack.Pass
		}, false, 1, 0},
		{"rewrite outbound ttl", func(p *stack.Packet) stack.Verdict {
			if p.Dir == stack.Outbound {
				ip := header.IPv4(p.Data)
				ip.SetTTL(7)
				ip.SetChecksum(0)
				ip.SetChecksum(^ip.CalculateChecksum())
			}
			return stack.Pass
		}, true, 0, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n := newNode(t, "n1")
			r := &recorder{name: "test", verdict: tc.verdict}
			n.st.Endpoint().AddHook(r)
			if err := n.dev.Deliver(ctx, ping); err != nil {
				t.Fatal(err)
			}
			rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			reply, err := n.dev.Receive(rctx)
			if tc.wantReply != (err == nil) {
				t.Fatalf("reply = %v (err %v), want reply %v", reply != nil, err, tc.wantReply)
			}
			if tc.name == "rewrite outbound ttl" && header.IPv4(reply).TTL() != 7 {
				t.Fatalf("outbound rewrite not applied: TTL %d", header.IPv4(reply).TTL())
			}
			d := n.st.Endpoint().HookDrops()["test"]
			if d[0]+d[1] != tc.wantDrops {
				t.Fatalf("drops %v, want %d", d, tc.wantDrops)
			}
			ls := n.st.Endpoint().Stats()
			if ls.RxConsumed+ls.TxConsumed != tc.wantConsumed {
				t.Fatalf("consumed %d+%d, want %d", ls.RxConsumed, ls.TxConsumed, tc.wantConsumed)
			}
			if r.in.Load() != 1 {
				t.Fatalf("hook saw %d inbound packets, want 1", r.in.Load())
			}
		})
	}
}

func TestInjectBypassesHooks(t *testing.T) {
	ctx := ctxT(t)
	n := newNode(t, "n1")
	r := &recorder{name: "test", verdict: func(*stack.Packet) stack.Verdict { return stack.Drop }}
	n.st.Endpoint().AddHook(r)
	// Injected inbound: the stack answers; the answer crosses the chain
	// outbound, where the hook drops it.
	if err := n.st.Endpoint().InjectInbound(icmpEcho(stacktest.ClientAddr4, stacktest.Anycast4, 9)); err != nil {
		t.Fatal(err)
	}
	// Injected outbound: reaches the device without crossing the chain.
	out := icmpEcho(stacktest.Anycast4, stacktest.ClientAddr4, 10)
	if err := n.st.Endpoint().InjectOutbound(out); err != nil {
		t.Fatal(err)
	}
	got, err := n.dev.Receive(ctx)
	if err != nil || string(got) != string(out) {
		t.Fatalf("injected outbound packet not received intact: %v", err)
	}
	if r.in.Load() != 0 || r.out.Load() != 1 {
		t.Fatalf("hook saw in=%d out=%d, want 0 and 1 (the stack's echo reply)", r.in.Load(), r.out.Load())
	}
	if err := n.st.Endpoint().InjectInbound([]byte{0x10, 0, 0}); err == nil {
		t.Fatal("injecting a non-IP packet succeeded")
	}
	if n.st.Endpoint().Stats().Injected != 2 {
		t.Fatalf("Injected = %d, want 2", n.st.Endpoint().Stats().Injected)
	}
}

func TestCloseStopsEverything(t *testing.T) {
	c, n := newLab(t)
	conn, err := c.DialTCP(ctxT(t), netip.AddrPortFrom(stacktest.Anycast4, 7))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	done := make(chan struct{})
	go func() { n.st.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		buf := make([]byte, 1<<20)
		t.Fatalf("Close did not return with a connection open\n%s", buf[:runtime.Stack(buf, true)])
	}
	if _, err := n.dev.Read(0, make([]byte, 1500)); !errors.Is(err, tun.ErrClosed) {
		t.Fatalf("device read after Close: %v, want ErrClosed", err)
	}
}

// TestReuseTimeWaitPort reconnects from the same client port while the
// server still holds the previous connection in TIME-WAIT (the stream
// service closes first). Linux accepts such a SYN; so must Baton.
func TestReuseTimeWaitPort(t *testing.T) {
	c, _ := newLab(t)
	ctx := ctxT(t)
	for i := range 3 {
		var conn net.Conn
		var err error
		// The client's own previous endpoint may still hold the port for
		// a moment (LAST-ACK); wait for it, boundedly.
		for try := 0; try < 100; try++ {
			conn, err = c.DialTCPFrom(ctx, 41000, netip.AddrPortFrom(stacktest.Anycast4, 9000))
			if err == nil || !strings.Contains(err.Error(), "bad local address") {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("connection %d from the same port: %v", i, err)
		}
		io.WriteString(conn, services.StreamRequest(1000, uint64(i)))
		if n, ok, err := services.ReadStream(conn, 1000, uint64(i)); !ok {
			t.Fatalf("connection %d: %d bytes, %v", i, n, err)
		}
		conn.Close()
	}
}

// TestHookOrderIsLayered checks that the first hook added is the outermost:
// first for inbound packets, last for outbound ones.
func TestHookOrderIsLayered(t *testing.T) {
	ctx := ctxT(t)
	n := newNode(t, "n1")
	var mu sync.Mutex
	var order []string
	mk := func(name string) *recorder {
		return &recorder{name: name, verdict: func(p *stack.Packet) stack.Verdict {
			mu.Lock()
			order = append(order, p.Dir.String()+":"+name)
			mu.Unlock()
			return stack.Pass
		}}
	}
	n.st.Endpoint().AddHook(mk("a"))
	n.st.Endpoint().AddHook(mk("b"))
	if err := n.dev.Deliver(ctx, icmpEcho(stacktest.ClientAddr4, stacktest.Anycast4, 11)); err != nil {
		t.Fatal(err)
	}
	if _, err := n.dev.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if got := strings.Join(order, " "); got != "in:a in:b out:b out:a" {
		t.Fatalf("hook order %q, want %q", got, "in:a in:b out:b out:a")
	}
}
