package handoff

// The in-process takeover lab: N Baton nodes (gVisor stack on a tun.Fake,
// the stream service, flow tracker, takeover engine) replicating to each
// other over real loopback gRPC with mutual TLS (Replication), a gVisor
// client, and stacktest's switch in between, whose route the tests flip.
// Every node also has a "tap" hook, outermost, that can drop its packets
// (loss after a takeover, or everything: a killed node).

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
	"github.com/baton-anycast/baton/stack/stacktest"
	"github.com/baton-anycast/baton/tun"
)

const tkStreamPort = 9000

// tkTap is the outermost hook of a lab node.
type tkTap struct {
	dead    atomic.Bool   // drop everything (a killed node)
	lossPPM atomic.Uint32 // drop this share (per million) of outbound data packets
	rng     *rand.Rand
	mu      sync.Mutex
	lost    atomic.Uint64
	name    string
	paws    *tkPAWS
	e       *Engine // the node's engine
}

// handedOver reports whether the node's engine holds pkt's flow as being
// handed over or handed over (esHold, esMoved): a segment such a node's
// hooks pass was past the handoff hook before the hand-over began (the
// hook drops the flow's outbound packets from then on) and is only still
// in flight through the outer hooks.
func (t *tkTap) handedOver(pkt []byte) bool {
	seg, res := parseTCPSegment(pkt, false, t.e.prefixes)
	if res != tcpOK {
		return false
	}
	f := t.e.lookup(seg.key)
	if f == nil {
		return false
	}
	s := f.get()
	return s == esHold || s == esMoved
}

// tkPAWS watches the timestamps of the segments every node sends to the
// client, per client port, as a Linux client's PAWS check would (RFC 7323
// 5.3; gVisor's client does not enforce it, pitfall 5): a data segment
// whose TSval is below the newest TSval the client got for its flow would
// be dropped by Linux. Such segments after a takeover stall a Linux
// client until the new owner's clock catches up.
type tkPAWS struct {
	mu        sync.Mutex
	newest    map[uint16]uint32
	backwards atomic.Uint64
	inFlight  atomic.Uint64 // segments of a node handing the flow over, not judged
	first     string        // the first violation, for the log
}

func (p *tkPAWS) note(node string, pkt []byte) {
	loc, ok := locateTCP(pkt)
	if !ok {
		return
	}
	tcp := header.TCP(pkt[loc.off:])
	ts, ok := tcpTSval(tcp[header.TCPMinimumSize:loc.hlen])
	if !ok {
		return
	}
	data := len(pkt) > loc.off+loc.hlen
	port := tcp.DestinationPort()
	p.mu.Lock()
	defer p.mu.Unlock()
	newest, seen := p.newest[port]
	switch {
	case !seen || tcpSeqAfter(ts, newest):
		p.newest[port] = ts
	case ts != newest && data:
		if p.backwards.Add(1) == 1 {
			p.first = fmt.Sprintf("%s sent a data segment to port %d with TSval %d, below %d", node, port, ts, newest)
		}
	}
}

func (*tkTap) Name() string { return "test-tap" }

func (t *tkTap) Inbound(*stack.Packet) stack.Verdict {
	if t.dead.Load() {
		return stack.Drop
	}
	return stack.Pass
}

func (t *tkTap) Outbound(p *stack.Packet) stack.Verdict {
	if t.dead.Load() {
		return stack.Drop
	}
	if ppm := t.lossPPM.Load(); ppm > 0 && len(p.Data) > 200 {
		t.mu.Lock()
		drop := t.rng.Uint32N(1_000_000) < ppm
		t.mu.Unlock()
		if drop {
			t.lost.Add(1)
			return stack.Drop
		}
	}
	if t.paws != nil {
		if t.handedOver(p.Data) {
			// Emitted before the hand-over, preempted between the hooks
			// (a full -race run here: 1 such segment, 1 029 ms below n2's
			// newest, n2's clock being tsMargin ahead). It reaches the
			// client late, as a reordered one would: a Linux client
			// drops it (PAWS) and the new owner covers its bytes.
			t.paws.inFlight.Add(1)
		} else {
			t.paws.note(t.name, p.Data)
		}
	}
	return stack.Pass
}

// tkNode is one node of the lab.
type tkNode struct {
	name   string
	dev    *tun.Fake
	st     *stack.Stack
	tap    *tkTap
	tr     *Tracker
	r      *Replication
	e      *Engine
	sy     *Sync // sync mode, or nil
	stop   context.CancelFunc
	killed bool
}

// tkConfig tweaks a lab.
type tkConfig struct {
	nodes    int
	replicas int
	gso      bool
	// noCheckpoint: node names whose stack publishes no checkpoints.
	noCheckpoint map[string]bool
	// service overrides the stream service.
	service func() services.TCPService
	policy  func(string) Policy
	// solo adds a standalone node outside the cluster (no tracker, no
	// takeover): its flows are unknown to every other node. Its switch
	// index is nodes.
	solo bool
	// syncMode runs the service in sync replication mode (sync.go);
	// coalesce sets the replicator's coalesce window (0: default).
	syncMode bool
	coalesce time.Duration
	// ignoreClient is the trackers' IgnoreClient (the node's own
	// addresses in batond).
	ignoreClient func(netip.Addr) bool
	// movedSettle is the engines' MovedSettle (0: default).
	movedSettle time.Duration
}

type tkLab struct {
	t      testing.TB
	nodes  []*tkNode
	solo   *stack.Stack
	closed bool
	client *stacktest.Client
	sw     *stacktest.Switch
	route  atomic.Int32
	// rewrite, when set, may change a client packet in place before it
	// is delivered (stripping options) or drop it (returns false).
	rewrite atomic.Pointer[func([]byte) bool]
	paws    *tkPAWS
}

// finishExact waits for d and fails the test unless it ended with exact
// bytes, the client saw no reset and no segment a Linux client would drop
// for PAWS.
func (l *tkLab) finishExact(t *testing.T, d *tkDownload) {
	t.Helper()
	if err := d.wait(t); err != nil {
		l.logStats()
		t.Fatalf("download: %v", err)
	}
	l.logStats()
	if n := l.resets(); n != 0 {
		t.Fatalf("client got %d resets", n)
	}
	l.noPAWSDrops(t)
}

// noPAWSDrops fails the test if a node sent the client a data segment a
// Linux client's PAWS check would have dropped (tkPAWS).
func (l *tkLab) noPAWSDrops(t *testing.T) {
	t.Helper()
	if n := l.paws.inFlight.Load(); n > 0 {
		t.Logf("%d segments passed the outer hooks of a node handing their flow over (in flight before it; not judged)", n)
	}
	if n := l.paws.backwards.Load(); n > 0 {
		l.paws.mu.Lock()
		first := l.paws.first
		l.paws.mu.Unlock()
		t.Errorf("%d data segments with a TSval below the newest the client had (a Linux client drops them: PAWS); first: %s", n, first)
	}
}

func newTkLab(t testing.TB, cfg tkConfig) *tkLab {
	t.Helper()
	if cfg.replicas == 0 {
		cfg.replicas = 2
	}
	names := make([]string, cfg.nodes)
	for i := range names {
		names[i] = fmt.Sprintf("n%d", i+1)
	}
	pki := t.TempDir()
	if err := GenerateLabPKI(pki, names); err != nil {
		t.Fatal(err)
	}
	lis := make([]net.Listener, cfg.nodes)
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[i] = l
	}
	l := &tkLab{t: t, paws: &tkPAWS{newest: map[uint16]uint32{}}}
	var devs []*tun.Fake
	for i, name := range names {
		var peers []Peer
		for j, o := range names {
			if j != i {
				peers = append(peers, Peer{Name: o, Addr: lis[j].Addr().String()})
			}
		}
		n := l.startNode(name, peers, lis[i], pki, cfg)
		l.nodes = append(l.nodes, n)
		devs = append(devs, n.dev)
	}
	if cfg.solo {
		dev := tun.NewFake("solo", 1500, 1, 4096)
		st, err := stack.New(dev, stack.Config{NodeName: "solo", Prefixes: stacktest.AnycastNets, Logger: testLogger()})
		if err != nil {
			t.Fatal(err)
		}
		if err := st.ServeTCP(tkStreamPort, services.NewStream()); err != nil {
			t.Fatal(err)
		}
		l.solo = st
		devs = append(devs, dev)
	}
	client, err := stacktest.NewClient(1500)
	if err != nil {
		t.Fatal(err)
	}
	l.client = client
	l.sw = stacktest.NewSwitch(client, devs...)
	l.sw.SetRoute(func(pkt []byte) int {
		if f := l.rewrite.Load(); f != nil && !(*f)(pkt) {
			return -1
		}
		return int(l.route.Load())
	})
	t.Cleanup(l.close)
	l.waitLive(names...)
	return l
}

func (l *tkLab) startNode(name string, peers []Peer, lis net.Listener, pki string, cfg tkConfig) *tkNode {
	t := l.t
	var dev *tun.Fake
	if cfg.gso {
		dev = tun.NewFakeGSO(name, 1500, 1, 4096)
	} else {
		dev = tun.NewFake(name, 1500, 1, 4096)
	}
	log := testLogger()
	st, err := stack.New(dev, stack.Config{NodeName: name, Prefixes: stacktest.AnycastNets, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	var svc services.TCPService = services.NewStream()
	if cfg.service != nil {
		svc = cfg.service()
	}
	if err := st.ServeTCP(tkStreamPort, svc); err != nil {
		t.Fatal(err)
	}
	tr := NewTracker(TrackerConfig{Node: name, Prefixes: st.Prefixes(), ServiceFor: st.TCPServiceName, Logger: log, IgnoreClient: cfg.ignoreClient})
	tm, err := LoadTLS(filepath.Join(pki, "ca.pem"), filepath.Join(pki, name+".pem"), filepath.Join(pki, name+"-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	r, err := NewReplication(ReplicationConfig{
		Self: name, Peers: peers, Listen: lis.Addr().String(), Replicas: cfg.replicas,
		Prefixes: st.Prefixes(), TLS: tm, Logger: log, listener: lis, CoalesceWindow: cfg.coalesce,
	}, tr)
	if err != nil {
		t.Fatal(err)
	}
	e, err := NewEngine(EngineConfig{
		Stack: st, Tracker: tr, Replication: r, Logger: log, Policy: cfg.policy, MovedSettle: cfg.movedSettle,
		Service: func(port uint16) services.TCPService {
			if port == tkStreamPort {
				return svc
			}
			return nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	tap := &tkTap{rng: rand.New(rand.NewPCG(uint64(len(name)), 7)), name: name, paws: l.paws, e: e}
	ep := st.Endpoint()
	ep.AddHook(tap)
	var sy *Sync
	if cfg.syncMode {
		sy = tkEnableSync(r, e, st, tap)
		ep.AddHook(sy.HoldHook())
	}
	ep.AddHook(e.FenceHook())
	ep.AddHook(tr)
	if sy != nil {
		ep.AddHook(sy.LogHook())
	}
	ep.AddHook(e.Hook())
	if !cfg.noCheckpoint[name] {
		st.SetCheckpointSink(tr.CheckpointSink())
	}
	st.SetResumeSource(e)
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	e.Start()
	ctx, cancel := context.WithCancel(context.Background())
	go tr.Run(ctx)
	return &tkNode{name: name, dev: dev, st: st, tap: tap, tr: tr, r: r, e: e, sy: sy, stop: cancel}
}

// kill simulates kill -9 of node i: nothing it would still send gets out,
// its peer connections close, its stack stops.
func (l *tkLab) kill(i int) {
	n := l.nodes[i]
	if n.killed {
		return
	}
	n.killed = true
	n.tap.dead.Store(true)
	if n.sy != nil {
		n.sy.Close()
	}
	n.e.Close()
	n.r.Close()
	n.stop()
	n.st.Close()
}

func (l *tkLab) close() {
	if l.closed {
		return
	}
	l.closed = true
	l.sw.Close()
	for i := range l.nodes {
		l.kill(i)
	}
	if l.solo != nil {
		l.solo.Close()
	}
	l.client.Close()
}

// waitLive waits until every named node sees exactly names live.
func (l *tkLab) waitLive(names ...string) {
	l.t.Helper()
	sort.Strings(names)
	want := strings.Join(names, ",")
	for _, n := range l.nodes {
		if !containsName(names, n.name) {
			continue
		}
		eventually(l.t, n.name+" to see "+want+" live", func() bool {
			return strings.Join(n.r.Members().Live(), ",") == want
		})
	}
}

func containsName(names []string, n string) bool {
	for _, x := range names {
		if x == n {
			return true
		}
	}
	return false
}

func (l *tkLab) node(name string) int {
	for i, n := range l.nodes {
		if n.name == name {
			return i
		}
	}
	l.t.Fatalf("no node %s", name)
	return -1
}

// quiesceTo waits until node i's hook chain has judged every client packet
// the switch handed it (passed, consumed or dropped: each is counted). A
// test that routes the client away and then changes node i's flow state
// calls it in between, so that no packet routed before the change reaches
// the hooks after it.
func (l *tkLab) quiesceTo(t *testing.T, i int) {
	t.Helper()
	ep := l.nodes[i].st.Endpoint()
	eventually(t, fmt.Sprintf("%s to judge every packet routed to it", l.nodes[i].name), func() bool {
		s := ep.Stats()
		seen := s.RxPackets + s.RxConsumed + s.RxNotIP
		for _, d := range ep.HookDrops() {
			seen += d[0]
		}
		// Injected packets (replays) are counted as delivered too: at
		// least as many as the switch handed over.
		return seen >= l.sw.ToNode[i].Load()
	})
}

// resets is the number of RSTs the client's connections received.
func (l *tkLab) resets() uint64 { return l.client.Stack.Stats().TCP.ResetsReceived.Value() }

// enableClientSACK turns SACK on in the client stack.
func (l *tkLab) enableClientSACK() { l.setClientSACK(true) }

// setClientSACK turns SACK on or off in the client stack.
func (l *tkLab) setClientSACK(on bool) {
	opt := tcpip.TCPSACKEnabled(on)
	if err := l.client.Stack.SetTransportProtocolOption(tcp.ProtocolNumber, &opt); err != nil {
		l.t.Fatal(err)
	}
}

// progressConn counts the bytes read. With limit > 0 it reads no further
// than limit bytes until the limit is lifted (the client's receive window
// closes meanwhile).
type progressConn struct {
	net.Conn
	n     atomic.Int64
	limit atomic.Int64
}

func (c *progressConn) Read(b []byte) (int, error) {
	for {
		lim := c.limit.Load()
		if lim <= 0 {
			break
		}
		if room := lim - c.n.Load(); room > 0 {
			b = b[:min(int64(len(b)), room)]
			break
		}
		time.Sleep(time.Millisecond)
	}
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	return n, err
}

// tkDownload is a stream download in progress.
type tkDownload struct {
	conn *progressConn
	key  FlowKey
	done chan error
	size uint64
}

// startDownload opens a connection to dst and requests size bytes of
// seed's pattern; the answer is checked byte by byte as it arrives.
func (l *tkLab) startDownload(ctx context.Context, dst netip.AddrPort, size, seed uint64) *tkDownload {
	l.t.Helper()
	c, err := l.client.DialTCP(ctx, dst)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { c.Close() })
	la := c.LocalAddr().(*net.TCPAddr).AddrPort()
	d := &tkDownload{
		conn: &progressConn{Conn: c},
		key:  FlowKey{Client: netip.AddrPortFrom(la.Addr().Unmap(), la.Port()), Anycast: dst},
		done: make(chan error, 1),
		size: size,
	}
	if _, err := io.WriteString(c, services.StreamRequest(size, seed)); err != nil {
		l.t.Fatal(err)
	}
	go func() {
		_, ok, err := services.ReadStream(d.conn, size, seed)
		if err == nil && !ok {
			err = fmt.Errorf("stream not ok")
		}
		d.done <- err
	}()
	return d
}

// waitBytes waits until the download received at least n bytes (or
// ended).
func (d *tkDownload) waitBytes(t *testing.T, n int64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for d.conn.n.Load() < n {
		select {
		case err := <-d.done:
			d.done <- err
			return
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("download stuck at %d bytes (waiting for %d)", d.conn.n.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// wait waits for the download to end and returns its error.
func (d *tkDownload) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-d.done:
		return err
	case <-time.After(120 * time.Second):
		t.Fatalf("download did not end (%d of %d bytes)", d.conn.n.Load(), d.size)
		return nil
	}
}

// stripTS replaces the timestamp option of a client SYN by NOPs (fixing
// the checksum), so the connection runs without timestamps.
func stripTS(pkt []byte) bool {
	loc, ok := locateTCP(pkt)
	if !ok {
		return true
	}
	hdr := pkt[loc.off : loc.off+loc.hlen]
	tcpH := header.TCP(hdr)
	if tcpH.Flags()&header.TCPFlagSyn == 0 {
		return true
	}
	o := findOptions(hdr[header.TCPMinimumSize:])
	if o.ts < 0 {
		return true
	}
	before := checksum.Checksum(hdr, 0)
	opts := hdr[header.TCPMinimumSize:]
	for i := 0; i < header.TCPOptionTSLength; i++ {
		opts[o.ts+i] = header.TCPOptionNOP
	}
	fixChecksum(hdr, before)
	return true
}

// logStats logs every node's takeover counters and latencies.
func (l *tkLab) logStats() {
	for _, n := range l.nodes {
		s := n.e.Stats()
		l.t.Logf("%s: takeovers %v failures %v rsts %v unknown %d packets %v latency p50 %v max %v restore p50 %v (%d samples)",
			n.name, s.Takeovers, s.Failures, s.RSTs, s.Unknown, nonZero(s.Packets),
			Quantile(s.Latencies, 0.5), Quantile(s.Latencies, 1), Quantile(s.RestoreDurations, 0.5), len(s.Latencies))
	}
}

func nonZero(m map[string]uint64) map[string]uint64 {
	out := map[string]uint64{}
	for k, v := range m {
		if v != 0 {
			out[k] = v
		}
	}
	return out
}

// sum adds a counter over every node.
func (l *tkLab) sum(f func(TakeoverStats) uint64) uint64 {
	var n uint64
	for _, nd := range l.nodes {
		if !nd.killed {
			n += f(nd.e.Stats())
		}
	}
	return n
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
