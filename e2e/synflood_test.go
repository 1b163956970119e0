package e2e

// A SYN flood from the client namespace: raw SYNs from 20 000 source
// ports to the stream service, whose SYN-ACKs the client namespace drops
// (so its kernel never resets the half-open connections), while real
// clients keep connecting.

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// csum16 is the Internet checksum of b, starting from sum.
func csum16(sum uint32, b []byte) uint16 {
	for ; len(b) >= 2; b = b[2:] {
		sum += uint32(b[0])<<8 | uint32(b[1])
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// synPacket builds an IPv4 TCP SYN (MSS option) from src to dst.
func synPacket(src, dst netip.AddrPort, seq uint32) []byte {
	p := make([]byte, 44)
	p[0], p[8], p[9] = 0x45, 64, syscall.IPPROTO_TCP
	binary.BigEndian.PutUint16(p[2:], 44)
	s4, d4 := src.Addr().As4(), dst.Addr().As4()
	copy(p[12:], s4[:])
	copy(p[16:], d4[:])
	binary.BigEndian.PutUint16(p[10:], csum16(0, p[:20]))
	t := p[20:]
	binary.BigEndian.PutUint16(t[0:], src.Port())
	binary.BigEndian.PutUint16(t[2:], dst.Port())
	binary.BigEndian.PutUint32(t[4:], seq)
	t[12], t[13] = 6<<4, 0x02 // data offset 24 bytes, SYN
	binary.BigEndian.PutUint16(t[14:], 64240)
	t[20], t[21] = 2, 4 // MSS 1460
	binary.BigEndian.PutUint16(t[22:], 1460)
	var pseudo uint32
	for i := 0; i < 4; i += 2 {
		pseudo += uint32(s4[i])<<8 | uint32(s4[i+1]) + uint32(d4[i])<<8 | uint32(d4[i+1])
	}
	pseudo += syscall.IPPROTO_TCP + 24
	binary.BigEndian.PutUint16(t[16:], csum16(pseudo, t))
	return p
}

// synFlood sends one SYN from each client port in [first, first+n) to
// dst from the client namespace (a raw socket made there).
func synFlood(l *lab.Lab, dst netip.AddrPort, first, n int) error {
	return l.Client.Do(func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		to := &syscall.SockaddrInet4{Addr: dst.Addr().As4()}
		for i := range n {
			pkt := synPacket(netip.AddrPortFrom(l.ClientAddr4, uint16(first+i)), dst, uint32(i)*7919)
			if err := syscall.Sendto(fd, pkt, 0, to); err != nil && err != syscall.ENOBUFS {
				return err
			}
		}
		return nil
	})
}

// nodeMetrics returns node i's whole metrics page.
func nodeMetrics(ctx context.Context, l *lab.Lab, i int) string {
	c, err := l.Node(i).Dial(ctx, "tcp4", "127.0.0.1:9470", 0)
	if err != nil {
		return ""
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\n\r\n"); err != nil {
		return ""
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// procStatus returns fields (kB for memory) of /proc/PID/status.
func procStatus(pid int, fields ...string) map[string]uint64 {
	out := map[string]uint64{}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(b), "\n") {
		for _, f := range fields {
			if rest, ok := strings.CutPrefix(line, f+":"); ok {
				v := strings.Fields(rest)
				if len(v) > 0 {
					out[f], _ = strconv.ParseUint(v[0], 10, 64)
				}
			}
		}
	}
	return out
}

// TestSYNFlood: 20 000 SYNs (one per source port, their SYN-ACKs dropped
// in the client namespace so the connections stay half-open) to the
// stream service of a 2-node cluster run with -max-flows 1000, while 20
// real echo connections are opened one after another. Every real
// connection is served (echo checked); no node tracks more than its
// -max-flows (the rest are counted untracked). Memory and threads of each
// batond are logged before and after.
func TestSYNFlood(t *testing.T) {
	ctx := testCtx(t)
	const maxFlows, floodFirst, floodN = 1000, 40000, 20000
	c := startCluster(t, ctx, 2, "btf", 1, nil, "-max-flows", strconv.Itoa(maxFlows))
	l := c.Lab
	nsRun(t, l.Client, fmt.Sprintf(`table inet flood {
  chain in {
    type filter hook input priority 0; policy accept;
    tcp sport %d tcp dport %d-%d counter drop
  }
}
`, streamPort, floodFirst, floodFirst+floodN-1), "nft", "-f", "-")
	fields := []string{"VmRSS", "VmHWM", "Threads"}
	before := make([]map[string]uint64, 2)
	for i := range 2 {
		before[i] = procStatus(c.procs[i].PID(), fields...)
	}

	var wg sync.WaitGroup
	var floodErr error
	t0 := time.Now()
	wg.Add(1)
	go func() {
		defer wg.Done()
		floodErr = synFlood(l, netip.AddrPortFrom(l.Anycast4, streamPort), floodFirst, floodN)
	}()
	served := 0
	for i, port := range portsTo(t, l, echoPort, -1, 20, 30000) {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		conn, err := l.Client.Dial(dctx, "tcp4", netip.AddrPortFrom(l.Anycast4, echoPort).String(), port)
		cancel()
		if err != nil {
			t.Errorf("real connection %d (port %d) during the flood: %v", i, port, err)
			continue
		}
		s := &echoSession{Conn: conn, port: port, seed: uint64(port) << 8}
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		if err := s.round(1000); err != nil {
			t.Errorf("real connection %d during the flood: %v", i, err)
		} else {
			served++
		}
		conn.Close()
	}
	wg.Wait()
	if floodErr != nil {
		t.Fatalf("flood: %v", floodErr)
	}
	t.Logf("flood of %d SYNs sent in %s; %d of 20 real echo connections served meanwhile",
		floodN, time.Since(t0).Round(time.Millisecond), served)
	time.Sleep(time.Second)
	for i := range 2 {
		h, err := c.admins[i].Health(ctx, &batonv1.HealthRequest{})
		if err != nil {
			t.Fatal(err)
		}
		m := nodeMetrics(ctx, l, i)
		after := procStatus(c.procs[i].PID(), fields...)
		t.Logf("%s: tracked flows %d (max %d), untracked %v, created %v; RSS %d -> %d kB (peak %d kB), threads %d -> %d",
			lab.NodeName(i), h.OwnedFlows, maxFlows, metricValue(m, "baton_flows_untracked_total", ""),
			metricValue(m, "baton_flows_created_total", ""), before[i]["VmRSS"], after["VmRSS"], after["VmHWM"],
			before[i]["Threads"], after["Threads"])
		if h.OwnedFlows > maxFlows {
			t.Errorf("%s tracks %d flows, above -max-flows %d", lab.NodeName(i), h.OwnedFlows, maxFlows)
		}
		if !c.live(i) {
			t.Errorf("%s died", lab.NodeName(i))
		}
	}
	// A real connection opened now, while the half-open flows fill the
	// table (until the tracker's handshake timeout): served, but counted
	// untracked (not replicated, not protected by takeover). Logged.
	port := portsTo(t, l, echoPort, 0, 1, 31000)[0]
	u0 := metricValue(nodeMetrics(ctx, l, 0), "baton_flows_untracked_total", "")
	conn, err := l.Client.Dial(ctx, "tcp4", netip.AddrPortFrom(l.Anycast4, echoPort).String(), port)
	if err != nil {
		t.Fatalf("real connection after the flood: %v", err)
	}
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if err := (&echoSession{Conn: conn, port: port, seed: uint64(port) << 8}).round(1000); err != nil {
		t.Errorf("real connection after the flood: %v", err)
	}
	conn.Close()
	t.Logf("a real connection to n1 after the flood: served; n1's untracked count +%v",
		metricValue(nodeMetrics(ctx, l, 0), "baton_flows_untracked_total", "")-u0)
	t.Logf("client namespace dropped SYN-ACKs:\n%s", nsRun(t, l.Client, "", "nft", "list", "table", "inet", "flood"))
}
