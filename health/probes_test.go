package health

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func probeCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// serveTCP answers every connection with handle until the test ends.
func serveTCP(t *testing.T, handle func(net.Conn)) netip.AddrPort {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	return l.Addr().(*net.TCPAddr).AddrPort()
}

func TestTCPConnect(t *testing.T) {
	ctx := probeCtx(t)
	up := serveTCP(t, func(net.Conn) {})
	if err := TCPConnect(KernelDialer(), []netip.AddrPort{up})(ctx); err != nil {
		t.Fatal(err)
	}
	down := netip.AddrPortFrom(up.Addr(), uint16(freePort(t)))
	err := TCPConnect(KernelDialer(), []netip.AddrPort{up, down})(ctx)
	if err == nil || !strings.Contains(err.Error(), down.String()) || strings.Contains(err.Error(), up.String()+":") {
		t.Fatalf("one target down: %v", err)
	}
	if err := TCPConnect(KernelDialer(), nil)(ctx); err == nil {
		t.Fatal("no targets passed")
	}
}

func TestHTTPGet(t *testing.T) {
	ctx := probeCtx(t)
	srv := func(status string) netip.AddrPort {
		return serveTCP(t, func(c net.Conn) {
			line, _ := bufio.NewReader(c).ReadString('\n')
			if !strings.HasPrefix(line, "GET /healthz HTTP/1.1") {
				status = "400 Bad Request"
			}
			fmt.Fprintf(c, "HTTP/1.1 %s\r\nContent-Length: 0\r\n\r\n", status)
		})
	}
	if err := HTTPGet(KernelDialer(), []netip.AddrPort{srv("200 OK")}, "/healthz")(ctx); err != nil {
		t.Fatal(err)
	}
	err := HTTPGet(KernelDialer(), []netip.AddrPort{srv("503 Service Unavailable")}, "/healthz")(ctx)
	if err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("503: %v", err)
	}
	// A server that never answers: the probe's context ends it.
	silent := serveTCP(t, func(c net.Conn) { time.Sleep(time.Minute) })
	sctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if err := HTTPGet(KernelDialer(), []netip.AddrPort{silent}, "/healthz")(sctx); err == nil {
		t.Fatal("a silent server passed")
	}
}

func TestUDPQuery(t *testing.T) {
	ctx := probeCtx(t)
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 100)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo([]byte("n1\n"), from)
		}
	}()
	target := []netip.AddrPort{pc.LocalAddr().(*net.UDPAddr).AddrPort()}
	if err := UDPQuery(KernelDialer(), target, []byte("health\n"), "n1\n")(ctx); err != nil {
		t.Fatal(err)
	}
	if err := UDPQuery(KernelDialer(), target, []byte("health\n"), "n2\n")(ctx); err == nil || !strings.Contains(err.Error(), `"n1\n"`) {
		t.Fatalf("wrong answer: %v", err)
	}
}

func TestOverrideFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "override")
	ov := OverrideFile(path)
	if o := ov("http"); o != OverrideNone {
		t.Fatalf("missing file: %v", o)
	}
	if err := os.WriteFile(path, []byte("# testing\nhttp fail\n\necho pass\nbad line here\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]Override{"http": OverrideFail, "echo": OverridePass, "tun": OverrideNone, "#": OverrideNone} {
		if o := ov(name); o != want {
			t.Errorf("%s: %v, want %v", name, o, want)
		}
	}
}
