package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/stack/services"
)

// TestServicesThroughRouter checks every service, over IPv4 and IPv6, from
// the client through the ECMP router to whichever node serves the flow,
// checking every byte.
func TestServicesThroughRouter(t *testing.T) {
	t.Parallel()
	l, _ := newLab(t, 3)
	checkServices(t, l)
}

// checkServices runs the service checks of TestServicesThroughRouter on a
// running lab.
func checkServices(t *testing.T, l *lab.Lab) {
	ctx := testCtx(t)
	families := []struct {
		name    string
		network string
		addr    netip.Addr
	}{
		{"ipv4", "tcp4", l.Anycast4},
		{"ipv6", "tcp6", l.Anycast6},
	}
	for _, f := range families {
		t.Run(f.name+"/stream", func(t *testing.T) {
			const size, seed = 20<<20 + 5, 77
			c, err := l.Client.Dial(ctx, f.network, hostPort(f.addr, 9000), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := io.WriteString(c, services.StreamRequest(size, seed)); err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			n, err := io.Copy(h, c)
			if err != nil || n != size {
				t.Fatalf("stream: %d bytes, err %v, want %d", n, err, size)
			}
			if [32]byte(h.Sum(nil)) != services.PatternSHA256(seed, 0, size) {
				t.Fatal("stream: SHA-256 of the received bytes differs from the pattern")
			}
		})
		t.Run(f.name+"/echo", func(t *testing.T) {
			c, err := l.Client.Dial(ctx, f.network, hostPort(f.addr, 7), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			msg := make([]byte, 4<<20)
			services.FillPattern(5, 0, msg)
			go func() { c.Write(msg) }()
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatal(err)
			}
			if sha256.Sum256(got) != sha256.Sum256(msg) {
				t.Fatal("echo: returned bytes differ")
			}
		})
		t.Run(f.name+"/http", func(t *testing.T) {
			h, err := dialHTTP(ctx, l.Client, f.network, hostPort(f.addr, 80), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			status, who, err := h.getString("/whoami")
			if err != nil || status != 200 || !strings.HasPrefix(who, "n") {
				t.Fatalf("/whoami: %d %q %v", status, who, err)
			}
			for i, n := range []uint64{0, 1, 65537, 8 << 20} {
				status, body, err := h.get(fmt.Sprintf("/bytes?n=%d&seed=%d", n, i))
				if err != nil || status != 200 {
					t.Fatalf("/bytes n=%d: %d %v", n, status, err)
				}
				if err := verifyBytes(body, n, uint64(i)); err != nil {
					t.Fatalf("/bytes n=%d on keep-alive request %d: %v", n, i, err)
				}
			}
			if status, body, err := h.getString("/healthz"); err != nil || status != 200 || body != "ok\n" {
				t.Fatalf("/healthz: %d %q %v", status, body, err)
			}
		})
		t.Run(f.name+"/whoami-udp", func(t *testing.T) {
			udp := strings.Replace(f.network, "tcp", "udp", 1)
			c, err := l.Client.DialUDP(ctx, udp, hostPort(f.addr, 53), 0)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			buf := make([]byte, 128)
			// UDP may lose the first datagram; retry a bounded number of times.
			for try := 0; ; try++ {
				if _, err := c.Write([]byte("who?")); err != nil {
					t.Fatal(err)
				}
				c.SetReadDeadline(time.Now().Add(time.Second))
				n, err := c.Read(buf)
				if err == nil {
					if got := string(buf[:n]); !strings.HasPrefix(got, "n") || !strings.HasSuffix(got, "\n") {
						t.Fatalf("whoami answered %q", got)
					}
					break
				}
				if try == 5 {
					t.Fatalf("no whoami answer: %v", err)
				}
			}
		})
		t.Run(f.name+"/ping", func(t *testing.T) {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			if err := l.Ping(pctx, l.Client, f.addr); err != nil {
				t.Fatalf("ping %v: %v", f.addr, err)
			}
		})
	}
}

// TestECMPSpreadMatchesRouter opens 64 connections with distinct source
// ports, asks each which node serves it, and checks the spread against the
// router's own forwarding decision.
func TestECMPSpreadMatchesRouter(t *testing.T) {
	t.Parallel()
	l, _ := newLab(t, 3)
	ctx := testCtx(t)
	for _, f := range []struct {
		network string
		addr    netip.Addr
		src     netip.Addr
	}{{"tcp4", l.Anycast4, l.ClientAddr4}, {"tcp6", l.Anycast6, l.ClientAddr6}} {
		t.Run(f.network, func(t *testing.T) {
			const flows = 64
			perNode := make([]int, len(l.Nodes))
			var mu sync.Mutex
			var wg sync.WaitGroup
			errs := make(chan error, flows)
			for i := range flows {
				port := 40000 + i*7
				if f.network == "tcp6" {
					port += 3000
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					want, err := l.PredictNode(netip.AddrPortFrom(f.src, uint16(port)), netip.AddrPortFrom(f.addr, 80))
					if err != nil {
						errs <- err
						return
					}
					h, err := dialHTTP(ctx, l.Client, f.network, hostPort(f.addr, 80), port)
					if err != nil {
						errs <- fmt.Errorf("port %d: %v", port, err)
						return
					}
					defer h.Close()
					_, who, err := h.getString("/whoami")
					if err != nil {
						errs <- fmt.Errorf("port %d: %v", port, err)
						return
					}
					if who != lab.NodeName(want)+"\n" {
						errs <- fmt.Errorf("port %d: served by %q, router predicted %s", port, strings.TrimSpace(who), lab.NodeName(want))
						return
					}
					mu.Lock()
					perNode[want]++
					mu.Unlock()
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			used := 0
			for _, n := range perNode {
				if n > 0 {
					used++
				}
			}
			t.Logf("%d flows per node: %v", flows, perNode)
			if used < 2 {
				t.Fatalf("flows spread over %d node(s), want at least 2: %v", used, perNode)
			}
		})
	}
}

// TestBatonctlAgainstLiveNode reads a live node through the admin socket.
func TestBatonctlAgainstLiveNode(t *testing.T) {
	t.Parallel()
	l, _ := newLab(t, 1)
	ctx := testCtx(t)
	h, err := dialHTTP(ctx, l.Client, "tcp4", hostPort(l.Anycast4, 80), 0)
	if err != nil {
		t.Fatal(err)
	}
	if st, _, err := h.getString("/whoami"); err != nil || st != 200 {
		t.Fatalf("whoami: %d %v", st, err)
	}
	h.Close()
	admin := "unix:" + l.AdminSocket(0)

	out, errOut, code := runCtl(t, "-admin", admin, "health")
	if code != 0 || !strings.Contains(out, "serving") || !strings.Contains(out, "n1") {
		t.Fatalf("health: code %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = runCtl(t, "-admin", admin, "-o", "json", "stats")
	if code != 0 {
		t.Fatalf("stats: code %d: %s", code, errOut)
	}
	var stats struct {
		Node     string `json:"node"`
		Services []struct {
			Name     string `json:"name"`
			Accepted string `json:"accepted"` // protojson encodes uint64 as a string
		} `json:"services"`
	}
	if err := json.Unmarshal([]byte(out), &stats); err != nil {
		t.Fatalf("stats -o json is not JSON: %v\n%s", err, out)
	}
	found := false
	for _, s := range stats.Services {
		// At least the request above: the node's own health probes
		// (GET /healthz through the TUN) are connections too.
		if n, err := strconv.ParseUint(s.Accepted, 10, 64); s.Name == "http" && err == nil && n >= 1 {
			found = true
		}
	}
	if stats.Node != "n1" || !found {
		t.Fatalf("stats: %+v", stats)
	}
	// The admin socket is for root only.
	if fi, err := os.Stat(l.AdminSocket(0)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin socket mode: %v %v", fi.Mode(), err)
	}
	// An unreachable daemon is one clear line.
	_, errOut, code = runCtl(t, "-admin", "unix:"+l.AdminSocket(0)+".missing", "stats")
	if code == 0 || !strings.HasPrefix(errOut, "batonctl: cannot reach batond at unix:") || strings.Count(errOut, "\n") != 1 {
		t.Fatalf("unreachable daemon: code %d, stderr %q", code, errOut)
	}
}
