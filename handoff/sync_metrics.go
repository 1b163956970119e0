package handoff

// The sync mode's counters and their Prometheus export.

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

var syncDegradedReasons = []string{syncDegradedTimeout, syncDegradedNoReplica}
var syncDropReasons = []string{syncDropFull, syncDropFenced, syncDropClosed, syncDropReset}

type syncMetrics struct {
	held     atomic.Uint64
	holdN    atomic.Uint64
	holdSum  atomic.Int64
	degr     [2]atomic.Uint64 // by syncDegradedReasons
	drop     [4]atomic.Uint64 // by syncDropReasons
	holdTime prometheus.Histogram

	heldDesc, heldNowDesc, degrDesc, dropDesc *prometheus.Desc
	heldNow                                   func() int64
}

func newSyncMetrics(node string) *syncMetrics {
	labels := prometheus.Labels{"node": node}
	return &syncMetrics{
		holdTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:        "baton_sync_hold_seconds",
			Help:        "How long sync-mode packets were held for their replicas' acknowledgement.",
			ConstLabels: labels,
			Buckets:     prometheus.ExponentialBuckets(20e-6, 2, 16), // 20 µs .. 0.66 s
		}),
		heldDesc:    prometheus.NewDesc("baton_sync_held_packets_total", "Outbound packets of sync-mode flows held until their state was replicated.", nil, labels),
		heldNowDesc: prometheus.NewDesc("baton_sync_held_packets", "Outbound packets held now.", nil, labels),
		degrDesc:    prometheus.NewDesc("baton_sync_degraded_total", "Held packets released before their state was replicated (output commit not kept), by reason.", []string{"reason"}, labels),
		dropDesc:    prometheus.NewDesc("baton_sync_dropped_total", "Held (or to be held) packets dropped, by reason (TCP retransmits them).", []string{"reason"}, labels),
	}
}

func reasonIndex(reasons []string, r string) int {
	for i, x := range reasons {
		if x == r {
			return i
		}
	}
	return 0
}

func (m *syncMetrics) degraded(reason string, n int) {
	m.degr[reasonIndex(syncDegradedReasons, reason)].Add(uint64(n))
}

func (m *syncMetrics) dropped(reason string, n int) {
	m.drop[reasonIndex(syncDropReasons, reason)].Add(uint64(n))
}

func (m *syncMetrics) stats(heldNow int64) SyncStats {
	s := SyncStats{Held: m.held.Load(), HeldNow: heldNow, Degraded: map[string]uint64{}, Dropped: map[string]uint64{},
		HoldCount: m.holdN.Load(), HoldSum: time.Duration(m.holdSum.Load())}
	for i, r := range syncDegradedReasons {
		s.Degraded[r] = m.degr[i].Load()
	}
	for i, r := range syncDropReasons {
		s.Dropped[r] = m.drop[i].Load()
	}
	return s
}

// Collector returns the sync mode's metrics.
func (s *Sync) Collector() prometheus.Collector {
	s.m.heldNow = s.heldPkts.Load
	return s.m
}

// Describe implements prometheus.Collector.
func (m *syncMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{m.heldDesc, m.heldNowDesc, m.degrDesc, m.dropDesc} {
		ch <- d
	}
	m.holdTime.Describe(ch)
}

// Collect implements prometheus.Collector.
func (m *syncMetrics) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(m.heldDesc, prometheus.CounterValue, float64(m.held.Load()))
	if m.heldNow != nil {
		ch <- prometheus.MustNewConstMetric(m.heldNowDesc, prometheus.GaugeValue, float64(m.heldNow()))
	}
	for i, r := range syncDegradedReasons {
		ch <- prometheus.MustNewConstMetric(m.degrDesc, prometheus.CounterValue, float64(m.degr[i].Load()), r)
	}
	for i, r := range syncDropReasons {
		ch <- prometheus.MustNewConstMetric(m.dropDesc, prometheus.CounterValue, float64(m.drop[i].Load()), r)
	}
	m.holdTime.Collect(ch)
}

// observeHold records one released packet's hold time.
func (m *syncMetrics) observeHold(d time.Duration) {
	m.holdN.Add(1)
	m.holdSum.Add(int64(d))
	m.holdTime.Observe(d.Seconds())
}
