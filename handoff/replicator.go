package handoff

// The replicator: one goroutine that takes flow changes from the tracker,
// places each flow on its replicas (rendezvous over the live members) and
// queues an event for every target peer. It never blocks the tracker (it
// only calls TakeChanges and Lookup) and never blocks on a peer (queues are
// bounded; overflow is counted and repaired by a resync).
//
// It keeps, for every owned flow it has seen, the set of peers it placed
// the flow on. That set is the authority for membership changes (a flow
// moves from the peers that are no longer its replicas to the new ones)
// and for resyncs (a peer gets exactly the flows placed on it).

import (
	"context"
	"math/bits"
	"sync/atomic"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

type placedFlow struct {
	set   peerSet
	epoch uint64
}

type placementView struct {
	live []string
	mask peerSet
}

type resyncRequest struct {
	l     *link
	gen   uint64
	reply chan []FlowKey // cap 1
}

type replicator struct {
	r      *Replication
	src    FlowSource
	placer *placer
	self   int
	k      int
	links  []*link // by placer index; nil for self

	view      atomic.Pointer[placementView]
	resyncReq chan resyncRequest
	// urgent cuts the coalesce window short (kick).
	urgent chan struct{}
	// sync is the sync replication mode (sync.go), nil when off.
	sync atomic.Pointer[Sync]

	// Owned by the run goroutine.
	placed    map[FlowKey]placedFlow
	counts    [maxMembers]int
	pending   [maxMembers][]qentry
	npending  int
	buf       []Change
	membersCh <-chan struct{}
}

// flushAt bounds the events held before they are pushed to the queues.
const flushAt = 8192

func newReplicator(r *Replication) *replicator {
	rp := &replicator{
		r:         r,
		src:       r.src,
		placer:    r.placer,
		self:      r.placer.idx[r.cfg.Self],
		k:         r.cfg.Replicas,
		links:     make([]*link, len(r.placer.names)),
		resyncReq: make(chan resyncRequest),
		urgent:    make(chan struct{}, 1),
		placed:    make(map[FlowKey]placedFlow),
	}
	for _, l := range r.links {
		rp.links[l.idx] = l
	}
	return rp
}

func (rp *replicator) run(ctx context.Context) {
	rp.syncMembers()
	rp.take()
	for {
		select {
		case <-ctx.Done():
			return
		case <-rp.src.Changes():
			// Let a burst of changes accumulate: a flow's open, its
			// first updates and often its close then travel as one
			// event (or none, for a flow that ended within the window),
			// and many flows share one batch. The window bounds the
			// latency it adds to a new flow reaching its replicas.
			if w := rp.r.cfg.CoalesceWindow; w > 0 {
				t := time.NewTimer(w)
				select {
				case <-ctx.Done():
					t.Stop()
					return
				case <-t.C:
				case <-rp.urgent:
					t.Stop()
				}
			}
			rp.take()
		case <-rp.membersCh:
			rp.syncMembers()
		case req := <-rp.resyncReq:
			rp.syncMembers()
			rp.serveResync(req)
		}
	}
}

// kick makes the replicator send the changes it is coalescing now rather
// than at the end of its window: something waits for them (a packet held
// in sync mode, sync_hold.go). A kick while no window is open ends the
// next one at once. Never blocks.
func (rp *replicator) kick() {
	select {
	case rp.urgent <- struct{}{}:
	default:
	}
}

// requestResync is called by a link's session: it opens the link's queue
// (discarding what it held) and returns the keys of the flows placed on
// the peer. Everything taken from the tracker afterwards is queued, so the
// keys' current states plus the queue bring the peer up to date.
func (rp *replicator) requestResync(ctx context.Context, l *link, gen uint64) ([]FlowKey, error) {
	req := resyncRequest{l: l, gen: gen, reply: make(chan []FlowKey, 1)}
	select {
	case rp.resyncReq <- req:
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
	select {
	case keys := <-req.reply:
		return keys, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

func (rp *replicator) serveResync(req resyncRequest) {
	if !req.l.q.reopen(req.gen) {
		req.reply <- nil
		return
	}
	keys := make([]FlowKey, 0, rp.counts[req.l.idx])
	for k, pf := range rp.placed {
		if pf.set.has(req.l.idx) {
			keys = append(keys, k)
		}
	}
	req.reply <- keys
}

// syncMembers reads the membership and re-places every flow when the live
// set changed.
func (rp *replicator) syncMembers() {
	live, ch := rp.r.members.Watch()
	rp.membersCh = ch
	mask := rp.placer.set(live)
	old := rp.view.Load()
	rp.view.Store(&placementView{live: live, mask: mask})
	if old == nil || old.mask != mask {
		rp.recompute(mask)
	}
}

// take routes the tracker's changes.
func (rp *replicator) take() {
	rp.buf = rp.src.TakeChanges(rp.buf[:0])
	if len(rp.buf) == 0 {
		return
	}
	now := mono()
	mask := rp.view.Load().mask
	for i := range rp.buf {
		rp.route(&rp.buf[i], mask, now)
	}
	clear(rp.buf)
	rp.flush()
}

func closeState(key *batonv1.FlowKey, owner string, epoch uint64) *batonv1.FlowState {
	return &batonv1.FlowState{Key: key, Owner: owner, Epoch: epoch, Phase: batonv1.FlowPhase_FLOW_PHASE_CLOSED}
}

func (rp *replicator) route(c *Change, mask peerSet, now int64) {
	st := c.State
	self := rp.r.cfg.Self
	if st == nil || st.Owner != self {
		return // only the owner replicates a flow
	}
	k, err := KeyFromProto(st.Key)
	if err != nil {
		return
	}
	pf, had := rp.placed[k]
	if c.Kind == batonv1.FlowEvent_KIND_CLOSE {
		if !had {
			return
		}
		cs := closeState(st.Key, self, st.Epoch)
		for s := pf.set; s != 0; s &= s - 1 {
			rp.add(bits.TrailingZeros64(uint64(s)), batonv1.FlowEvent_KIND_CLOSE, cs, now)
		}
		rp.place(k, pf.set, 0, 0, false)
		return
	}
	if sy := rp.sync.Load(); sy != nil && !sy.prepare(k, st) {
		return // sync mode: a state the service cannot resume from is not sent
	}
	kind := c.Kind
	if kind < batonv1.FlowEvent_KIND_OPEN || kind > batonv1.FlowEvent_KIND_CHECKPOINT {
		kind = batonv1.FlowEvent_KIND_UPDATE
	}
	nset := rp.placer.top(k, rp.self, mask, rp.k)
	for s := nset; s != 0; s &= s - 1 {
		i := bits.TrailingZeros64(uint64(s))
		if pf.set.has(i) {
			rp.add(i, kind, st, now)
		} else {
			rp.add(i, batonv1.FlowEvent_KIND_OPEN, st, now)
		}
	}
	if gone := pf.set &^ nset; gone != 0 {
		cs := closeState(st.Key, self, st.Epoch)
		for s := gone; s != 0; s &= s - 1 {
			rp.add(bits.TrailingZeros64(uint64(s)), batonv1.FlowEvent_KIND_CLOSE, cs, now)
		}
	}
	rp.place(k, pf.set, nset, st.Epoch, true)
}

// recompute re-places every known flow over mask: OPEN to the peers that
// became replicas, CLOSE to those that no longer are (dropped unless they
// are streaming). A flow the tracker no longer has is forgotten.
func (rp *replicator) recompute(mask peerSet) {
	now := mono()
	self := rp.r.cfg.Self
	for k, pf := range rp.placed {
		nset := rp.placer.top(k, rp.self, mask, rp.k)
		if nset == pf.set {
			continue
		}
		epoch := pf.epoch
		if added := nset &^ pf.set; added != 0 {
			st, ok := rp.src.Lookup(k)
			if !ok || st.Owner != self {
				// Closed or moved, its change not taken yet: forget it.
				cs := closeState(k.Proto(), self, pf.epoch)
				for s := pf.set; s != 0; s &= s - 1 {
					rp.add(bits.TrailingZeros64(uint64(s)), batonv1.FlowEvent_KIND_CLOSE, cs, now)
				}
				rp.place(k, pf.set, 0, 0, false)
				continue
			}
			epoch = st.Epoch
			if sy := rp.sync.Load(); sy != nil {
				if st = sy.forResync(k, st); st == nil {
					added = 0 // nothing resumable yet: its next change opens it
				}
			}
			for s := added; s != 0; s &= s - 1 {
				rp.add(bits.TrailingZeros64(uint64(s)), batonv1.FlowEvent_KIND_OPEN, st, now)
			}
		}
		if gone := pf.set &^ nset; gone != 0 {
			cs := closeState(k.Proto(), self, epoch)
			for s := gone; s != 0; s &= s - 1 {
				rp.add(bits.TrailingZeros64(uint64(s)), batonv1.FlowEvent_KIND_CLOSE, cs, now)
			}
		}
		rp.place(k, pf.set, nset, epoch, true)
	}
	rp.flush()
}

// place records a flow's new replica set (keep=false forgets the flow).
func (rp *replicator) place(k FlowKey, old, nset peerSet, epoch uint64, keep bool) {
	for s := old &^ nset; s != 0; s &= s - 1 {
		rp.counts[bits.TrailingZeros64(uint64(s))]--
	}
	for s := nset &^ old; s != 0; s &= s - 1 {
		rp.counts[bits.TrailingZeros64(uint64(s))]++
	}
	if keep {
		rp.placed[k] = placedFlow{set: nset, epoch: epoch}
	} else {
		delete(rp.placed, k)
	}
}

func (rp *replicator) add(i int, kind batonv1.FlowEvent_Kind, st *batonv1.FlowState, now int64) {
	if rp.links[i] == nil {
		return
	}
	rp.pending[i] = append(rp.pending[i], qentry{kind: kind, state: st, taken: now})
	rp.npending++
	if rp.npending >= flushAt {
		rp.flush()
	}
}

// flush pushes the pending events to the peers' queues.
func (rp *replicator) flush() {
	for i, l := range rp.links {
		if l == nil {
			continue
		}
		if p := rp.pending[i]; len(p) > 0 {
			if n := l.q.push(p); n > 0 {
				l.droppedFull.Add(uint64(n))
			}
			clear(p)
			rp.pending[i] = p[:0]
		}
		l.flowsSent.Store(int64(rp.counts[i]))
	}
	rp.npending = 0
}
