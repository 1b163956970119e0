package handoff

// The replication link to one peer: a bounded queue the replicator fills,
// and a sender goroutine that keeps a Replicate stream open to the peer.
//
// A session (one stream) goes:
//  1. open the stream; send an empty batch with resync_begin and wait for
//     its ack (proof the peer accepted us); the peer is now up;
//  2. ask the replicator for a resync: it discards the queue, opens it for
//     this session and returns the keys of every owned flow placed on the
//     peer; send their current state (from FlowSource.Lookup) in batches,
//     the last with resync_end;
//  3. stream the queue: a batch of up to maxSendBatch events (or
//     maxSendBatchBytes) as soon as anything is queued, a heartbeat after
//     heartbeatEvery without traffic. When the queue overflowed, resync
//     again (resync_begin, flows, resync_end) on the same stream.
//
// A session ends on any stream error, on an ack missing for ackTimeout, or
// on Close; the link then waits (backoffMin doubling to backoffMax) and
// starts over.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/stats"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

const (
	// maxSendBatch and maxSendBatchBytes bound one batch this node sends
	// (the receiver accepts up to MaxBatchEvents and MaxPeerMessageBytes).
	maxSendBatch      = 256
	maxSendBatchBytes = 1 << 20
	// Unacknowledged batches allowed on a stream.
	maxInflightBatches = 64
	maxInflightBytes   = 4 << 20
	// heartbeatEvery: an empty batch after this long without sending.
	heartbeatEvery = time.Second
	// ackTimeout: a batch unacknowledged this long ends the session.
	ackTimeout = 2 * time.Second
	backoffMin = 100 * time.Millisecond
	backoffMax = 2 * time.Second
)

var (
	errAckTimeout  = errors.New("no acknowledgement within 2s")
	errNeedResync  = errors.New("queue overflowed: resync")
	errPeerEnded   = errors.New("peer ended the stream")
	errSessionDone = errors.New("session ended")
)

// qentry is one queued event.
type qentry struct {
	kind  batonv1.FlowEvent_Kind
	state *batonv1.FlowState // shared, read-only
	taken int64              // mono() when taken from the tracker; 0: not measured
}

// estSize bounds an event's encoded size: every field but the checkpoint
// and the unacknowledged output (sync mode)
// is small and bounded.
func estSize(st *batonv1.FlowState) int {
	return 384 + len(st.Checkpoint) + len(st.UnackedOutput)
}

// peerQueue is the bounded queue of events for one peer. It is open only
// while a session streams to the peer (pushes to a closed queue are
// discarded: the next session starts with a resync).
type peerQueue struct {
	max    int
	signal chan struct{} // cap 1: something was pushed

	mu     sync.Mutex
	items  []qentry
	open   bool
	gen    uint64 // bumped by shut: a late reopen of an ended session is ignored
	resync atomic.Bool
	n      atomic.Int64
}

func newPeerQueue(max int) *peerQueue {
	return &peerQueue{max: max, signal: make(chan struct{}, 1)}
}

// push appends es (up to the bound) and returns how many were dropped.
// Dropping marks the queue for a resync.
func (q *peerQueue) push(es []qentry) int {
	q.mu.Lock()
	if !q.open {
		q.mu.Unlock()
		return 0
	}
	dropped := 0
	if room := q.max - len(q.items); room < len(es) {
		room = max(room, 0)
		dropped = len(es) - room
		es = es[:room]
		q.resync.Store(true)
	}
	q.items = append(q.items, es...)
	q.n.Store(int64(len(q.items)))
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
	return dropped
}

// take returns everything queued and keeps buf (emptied) as the new queue.
func (q *peerQueue) take(buf []qentry) []qentry {
	clear(buf)
	q.mu.Lock()
	out := q.items
	q.items = buf[:0]
	q.n.Store(0)
	q.mu.Unlock()
	return out
}

// generation returns the current session generation.
func (q *peerQueue) generation() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.gen
}

// reopen empties the queue and opens it, unless gen is stale.
func (q *peerQueue) reopen(gen uint64) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if gen != q.gen {
		return false
	}
	clear(q.items)
	q.items = q.items[:0]
	q.n.Store(0)
	q.open = true
	q.resync.Store(false)
	return true
}

// shut empties and closes the queue (the session ended).
func (q *peerQueue) shut() {
	q.mu.Lock()
	defer q.mu.Unlock()
	clear(q.items)
	q.items = q.items[:0]
	q.n.Store(0)
	q.open = false
	q.gen++
	q.resync.Store(false)
}

func (q *peerQueue) len() int { return int(q.n.Load()) }

// link is the replication link to one peer, and its counters.
type link struct {
	r      *Replication
	peer   Peer
	idx    int // placer index
	conn   *grpc.ClientConn
	client batonv1.PeerClient
	q      *peerQueue
	lagObs prometheus.Observer
	window lagWindow

	eventsByKind   [5]atomic.Uint64
	bytesSent      atomic.Uint64 // gRPC messages on our connection to the peer
	bytesRecv      atomic.Uint64 // acks/responses on our connection + batches it sent us
	droppedFull    atomic.Uint64
	droppedLarge   atomic.Uint64
	rejectedByPeer atomic.Uint64
	resyncs        atomic.Uint64
	flowsSent      atomic.Int64
	lastLag        atomic.Int64

	errMu      sync.Mutex
	lastErr    string
	lastRejLog time.Time
}

func (l *link) eventsSent() uint64 {
	var n uint64
	for i := range l.eventsByKind {
		n += l.eventsByKind[i].Load()
	}
	return n
}

func (l *link) setError(err error) {
	if err == nil {
		return
	}
	l.errMu.Lock()
	l.lastErr = err.Error()
	l.errMu.Unlock()
}

func (l *link) lastError() string {
	l.errMu.Lock()
	defer l.errMu.Unlock()
	return l.lastErr
}

// run keeps sessions going until ctx ends.
func (l *link) run(ctx context.Context) {
	delay := backoffMin
	wasUp := false
	for {
		up, err := l.session(ctx)
		if ctx.Err() != nil {
			return
		}
		l.setError(err)
		if !l.r.members.Dead(l.peer.Name) && probeDead(ctx, l.peer.Addr) {
			// Nothing listens on its peer port: its process is gone
			// (lease.go: its flows may be taken over at once).
			l.r.members.markDead(l.peer.Name)
			l.r.log.Info("replication: peer is dead (connection refused)", "peer", l.peer.Name)
		}
		switch {
		case up:
			l.r.log.Warn("replication: stream to peer ended", "peer", l.peer.Name, "err", err)
		case wasUp || delay == backoffMin:
			l.r.log.Info("replication: cannot reach peer", "peer", l.peer.Name, "addr", l.peer.Addr, "err", err)
		default:
			l.r.log.Debug("replication: cannot reach peer", "peer", l.peer.Name, "err", err)
		}
		wasUp = up
		if up {
			delay = backoffMin
		}
		// Full jitter over the upper half of the delay.
		d := delay/2 + rand.N(delay/2+1)
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if !up {
			delay = min(2*delay, backoffMax)
		}
	}
}

// session runs one stream; up reports whether the peer acknowledged it.
func (l *link) session(ctx context.Context) (up bool, err error) {
	gen := l.q.generation()
	sctx, cancel := context.WithCancelCause(ctx)
	stream, err := l.client.Replicate(sctx)
	if err != nil {
		cancel(errSessionDone)
		return false, err
	}
	ss := &session{
		l:          l,
		stream:     stream,
		ctx:        sctx,
		cancel:     cancel,
		acked:      make(chan struct{}, 1),
		firstAck:   make(chan struct{}),
		readerDone: make(chan struct{}),
		hb:         time.NewTimer(heartbeatEvery),
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); ss.readAcks() }()
	go func() { defer wg.Done(); ss.watchdog() }()
	defer func() {
		cancel(errSessionDone)
		wg.Wait()
		ss.hb.Stop()
		if up {
			l.q.shut()
			l.r.members.setOutbound(l.peer.Name, false)
		}
	}()

	if err := ss.sendBatch(nil, true, false); err != nil {
		return false, err
	}
	select {
	case <-ss.firstAck:
	case <-sctx.Done():
		return false, context.Cause(sctx)
	}
	up = true
	l.r.members.setOutbound(l.peer.Name, true)
	l.r.log.Info("replication: stream to peer up", "peer", l.peer.Name)
	for first := true; ; first = false {
		if !first {
			if err := ss.sendBatch(nil, true, false); err != nil {
				return true, err
			}
		}
		if err := ss.resync(gen); err != nil {
			return true, err
		}
		if err := ss.streamQueue(); !errors.Is(err, errNeedResync) {
			return true, err
		}
	}
}

type inflightBatch struct {
	seq   uint64
	sent  int64
	bytes int
	taken []int64
	sync  []*batonv1.FlowState // sync-mode flows' states (sync.go)
}

// session is one Replicate stream.
type session struct {
	l          *link
	stream     grpc.BidiStreamingClient[batonv1.FlowBatch, batonv1.BatchAck]
	ctx        context.Context
	cancel     context.CancelCauseFunc
	seq        uint64
	hb         *time.Timer // sender goroutine only
	lastReport time.Time   // sender goroutine only: the last batch with a heard report
	acked      chan struct{}
	firstAck   chan struct{}
	readerDone chan struct{}

	mu            sync.Mutex
	inflight      []inflightBatch
	inflightBytes int
}

// fail returns the reason the stream broke after a Send error (the ack
// reader sees the status).
func (ss *session) fail(err error) error {
	if errors.Is(err, io.EOF) {
		<-ss.readerDone
	}
	if c := context.Cause(ss.ctx); c != nil {
		return c
	}
	return err
}

// sendBatch sends entries as one batch, waiting for room in the window.
func (ss *session) sendBatch(entries []qentry, begin, end bool) error {
	l := ss.l
	events := make([]*batonv1.FlowEvent, len(entries))
	var taken []int64
	var syncStates []*batonv1.FlowState
	sy := l.r.repl.sync.Load()
	size := 64
	for i, e := range entries {
		events[i] = &batonv1.FlowEvent{Kind: e.kind, State: e.state}
		size += estSize(e.state)
		if e.taken > 0 {
			taken = append(taken, e.taken)
		}
		if sy != nil && sy.wants(e.state) {
			syncStates = append(syncStates, e.state)
		}
	}
	for {
		ss.mu.Lock()
		full := len(ss.inflight) >= maxInflightBatches || (len(ss.inflight) > 0 && ss.inflightBytes+size > maxInflightBytes)
		ss.mu.Unlock()
		if !full {
			break
		}
		select {
		case <-ss.acked:
		case <-ss.ctx.Done():
			return context.Cause(ss.ctx)
		}
	}
	ss.seq++
	now := time.Now()
	b := &batonv1.FlowBatch{
		Sender:       l.r.cfg.Self,
		Seq:          ss.seq,
		Events:       events,
		ResyncBegin:  begin,
		ResyncEnd:    end,
		SentUnixNano: now.UnixNano(),
	}
	if now.Sub(ss.lastReport) >= reportEvery {
		ss.lastReport = now
		b.Heard = l.r.members.heardReports(now) // lease.go
	}
	ss.mu.Lock()
	ss.inflight = append(ss.inflight, inflightBatch{seq: ss.seq, sent: mono(), bytes: size, taken: taken, sync: syncStates})
	ss.inflightBytes += size
	// The peer coalesces acks (peer_server.go); ask for this one at once
	// when something waits for it: the session's first ack, the release
	// of sync-mode packets, or room in a filling window.
	b.AckNow = begin || len(syncStates) > 0 ||
		len(ss.inflight) >= maxInflightBatches/2 || ss.inflightBytes >= maxInflightBytes/2
	ss.mu.Unlock()
	if err := ss.stream.Send(b); err != nil {
		return ss.fail(err)
	}
	for _, e := range entries {
		if k := int(e.kind); k >= 0 && k < len(l.eventsByKind) {
			l.eventsByKind[k].Add(1)
		}
	}
	ss.hb.Reset(heartbeatEvery)
	return nil
}

// sendEntries sends entries in as many batches as needed; begin marks the
// first, end the last (an empty batch carries the flags when there is
// nothing to send).
func (ss *session) sendEntries(entries []qentry, begin, end bool) error {
	for first := true; first || len(entries) > 0; first = false {
		n, bytes := 0, 0
		for n < len(entries) && n < maxSendBatch {
			sz := estSize(entries[n].state)
			if n > 0 && bytes+sz > maxSendBatchBytes {
				break
			}
			bytes += sz
			n++
		}
		last := n == len(entries)
		if err := ss.sendBatch(entries[:n], begin && first, end && last); err != nil {
			return err
		}
		entries = entries[n:]
	}
	return nil
}

// resync sends the current state of every owned flow placed on the peer,
// ending with resync_end (resync_begin was sent by the caller).
func (ss *session) resync(gen uint64) error {
	l := ss.l
	keys, err := l.r.repl.requestResync(ss.ctx, l, gen)
	if err != nil {
		return err
	}
	l.resyncs.Add(1)
	self := l.r.cfg.Self
	entries := make([]qentry, 0, min(len(keys), maxSendBatch))
	sent := 0
	for _, k := range keys {
		st, ok := l.r.src.Lookup(k)
		if !ok || st.Owner != self {
			continue // closed or moved since: its change is queued
		}
		if sy := l.r.repl.sync.Load(); sy != nil {
			if st = sy.forResync(k, st); st == nil {
				continue // nothing resumable yet: its next change opens it
			}
		}
		if estSize(st) > maxSendBatchBytes {
			l.droppedLarge.Add(1)
			continue
		}
		entries = append(entries, qentry{kind: batonv1.FlowEvent_KIND_OPEN, state: st})
		if len(entries) == maxSendBatch {
			if err := ss.sendEntries(entries, false, false); err != nil {
				return err
			}
			sent += len(entries)
			clear(entries)
			entries = entries[:0]
		}
	}
	sent += len(entries)
	if err := ss.sendEntries(entries, false, true); err != nil {
		return err
	}
	l.r.log.Debug("replication: resync sent", "peer", l.peer.Name, "flows", sent)
	return nil
}

// streamQueue sends queued events until the session ends or the queue
// overflowed (errNeedResync).
func (ss *session) streamQueue() error {
	l := ss.l
	var (
		local []qentry
		pos   int
		batch = make([]qentry, 0, maxSendBatch)
	)
	for {
		if l.q.resync.Load() {
			return errNeedResync
		}
		if pos >= len(local) {
			local, pos = l.q.take(local), 0
			if len(local) == 0 {
				select {
				case <-l.q.signal:
				case <-ss.hb.C:
					if err := ss.sendBatch(nil, false, false); err != nil {
						return err
					}
				case <-ss.ctx.Done():
					return context.Cause(ss.ctx)
				}
				continue
			}
		}
		batch = batch[:0]
		bytes := 0
		for pos < len(local) && len(batch) < maxSendBatch {
			e := local[pos]
			sz := estSize(e.state)
			if sz > maxSendBatchBytes {
				l.droppedLarge.Add(1)
				pos++
				continue
			}
			if len(batch) > 0 && bytes+sz > maxSendBatchBytes {
				break
			}
			batch = append(batch, e)
			bytes += sz
			pos++
		}
		if len(batch) > 0 {
			if err := ss.sendBatch(batch, false, false); err != nil {
				return err
			}
		}
	}
}

// readAcks matches acks to batches, measures lag and records rejections.
// An ack is cumulative: it covers every in-flight batch up to its seq, and
// its rejections are those of that newest batch (the peer acks at once a
// batch with a rejection, peer_server.go).
func (ss *session) readAcks() {
	defer close(ss.readerDone)
	l := ss.l
	gotFirst := false
	var (
		lags    []time.Duration
		covered []inflightBatch
	)
	for {
		ack, err := ss.stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errPeerEnded
			}
			ss.cancel(err)
			return
		}
		now, wall := mono(), time.Now()
		ss.mu.Lock()
		var n int
		if len(ss.inflight) > 0 && ack.Seq >= ss.inflight[0].seq {
			n = int(min(ack.Seq-ss.inflight[0].seq, uint64(len(ss.inflight)))) + 1
		}
		if n == 0 || n > len(ss.inflight) || ss.inflight[n-1].seq != ack.Seq {
			want := uint64(0)
			if len(ss.inflight) > 0 {
				want = ss.inflight[0].seq
			}
			ss.mu.Unlock()
			ss.cancel(fmt.Errorf("protocol: ack for batch %d, expected %d or a later batch in flight", ack.Seq, want))
			return
		}
		covered = append(covered[:0], ss.inflight[:n]...)
		for i := range n {
			ss.inflightBytes -= ss.inflight[i].bytes
			ss.inflight[i] = inflightBatch{}
		}
		ss.inflight = ss.inflight[n:]
		ss.mu.Unlock()
		select {
		case ss.acked <- struct{}{}:
		default:
		}
		l.r.members.seen(l.peer.Name, wall)
		// The newest covered batch's send time, never a later one.
		l.r.members.supported(l.peer.Name, monoBase.Add(time.Duration(covered[n-1].sent-1))) // lease.go
		sy := l.r.repl.sync.Load()
		for i := range covered {
			f := &covered[i]
			rejected := uint32(0)
			if i == n-1 {
				rejected = ack.Rejected
			}
			if len(f.sync) > 0 && rejected == 0 && sy != nil {
				sy.acked(l.idx, f.sync) // releases held packets
			}
			if len(f.taken) > 0 {
				lags = lags[:0]
				var worst time.Duration
				for _, t := range f.taken {
					d := time.Duration(now - t)
					lags = append(lags, d)
					worst = max(worst, d)
					l.lagObs.Observe(d.Seconds())
				}
				l.window.observe(wall, lags)
				l.lastLag.Store(int64(worst))
			}
		}
		clear(covered)
		if ack.Rejected > 0 {
			l.rejectedByPeer.Add(uint64(ack.Rejected))
			l.setError(fmt.Errorf("peer rejected %d events: %s", ack.Rejected, ack.FirstReject))
			l.errMu.Lock()
			logIt := wall.Sub(l.lastRejLog) >= rejectLogEvery
			if logIt {
				l.lastRejLog = wall
			}
			l.errMu.Unlock()
			if logIt {
				l.r.log.Warn("replication: peer rejected events", "peer", l.peer.Name,
					"rejected", ack.Rejected, "first_reason", ack.FirstReject)
			}
		}
		if !gotFirst {
			gotFirst = true
			close(ss.firstAck)
		}
	}
}

// watchdog ends the session when the oldest batch waits too long for its
// ack (a hung peer or a dead path gRPC has not noticed yet).
func (ss *session) watchdog() {
	t := time.NewTicker(ackTimeout / 8)
	defer t.Stop()
	for {
		select {
		case <-ss.ctx.Done():
			return
		case <-t.C:
			ss.mu.Lock()
			stale := len(ss.inflight) > 0 && time.Duration(mono()-ss.inflight[0].sent) > ackTimeout
			ss.mu.Unlock()
			if stale {
				ss.cancel(errAckTimeout)
				return
			}
		}
	}
}

// byteCounter counts the gRPC payload bytes of a link's connection.
type byteCounter struct{ l *link }

func (h byteCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (h byteCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (h byteCounter) HandleConn(context.Context, stats.ConnStats) {}
func (h byteCounter) HandleRPC(_ context.Context, s stats.RPCStats) {
	switch p := s.(type) {
	case *stats.OutPayload:
		h.l.bytesSent.Add(uint64(p.WireLength))
	case *stats.InPayload:
		h.l.bytesRecv.Add(uint64(p.WireLength))
	}
}
