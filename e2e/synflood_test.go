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
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
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

// floodPeaks are the highest values sampled on each node during the
// flood.
type floodPeaks struct {
	mu                      sync.Mutex
	rss                     [2]uint64 // kB
	tracked, handshaking    [2]float64
	samples, metricsFetched int
}

// sampleFlood samples each node's resident size (/proc/PID/status VmRSS)
// and tracker gauges (metrics) until stop is closed.
func sampleFlood(ctx context.Context, c *takeoverCluster, p *floodPeaks, stop <-chan struct{}) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		for i := range 2 {
			rss := procStatus(c.procs[i].PID(), "VmRSS")["VmRSS"]
			m := nodeMetrics(ctx, c.Lab, i)
			p.mu.Lock()
			p.rss[i] = max(p.rss[i], rss)
			if m != "" {
				p.tracked[i] = max(p.tracked[i], metricValue(m, "baton_flows_tracked", ""))
				p.handshaking[i] = max(p.handshaking[i], metricValue(m, "baton_flows_handshaking", ""))
				p.metricsFetched++
			}
			p.samples++
			p.mu.Unlock()
		}
		select {
		case <-stop:
			return
		case <-tick.C:
		}
	}
}

// flowTracked reports whether a node owns the flow from the client's port
// to the anycast echo service, established (not merely half-open).
func flowTracked(ctx context.Context, c *takeoverCluster, port int) bool {
	key := handoff.FlowKey{
		Client:  netip.AddrPortFrom(c.Lab.ClientAddr4, uint16(port)),
		Anycast: netip.AddrPortFrom(c.Lab.Anycast4, echoPort),
	}
	for i := range 2 {
		resp, err := c.admins[i].GetFlow(ctx, &batonv1.GetFlowRequest{Key: key.Proto(), LocalOnly: true})
		if err != nil {
			continue
		}
		for _, cp := range resp.Copies {
			if cp.Owned && cp.State.GetPhase() == batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED {
				return true
			}
		}
	}
	return false
}

// TestSYNFlood: 20 000 SYNs (one per source port, their SYN-ACKs dropped
// in the client namespace so the connections stay half-open) to the
// stream service of a 2-node cluster run with -max-flows 1000,
// -max-handshake-flows 250 and -memory-limit 128MiB, while 20 real echo
// connections are opened one after another, then 10 more once the flood is
// sent (its half-open flows still hold the handshake bound). Asserted:
// every real connection is served (echo checked); those opened after the
// flood are tracked (a node owns each, established, while it is open) and
// none is refused; no node tracks more than -max-flows flows nor more than
// -max-handshake-flows in the handshake (sampled during the flood and
// checked after); no flow is ever refused for a full table (the flood's
// half-open flows are evicted instead, and some are); each batond's peak
// resident size (VmHWM) stays under -memory-limit. How many of the real
// connections opened during the flood are tracked, resident sizes sampled
// during the flood, and threads are logged.
func TestSYNFlood(t *testing.T) {
	ctx := testCtx(t)
	const maxFlows, maxHS, floodFirst, floodN = 1000, 250, 40000, 20000
	const memLimit, memLimitKB = "128MiB", 128 << 10
	c := startCluster(t, ctx, 2, "btf", 1, nil, "-max-flows", strconv.Itoa(maxFlows),
		"-max-handshake-flows", strconv.Itoa(maxHS), "-memory-limit", memLimit)
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

	var peaks floodPeaks
	stopSampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() { defer close(sampled); sampleFlood(ctx, c, &peaks, stopSampling) }()

	// realConn opens a real echo connection from port, checks its echo,
	// and reports whether it was served and whether a node tracked it.
	realConn := func(what string, port int) (served, tracked bool) {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		conn, err := l.Client.Dial(dctx, "tcp4", netip.AddrPortFrom(l.Anycast4, echoPort).String(), port)
		cancel()
		if err != nil {
			t.Errorf("real connection %s (port %d): %v", what, port, err)
			return false, false
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		if err := (&echoSession{Conn: conn, port: port, seed: uint64(port) << 8}).round(1000); err != nil {
			t.Errorf("real connection %s (port %d): %v", what, port, err)
		} else {
			served = true
		}
		return served, flowTracked(ctx, c, port)
	}

	// Real connections while the flood is sent. A real handshake is
	// evicted if -max-handshake-flows newer SYNs reach its node before
	// the client's ACK does (the node's TUN queue alone holds 1000
	// packets): how many are tracked is logged, not asserted.
	var wg sync.WaitGroup
	var floodErr error
	var sending atomic.Bool
	sending.Store(true)
	t0 := time.Now()
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer sending.Store(false)
		floodErr = synFlood(l, netip.AddrPortFrom(l.Anycast4, streamPort), floodFirst, floodN)
	}()
	served, tracked, whileSending, trackedWhileSending := 0, 0, 0, 0
	for i, port := range portsTo(t, l, echoPort, -1, 20, 30000) {
		during := sending.Load()
		ok, tr := realConn(fmt.Sprintf("%d during the flood", i), port)
		if ok {
			served++
		}
		if tr {
			tracked++
		}
		if during {
			whileSending++
			if tr {
				trackedWhileSending++
			}
		}
	}
	wg.Wait()
	if floodErr != nil {
		t.Fatalf("flood: %v", floodErr)
	}
	t.Logf("flood of %d SYNs sent in %s; %d of 20 real echo connections served meanwhile, %d tracked (%d opened while SYNs were being sent, %d of them tracked)",
		floodN, time.Since(t0).Round(time.Millisecond), served, tracked, whileSending, trackedWhileSending)
	time.Sleep(time.Second)
	close(stopSampling)
	<-sampled
	var evicted float64
	for i := range 2 {
		h, err := c.admins[i].Health(ctx, &batonv1.HealthRequest{})
		if err != nil {
			t.Fatal(err)
		}
		m := nodeMetrics(ctx, l, i)
		after := procStatus(c.procs[i].PID(), fields...)
		untracked := metricValue(m, "baton_flows_untracked_total", "")
		untrackedHS := metricValue(m, "baton_flows_untracked_handshake_total", "")
		handshaking := metricValue(m, "baton_flows_handshaking", "")
		ev := metricValue(m, "baton_flows_handshake_evicted_total", "")
		evicted += ev
		t.Logf("%s: tracked flows %d (max %d, sampled peak %v), in the handshake %v (max %d, sampled peak %v); "+
			"created %v, opened %v, evicted %v, untracked %v (table full) %v (handshake); "+
			"RSS %d -> %d kB (sampled peak %d kB, VmHWM %d kB, limit %d kB), threads %d -> %d",
			lab.NodeName(i), h.OwnedFlows, maxFlows, peaks.tracked[i], handshaking, maxHS, peaks.handshaking[i],
			metricValue(m, "baton_flows_created_total", ""), metricValue(m, "baton_flows_opened_total", ""), ev, untracked, untrackedHS,
			before[i]["VmRSS"], after["VmRSS"], peaks.rss[i], after["VmHWM"], memLimitKB,
			before[i]["Threads"], after["Threads"])
		if h.OwnedFlows > maxFlows || peaks.tracked[i] > maxFlows {
			t.Errorf("%s tracks %d flows (sampled peak %v), above -max-flows %d", lab.NodeName(i), h.OwnedFlows, peaks.tracked[i], maxFlows)
		}
		if handshaking > maxHS || peaks.handshaking[i] > maxHS {
			t.Errorf("%s has %v flows in the handshake (sampled peak %v), above -max-handshake-flows %d", lab.NodeName(i), handshaking, peaks.handshaking[i], maxHS)
		}
		if untracked != 0 {
			t.Errorf("%s refused %v flows for a full table: half-open flows took the room of established ones", lab.NodeName(i), untracked)
		}
		if after["VmHWM"] >= memLimitKB || peaks.rss[i] >= memLimitKB {
			t.Errorf("%s peak resident size %d kB (sampled %d kB), not under -memory-limit %s", lab.NodeName(i), after["VmHWM"], peaks.rss[i], memLimit)
		}
		if !c.live(i) {
			t.Errorf("%s died", lab.NodeName(i))
		}
	}
	t.Logf("sampled %d times (metrics %d times)", peaks.samples, peaks.metricsFetched)
	if evicted == 0 {
		t.Error("no half-open flow was evicted: the flood did not reach -max-handshake-flows")
	}
	// Real connections opened now, while the flood's half-open flows hold
	// the handshake bound (until the tracker's handshake timeout, 60 s):
	// each is served and tracked (a SYN that finds the bound full evicts
	// the oldest half-open flow; the table has room for established
	// flows). Before the bound, the half-open flows filled the table and
	// these were served untracked.
	const afterN = 10
	before0 := [2]string{nodeMetrics(ctx, l, 0), nodeMetrics(ctx, l, 1)}
	afterTracked := 0
	for i, port := range portsTo(t, l, echoPort, -1, afterN, 31000) {
		ok, tr := realConn(fmt.Sprintf("%d after the flood", i), port)
		if ok && !tr {
			t.Errorf("real connection %d after the flood (port %d) is served but not tracked", i, port)
		}
		if tr {
			afterTracked++
		}
	}
	var d [5]float64
	for i := range 2 {
		m := nodeMetrics(ctx, l, i)
		for j, name := range []string{"baton_flows_opened_total", "baton_flows_handshake_evicted_total",
			"baton_flows_untracked_total", "baton_flows_untracked_handshake_total", "baton_flows_handshaking"} {
			if j < 4 {
				d[j] += metricValue(m, name, "") - metricValue(before0[i], name, "")
			} else {
				d[j] += metricValue(m, name, "")
			}
		}
	}
	t.Logf("%d real connections after the flood: %d tracked; opened +%v, evicted +%v, untracked +%v (table full) +%v (handshake); %v flows in the handshake on both nodes",
		afterN, afterTracked, d[0], d[1], d[2], d[3], d[4])
	if d[0] != afterN || d[2] != 0 || d[3] != 0 {
		t.Errorf("after the flood: opened +%v (want %d), untracked +%v (table full) +%v (handshake) (want 0)", d[0], afterN, d[2], d[3])
	}
	t.Logf("client namespace dropped SYN-ACKs:\n%s", nsRun(t, l.Client, "", "nft", "list", "table", "inet", "flood"))
}
