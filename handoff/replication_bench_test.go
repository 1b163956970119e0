package handoff

import (
	"fmt"
	"runtime"
	"sort"
	"syscall"
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

// Short connections at a steady rate, as in the lab's connection-rate
// figure: a replicates to b and c (k=2); every millisecond two flows open,
// the two opened the millisecond before are updated and the two before
// those close, so that each flow is an OPEN, an UPDATE and a CLOSE in
// separate coalesce windows. b.N is the number of flows. cpu-µs/flow is
// the process's CPU time (all three nodes, user + system) per flow: the
// figure to compare between builds on a noisy machine, rather than the
// elapsed time, which the pacing sets.
func BenchmarkReplicationShortFlows(b *testing.B) {
	c := newCluster(b, []string{"a", "b", "c"}, 2, func(cfg *ReplicationConfig) { cfg.MaxReplicaFlows = 1 << 22 })
	c.waitLive("a", "b", "c")
	src := c.nodes["a"].src
	const perTick = 2
	var ru0, ru1 syscall.Rusage
	cpu := func(ru *syscall.Rusage) time.Duration {
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	var recv0 uint64
	for _, l := range c.nodes["a"].r.links {
		recv0 += l.bytesRecv.Load()
	}
	b.ResetTimer()
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	opened := 0
	for seq := uint32(1); opened < b.N+2*perTick; seq++ {
		<-tick.C
		n := min(perTick, b.N-opened)
		if n > 0 {
			src.Open(keysRange(opened, opened+n)...)
		}
		if from := opened - perTick; from >= 0 && from < b.N {
			src.Update(seq, keysRange(from, min(from+perTick, b.N))...)
		}
		if from := opened - 2*perTick; from >= 0 && from < b.N {
			src.Close(keysRange(from, min(from+perTick, b.N))...)
		}
		opened += perTick
	}
	waitCount(c.nodes["b"].r.Store(), "a", 0)
	waitCount(c.nodes["c"].r.Store(), "a", 0)
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	b.StopTimer()
	var recv uint64
	for _, l := range c.nodes["a"].r.links {
		recv += l.bytesRecv.Load()
	}
	b.ReportMetric(float64(cpu(&ru1)-cpu(&ru0))/1e3/float64(b.N), "cpu-µs/flow")
	b.ReportMetric(float64(recv-recv0)/float64(b.N), "recv-B/flow")
	b.ReportMetric(0, "ns/op")
}
