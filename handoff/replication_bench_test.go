package handoff

import (
	"fmt"
	"runtime"
	"sort"
	"testing"
	"time"
)

// benchPair is two nodes over loopback with mutual TLS, k=1: every flow of
// a goes to b over the one link.
func benchPair(b *testing.B) *testCluster {
	b.Helper()
	c := newCluster(b, []string{"a", "b"}, 1, func(cfg *ReplicationConfig) { cfg.MaxReplicaFlows = 1 << 22 })
	c.waitLive("a", "b")
	return c
}

func waitCount(s *ReplicaStore, owner string, n int) {
	for s.Count(owner) != n {
		runtime.Gosched()
		time.Sleep(50 * time.Microsecond)
	}
}

// Events per second through one replication link: rounds of opening then
// closing up to 20000 flows (b.N is the number of events).
func BenchmarkReplicationThroughput(b *testing.B) {
	c := benchPair(b)
	src, store := c.nodes["a"].src, c.nodes["b"].r.Store()
	const chunk = 20000
	keys := keysRange(0, chunk)
	b.ResetTimer()
	events := 0
	for events < b.N {
		n := max(1, min(chunk, (b.N-events)/2))
		src.Open(keys[:n]...)
		waitCount(store, "a", n)
		src.Close(keys[:n]...)
		waitCount(store, "a", 0)
		events += 2 * n
	}
	b.StopTimer()
	b.ReportMetric(float64(events)/b.Elapsed().Seconds(), "events/s")
}

// Lag of single new flows: from the tracker reporting an open on a to the
// flow stored on b, one flow at a time; and the ack lag a measured.
func BenchmarkReplicationLagNewFlow(b *testing.B) {
	c := benchPair(b)
	src := c.nodes["a"].src
	applied := make(chan FlowKey, 16)
	hook := func(k FlowKey) {
		select {
		case applied <- k:
		default:
		}
	}
	c.nodes["b"].r.Store().onApply.Store(&hook)
	var samples []time.Duration
	i := 0
	for b.Loop() {
		k := testKey(i)
		i++
		t0 := time.Now()
		src.Open(k)
		for got := <-applied; got != k; got = <-applied {
		}
		samples = append(samples, time.Since(t0))
	}
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	q := func(p float64) float64 {
		return float64(samples[min(len(samples)-1, int(p*float64(len(samples))))]) / 1e3
	}
	b.ReportMetric(q(0.50), "p50-µs")
	b.ReportMetric(q(0.99), "p99-µs")
	b.ReportMetric(q(1), "max-µs")
	l := c.nodes["a"].r.links[0]
	now := time.Now()
	b.ReportMetric(float64(l.window.quantile(now, 0.5))/1e3, "ack-p50-µs")
	b.ReportMetric(float64(l.window.quantile(now, 0.99))/1e3, "ack-p99-µs")
	if testing.Verbose() {
		fmt.Printf("lag samples: %d\n", len(samples))
	}
}
