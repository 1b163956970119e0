package handoff

// This file is the optional "sync" replication mode of a service (output
// commit): an outbound packet of a sync-mode flow leaves the node only once
// the flow's replicas have acknowledged a state that covers everything the
// packet reveals, so that a crash takeover continues exactly what the
// client saw, for any service that can resume from its replicated state.
//
// What a packet reveals: its ack number (client input the server has
// consumed: the client will never send it again) and its sequence range
// (server output, FIN included). A replica's state covers the packet when
// its server_ack and server_next_seq are at least the packet's ack and end.
//
// What a replica must hold to continue the stream: a state its service
// can resume from (services.Resumable.CanResume). Echo's output is its
// input, so it cannot produce again output the client has not
// acknowledged; for such a service the state carries the unacknowledged
// output itself (FlowState.unacked_output, the crash restore's
// Resume.Pending). The replicator sends a sync flow's state only when the
// service can resume from it (prepare): a state that cannot be resumed
// (echo acknowledged input it has not echoed yet) is not sent, and the
// packets that would reveal it wait for the next state that can (the echo
// itself). So the replica's latest state of a sync flow is always
// resumable, and it covers everything the client saw.
//
// Two hooks (cluster.go wires them):
//
//	"sync-log" (LogHook), inside the flow tracker (added right after it):
//	  copies the payload of every outbound data packet of a sync flow into
//	  the flow's output log before the tracker records the packet, so any
//	  state the tracker reports has its output logged;
//	"sync-hold" (HoldHook), outside the flow tracker and the takeover's
//	  fence (added right after the anycast filter): passes a packet whose
//	  revelations are covered, else copies it into the flow's hold queue
//	  (Consume). Acks from the replicas (peer_link.go) release the queue in
//	  order, written to the device with the Injector (which skips the
//	  chain: the packet has crossed every hook inside this one, and the
//	  filter outside passes anycast-sourced packets). A flow this node no
//	  longer owns (fenced, handed over, killed) has its queue dropped.
//
// The replicas required are the flow's placement (the k live peers the
// replicator places it on); all of them must cover the packet, so
// whichever restores it after a crash is complete.
//
// Bounds and failure choices (documented in the README):
//   - per-flow queue full (MaxFlowPackets) or all queues full (MaxHeldBytes):
//     the packet is dropped (counted "full"); TCP retransmits it later.
//     Safety is kept: nothing unreplicated leaves.
//   - a packet held longer than HoldTimeout (a slow or unreachable replica,
//     a service whose state stays unresumable), or a flow with no live
//     replica at all: the queue is released anyway and counted as
//     "degraded" (by reason). Availability wins over output commit: a
//     crash in that window may reset the flow (the honest failure) instead
//     of continuing it.
//
// States are cut back when needed (cutBack): to at most MaxUnackedOutput
// of unacknowledged output, and to no more input than output when that is
// what the service needs (echo). Known limit: a bulk echo whose input
// backlog runs more than MaxUnackedOutput ahead of the client's ack holds
// packets until HoldTimeout (degraded); clamping the ack field of held
// packets to the covered ack, instead of holding them, would remove it.
//
// Measured (BenchmarkSyncReplication, 3 in-process nodes, 2 replicas):
// 64-byte echo round trip p50 ~40 us async, ~1.5 ms sync when a held
// packet waited for the replicator's 1 ms coalesce window; a hold now ends
// the window at once (replicator.kick): ~0.19-0.21 ms, like sync without
// coalescing (0.12-0.21 ms). 4 MiB echo ~5-55 MB/s async; sync is bimodal
// on a loaded 2-core machine, ~5 MB/s or ~0.1 MB/s when held packets wait
// for HoldTimeout (the bulk-echo limit below), with or without the kick.
//
// Cost on the fast path: flows of async services pay a port lookup after
// the segment parse; sync flows pay one shard lock per packet, a payload
// copy into the log (data packets) and, when held, a copy into a pooled
// buffer. Nothing allocates per packet in steady state.

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
	"github.com/baton-anycast/baton/tun"
)

// Defaults of SyncConfig.
const (
	DefaultSyncHoldTimeout      = 500 * time.Millisecond
	DefaultSyncMaxFlowPackets   = 1024
	DefaultSyncMaxHeldBytes     = 64 << 20
	DefaultSyncMaxUnackedOutput = 256 << 10
)

// SyncConfig configures the sync replication mode.
type SyncConfig struct {
	// Sync reports whether the service on an anycast TCP port runs in sync
	// mode. nil: none does.
	Sync func(port uint16) bool
	// Service returns the service on a port, asked whether a state can be
	// resumed (the takeover engine's).
	Service func(port uint16) services.TCPService
	// Injector writes released packets to the device (the stack's
	// endpoint); MTU bounds the packets a GSO segment is cut into.
	Injector stack.Injector
	MTU      int
	// Fenced, if set, reports that this node must no longer emit for a
	// flow (handed over, lost, or the node is going away): its held
	// packets are dropped instead of released.
	Fenced func(FlowKey) bool
	// HoldTimeout, MaxFlowPackets, MaxHeldBytes: see the file comment.
	HoldTimeout    time.Duration
	MaxFlowPackets int
	MaxHeldBytes   int
	// MaxUnackedOutput bounds the unacknowledged output a state carries
	// (below the replication batch size); a state needing more is not
	// sent, which holds the flow's output until the client acknowledges.
	MaxUnackedOutput int
	Logger           *slog.Logger
}

const syncShards = 32

// syncMaxLog bounds a flow's output log. The log holds the output the
// client has not acknowledged, which the stack keeps in its send buffer
// too (gVisor's is at most 4 MiB unless configured larger): the bound only
// stops a runaway.
const syncMaxLog = 16 << 20

// heldPkt is one packet in a hold queue.
type heldPkt struct {
	buf      *[]byte
	n        int
	gso      stack.GSOInfo
	ack, end uint32 // what it reveals (client space)
	hasAck   bool
	at       int64 // mono() when held
}

// syncCov is what one replica acknowledged of a flow.
type syncCov struct {
	ack, next uint32
}

// syncFlow is a sync-mode flow. Guarded by its shard's lock.
type syncFlow struct {
	key FlowKey

	// The output log: server payload bytes from logSeq on (client space).
	log    []byte
	logSeq uint32
	logOK  bool

	covered peerSet
	cov     [maxMembers]syncCov
	closed  bool // a CLOSE was replicated and acknowledged: release all
	// lastGood is the latest state prepared for replication (resyncs of
	// a state that cannot be resumed send it instead).
	lastGood *batonv1.FlowState

	// The replicas required, cached for one placement view.
	reqView *placementView
	req     peerSet

	q         []heldPkt
	releasing bool
	lastUsed  int64
}

type syncShard struct {
	mu    sync.Mutex
	flows map[trkKey]*syncFlow
	_     [40]byte
}

// Sync is the sync replication mode of a node. Create it with
// Replication.EnableSync.
type Sync struct {
	cfg      SyncConfig
	log      *slog.Logger
	r        *Replication
	prefixes []netip.Prefix
	seed     uint64
	has      func(FlowKey) bool // the tracker has the flow
	// coalesceHolds: a hold waits for the replicator's coalesce window
	// like any change, as it once did (the benchmark's comparison); by
	// default it ends the window at once (replicator.kick).
	coalesceHolds atomic.Bool
	shards        [syncShards]syncShard

	small, large sync.Pool // *[]byte: small for MTU-sized packets

	heldPkts  atomic.Int64
	heldBytes atomic.Int64
	m         *syncMetrics

	hold *syncHoldHook
	lg   *syncLogHook

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// EnableSync turns the sync replication mode on for r (before Start or
// while running) and starts its timeout sweeper; Close stops it. Add
// HoldHook right after the anycast filter (outside the fence) and LogHook
// right after the flow tracker.
func (r *Replication) EnableSync(cfg SyncConfig) *Sync {
	if cfg.Sync == nil {
		cfg.Sync = func(uint16) bool { return false }
	}
	if cfg.Service == nil {
		cfg.Service = func(uint16) services.TCPService { return nil }
	}
	if cfg.HoldTimeout <= 0 {
		cfg.HoldTimeout = DefaultSyncHoldTimeout
	}
	if cfg.MaxFlowPackets <= 0 {
		cfg.MaxFlowPackets = DefaultSyncMaxFlowPackets
	}
	if cfg.MaxHeldBytes <= 0 {
		cfg.MaxHeldBytes = DefaultSyncMaxHeldBytes
	}
	if cfg.MaxUnackedOutput <= 0 {
		cfg.MaxUnackedOutput = DefaultSyncMaxUnackedOutput
	}
	cfg.MaxUnackedOutput = min(cfg.MaxUnackedOutput, maxSendBatchBytes/2)
	if cfg.MTU <= 0 {
		cfg.MTU = 1500
	}
	if cfg.Logger == nil {
		cfg.Logger = r.log
	}
	s := &Sync{cfg: cfg, log: cfg.Logger, r: r, prefixes: r.cfg.Prefixes, m: newSyncMetrics(r.cfg.Self)}
	s.has = func(FlowKey) bool { return true }
	if h, ok := r.src.(interface{ Has(FlowKey) bool }); ok {
		s.has = h.Has
	}
	var seed [8]byte
	_, _ = rand.Read(seed[:])
	s.seed = binary.LittleEndian.Uint64(seed[:])
	for i := range s.shards {
		s.shards[i].flows = make(map[trkKey]*syncFlow)
	}
	mtu := cfg.MTU
	s.small.New = func() any { b := make([]byte, mtu); return &b }
	s.large.New = func() any { b := make([]byte, tun.MaxGSOPacket); return &b }
	s.hold = &syncHoldHook{s: s}
	s.lg = &syncLogHook{s: s}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.wg.Add(1)
	go func() { defer s.wg.Done(); s.sweep() }()
	r.repl.sync.Store(s)
	return s
}

// HoldHook is the outer hook ("sync-hold").
func (s *Sync) HoldHook() stack.Hook { return s.hold }

// LogHook is the inner hook ("sync-log").
func (s *Sync) LogHook() stack.Hook { return s.lg }

// Close stops the sweeper and drops every held packet (a stopping node
// emits nothing more).
func (s *Sync) Close() {
	s.cancel()
	s.wg.Wait()
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for hk, f := range sh.flows {
			s.dropQueueLocked(f, "closed")
			delete(sh.flows, hk)
		}
		sh.mu.Unlock()
	}
}

func (s *Sync) shardFor(hk *trkKey) *syncShard {
	h := s.seed
	h = trkMix(h ^ binary.LittleEndian.Uint64(hk.c[:8]))
	h = trkMix(h ^ binary.LittleEndian.Uint64(hk.c[8:]))
	h = trkMix(h ^ binary.LittleEndian.Uint64(hk.a[8:]) ^ uint64(hk.cp)<<32 ^ uint64(hk.ap)<<48)
	return &s.shards[h%syncShards]
}

// flowLocked returns k's flow, creating it.
func (sh *syncShard) flowLocked(hk *trkKey, k FlowKey) *syncFlow {
	f := sh.flows[*hk]
	if f == nil {
		f = &syncFlow{key: k}
		sh.flows[*hk] = f
	}
	return f
}

// wants reports whether st is a sync-mode flow's state (its acks matter).
func (s *Sync) wants(st *batonv1.FlowState) bool {
	return st != nil && st.Key != nil && s.cfg.Sync(uint16(st.Key.AnycastPort))
}

// ---- The log hook ----

type syncLogHook struct{ s *Sync }

func (*syncLogHook) Name() string                        { return "sync-log" }
func (*syncLogHook) Inbound(*stack.Packet) stack.Verdict { return stack.Pass }

// Outbound logs the payload of a sync flow's data packet.
func (h *syncLogHook) Outbound(p *stack.Packet) stack.Verdict {
	s := h.s
	seg, res := parseTCPSegment(p.Data, false, s.prefixes)
	if res != tcpOK || seg.payloadLen == 0 || seg.flags&(header.TCPFlagSyn|header.TCPFlagRst) != 0 || !s.cfg.Sync(seg.key.Anycast.Port()) {
		return stack.Pass
	}
	payload := seg.l4[len(seg.l4)-int(seg.payloadLen):]
	hk := trkKeyOf(seg.key)
	sh := s.shardFor(&hk)
	sh.mu.Lock()
	f := sh.flowLocked(&hk, seg.key)
	f.appendLog(seg.seq, payload, syncMaxLog)
	f.lastUsed = mono()
	sh.mu.Unlock()
	return stack.Pass
}

// appendLog adds the bytes of payload (at seq) beyond the log's end. A gap
// restarts the log at seq; a log past limit is dropped (a state needing it
// is then not sent until the client acknowledges past the gap).
func (f *syncFlow) appendLog(seq uint32, payload []byte, limit int) {
	if !f.logOK {
		f.logOK, f.logSeq, f.log = true, seq, append(f.log[:0], payload...)
		return
	}
	end := f.logSeq + uint32(len(f.log))
	switch {
	case tcpSeqAfter(seq, end) || tcpSeqAfter(f.logSeq, seq+uint32(len(payload))):
		f.logSeq, f.log = seq, append(f.log[:0], payload...)
	case tcpSeqAfter(seq+uint32(len(payload)), end):
		f.log = append(f.log, payload[end-seq:]...)
	}
	if len(f.log) > limit {
		f.logSeq += uint32(len(f.log))
		f.log = f.log[:0]
	}
}

// trimLog drops the log before seq.
func (f *syncFlow) trimLog(seq uint32) {
	if !f.logOK || !tcpSeqAfter(seq, f.logSeq) {
		return
	}
	n := seq - f.logSeq
	if int(n) >= len(f.log) {
		f.logSeq, f.log = seq, f.log[:0]
		return
	}
	f.log = f.log[:copy(f.log, f.log[n:])]
	f.logSeq = seq
}

// output returns the logged bytes [from, from+n), or false.
func (f *syncFlow) output(from uint32, n uint64) ([]byte, bool) {
	if n == 0 {
		return nil, true
	}
	if !f.logOK || tcpSeqAfter(f.logSeq, from) {
		return nil, false
	}
	off := uint64(from - f.logSeq)
	if off+n > uint64(len(f.log)) {
		return nil, false
	}
	return f.log[off : off+n], true
}

// ---- Preparing states for replication (the replicator's goroutine and
// link sessions) ----

// prepare readies a sync flow's state for replication and reports whether
// it may be sent: true for a state the service can resume from (with the
// unacknowledged output attached when the service needs it), false
// otherwise. Other states pass unchanged. st is not shared yet.
func (s *Sync) prepare(k FlowKey, st *batonv1.FlowState) bool {
	if !s.wants(st) {
		return true
	}
	hk := trkKeyOf(k)
	sh := s.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if st.Phase == batonv1.FlowPhase_FLOW_PHASE_CLOSED {
		if f := sh.flows[hk]; f != nil {
			f.lastGood = nil
		}
		return true
	}
	f := sh.flowLocked(&hk, k)
	f.lastUsed = mono()
	ok := s.resumableLocked(f, k, st)
	if ok {
		f.lastGood = st
	}
	return ok
}

func (s *Sync) resumableLocked(f *syncFlow, k FlowKey, st *batonv1.FlowState) bool {
	st.UnackedOutput = nil
	ackedAt := st.ServerIsn + 1 + uint32(st.ClientAckedBytes)
	f.trimLog(ackedAt)
	svc, _ := s.cfg.Service(k.Anycast.Port()).(services.Resumable)
	if svc == nil {
		return true // cannot resume anyway: nothing to wait for
	}
	if svc.CanResume(resumeOf(st, false, nil)) == nil {
		return true
	}
	if st.ServerSentBytes < st.ClientAckedBytes {
		return false
	}
	// Cut the state back (see cutBack) to at most MaxUnackedOutput of
	// unacknowledged output, and to no more input than output (echo).
	sent := min(st.ServerSentBytes, st.ClientAckedBytes+uint64(s.cfg.MaxUnackedOutput))
	for _, in := range []uint64{st.ServerAckedBytes, min(st.ServerAckedBytes, sent)} {
		out, ok := f.output(ackedAt, sent-st.ClientAckedBytes)
		if !ok || (in == st.ServerAckedBytes && sent == st.ServerSentBytes && len(out) == 0) {
			continue
		}
		if svc.CanResume(cutResume(st, sent, in, out)) != nil {
			continue
		}
		cutBack(st, sent, in)
		st.UnackedOutput = append([]byte(nil), out...)
		return true
	}
	return false
}

// cutResume is resumeOf(st) after cutBack(st, sent, in), with pending out.
func cutResume(st *batonv1.FlowState, sent, in uint64, out []byte) services.Resume {
	r := resumeOf(st, false, out)
	r.InputOffset = in
	return r
}

// cutBack moves a sync flow's state back to server output sent and
// client input in (at most its own positions). That is a state the flow
// went through as far as the client can tell: every packet revealing more
// (an ack beyond in, output beyond sent) is held until a state covering it
// is acknowledged, so a restore from the cut state has the client resend
// the input and the restored service resend the output it lacks.
func cutBack(st *batonv1.FlowState, sent, in uint64) {
	if sent < st.ServerSentBytes {
		st.ServerSentBytes = sent
		st.ServerNextSeq = st.ServerIsn + 1 + uint32(sent)
		st.ServerFin = false // a FIN follows every byte
	}
	if in < st.ServerAckedBytes {
		st.ServerAckedBytes = in
		st.ServerAck = st.ClientIsn + 1 + uint32(in)
	}
}

// forResync returns the state to send for a sync flow in a resync or to a
// newly placed replica: st when resumable, else the last resumable state
// prepared, else nil (send nothing).
func (s *Sync) forResync(k FlowKey, st *batonv1.FlowState) *batonv1.FlowState {
	if !s.wants(st) || st.Phase == batonv1.FlowPhase_FLOW_PHASE_CLOSED {
		return st
	}
	hk := trkKeyOf(k)
	sh := s.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flowLocked(&hk, k)
	if s.resumableLocked(f, k, st) {
		f.lastGood = st
		return st
	}
	return f.lastGood
}

// FlowFenced reports whether this node must no longer emit for k: the flow
// is being handed over, or was (SyncConfig.Fenced).
func (e *Engine) FlowFenced(k FlowKey) bool {
	f := e.lookup(k)
	if f == nil {
		return false
	}
	s := f.get()
	return s == esHold || s == esMoved
}

// attachOutput sets st.UnackedOutput (a sync flow's exact state, handed
// over in a claim) from the output log, when the log has it.
func (s *Sync) attachOutput(k FlowKey, st *batonv1.FlowState) {
	if !s.wants(st) || st.ServerSentBytes <= st.ClientAckedBytes {
		return
	}
	n := st.ServerSentBytes - st.ClientAckedBytes
	if n > MaxUnackedOutputBytes {
		return
	}
	hk := trkKeyOf(k)
	sh := s.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if f := sh.flows[hk]; f != nil {
		if out, ok := f.output(st.ServerIsn+1+uint32(st.ClientAckedBytes), n); ok {
			st.UnackedOutput = append([]byte(nil), out...)
		}
	}
}

// seedLog starts a restored sync flow's output log with the output the
// client is owed (pending, from output offset at), so that the flow can be
// replicated, and handed over again, before its service resends it.
func (s *Sync) seedLog(k FlowKey, st *batonv1.FlowState, at uint64, pending []byte) {
	if !s.wants(st) {
		return
	}
	hk := trkKeyOf(k)
	sh := s.shardFor(&hk)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	f := sh.flowLocked(&hk, k)
	f.logOK, f.logSeq = true, st.ServerIsn+1+uint32(at)
	f.log = append(f.log[:0], pending...)
	f.covered, f.closed, f.lastGood = 0, false, nil
	f.lastUsed = mono()
}
