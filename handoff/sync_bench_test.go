package handoff

// What sync replication mode costs: echo round-trip latency and echo
// throughput through a three-node in-process lab (real gVisor stacks,
// loopback gRPC with mutual TLS, two replicas), async against sync, and
// sync without the replicator's 1 ms coalesce window; "sync-holdwaits" is
// sync as it was before a held packet cut the coalesce window short.
//
//	go test ./handoff/ -run '^$' -bench SyncReplication -benchtime 2000x
//
// Each sub-benchmark reports rtt-p50-us and rtt-p99-us (64-byte echo
// round trips, one at a time) and MB/s (a 4 MiB echo, written and read
// concurrently); the last one logs the three side by side.

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"testing"
	"time"
)

type syncBenchResult struct {
	name          string
	p50, p99      time.Duration
	mbps          float64
	held, degrade uint64
	dropped       uint64
}

func BenchmarkSyncReplication(b *testing.B) {
	variants := []struct {
		name     string
		sync     bool
		coalesce time.Duration
		// holdWaits: a held packet waits for the coalesce window to
		// end, as before holds kicked the replicator.
		holdWaits bool
	}{
		{"async", false, 0, false},
		{"sync-holdwaits", true, 0, true},
		{"sync", true, 0, false},
		{"sync-nocoalesce", true, -1, false},
	}
	results := map[string]syncBenchResult{}
	for _, v := range variants {
		b.Run(v.name, func(b *testing.B) {
			r := syncBench(b, v.sync, v.coalesce, v.holdWaits)
			r.name = v.name
			results[v.name] = r // the last run (largest b.N) wins
		})
	}
	if len(results) == len(variants) {
		var sb strings.Builder
		fmt.Fprintf(&sb, "\n%-16s %12s %12s %10s %8s %9s %8s\n", "mode", "rtt p50", "rtt p99", "MB/s", "held", "degraded", "dropped")
		for _, v := range variants {
			r := results[v.name]
			fmt.Fprintf(&sb, "%-16s %12v %12v %10.1f %8d %9d %8d\n", r.name, r.p50, r.p99, r.mbps, r.held, r.degrade, r.dropped)
		}
		fmt.Fprint(os.Stdout, sb.String())
	}
}

func syncBench(b *testing.B, syncMode bool, coalesce time.Duration, holdWaits bool) syncBenchResult {
	l := newTkLab(b, tkConfig{nodes: 3, service: echoService, syncMode: syncMode, coalesce: coalesce})
	for _, n := range l.nodes {
		if n.sy != nil {
			n.sy.coalesceHolds.Store(holdWaits)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c, err := l.client.DialTCP(ctx, tkDst4)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	msg := echoMsg(1, 64)
	// Warm up: the flow is replicated before anything is measured.
	for range 20 {
		if err := echoRound(c, msg); err != nil {
			b.Fatal(err)
		}
	}
	rtts := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		t0 := time.Now()
		if err := echoRound(c, msg); err != nil {
			b.Fatal(err)
		}
		rtts = append(rtts, time.Since(t0))
	}
	b.StopTimer()
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	res := syncBenchResult{p50: rtts[len(rtts)/2], p99: rtts[len(rtts)*99/100]}

	// Throughput: 4 MiB echoed, writer and reader concurrent.
	const size = 4 << 20
	chunk := echoMsg(2, 32<<10)
	t0 := time.Now()
	werr := make(chan error, 1)
	go func() {
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := c.Write(chunk); err != nil {
				werr <- err
				return
			}
		}
		werr <- nil
	}()
	if _, err := io.CopyN(io.Discard, c, size); err != nil {
		b.Fatal(err)
	}
	if err := <-werr; err != nil {
		b.Fatal(err)
	}
	res.mbps = float64(size) / 1e6 / time.Since(t0).Seconds()
	if sy := l.nodes[0].sy; sy != nil {
		s := sy.Stats()
		res.held = s.Held
		for _, n := range s.Degraded {
			res.degrade += n
		}
		for _, n := range s.Dropped {
			res.dropped += n
		}
	}
	b.ReportMetric(float64(res.p50.Microseconds()), "rtt-p50-us")
	b.ReportMetric(float64(res.p99.Microseconds()), "rtt-p99-us")
	b.ReportMetric(res.mbps, "MB/s")
	return res
}
