package handoff

// This file holds the takeover engine's counters and its Prometheus
// collector (baton_takeover_*), and Stats, the same numbers for tests and
// the admin API.

import (
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Takeover failure and reset reasons. Each is a metric label; keep them
// short and stable.
const (
	// reasonCannotResume: the service cannot continue the exact stream
	// (services.ErrCannotResume, or it is not Resumable), and the owner
	// cannot keep the flow (it is dead).
	reasonCannotResume = "cannot_resume"
	// reasonNoState: the flow's owner is known but its state is not (or
	// is unusable).
	reasonNoState = "no_state"
	// reasonClaimRefused: the owner refused the hand-over for a reason
	// that does not leave it serving the flow.
	reasonClaimRefused = "claim_refused"
	// reasonQueueFull: too many takeovers in progress.
	reasonQueueFull = "queue_full"
	// reasonTimeout: the takeover did not finish within its window.
	reasonTimeout = "timeout"
	// reasonRestoreFailed: the stack did not take the synthetic handshake.
	reasonRestoreFailed = "restore_failed"
	// reasonUnknown: the flow is unknown everywhere (reset by the stack).
	reasonUnknown = "unknown"
)

// Claim refusal reasons (ClaimResponse.reason).
const (
	claimNotOwner     = "not_owner"
	claimBusy         = "busy"
	claimStaleEpoch   = "stale_epoch"
	claimCannotResume = reasonCannotResume
	claimNoTakeover   = "no_takeover"
	claimReset        = "reset"
)

// Packet counters.
const (
	pktQueued         = iota // client packets queued while a flow was taken over
	pktReplayed              // queued packets replayed into the new stack
	pktQueueDropped          // packets dropped: queue full or flow not in transit
	pktFenced                // packets dropped for a flow held or handed over
	pktForwardOut            // packets tunnelled to an owner
	pktForwardIn             // packets a peer tunnelled to this node, delivered
	pktForwardDropped        // tunnelled packets dropped (queue full, peer down, invalid)
	pktForwardUnknown        // tunnelled packets of flows this node does not have
	pktLeaseFenced           // packets of own flows dropped while this node held no lease (lease.go)
	pktAwaitGone             // client packets dropped: their owner unreachable, not proven gone (lease.go)
	pktLateForward           // late packets of a flow just handed over, tunnelled to its new owner (MovedSettle)
	pktKinds
)

var pktNames = [pktKinds]string{"queued", "replayed", "queue_dropped", "fenced", "forward_out", "forward_in", "forward_dropped", "forward_unknown", "lease_fenced", "await_gone", "late_forward"}

// latencyRing keeps the most recent samples for Stats.
const latencyRing = 1024

type engineMetrics struct {
	mu        sync.Mutex
	takeovers map[string]uint64
	failures  map[string]uint64
	rsts      map[string]uint64
	lat, rest []time.Duration
	latN      int
	restN     int

	unknown   atomic.Uint64
	packets   [pktKinds]atomic.Uint64
	leaseHeld atomic.Int32 // 1 while the lease is held and nothing is fenced

	latHist    *prometheus.HistogramVec
	restHist   prometheus.Histogram
	dTakeovers *prometheus.Desc
	dFailures  *prometheus.Desc
	dRSTs      *prometheus.Desc
	dUnknown   *prometheus.Desc
	dPackets   *prometheus.Desc
	dFlows     *prometheus.Desc
	dLease     *prometheus.Desc
	flows      func() map[string]int
}

func newEngineMetrics(node string) *engineMetrics {
	labels := prometheus.Labels{"node": node}
	d := func(name, help string, l ...string) *prometheus.Desc {
		return prometheus.NewDesc("baton_takeover_"+name, help, l, labels)
	}
	buckets := prometheus.ExponentialBuckets(0.0001, 2, 18) // 0.1 ms .. 13 s
	// The takeover latency's target is p50 <= 1 ms, p99 <= 5 ms: buckets
	// 19% apart, so that a quantile read from them is that close.
	latBuckets := prometheus.ExponentialBuckets(0.0001, 1.19, 70) // 0.1 ms .. 19 s
	m := &engineMetrics{
		takeovers: map[string]uint64{},
		failures:  map[string]uint64{},
		rsts:      map[string]uint64{},
		latHist: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:        "baton_takeover_latency_seconds",
			Help:        "From the first misrouted packet (or the owner's death, for a push) to the first data byte the new owner sends, by kind of takeover.",
			ConstLabels: labels,
			Buckets:     latBuckets,
		}, []string{"kind"}),
		restHist: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:        "baton_takeover_restore_seconds",
			Help:        "Synthetic handshake: from the synthetic SYN to the restored connection handed to its service.",
			ConstLabels: labels,
			Buckets:     buckets,
		}),
		dTakeovers: d("total", "Flows taken over, by kind (pull-migrate, pull-restore, push, forward).", "kind"),
		dFailures:  d("failures_total", "Takeovers that failed, by reason.", "reason"),
		dRSTs:      d("rst_sent_total", "Resets the takeover sent to clients, by reason.", "reason"),
		dUnknown:   d("unknown_flows_total", "Misrouted flows unknown everywhere, left to the stack (which resets them)."),
		dPackets:   d("packets_total", "Packets of flows in transit, by what happened to them.", "what"),
		dFlows:     d("flows", "Flows in the takeover table, by state.", "state"),
		dLease:     d("lease_held", "1 while this node holds its lease (a majority of the cluster acknowledges it) and fences none of its flows, else 0 (handoff/lease.go)."),
	}
	m.leaseHeld.Store(1)
	return m
}

func (m *engineMetrics) count(mp map[string]uint64, key string) {
	m.mu.Lock()
	mp[key]++
	m.mu.Unlock()
}

func (m *engineMetrics) takeover(kind string)  { m.count(m.takeovers, kind) }
func (m *engineMetrics) failure(reason string) { m.count(m.failures, reason) }
func (m *engineMetrics) rst(reason string)     { m.count(m.rsts, reason) }
func (m *engineMetrics) packet(kind int)       { m.packets[kind].Add(1) }

func (m *engineMetrics) latencySample(ring *[]time.Duration, n *int, d time.Duration) {
	if len(*ring) < latencyRing {
		*ring = append(*ring, d)
	} else {
		(*ring)[*n%latencyRing] = d
	}
	*n++
}

func (m *engineMetrics) latency(kind string, d time.Duration) {
	m.latHist.WithLabelValues(kind).Observe(d.Seconds())
	m.mu.Lock()
	m.latencySample(&m.lat, &m.latN, d)
	m.mu.Unlock()
}

func (m *engineMetrics) restored(d time.Duration) {
	m.restHist.Observe(d.Seconds())
	m.mu.Lock()
	m.latencySample(&m.rest, &m.restN, d)
	m.mu.Unlock()
}

// Describe implements prometheus.Collector.
func (m *engineMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.dTakeovers, m.dFailures, m.dRSTs, m.dUnknown, m.dPackets, m.dFlows, m.dLease} {
		ch <- d
	}
	m.latHist.Describe(ch)
	m.restHist.Describe(ch)
}

// Collect implements prometheus.Collector.
func (m *engineMetrics) Collect(ch chan<- prometheus.Metric) {
	cnt := func(d *prometheus.Desc, v uint64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), l...)
	}
	m.mu.Lock()
	for _, kind := range []string{HowPullMigrate, HowPullRestore, HowPush, HowForward} {
		cnt(m.dTakeovers, m.takeovers[kind], kind)
	}
	for r, v := range m.failures {
		cnt(m.dFailures, v, r)
	}
	for r, v := range m.rsts {
		cnt(m.dRSTs, v, r)
	}
	m.mu.Unlock()
	cnt(m.dUnknown, m.unknown.Load())
	for i := range m.packets {
		cnt(m.dPackets, m.packets[i].Load(), pktNames[i])
	}
	ch <- prometheus.MustNewConstMetric(m.dLease, prometheus.GaugeValue, float64(m.leaseHeld.Load()))
	if m.flows != nil {
		for s, n := range m.flows() {
			ch <- prometheus.MustNewConstMetric(m.dFlows, prometheus.GaugeValue, float64(n), s)
		}
	}
	m.latHist.Collect(ch)
	m.restHist.Collect(ch)
}

// TakeoverStats are the engine's counters.
type TakeoverStats struct {
	// Takeovers by kind (pull-migrate, pull-restore, push, forward),
	// Failures and RSTs (resets sent to clients) by reason.
	Takeovers, Failures, RSTs map[string]uint64
	// Unknown counts misrouted flows unknown everywhere.
	Unknown uint64
	// Packets by what happened to them (queued, replayed, ...).
	Packets map[string]uint64
	// Flows in the table by state.
	Flows map[string]int
	// Latencies are recent takeover latencies (misrouted packet or death
	// of the owner -> first data byte sent), RestoreDurations recent
	// synthetic handshakes, oldest first.
	Latencies, RestoreDurations []time.Duration
}

func copyRing(ring []time.Duration, n int) []time.Duration {
	out := make([]time.Duration, 0, len(ring))
	if len(ring) < latencyRing {
		return append(out, ring...)
	}
	i := n % latencyRing
	return append(append(out, ring[i:]...), ring[:i]...)
}

func copyCounts(m map[string]uint64) map[string]uint64 {
	out := make(map[string]uint64, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Stats returns the engine's counters.
func (e *Engine) Stats() TakeoverStats {
	m := e.m
	s := TakeoverStats{Unknown: m.unknown.Load(), Packets: map[string]uint64{}, Flows: e.flowCounts()}
	m.mu.Lock()
	s.Takeovers, s.Failures, s.RSTs = copyCounts(m.takeovers), copyCounts(m.failures), copyCounts(m.rsts)
	s.Latencies, s.RestoreDurations = copyRing(m.lat, m.latN), copyRing(m.rest, m.restN)
	m.mu.Unlock()
	for i := range m.packets {
		s.Packets[pktNames[i]] = m.packets[i].Load()
	}
	return s
}

// Collector exports the engine's metrics (baton_takeover_*).
func (e *Engine) Collector() prometheus.Collector { return e.m }

// flowCounts counts the table's entries by state.
func (e *Engine) flowCounts() map[string]int {
	out := map[string]int{}
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.RLock()
		for _, f := range sh.m {
			out[f.get().String()]++
		}
		sh.mu.RUnlock()
	}
	return out
}

// Quantile returns the q-quantile of ds (0 for none).
func Quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(q * float64(len(s)-1))
	return s[i]
}
