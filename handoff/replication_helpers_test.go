package handoff

import (
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

var testPrefixes = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8:a::/48")}

var testAnycast = netip.MustParseAddr("192.0.2.1")

// testKey returns a distinct IPv4 flow key for i (up to 2^24 keys).
func testKey(i int) FlowKey {
	return FlowKey{
		Client:  netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), uint16(1024+i%50000)),
		Anycast: netip.AddrPortFrom(testAnycast, 80),
	}
}

func testState(owner string, k FlowKey, epoch uint64) *batonv1.FlowState {
	return &batonv1.FlowState{
		Key:               k.Proto(),
		Owner:             owner,
		Epoch:             epoch,
		Service:           "echo",
		Phase:             batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED,
		ClientIsn:         1000,
		ServerIsn:         2000,
		ClientSyn:         &batonv1.SynOptions{Mss: 1460, WindowScale: 7, SackPermitted: true, Timestamps: true},
		ClientWindowScale: 7,
		ServerWindowScale: 7,
		ServerMss:         1460,
		Sack:              true,
		Timestamps:        true,
		ServerNextSeq:     2001,
		ClientAck:         2001,
		ServerAck:         1001,
		OpenedUnixNano:    1,
		UpdatedUnixNano:   1,
	}
}

// fakeSource is a FlowSource following the tracker's contract: changes
// coalesce per flow between takes; an open closed before it was taken is
// never reported.
type fakeSource struct {
	owner string
	ch    chan struct{}

	mu       sync.Mutex
	flows    map[FlowKey]*batonv1.FlowState
	pending  map[FlowKey]Change
	order    []FlowKey
	reported map[FlowKey]bool
}

func newFakeSource(owner string) *fakeSource {
	return &fakeSource{
		owner:    owner,
		ch:       make(chan struct{}, 1),
		flows:    map[FlowKey]*batonv1.FlowState{},
		pending:  map[FlowKey]Change{},
		reported: map[FlowKey]bool{},
	}
}

func (f *fakeSource) Changes() <-chan struct{} { return f.ch }

func (f *fakeSource) TakeChanges(dst []Change) []Change {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range f.order {
		c := f.pending[k]
		dst = append(dst, c)
		f.reported[k] = c.Kind != batonv1.FlowEvent_KIND_CLOSE
	}
	f.pending = map[FlowKey]Change{}
	f.order = nil
	return dst
}

func (f *fakeSource) Owned(fn func(*batonv1.FlowState) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, st := range f.flows {
		if !fn(proto.Clone(st).(*batonv1.FlowState)) {
			return
		}
	}
}

func (f *fakeSource) Lookup(k FlowKey) (*batonv1.FlowState, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st, ok := f.flows[k]
	if !ok {
		return nil, false
	}
	return proto.Clone(st).(*batonv1.FlowState), true
}

// mark records a change under f.mu.
func (f *fakeSource) mark(k FlowKey, kind batonv1.FlowEvent_Kind, st *batonv1.FlowState) {
	prev, had := f.pending[k]
	switch {
	case !had:
		f.order = append(f.order, k)
	case kind == batonv1.FlowEvent_KIND_CLOSE && prev.Kind == batonv1.FlowEvent_KIND_OPEN && !f.reported[k]:
		delete(f.pending, k) // never reported: nothing to report
		f.order = removeKey(f.order, k)
		return
	case prev.Kind == batonv1.FlowEvent_KIND_OPEN && kind != batonv1.FlowEvent_KIND_CLOSE:
		kind = batonv1.FlowEvent_KIND_OPEN
	}
	f.pending[k] = Change{Kind: kind, State: proto.Clone(st).(*batonv1.FlowState)}
}

func removeKey(ks []FlowKey, k FlowKey) []FlowKey {
	for i := range ks {
		if ks[i] == k {
			return append(ks[:i], ks[i+1:]...)
		}
	}
	return ks
}

func (f *fakeSource) signal() {
	select {
	case f.ch <- struct{}{}:
	default:
	}
}

// Open adds flows (epoch 1) and reports them.
func (f *fakeSource) Open(keys ...FlowKey) {
	f.mu.Lock()
	for _, k := range keys {
		st := testState(f.owner, k, 1)
		f.flows[k] = st
		f.mark(k, batonv1.FlowEvent_KIND_OPEN, st)
	}
	f.mu.Unlock()
	f.signal()
}

// Update changes flows' server_next_seq.
func (f *fakeSource) Update(seq uint32, keys ...FlowKey) {
	f.mu.Lock()
	for _, k := range keys {
		st := f.flows[k]
		st.ServerNextSeq = seq
		f.mark(k, batonv1.FlowEvent_KIND_UPDATE, st)
	}
	f.mu.Unlock()
	f.signal()
}

// Close closes flows.
func (f *fakeSource) Close(keys ...FlowKey) {
	f.mu.Lock()
	for _, k := range keys {
		st := f.flows[k]
		delete(f.flows, k)
		st.Phase = batonv1.FlowPhase_FLOW_PHASE_CLOSED
		f.mark(k, batonv1.FlowEvent_KIND_CLOSE, st)
	}
	f.mu.Unlock()
	f.signal()
}

func (f *fakeSource) Keys() []FlowKey {
	f.mu.Lock()
	defer f.mu.Unlock()
	ks := make([]FlowKey, 0, len(f.flows))
	for k := range f.flows {
		ks = append(ks, k)
	}
	return ks
}

// testLogger discards logs unless BATON_TEST_LOG is set.
func testLogger() *slog.Logger {
	if os.Getenv("BATON_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// eventually polls cond until it holds, failing the test after a generous
// bound (a hang guard, not a performance threshold).
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// leakCheck returns a function that waits (bounded) until the number of
// goroutines is back to what it is now, and fails with a dump if not.
func leakCheck(t testing.TB) func() {
	before := runtime.NumGoroutine()
	return func() {
		deadline := time.Now().Add(10 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				n := runtime.Stack(buf, true)
				t.Errorf("goroutines: %d before, %d after Close\n%s", before, runtime.NumGoroutine(), buf[:n])
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// testNode is one node of an in-process cluster.
type testNode struct {
	name string
	addr string
	src  *fakeSource
	r    *Replication
}

type testCluster struct {
	t      testing.TB
	pki    string
	k      int
	nodes  map[string]*testNode
	names  []string
	tweak  func(*ReplicationConfig)
	closed bool
}

// newCluster starts nodes over loopback TCP with mutual TLS (certificates
// from GenerateLabPKI). tweak may adjust each node's config.
func newCluster(t testing.TB, names []string, k int, tweak func(*ReplicationConfig)) *testCluster {
	t.Helper()
	c := &testCluster{t: t, pki: t.TempDir(), k: k, nodes: map[string]*testNode{}, names: append([]string(nil), names...), tweak: tweak}
	sort.Strings(c.names)
	if err := GenerateLabPKI(c.pki, names); err != nil {
		t.Fatal(err)
	}
	lis := map[string]net.Listener{}
	for _, n := range names {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[n] = l
		c.nodes[n] = &testNode{name: n, addr: l.Addr().String(), src: newFakeSource(n)}
	}
	for _, n := range names {
		c.start(n, lis[n])
	}
	t.Cleanup(c.Close)
	return c
}

func (c *testCluster) config(name string, lis net.Listener) ReplicationConfig {
	var peers []Peer
	for _, o := range c.names {
		if o != name {
			peers = append(peers, Peer{Name: o, Addr: c.nodes[o].addr})
		}
	}
	cfg := ReplicationConfig{
		Self:     name,
		Peers:    peers,
		Listen:   c.nodes[name].addr,
		Replicas: c.k,
		Prefixes: testPrefixes,
		Logger:   testLogger(),
		listener: lis,
	}
	if c.tweak != nil {
		c.tweak(&cfg)
	}
	if !cfg.Insecure && cfg.TLS == nil {
		tm, err := LoadTLS(filepath.Join(c.pki, "ca.pem"), filepath.Join(c.pki, name+".pem"), filepath.Join(c.pki, name+"-key.pem"))
		if err != nil {
			c.t.Fatal(err)
		}
		cfg.TLS = tm
	}
	return cfg
}

// start (re)starts a node: on its reserved listener, or on its address.
func (c *testCluster) start(name string, lis net.Listener) {
	c.t.Helper()
	n := c.nodes[name]
	r, err := NewReplication(c.config(name, lis), n.src)
	if err != nil {
		c.t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		c.t.Fatal(err)
	}
	n.r = r
}

func (c *testCluster) stop(name string) {
	c.nodes[name].r.Close()
}

// restart starts a stopped node on the same address, with src (nil: keep
// the old source).
func (c *testCluster) restart(name string, src *fakeSource) {
	c.t.Helper()
	if src != nil {
		c.nodes[name].src = src
	}
	c.start(name, nil)
}

func (c *testCluster) Close() {
	if c.closed {
		return
	}
	c.closed = true
	for _, n := range c.nodes {
		if n.r != nil {
			n.r.Close()
		}
	}
}

// waitLive waits until every running node sees live as its live set.
func (c *testCluster) waitLive(live ...string) {
	c.t.Helper()
	sort.Strings(live)
	want := strings.Join(live, ",")
	for _, name := range live {
		r := c.nodes[name].r
		eventually(c.t, fmt.Sprintf("%s to see live %s", name, want), func() bool {
			return strings.Join(r.Members().Live(), ",") == want
		})
	}
}

// holders returns the nodes (of those given) whose store holds k.
func (c *testCluster) holders(k FlowKey, among []string) []string {
	var out []string
	for _, n := range among {
		if _, ok := c.nodes[n].r.Store().Lookup(k); ok {
			out = append(out, n)
		}
	}
	return out
}

// waitPlaced waits until every flow of owner is held by exactly its
// replicas over live, and nobody holds anything else from owner.
func (c *testCluster) waitPlaced(owner string, live []string) {
	c.t.Helper()
	var last string
	ok := func() bool {
		keys := c.nodes[owner].src.Keys()
		want := map[string]int{}
		for _, k := range keys {
			reps := Replicas(k, owner, live, c.k)
			sort.Strings(reps)
			if got := c.holders(k, live); strings.Join(got, ",") != strings.Join(reps, ",") {
				last = fmt.Sprintf("flow %s held by %v, want %v", k, got, reps)
				return false
			}
			for _, n := range reps {
				want[n]++
			}
		}
		for _, n := range live {
			if n == owner {
				continue
			}
			if got := c.nodes[n].r.Store().Count(owner); got != want[n] {
				last = fmt.Sprintf("%s holds %d flows of %s, want %d", n, got, owner, want[n])
				return false
			}
		}
		return true
	}
	deadline := time.Now().Add(30 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			c.t.Fatalf("placement of %s's flows over %v not reached: %s", owner, live, last)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func keysRange(from, to int) []FlowKey {
	ks := make([]FlowKey, 0, to-from)
	for i := from; i < to; i++ {
		ks = append(ks, testKey(i))
	}
	return ks
}
