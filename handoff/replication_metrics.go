package handoff

// Replication counters and their Prometheus export. Hot paths bump plain
// atomics (per link) or observe one histogram; the collector reads the rest
// at scrape time.

import (
	"log/slog"
	"math"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// monoBase anchors mono: a monotonic clock in nanoseconds (never 0 for a
// real reading) used for lag measurements.
var monoBase = time.Now()

func mono() int64 { return int64(time.Since(monoBase)) + 1 }

// lagWindow keeps approximate lag quantiles over the last minute: twelve
// 5-second slots of log-scale buckets (4 per power of two, from 1 µs), so
// a quantile is within 19% of the true value.
type lagWindow struct {
	mu    sync.Mutex
	slots [lagSlots]lagSlot
}

const (
	lagSlots    = 12
	lagSlotSpan = 5 * time.Second
	lagBuckets  = 4 * 36 // 1 µs .. ~19 h
)

type lagSlot struct {
	epoch  int64 // slot number (time / lagSlotSpan)
	n      uint64
	counts [lagBuckets]uint32
}

func lagBucket(d time.Duration) int {
	us := float64(d) / float64(time.Microsecond)
	if us <= 1 {
		return 0
	}
	b := int(math.Ceil(4 * math.Log2(us)))
	return min(b, lagBuckets-1)
}

// lagBucketUpper is the upper bound of bucket b.
func lagBucketUpper(b int) time.Duration {
	return time.Duration(math.Exp2(float64(b)/4) * float64(time.Microsecond))
}

func (w *lagWindow) observe(now time.Time, lags []time.Duration) {
	e := now.UnixNano() / int64(lagSlotSpan)
	w.mu.Lock()
	s := &w.slots[e%lagSlots]
	if s.epoch != e {
		*s = lagSlot{epoch: e}
	}
	for _, d := range lags {
		s.counts[lagBucket(d)]++
		s.n++
	}
	w.mu.Unlock()
}

// quantile returns the q-quantile of the lags observed in the last minute
// (0 when none).
func (w *lagWindow) quantile(now time.Time, q float64) time.Duration {
	e := now.UnixNano() / int64(lagSlotSpan)
	var (
		counts [lagBuckets]uint64
		n      uint64
	)
	w.mu.Lock()
	for i := range w.slots {
		s := &w.slots[i]
		if s.n == 0 || s.epoch <= e-lagSlots || s.epoch > e {
			continue
		}
		n += s.n
		for b, c := range s.counts {
			counts[b] += uint64(c)
		}
	}
	w.mu.Unlock()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	var cum uint64
	for b, c := range counts {
		cum += c
		if cum >= rank {
			return lagBucketUpper(b)
		}
	}
	return lagBucketUpper(lagBuckets - 1)
}

// rejects counts rejected input by peer and reason and logs it, at most
// once per reason and peer every rejectLogEvery (with the number of
// rejections not logged).
type rejects struct {
	log    *slog.Logger
	mu     sync.Mutex
	counts map[[2]string]uint64
	logged map[[2]string]rejectLogState
}

const rejectLogEvery = 10 * time.Second

type rejectLogState struct {
	at         time.Time
	suppressed uint64
}

func newRejects(log *slog.Logger) *rejects {
	return &rejects{log: log, counts: map[[2]string]uint64{}, logged: map[[2]string]rejectLogState{}}
}

// add counts n rejections of input from peer (a configured peer name, or
// "unknown": never a name the remote chose) and logs detail.
func (r *rejects) add(peer, reason string, n int, detail string, attrs ...any) {
	if n <= 0 {
		return
	}
	key := [2]string{peer, reason}
	now := time.Now()
	r.mu.Lock()
	r.counts[key] += uint64(n)
	st := r.logged[key]
	if !st.at.IsZero() && now.Sub(st.at) < rejectLogEvery {
		st.suppressed += uint64(n)
		r.logged[key] = st
		r.mu.Unlock()
		return
	}
	suppressed := st.suppressed
	r.logged[key] = rejectLogState{at: now}
	r.mu.Unlock()
	r.log.Warn("replication: rejected input from peer", append([]any{
		"peer", peer, "reason", reason, "count", n, "detail", detail, "suppressed_since_last_log", suppressed}, attrs...)...)
}

// get returns the count for one peer and reason.
func (r *rejects) get(peer, reason string) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counts[[2]string{peer, reason}]
}

func (r *rejects) snapshot() map[[2]string]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[[2]string]uint64, len(r.counts))
	for k, v := range r.counts {
		out[k] = v
	}
	return out
}

// lagBucketsSeconds are the lag histogram's buckets: 50 µs .. ~13 s.
var lagBucketsSeconds = prometheus.ExponentialBuckets(50e-6, 2, 19)

func newLagHistogram(self string) *prometheus.HistogramVec {
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:        "baton_replication_lag_seconds",
		Help:        "Time from a flow change taken from the tracker to the peer's acknowledgement, per event.",
		Buckets:     lagBucketsSeconds,
		ConstLabels: prometheus.Labels{"node": self},
	}, []string{"peer"})
}

// replCollector exports the replication counters.
type replCollector struct {
	r *Replication

	eventsSent, bytesSent, bytesRecv, dropped   *prometheus.Desc
	peerUp, rejected, peerRejected, replicaHeld *prometheus.Desc
	queued, flowsSent, resyncs                  *prometheus.Desc
}

func newReplCollector(r *Replication) *replCollector {
	n := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, prometheus.Labels{"node": r.cfg.Self})
	}
	return &replCollector{
		r:            r,
		eventsSent:   n("baton_replication_events_sent_total", "Flow events sent to a peer, by kind.", "peer", "kind"),
		bytesSent:    n("baton_replication_bytes_sent_total", "Bytes of gRPC messages sent to a peer.", "peer"),
		bytesRecv:    n("baton_replication_bytes_received_total", "Bytes of gRPC messages received from a peer (its batches, acks and responses).", "peer"),
		dropped:      n("baton_replication_events_dropped_total", "Flow events not sent to a peer: queue_full (a resync repairs it) or too_large.", "peer", "reason"),
		peerUp:       n("baton_peer_up", "1 when the peer is up (a replication stream to or from it is live).", "peer"),
		rejected:     n("baton_replication_rejected_total", "Input from peers this node rejected, by reason (events; connections or batches for tls_handshake, not_member, identity_mismatch). peer is unknown when not authenticated.", "peer", "reason"),
		peerRejected: n("baton_replication_peer_rejected_total", "Events this node sent that the peer rejected.", "peer"),
		replicaHeld:  n("baton_replication_replica_flows", "Flows held as replicas, by owner.", "owner"),
		queued:       n("baton_replication_queue_events", "Events queued for a peer, not yet sent.", "peer"),
		flowsSent:    n("baton_replication_flows_placed", "Owned flows placed on the peer (it should hold a replica).", "peer"),
		resyncs:      n("baton_replication_resyncs_total", "Full resyncs sent to a peer.", "peer"),
	}
}

func (c *replCollector) descs() []*prometheus.Desc {
	return []*prometheus.Desc{c.eventsSent, c.bytesSent, c.bytesRecv, c.dropped, c.peerUp, c.rejected,
		c.peerRejected, c.replicaHeld, c.queued, c.flowsSent, c.resyncs}
}

// Describe implements prometheus.Collector.
func (c *replCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs() {
		ch <- d
	}
	c.r.lagHist.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *replCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	r := c.r
	for _, l := range r.links {
		name := l.peer.Name
		for k := batonv1.FlowEvent_KIND_OPEN; k <= batonv1.FlowEvent_KIND_CLOSE; k++ {
			counter(c.eventsSent, l.eventsByKind[k].Load(), name, kindLabel(k))
		}
		counter(c.bytesSent, l.bytesSent.Load(), name)
		counter(c.bytesRecv, l.bytesRecv.Load(), name)
		counter(c.dropped, l.droppedFull.Load(), name, "queue_full")
		counter(c.dropped, l.droppedLarge.Load(), name, "too_large")
		up := 0.0
		if r.members.Up(name) {
			up = 1
		}
		gauge(c.peerUp, up, name)
		counter(c.peerRejected, l.rejectedByPeer.Load(), name)
		gauge(c.queued, float64(l.q.len()), name)
		gauge(c.flowsSent, float64(l.flowsSent.Load()), name)
		counter(c.resyncs, l.resyncs.Load(), name)
	}
	rej := r.rejects.snapshot()
	keys := make([][2]string, 0, len(rej))
	for k := range rej {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i][0]+"\x00"+keys[i][1] < keys[j][0]+"\x00"+keys[j][1] })
	for _, k := range keys {
		counter(c.rejected, rej[k], k[0], k[1])
	}
	for owner, n := range r.store.Counts() {
		gauge(c.replicaHeld, float64(n), owner)
	}
	r.lagHist.Collect(ch)
}

func kindLabel(k batonv1.FlowEvent_Kind) string {
	switch k {
	case batonv1.FlowEvent_KIND_OPEN:
		return "open"
	case batonv1.FlowEvent_KIND_UPDATE:
		return "update"
	case batonv1.FlowEvent_KIND_CHECKPOINT:
		return "checkpoint"
	case batonv1.FlowEvent_KIND_CLOSE:
		return "close"
	}
	return "unspecified"
}
