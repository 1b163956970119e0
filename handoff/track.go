package handoff

// This file is the flow tracker: a stack.Hook that watches every TCP packet
// to and from the anycast prefixes and keeps, per connection, what a
// takeover needs that a mid-flow packet does not show (ISNs, the client's SYN
// options, the negotiated window scales, SACK and timestamps) plus the live
// positions (highest sequence the server sent, highest acks each way, the
// latest timestamps). track_source.go hands the changes to replication.
//
// The packet path. Every packet is parsed without allocating (tcpparse.go);
// packets of tracked flows then take one shard lock (64 shards by a seeded
// hash of the 4-tuple), update the flow's fields in place and, the first
// time a flow changes after TakeChanges, append it to its shard's dirty list
// and signal Changes. Nothing allocates for an existing flow; the shard lock
// is held for a map lookup and a few comparisons. While Run runs, packets
// are stamped with a clock it refreshes every 10 ms instead of reading the
// clock each time. The tracker only observes: it returns stack.Pass for
// every packet.
//
// Known limits: data segments (no SYN/FIN/RST) are not checksum-verified, so
// a corrupted one can move client_ack (never past server_next_seq) or a
// TSval. Flows the stack restores from another node are handshaken below
// the hook chain (injected), so the takeover registers them with Restore;
// from then on the tracker sees their packets in the client's sequence
// space like any other flow's (it is outside the translating hook).
//
// Positions. Besides the raw 32-bit sequence numbers, the tracker keeps
// three unwrapped 64-bit byte counts (server payload bytes sent, of those
// acknowledged by the client, client payload bytes acknowledged by the
// server): each advances by the sequence-number delta of a newer value and
// never goes backwards; SYN and FIN are not counted. A takeover restores a
// connection from them (services.Resume's offsets).
//
// What the tracker believes. Outbound packets come from the local gVisor
// stack and are trusted. Inbound packets are what a client (or anyone) sent
// and the stack may still drop them, so:
//
//   - a client ack counts only if it acknowledges data the server has sent
//     (at most server_next_seq), as the stack itself requires;
//   - a client RST closes a flow only if its sequence number is inside the
//     window the server advertised (blind resets do not untrack flows);
//   - inbound SYN, FIN and RST segments are checksum-verified first (packets
//     forwarded into a TUN are not verified by the kernel; the stack drops a
//     corrupted one, and the tracker must not open or close flows on it).
//
// Phases: HANDSHAKE (client SYN seen) -> ESTABLISHED (the client acked the
// SYN-ACK) -> CLOSING (a FIN either way) -> CLOSED (both FINs acked, RST, idle
// timeout, or a new connection on the same 4-tuple), after which the flow is
// removed from the table at once. Flows still in HANDSHAKE are never
// reported: a SYN flood must not reach replication, and at most
// MaxHandshaking of them are in the table (track_bound.go): a flood of
// half-open connections cannot take the room of established flows.

import (
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
)

// Tracker defaults.
const (
	DefaultMaxFlows         = 65536
	DefaultIdleTimeout      = 5 * time.Minute
	DefaultHandshakeTimeout = time.Minute
)

// trackerShards is the number of independently locked parts of the table.
const trackerShards = 64

// trkClockTick is the resolution of the clock packets are stamped with while
// Run runs. Reading the clock for every packet was a third of the
// per-packet cost (time.Now reads two clocks; ~50 ns on a VM); flow
// timestamps and idle detection do not need better than 10 ms.
const trkClockTick = 10 * time.Millisecond

// TrackerConfig configures a Tracker.
type TrackerConfig struct {
	// Node is this node's name, the owner of every tracked flow.
	Node string
	// Prefixes are the anycast prefixes: a packet is tracked when its
	// anycast side (destination inbound, source outbound) is inside one.
	Prefixes []netip.Prefix
	// MaxFlows bounds the table; a flow beyond it is served by the stack but
	// not tracked (Stats().Untracked). 0 means DefaultMaxFlows.
	MaxFlows int
	// MaxHandshaking bounds the flows in the table that are still in the
	// handshake (client SYN seen, not yet acked), within MaxFlows. When it
	// is reached, a new client SYN evicts the oldest of them (see
	// track_bound.go). 0 means DefaultMaxHandshaking(MaxFlows); it is
	// capped at MaxFlows.
	MaxHandshaking int
	// IdleTimeout removes flows that saw no packet for this long (in Sweep).
	// 0 means DefaultIdleTimeout.
	IdleTimeout time.Duration
	// HandshakeTimeout removes flows still in the handshake after this long
	// without a packet, so a SYN flood does not hold table slots for a
	// whole IdleTimeout. 0 means DefaultHandshakeTimeout; it is capped at
	// IdleTimeout.
	HandshakeTimeout time.Duration
	// ServiceFor names the service on an anycast TCP port (for snapshots);
	// nil means no names.
	ServiceFor func(port uint16) string
	// Now is the clock (default time.Now); tests inject their own.
	Now func() time.Time
	// Logger receives the tracker's logs; nil means slog.Default().
	Logger *slog.Logger
	// IgnoreClient, if set, leaves out flows from these client addresses:
	// the node's own health probes connect from its own address, and
	// such a flow must be neither replicated nor taken over elsewhere.
	IgnoreClient func(netip.Addr) bool
}

// ClosedStats count removed flows by reason. Every flow that entered the
// table leaves it through exactly one of them, including flows that never
// completed the handshake.
type ClosedStats struct {
	FIN      uint64 // both FINs sent and acked
	RST      uint64 // RST either way
	Idle     uint64 // no packet for IdleTimeout (HandshakeTimeout in the handshake), or evicted from the handshake (HandshakeStats)
	Replaced uint64 // the stack accepted a new connection on the same 4-tuple
	Moved    uint64 // another node took the flow over (Remove)
}

// Total is the sum of every reason.
func (c ClosedStats) Total() uint64 { return c.FIN + c.RST + c.Idle + c.Replaced + c.Moved }

// CheckpointRejectStats count checkpoints SetCheckpoint refused, by reason.
type CheckpointRejectStats struct {
	TooLarge    uint64 // more than MaxCheckpointBytes
	UnknownFlow uint64 // no tracked flow past the SYN-ACK for the key
}

// Total is the sum of every reason.
func (c CheckpointRejectStats) Total() uint64 { return c.TooLarge + c.UnknownFlow }

// TrackerStats are the tracker's counters.
type TrackerStats struct {
	Tracked int    // flows in the table now (any phase)
	Created uint64 // flows that entered the table (client SYN)
	Opened  uint64 // flows that completed the handshake
	// Restored counts flows registered by Restore (taken over from
	// another node).
	Restored uint64
	Closed   ClosedStats
	// Untracked counts new flows refused because the table was full: the
	// stack serves them, but they are not replicated. Flows left out by
	// the handshake bound are counted in HandshakeStats instead.
	Untracked uint64
	// Malformed counts TCP packets to or from an anycast address that could
	// not be parsed; BadChecksum inbound SYN/FIN/RST segments with a wrong
	// checksum; Fragments IP fragments of TCP (not tracked).
	Malformed   uint64
	BadChecksum uint64
	Fragments   uint64
	// Ignored counts packets of flows from IgnoreClient addresses.
	Ignored uint64
	// IgnoredSYN counts client SYNs with a new ISN for a 4-tuple whose flow
	// is past the handshake.
	IgnoredSYN         uint64
	CheckpointRejected CheckpointRejectStats
}

// trkState is everything a snapshot shows. It is copied out under the
// shard lock and converted to protobuf outside it.
type trkState struct {
	key   FlowKey
	phase batonv1.FlowPhase
	epoch uint64

	clientISN, serverISN uint32
	// SYN options each side offered; ws is -1 when not offered.
	clientMSS, serverMSS   uint16
	clientWS, serverWS     int8
	clientSACK, serverSACK bool
	clientTS, serverTS     bool

	clientTSval, serverTSval uint32
	serverNext               uint32
	clientAck, serverAck     uint32
	clientFin, serverFin     bool

	// Unwrapped positions (see the file comment): sent counts server
	// payload bytes, cliAcked the client's acks of them (reported capped
	// at sent: the ack of the FIN is not a byte), srvAcked the server's
	// acks of client payload (capped at the client's FIN).
	sent, cliAcked, srvAcked trkPos

	// checkpoint is never modified after SetCheckpoint stored it (a new
	// checkpoint replaces the slice), so snapshots share it.
	checkpoint       []byte
	checkpointSeq    uint32
	checkpointOffset uint64

	// history is the ownership history, newest last (at most
	// trkMaxHistory); like checkpoint it is replaced, never modified.
	history []*batonv1.OwnershipChange

	opened, updated int64 // unix nanoseconds
}

// trkMaxHistory bounds a flow's ownership history.
const trkMaxHistory = 16

// trkPos is a 64-bit byte position unwrapped from 32-bit sequence numbers:
// pos is the byte count at sequence number at.
type trkPos struct {
	pos uint64
	at  uint32
}

// advance moves the position to sequence number v if v is after it.
func (p *trkPos) advance(v uint32) bool {
	if !tcpSeqAfter(v, p.at) {
		return false
	}
	p.pos += uint64(v - p.at)
	p.at = v
	return true
}

// trkPosAt is position pos of a byte stream whose byte 0 has sequence
// number first.
func trkPosAt(first uint32, pos uint64) trkPos {
	return trkPos{pos: pos, at: first + uint32(pos)}
}

// Change bits: what changed since the flow was last taken.
const (
	trkChgState      uint8 = 1 << iota // phase, positions, timestamps, epoch
	trkChgCheckpoint                   // only the checkpoint
)

// trkFlow is one tracked connection. Every field is guarded by its shard's
// lock.
type trkFlow struct {
	st trkState
	hk trkKey

	haveSynAck   bool
	clientFinSeq uint32 // sequence number of the client's FIN
	serverFinSeq uint32 // sequence number of the server's FIN
	serverWnd    uint32 // the server's last advertised window, scaled
	lastSeen     int64

	// A client SYN with a new ISN seen while the flow is past the
	// handshake: if the stack answers it with a SYN-ACK, the old
	// connection is gone and this one replaces it.
	pendSyn  bool
	pendISN  uint32
	pendOpts header.TCPSynOptions
	pendSeen int64

	dirty    bool  // in its shard's dirty list
	reported bool  // KIND_OPEN was taken
	closed   bool  // removed from the table
	changed  uint8 // chg* bits since the last take

	// hs is the flow's place in the handshake list while it holds one of
	// the MaxHandshaking slots (track_bound.go), nil otherwise.
	hs *trkHSNode
}

// trkKey is the table's key: a FlowKey flattened to plain bytes, which the
// map hashes and compares as one block of memory (a FlowKey's netip.Addr
// fields are hashed field by field, with a pointer each).
type trkKey struct {
	c, a   [16]byte
	cp, ap uint16
	v6     bool
}

func trkKeyOf(k FlowKey) trkKey {
	return trkKey{
		c: k.Client.Addr().As16(), a: k.Anycast.Addr().As16(),
		cp: k.Client.Port(), ap: k.Anycast.Port(),
		v6: k.Anycast.Addr().Is6(),
	}
}

type trkShard struct {
	mu    sync.Mutex
	flows map[trkKey]*trkFlow
	dirty []*trkFlow
	_     [64]byte // keep neighbouring shard locks on separate cache lines
}

// Tracker tracks the TCP flows the local stack terminates. It implements
// stack.Hook and FlowSource. Create it with NewTracker.
type Tracker struct {
	cfg       TrackerConfig
	log       *slog.Logger
	prefixes  []netip.Prefix
	idle      int64 // nanoseconds
	handshake int64
	seed      uint64
	shards    [trackerShards]trkShard
	count     atomic.Int64
	changes   chan struct{}
	// The handshake bound (track_bound.go): the flows in the handshake,
	// oldest first, guarded by hsMu; hsLen mirrors their number for a
	// lock-free look.
	maxHS          int64
	hsMu           sync.Mutex
	hsHead, hsTail *trkHSNode
	hsLen          atomic.Int64
	hsEvicted      atomic.Uint64
	hsUntracked    atomic.Uint64
	// coarse is the clock (unix ns) Run refreshes every trkClockTick;
	// ticking counts the running Runs (0: packets read cfg.Now).
	coarse  atomic.Int64
	ticking atomic.Int32

	created, opened                  atomic.Uint64
	closedFIN, closedRST, closedIdle atomic.Uint64
	closedReplaced, closedMoved      atomic.Uint64
	untracked, malformed             atomic.Uint64
	badChecksum, fragments, ignored  atomic.Uint64
	ignoredSYN, restored             atomic.Uint64
	ckptTooLarge, ckptUnknown        atomic.Uint64
}

var (
	_ stack.Hook = (*Tracker)(nil)
	_ FlowSource = (*Tracker)(nil)
)

// NewTracker returns a tracker for cfg (see TrackerConfig for defaults).
func NewTracker(cfg TrackerConfig) *Tracker {
	if cfg.MaxFlows <= 0 {
		cfg.MaxFlows = DefaultMaxFlows
	}
	if cfg.MaxHandshaking <= 0 {
		cfg.MaxHandshaking = DefaultMaxHandshaking(cfg.MaxFlows)
	}
	cfg.MaxHandshaking = min(cfg.MaxHandshaking, cfg.MaxFlows)
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	cfg.HandshakeTimeout = min(cfg.HandshakeTimeout, cfg.IdleTimeout)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	t := &Tracker{
		cfg:       cfg,
		log:       cfg.Logger,
		idle:      int64(cfg.IdleTimeout),
		handshake: int64(cfg.HandshakeTimeout),
		changes:   make(chan struct{}, 1),
		maxHS:     int64(cfg.MaxHandshaking),
	}
	for _, p := range cfg.Prefixes {
		t.prefixes = append(t.prefixes, p.Masked())
	}
	var seed [8]byte
	_, _ = rand.Read(seed[:])
	t.seed = binary.LittleEndian.Uint64(seed[:])
	for i := range t.shards {
		t.shards[i].flows = make(map[trkKey]*trkFlow)
	}
	return t
}

// Name implements stack.Hook.Name.
func (*Tracker) Name() string { return "flow-tracker" }

// Inbound implements stack.Hook.Inbound. It only observes.
func (t *Tracker) Inbound(p *stack.Packet) stack.Verdict {
	t.observe(p.Data, true)
	return stack.Pass
}

// Outbound implements stack.Hook.Outbound. It only observes.
func (t *Tracker) Outbound(p *stack.Packet) stack.Verdict {
	t.observe(p.Data, false)
	return stack.Pass
}

// Len returns the number of flows in the table (any phase).
func (t *Tracker) Len() int { return int(t.count.Load()) }

func (t *Tracker) now() int64 { return t.cfg.Now().UnixNano() }

// packetNow is the time a packet is stamped with: the coarse clock while Run
// keeps it, cfg.Now otherwise.
func (t *Tracker) packetNow() int64 {
	if t.ticking.Load() > 0 {
		return t.coarse.Load()
	}
	return t.now()
}

// shardFor picks the shard of k by a seeded hash of the 4-tuple (seeded so
// that clients cannot aim every flow at one lock).
func (t *Tracker) shardFor(k *trkKey) *trkShard {
	h := t.seed
	h = trkMix(h ^ binary.LittleEndian.Uint64(k.c[:8]))
	h = trkMix(h ^ binary.LittleEndian.Uint64(k.c[8:]))
	h = trkMix(h ^ binary.LittleEndian.Uint64(k.a[8:]) ^ uint64(k.cp)<<32 ^ uint64(k.ap)<<48)
	return &t.shards[h%trackerShards]
}

func trkMix(h uint64) uint64 {
	h *= 0x9e3779b97f4a7c15
	return h ^ h>>29
}

func (t *Tracker) observe(data []byte, inbound bool) {
	seg, res := parseTCPSegment(data, inbound, t.prefixes)
	switch res {
	case tcpOK:
	case tcpMalformed:
		t.malformed.Add(1)
		return
	case tcpFragment:
		t.fragments.Add(1)
		return
	default:
		return
	}
	if inbound && seg.flags&(header.TCPFlagSyn|header.TCPFlagFin|header.TCPFlagRst) != 0 && !tcpChecksumValid(&seg) {
		t.badChecksum.Add(1)
		return
	}
	if t.cfg.IgnoreClient != nil && t.cfg.IgnoreClient(seg.key.Client.Addr()) {
		t.ignored.Add(1)
		return
	}
	now := t.packetNow()
	hk := trkKeyOf(seg.key)
	sh := t.shardFor(&hk)
	if inbound && trkClientSYN(&seg) && t.hsLen.Load() >= t.maxHS {
		t.makeHandshakeRoom(sh, &hk, seg.key.Client.Addr(), now)
	}
	sh.mu.Lock()
	if inbound {
		t.inboundLocked(sh, &hk, &seg, now)
	} else {
		t.outboundLocked(sh, &hk, &seg, now)
	}
	sh.mu.Unlock()
}

// inboundLocked applies a client -> anycast segment.
func (t *Tracker) inboundLocked(sh *trkShard, hk *trkKey, seg *tcpSegment, now int64) {
	f := sh.flows[*hk]
	if trkClientSYN(seg) {
		t.clientSYNLocked(sh, hk, f, seg, now)
		return
	}
	if f == nil {
		return
	}
	f.lastSeen = now
	if seg.flags&header.TCPFlagRst != 0 {
		if trkRSTAcceptable(f, seg) {
			t.removeLocked(sh, f, &t.closedRST, now)
		}
		return
	}
	// A SYN-ACK from the client (simultaneous open) is not served; every
	// segment after the SYN carries an ACK.
	if seg.flags&header.TCPFlagSyn != 0 || seg.flags&header.TCPFlagAck == 0 {
		return
	}
	st := &f.st
	changed := false
	if st.phase == batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE {
		// The handshake completes when the client acks the SYN-ACK
		// (ack == server_isn+1; a later ack if that ACK was lost).
		if !f.haveSynAck || !tcpSeqInRange(seg.ack, st.serverISN, st.serverNext) {
			return
		}
		st.phase = batonv1.FlowPhase_FLOW_PHASE_ESTABLISHED
		st.opened = now
		st.clientAck = seg.ack
		st.cliAcked.advance(seg.ack)
		st.history = []*batonv1.OwnershipChange{{Node: t.cfg.Node, Epoch: st.epoch, How: HowOpen, UnixNano: now}}
		f.pendSyn = false
		t.leaveHandshakeLocked(f)
		t.opened.Add(1)
		changed = true
	}
	if tcpSeqInRange(seg.ack, st.clientAck, st.serverNext) {
		st.clientAck = seg.ack
		st.cliAcked.advance(seg.ack)
		changed = true
	}
	if ts, ok := tcpTSval(seg.opts); ok && tcpSeqAfter(ts, st.clientTSval) {
		st.clientTSval = ts
		changed = true
	}
	if seg.flags&header.TCPFlagFin != 0 && !st.clientFin {
		st.clientFin = true
		f.clientFinSeq = seg.seq + seg.payloadLen
		st.phase = batonv1.FlowPhase_FLOW_PHASE_CLOSING
		changed = true
	}
	t.afterUpdateLocked(sh, f, changed, now)
}

// clientSYNLocked handles a client SYN (no ACK, no RST) for the flow f
// (nil when the 4-tuple is not tracked).
func (t *Tracker) clientSYNLocked(sh *trkShard, hk *trkKey, f *trkFlow, seg *tcpSegment, now int64) {
	if f != nil {
		f.lastSeen = now
		switch {
		case seg.seq == f.st.clientISN:
			return // retransmission: state stays
		case f.st.phase == batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE && !f.haveSynAck:
			// The client restarted its connection attempt before the
			// stack answered: nothing was reported, start over.
			trkInitSYN(f, seg, now)
			return
		default:
			// A new connection attempt on a 4-tuple we believe is in
			// use. Ignored, but remembered: if the stack answers it
			// with a SYN-ACK, the old connection is gone.
			t.ignoredSYN.Add(1)
			f.pendSyn = true
			f.pendISN = seg.seq
			f.pendOpts = header.ParseSynOptions(seg.opts, false)
			f.pendSeen = now
			return
		}
	}
	if ca := seg.key.Client.Addr(); ca.IsUnspecified() || ca.IsMulticast() {
		t.malformed.Add(1) // not a client address; checked here, not per packet
		return
	}
	if t.count.Add(1) > int64(t.cfg.MaxFlows) {
		t.count.Add(-1)
		t.untracked.Add(1)
		return
	}
	f = &trkFlow{hk: *hk}
	if !t.enterHandshakeLocked(f) {
		t.count.Add(-1)
		t.hsUntracked.Add(1)
		return
	}
	f.st.key = seg.key
	f.st.epoch = 1
	trkInitSYN(f, seg, now)
	sh.flows[*hk] = f
	t.created.Add(1)
}

// trkInitSYN (re)starts f's handshake from a client SYN.
func trkInitSYN(f *trkFlow, seg *tcpSegment, now int64) {
	trkSetSYN(f, seg.seq, header.ParseSynOptions(seg.opts, false), now)
}

// trkSetSYN resets f to the handshake. Only flows in the handshake are reset,
// and those are never dirty or reported; f keeps its handshake slot.
func trkSetSYN(f *trkFlow, isn uint32, o header.TCPSynOptions, now int64) {
	key, hk, epoch, hs := f.st.key, f.hk, f.st.epoch, f.hs
	*f = trkFlow{hk: hk, hs: hs}
	f.st = trkState{
		key:         key,
		epoch:       epoch,
		phase:       batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE,
		clientISN:   isn,
		clientMSS:   trkClampMSS(o.MSS),
		clientWS:    int8(o.WS),
		clientSACK:  o.SACKPermitted,
		clientTS:    o.TS,
		clientTSval: o.TSVal,
		serverWS:    -1,
		updated:     now,
	}
	f.lastSeen = now
}

// trkClampMSS keeps an MSS inside what ValidateState accepts. ParseSynOptions
// already returns the MSS the stack applies (536 when the SYN had none, a
// floor of 48); a peer would reject a state outside [MinMSS, MaxMSS], and
// sending smaller segments than a client allows is always safe.
func trkClampMSS(mss uint16) uint16 {
	return uint16(min(max(uint32(mss), MinMSS), MaxMSS))
}

// outboundLocked applies an anycast -> client segment (from the stack).
func (t *Tracker) outboundLocked(sh *trkShard, hk *trkKey, seg *tcpSegment, now int64) {
	f := sh.flows[*hk]
	if f == nil {
		return
	}
	if seg.has(header.TCPFlagSyn | header.TCPFlagAck) {
		t.serverSYNACKLocked(sh, f, seg, now)
		return
	}
	f.lastSeen = now
	if seg.flags&header.TCPFlagRst != 0 {
		t.removeLocked(sh, f, &t.closedRST, now)
		return
	}
	st := &f.st
	// The stack does not open connections, and sends nothing but the
	// SYN-ACK (and RST, challenge ACKs) before the handshake completes.
	if seg.flags&header.TCPFlagSyn != 0 || st.phase == batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE {
		return
	}
	changed := false
	if end := seg.seq + seg.seqLen(); tcpSeqAfter(end, st.serverNext) {
		st.serverNext = end
		changed = true
	}
	if seg.payloadLen > 0 && st.sent.advance(seg.seq+seg.payloadLen) {
		changed = true
	}
	if seg.flags&header.TCPFlagAck != 0 && tcpSeqAfter(seg.ack, st.serverAck) {
		st.serverAck = seg.ack
		v := seg.ack
		if st.clientFin && tcpSeqAfter(v, f.clientFinSeq) {
			v = f.clientFinSeq // the ack of the FIN is not a byte
		}
		st.srvAcked.advance(v)
		changed = true
	}
	f.serverWnd = uint32(seg.window) << max(trkScale(st.serverWS, st.clientWS), 0)
	if ts, ok := tcpTSval(seg.opts); ok && tcpSeqAfter(ts, st.serverTSval) {
		st.serverTSval = ts
		changed = true
	}
	if seg.flags&header.TCPFlagFin != 0 && !st.serverFin {
		st.serverFin = true
		f.serverFinSeq = seg.seq + seg.payloadLen
		st.phase = batonv1.FlowPhase_FLOW_PHASE_CLOSING
		changed = true
	}
	t.afterUpdateLocked(sh, f, changed, now)
}

// serverSYNACKLocked handles the stack's SYN-ACK for f.
func (t *Tracker) serverSYNACKLocked(sh *trkShard, f *trkFlow, seg *tcpSegment, now int64) {
	f.lastSeen = now
	st := &f.st
	if f.pendSyn && seg.ack == f.pendISN+1 && seg.ack != st.clientISN+1 {
		// The stack answered the client's new connection attempt: the
		// old connection on this 4-tuple is gone from the stack.
		isn, opts, seen := f.pendISN, f.pendOpts, f.pendSeen
		if st.phase != batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE {
			// The new flow takes the old one's slot (count unchanged)
			// if it gets a handshake slot; it is untracked otherwise.
			nf := &trkFlow{hk: f.hk}
			if !t.enterHandshakeLocked(nf) {
				t.removeLocked(sh, f, &t.closedReplaced, now)
				t.hsUntracked.Add(1)
				return
			}
			t.closeLocked(sh, f, &t.closedReplaced, now)
			f = nf
			f.st.key, f.st.epoch = seg.key, 1
			sh.flows[f.hk] = f
			t.created.Add(1)
		}
		trkSetSYN(f, isn, opts, seen)
		f.lastSeen = now
		st = &f.st
	}
	if st.phase != batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE || seg.ack != st.clientISN+1 {
		return // a retransmitted SYN-ACK, a challenge, or one for an older SYN
	}
	if f.haveSynAck && seg.seq == st.serverISN {
		return // retransmission
	}
	// The first SYN-ACK, or one with a new ISN (with SYN cookies a
	// retransmitted SYN can get a freshly computed one): the latest wins.
	o := header.ParseSynOptions(seg.opts, true)
	f.haveSynAck = true
	st.serverISN = seg.seq
	st.serverMSS = trkClampMSS(o.MSS)
	st.serverWS = int8(o.WS)
	st.serverSACK = o.SACKPermitted
	st.serverTS = o.TS
	st.serverTSval = o.TSVal
	st.serverNext = seg.seq + 1
	st.serverAck = seg.ack
	st.clientAck = seg.seq
	st.sent = trkPosAt(seg.seq+1, 0)
	st.cliAcked = trkPosAt(seg.seq+1, 0)
	st.srvAcked = trkPosAt(st.clientISN+1, 0)
	f.serverWnd = uint32(seg.window) // never scaled in a SYN-ACK
	st.updated = max(st.updated, now)
}

// trkScale returns own when both sides offered window scaling, -1
// otherwise.
func trkScale(own, other int8) int8 {
	if own < 0 || other < 0 {
		return -1
	}
	return own
}

// trkRSTAcceptable reports whether a client RST falls inside the window the
// server advertised (RFC 793; gVisor is stricter and challenges in-window
// resets that are not exact, to which a genuine client answers with an
// exact one).
func trkRSTAcceptable(f *trkFlow, seg *tcpSegment) bool {
	if !f.haveSynAck {
		return true
	}
	wnd := max(f.serverWnd, 1)
	return seg.seq-f.st.serverAck < wnd
}

// afterUpdateLocked records a change and removes the flow once both FINs
// were sent and acked.
func (t *Tracker) afterUpdateLocked(sh *trkShard, f *trkFlow, changed bool, now int64) {
	if changed {
		f.st.updated = max(f.st.updated, now)
		t.touchLocked(sh, f, trkChgState)
	}
	st := &f.st
	if st.clientFin && st.serverFin &&
		tcpSeqAtLeast(st.serverAck, f.clientFinSeq+1) && tcpSeqAtLeast(st.clientAck, f.serverFinSeq+1) {
		t.removeLocked(sh, f, &t.closedFIN, now)
	}
}

// touchLocked marks f changed. Flows in the handshake are never reported.
func (t *Tracker) touchLocked(sh *trkShard, f *trkFlow, bits uint8) {
	if f.st.phase == batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE {
		return
	}
	f.changed |= bits
	if f.dirty {
		return
	}
	f.dirty = true
	sh.dirty = append(sh.dirty, f)
	select {
	case t.changes <- struct{}{}:
	default:
	}
}

// removeLocked closes f and takes it out of the table; reason is the
// counter to increment. A flow whose open was reported stays in the dirty
// list until TakeChanges reports its close.
func (t *Tracker) removeLocked(sh *trkShard, f *trkFlow, reason *atomic.Uint64, now int64) {
	if sh.flows[f.hk] == f {
		delete(sh.flows, f.hk)
		t.count.Add(-1)
	}
	t.closeLocked(sh, f, reason, now)
}

// closeLocked marks f closed (the caller takes it out of the table or
// replaces it) and reports the close if its open was reported.
func (t *Tracker) closeLocked(sh *trkShard, f *trkFlow, reason *atomic.Uint64, now int64) {
	t.leaveHandshakeLocked(f)
	f.closed = true
	f.st.phase = batonv1.FlowPhase_FLOW_PHASE_CLOSED
	f.st.updated = max(f.st.updated, now)
	reason.Add(1)
	if f.reported {
		t.touchLocked(sh, f, trkChgState)
	}
}
