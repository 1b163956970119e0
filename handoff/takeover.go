package handoff

// This file is the takeover engine: the node's table of flows in transit
// (being decided, restored, translated, forwarded, handed over, reset), its
// lifecycle, and the ResumeSource the stack's accept loop asks. A node that
// receives packets of a flow its stack does not have continues that flow
// instead of resetting it:
//
//	interception (takeover_hook.go): the innermost hook catches a non-SYN
//	  packet of a flow the stack does not know (pitfall 7), queues it and
//	  starts a takeover on its own goroutine (the packet path never waits);
//	decision (takeover_pull.go): find the flow's state (local replicas,
//	  then the peers) and its owner: a live owner hands it over (claim.go:
//	  it fences the flow, pitfall 4, and returns its exact state) or, for
//	  services that cannot move, gets the packets tunnelled (forward.go); a
//	  dead owner's flow is restored from replicated state by its designated
//	  replica, which every node computes alike;
//	push (takeover_push.go): when a peer goes down, its flows' designated
//	  replicas restore them at once, since a receive-only client sends
//	  nothing that could trigger a pull (pitfall 1);
//	restore (takeover_restore.go, synth.go): the synthetic handshake, then
//	  translation (translate.go) for the life of the connection.
//
// Invariant: a takeover either continues the exact byte stream the client
// would have received, or resets it. Every path that cannot continue
// exactly ends in a RST to the client, counted by reason.
//
// Hook placement. The engine has two hooks: Hook() must be the innermost
// (added last, after the flow tracker), so the tracker sees restored flows
// in the client's sequence space both ways; FenceHook() must be outside the
// tracker (added before it), so that while a flow is being handed over,
// every packet the tracker has not yet recorded is dropped before it leaves
// (pitfall 4: the state handed over is exactly what the client saw).

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
)

// Policy says how a node continues a flow of a live owner.
type Policy uint8

const (
	// PolicyDefault: migrate for Resumable services, forward for others.
	PolicyDefault Policy = iota
	// PolicyMigrate: claim the flow from its owner and restore it here.
	PolicyMigrate
	// PolicyForward: tunnel the flow's packets to its owner.
	PolicyForward
)

// String returns "default", "migrate" or "forward".
func (p Policy) String() string {
	switch p {
	case PolicyMigrate:
		return "migrate"
	case PolicyForward:
		return "forward"
	}
	return "default"
}

// ParsePolicy parses "migrate", "forward" or "default".
func ParsePolicy(s string) (Policy, error) {
	switch strings.TrimSpace(s) {
	case "migrate":
		return PolicyMigrate, nil
	case "forward":
		return PolicyForward, nil
	case "default", "":
		return PolicyDefault, nil
	}
	return PolicyDefault, fmt.Errorf("takeover policy %q: want migrate, forward or default", s)
}

// Engine defaults.
const (
	DefaultQueuePackets = 128
	DefaultMaxQueued    = 16384
	// DefaultMaxQueuedBytes bounds the bytes of all queued packets: with
	// receive offload a client packet can be a 64 KiB segment, so the
	// packet bounds alone would allow 1 GiB.
	DefaultMaxQueuedBytes = 32 << 20
	DefaultMaxTakeovers   = 256
	DefaultTakeoverWindow = 10 * time.Second
	// DefaultMovedSettle is how long after handing a flow over a node
	// tunnels the flow's late packets to the new owner instead of taking
	// the flow back. Late packets are those the node was handed before
	// the route changed and judges after its claim was granted: its
	// receive backlog (the TUN's queue, 500 packets at the default
	// txqueuelen, read in batches) drains in milliseconds, so 200 ms is
	// a wide margin. A flow that really comes back within the window
	// loses nothing: its packets take the detour until the window ends,
	// then the next one takes it back.
	DefaultMovedSettle = 200 * time.Millisecond
)

// Lingering of the table's tombstones.
const (
	restoreTimeout   = 2 * time.Second        // SYN -> SYN-ACK
	claimTimeout     = 3 * time.Second        // one Claim RPC
	lookupTimeout    = time.Second            // one round of Lookup RPCs
	movedLinger      = 60 * time.Second       // esMoved: outbound dropped
	resetLinger      = 30 * time.Second       // esReset: answered with RST
	unknownLinger    = 3 * time.Second        // esUnknown: delivered to the stack
	forwardIdle      = 2 * time.Minute        // esForward without packets
	activeGrace      = 5 * time.Second        // esActive before the endpoint check applies
	janitorEvery     = 100 * time.Millisecond // table sweep
	rstEvery         = 50 * time.Millisecond  // rate limit of RSTs per reset flow
	waitRestoreBound = 3 * time.Second        // a claim waiting for a restore in progress
)

// EngineConfig configures an Engine.
type EngineConfig struct {
	// Stack is the node's stack; Tracker the flow tracker on its chain;
	// Replication the peer network (its members, replicas and RPCs).
	Stack       *stack.Stack
	Tracker     *Tracker
	Replication *Replication
	// Service returns the TCP service on an anycast port (nil: none).
	Service func(port uint16) services.TCPService
	// Policy returns the policy for a service name (nil: PolicyDefault).
	Policy func(service string) Policy
	// QueuePackets bounds the packets queued per flow while it is being
	// taken over, MaxQueued all of them; MaxTakeovers the takeovers in
	// progress; Window the time one takeover may take. 0: defaults.
	QueuePackets int
	MaxQueued    int
	// MaxQueuedBytes bounds the bytes of all queued packets (0: default).
	MaxQueuedBytes int
	MaxTakeovers   int
	Window         time.Duration
	// MovedSettle: for this long after handing a flow over, its client
	// packets that still reach this node are tunnelled to the new owner
	// (late packets of the route change that moved it: taking the flow
	// back for one of them would bounce it between the nodes). 0: the
	// default; negative: never (every such packet takes the flow back).
	MovedSettle time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// entryState is where a flow of the table stands.
type entryState uint32

const (
	esDeciding  entryState = iota // intercepted: packets queued, takeover deciding
	esRestoring                   // synthetic handshake under way: packets queued
	esActive                      // restored: packets translated
	esForward                     // packets tunnelled to the owner
	esHold                        // being handed over: every packet dropped (FenceHook)
	esMoved                       // handed over: outbound dropped, inbound starts a takeover
	esReset                       // reset: answered with RST
	esUnknown                     // unknown everywhere: delivered to the stack (RST)
	esStates
)

var entryStateNames = [esStates]string{"deciding", "restoring", "active", "forward", "hold", "moved", "reset", "unknown"}

func (s entryState) String() string {
	if s < esStates {
		return entryStateNames[s]
	}
	return fmt.Sprintf("entryState(%d)", uint32(s))
}

// flowEntry is one flow of the table. state, the translator and the
// counters the hooks read are atomics; everything else is guarded by mu.
type flowEntry struct {
	key FlowKey
	hk  trkKey

	state atomic.Uint32 // entryState
	tr    atomic.Pointer[Translator]
	// maxSent is the highest sequence number (stack space) the new stack
	// sent: client acks are capped at it (pitfall 2). tsFloor is the
	// first TSval (client space) the new stack sent.
	maxSent   atomic.Uint32
	tsFloor   atomic.Uint32
	haveFloor atomic.Bool
	firstByte atomic.Bool
	trigger   time.Time // when the takeover started (latency)
	how       string    // the last restore's kind (latency label)
	lastUsed  atomic.Int64

	ahead atomic.Pointer[aheadWatch] // crash restores (takeover_ahead.go)

	mu      sync.Mutex
	queue   [][]byte
	synSeq  uint32
	synCh   chan synAck
	run     *takeoverRun
	fwd     *forwarder
	owner   string    // esMoved: the new owner; esForward: the owner
	movedAt time.Time // esMoved: when the flow was handed over
	epoch   uint64
	until   time.Time // tombstone expiry
	reason  string    // esReset: why
	lastRST time.Time
	// esReset without a client packet to answer: the state to probe the
	// client with, how many probes went out, when the next one is due.
	probe     *batonv1.FlowState
	probes    uint
	nextProbe time.Time
	lastAck   uint32 // the newest queued client ack (client space)
	haveAck   bool
	lastWnd   uint16
	lastTS    uint32
	haveTS    bool
	prevHold  entryState    // state to return to when a hand-over is refused
	aborted   chan struct{} // closed once the connection handed over is aborted (claim.go)

	phaseAt [tracePhases]atomic.Int64 // unix ns of this takeover's phases (takeover_trace.go)
	retries atomic.Uint32
}

func (f *flowEntry) get() entryState { return entryState(f.state.Load()) }

// takeoverRun is one takeover in progress.
type takeoverRun struct {
	done chan struct{}
	err  error
}

type entryShard struct {
	mu sync.RWMutex
	m  map[trkKey]*flowEntry
	_  [40]byte
}

const engineShards = 32

// pendingResume is a connection being restored, until the accept loop
// takes it.
type pendingResume struct {
	r     services.Resume
	taken chan struct{}
}

// Engine takes over flows other nodes started. Create it with NewEngine,
// add FenceHook before the tracker and Hook last, install it as the
// stack's ResumeSource, then Start it.
type Engine struct {
	cfg      EngineConfig
	log      *slog.Logger
	self     string
	st       *stack.Stack
	gv       *gstack.Stack
	inj      stack.Injector
	tr       *Tracker
	r        *Replication
	prefixes []netip.Prefix
	nic      tcpip.NICID
	mtu      int
	seed     uint64

	shards   [engineShards]entryShard
	nEntries atomic.Int64
	nHold    atomic.Int64
	nQueued  atomic.Int64
	qBytes   atomic.Int64 // bytes of all queued packets

	// Lease (takeover_lease.go): leaseFence is the unix nanosecond before
	// which established flows are fenced (0: none); awaiting holds the
	// peers a goroutine waits for until they are certainly gone.
	leaseFence atomic.Int64
	goneMu     sync.Mutex
	awaiting   map[string]bool

	resMu   sync.Mutex
	resumes map[FlowKey]*pendingResume

	sem    chan struct{}
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool
	// spawnMu orders spawn's wg.Add before Close's Wait (spawn).
	spawnMu sync.Mutex

	tracer atomic.Pointer[Tracer] // takeover_trace.go

	fwdMu sync.Mutex
	fwds  map[string]*forwarder

	hook  *innerHook
	fence *fenceHook
	m     *engineMetrics

	startOnce sync.Once
}

var _ stack.ResumeSource = (*Engine)(nil)

// NewEngine checks cfg and builds the engine.
func NewEngine(cfg EngineConfig) (*Engine, error) {
	switch {
	case cfg.Stack == nil:
		return nil, errors.New("takeover: no stack")
	case cfg.Tracker == nil:
		return nil, errors.New("takeover: no flow tracker")
	case cfg.Replication == nil:
		return nil, errors.New("takeover: no replication")
	}
	if cfg.QueuePackets <= 0 {
		cfg.QueuePackets = DefaultQueuePackets
	}
	if cfg.MaxQueuedBytes <= 0 {
		cfg.MaxQueuedBytes = DefaultMaxQueuedBytes
	}
	if cfg.MaxQueued <= 0 {
		cfg.MaxQueued = DefaultMaxQueued
	}
	if cfg.MaxTakeovers <= 0 {
		cfg.MaxTakeovers = DefaultMaxTakeovers
	}
	if cfg.MovedSettle == 0 {
		cfg.MovedSettle = DefaultMovedSettle
	}
	if cfg.Window <= 0 {
		cfg.Window = DefaultTakeoverWindow
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Service == nil {
		cfg.Service = func(uint16) services.TCPService { return nil }
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &Engine{
		cfg:      cfg,
		log:      cfg.Logger,
		self:     cfg.Replication.cfg.Self,
		st:       cfg.Stack,
		gv:       cfg.Stack.GVisor(),
		inj:      cfg.Stack.Endpoint(),
		tr:       cfg.Tracker,
		r:        cfg.Replication,
		prefixes: cfg.Stack.Prefixes(),
		nic:      1,
		mtu:      int(cfg.Stack.Endpoint().MTU()),
		resumes:  make(map[FlowKey]*pendingResume),
		awaiting: make(map[string]bool),
		sem:      make(chan struct{}, cfg.MaxTakeovers),
		ctx:      ctx,
		cancel:   cancel,
		fwds:     make(map[string]*forwarder),
	}
	for id := range e.gv.NICInfo() {
		e.nic = id // the stack has one NIC: the TUN
	}
	var seed [8]byte
	_, _ = rand.Read(seed[:])
	e.seed = binary.LittleEndian.Uint64(seed[:])
	for i := range e.shards {
		e.shards[i].m = make(map[trkKey]*flowEntry)
	}
	e.hook = &innerHook{e: e}
	e.fence = &fenceHook{e: e}
	e.m = newEngineMetrics(e.self)
	e.m.flows = e.flowCounts
	return e, nil
}

// Hook is the interception and translation hook ("handoff"): add it last,
// after the flow tracker.
func (e *Engine) Hook() stack.Hook { return e.hook }

// FenceHook drops the packets of flows being handed over
// ("handoff-fence"): add it before the flow tracker.
func (e *Engine) FenceHook() stack.Hook { return e.fence }

// Start starts the engine's goroutines (membership watch, table sweep) and
// makes it answer the peers' Claim, Release and Forward calls.
func (e *Engine) Start() {
	e.startOnce.Do(func() {
		e.r.engine.Store(e)
		e.spawn(e.watchMembers)
		e.spawn(e.janitor)
		e.spawn(e.watchLease)
	})
}

// spawn runs fn on a goroutine Close waits for, unless the engine is
// closing; it reports whether it did. Close marks the engine closed under
// the same lock, so no Add can race its Wait: hooks and RPC handlers start
// goroutines (takeovers, forwarders) while Close may be waiting, and an
// Add concurrent with Wait is a data race (the race detector reports it)
// whose goroutine could outlive Close.
func (e *Engine) spawn(fn func()) bool {
	e.spawnMu.Lock()
	defer e.spawnMu.Unlock()
	if e.closed.Load() {
		return false
	}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		fn()
	}()
	return true
}

// Close stops every goroutine of the engine (takeovers in progress end
// with their context). The hooks keep applying the table (fences,
// translations), but no new takeover starts.
func (e *Engine) Close() {
	e.spawnMu.Lock()
	closed := e.closed.Swap(true)
	e.spawnMu.Unlock()
	if closed {
		return
	}
	if e.r.engine.Load() == e {
		e.r.engine.Store(nil)
	}
	e.cancel()
	e.wg.Wait()
}

// Self is this node's name.
func (e *Engine) Self() string { return e.self }

// Engine returns the takeover engine started on r (nil when none runs).
func (r *Replication) Engine() *Engine { return r.engine.Load() }

// shard picks the table shard of hk (a seeded hash, like the tracker's).
func (e *Engine) shard(hk *trkKey) *entryShard {
	h := e.seed
	h = trkMix(h ^ binary.LittleEndian.Uint64(hk.c[:8]))
	h = trkMix(h ^ binary.LittleEndian.Uint64(hk.c[8:]))
	h = trkMix(h ^ binary.LittleEndian.Uint64(hk.a[8:]) ^ uint64(hk.cp)<<32 ^ uint64(hk.ap)<<48)
	return &e.shards[h%engineShards]
}

// lookup returns the table entry of k, or nil.
func (e *Engine) lookup(k FlowKey) *flowEntry {
	if e.nEntries.Load() == 0 {
		return nil
	}
	hk := trkKeyOf(k)
	sh := e.shard(&hk)
	sh.mu.RLock()
	f := sh.m[hk]
	sh.mu.RUnlock()
	return f
}

// entry returns k's entry, creating it in state s if there is none.
func (e *Engine) entry(k FlowKey, s entryState) (f *flowEntry, created bool) {
	hk := trkKeyOf(k)
	sh := e.shard(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if f = sh.m[hk]; f != nil {
		return f, false
	}
	f = &flowEntry{key: k, hk: hk, trigger: time.Now()}
	f.state.Store(uint32(s))
	f.lastUsed.Store(time.Now().UnixNano())
	if s == esHold {
		e.nHold.Add(1)
	}
	sh.m[hk] = f
	e.nEntries.Add(1)
	return f, true
}

// drop removes f from the table (if it is still k's entry) and releases
// what it holds.
func (e *Engine) drop(f *flowEntry) {
	sh := e.shard(&f.hk)
	sh.mu.Lock()
	if sh.m[f.hk] == f {
		delete(sh.m, f.hk)
		e.nEntries.Add(-1)
	}
	sh.mu.Unlock()
	f.mu.Lock()
	e.setStateLocked(f, esUnknown) // no longer held, whatever it was
	e.clearQueueLocked(f)
	f.mu.Unlock()
}

// setStateLocked changes f's state (f.mu held), keeping the count of held
// flows the fence hook's fast path reads.
func (e *Engine) setStateLocked(f *flowEntry, s entryState) {
	old := f.get()
	if old == s {
		return
	}
	if old == esHold {
		e.nHold.Add(-1)
	}
	if s == esHold {
		e.nHold.Add(1)
	}
	if s == esMoved {
		f.movedAt = time.Now()
	}
	f.state.Store(uint32(s))
}

func (e *Engine) clearQueueLocked(f *flowEntry) {
	e.unqueue(f.queue)
	clear(f.queue)
	f.queue = nil
}

// takeQueueLocked returns f's queue and empties it.
func (e *Engine) takeQueueLocked(f *flowEntry) [][]byte {
	q := f.queue
	f.queue = nil
	e.unqueue(q)
	return q
}

// unqueue takes q's packets off the engine's queue counts.
func (e *Engine) unqueue(q [][]byte) {
	n := 0
	for _, p := range q {
		n += len(p)
	}
	e.nQueued.Add(-int64(len(q)))
	e.qBytes.Add(-int64(n))
}

// startRun starts fn as f's takeover on its own goroutine, unless one is
// running (pitfall 3: a takeover is idempotent per flow). It returns the
// run, or nil when the engine is closed or at MaxTakeovers (counted as
// queue_full).
func (e *Engine) startRun(f *flowEntry, fn func(ctx context.Context) error) *takeoverRun {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.run != nil {
		select {
		case <-f.run.done:
		default:
			return f.run
		}
	}
	if e.closed.Load() {
		return nil
	}
	select {
	case e.sem <- struct{}{}:
	default:
		e.m.failure(reasonQueueFull)
		return nil
	}
	run := &takeoverRun{done: make(chan struct{})}
	if !e.spawn(func() {
		defer func() { <-e.sem }()
		ctx, cancel := context.WithTimeout(e.ctx, e.cfg.Window)
		defer cancel()
		run.err = fn(ctx)
		close(run.done)
	}) {
		<-e.sem
		return nil
	}
	f.run = run
	return run
}

// service returns the TCP service on port, or nil.
func (e *Engine) service(port uint16) services.TCPService { return e.cfg.Service(port) }

// policy returns the policy for the flow's service.
func (e *Engine) policy(k FlowKey) Policy {
	svc := e.service(k.Anycast.Port())
	if svc == nil {
		return PolicyForward
	}
	p := PolicyDefault
	if e.cfg.Policy != nil {
		p = e.cfg.Policy(svc.Name())
	}
	if p == PolicyDefault {
		if _, ok := svc.(services.Resumable); ok {
			return PolicyMigrate
		}
		return PolicyForward
	}
	return p
}

// alive reports whether node is up (this node always is).
func (e *Engine) alive(node string) bool {
	return node == e.self || e.r.members.Up(node)
}

// designated is the node that restores a dead owner's flow: the live
// member, other than the owner, with the highest rendezvous weight for the
// flow. Every node with the same view of the live members computes the
// same one (placement.go), so exactly one node pushes each flow.
func (e *Engine) designated(k FlowKey, owner string) string {
	live := e.r.members.Live()
	reps := Replicas(k, owner, live, len(live))
	if len(reps) == 0 {
		return ""
	}
	return reps[0]
}

// findEndpoint returns the stack's TCP endpoint for exactly k's 4-tuple,
// or nil. The demuxer falls back to the listener for an unknown 4-tuple;
// a listener (its state read without taking its lock) is not a match.
func (e *Engine) findEndpoint(k FlowKey) gstack.TransportEndpoint {
	proto := ipv4.ProtocolNumber
	if k.Anycast.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	id := gstack.TransportEndpointID{
		LocalPort:     k.Anycast.Port(),
		LocalAddress:  tcpip.AddrFromSlice(k.Anycast.Addr().AsSlice()),
		RemotePort:    k.Client.Port(),
		RemoteAddress: tcpip.AddrFromSlice(k.Client.Addr().AsSlice()),
	}
	ep := e.gv.FindTransportEndpoint(proto, tcp.ProtocolNumber, id, e.nic)
	if ep == nil {
		return nil
	}
	if t, ok := ep.(*tcp.Endpoint); ok && t.EndpointState() == tcp.StateListen {
		return nil
	}
	return ep
}

// TakeResume implements stack.ResumeSource: the accept loop asks it for
// every connection it accepts; those being restored are resumed.
func (e *Engine) TakeResume(client, anycast netip.AddrPort) (services.Resume, bool) {
	if e.nEntries.Load() == 0 {
		return services.Resume{}, false
	}
	k := FlowKey{Client: client, Anycast: anycast}
	e.resMu.Lock()
	pr := e.resumes[k]
	delete(e.resumes, k)
	e.resMu.Unlock()
	if pr == nil {
		return services.Resume{}, false
	}
	close(pr.taken)
	e.trace(k, PhaseAccepted, "")
	return pr.r, true
}

func (e *Engine) putResume(k FlowKey, r services.Resume) *pendingResume {
	pr := &pendingResume{r: r, taken: make(chan struct{})}
	e.resMu.Lock()
	e.resumes[k] = pr
	e.resMu.Unlock()
	return pr
}

func (e *Engine) dropResume(k FlowKey, pr *pendingResume) {
	e.resMu.Lock()
	if e.resumes[k] == pr {
		delete(e.resumes, k)
	}
	e.resMu.Unlock()
}

// janitor sweeps the table: tombstones expire, restored flows whose
// connection is gone are forgotten, idle forwarded flows too.
func (e *Engine) janitor() {
	t := time.NewTicker(janitorEvery)
	defer t.Stop()
	for {
		select {
		case <-e.ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		var expired, reset, ahead []*flowEntry
		for i := range e.shards {
			sh := &e.shards[i]
			sh.mu.RLock()
			for _, f := range sh.m {
				if e.expired(f, now) {
					expired = append(expired, f)
				} else if f.get() == esReset {
					reset = append(reset, f)
				} else if f.ahead.Load() != nil {
					ahead = append(ahead, f)
				}
			}
			sh.mu.RUnlock()
		}
		for _, f := range expired {
			e.drop(f)
		}
		for _, f := range reset {
			e.reprobe(f, now)
		}
		for _, f := range ahead {
			e.checkAhead(f, now)
		}
	}
}

// expired reports whether f can leave the table.
func (e *Engine) expired(f *flowEntry, now time.Time) bool {
	switch f.get() {
	case esActive:
		return now.Sub(f.trigger) > activeGrace && e.findEndpoint(f.key) == nil
	case esForward:
		return now.UnixNano()-f.lastUsed.Load() > int64(forwardIdle)
	case esMoved, esReset, esUnknown:
		f.mu.Lock()
		defer f.mu.Unlock()
		return now.After(f.until)
	}
	return false
}
