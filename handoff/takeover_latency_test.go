package handoff

// The takeover latency benchmark: live migrations (pull-migrate) of a
// running download in the in-process lab, timed phase by phase with the
// engine's tracer (takeover_trace.go), from the first misrouted packet to
// the first data byte the new owner sends (the metric
// baton_takeover_latency_seconds measures the same span).
//
//	go test ./handoff/ -run '^$' -bench TakeoverMigrate -benchtime 60x -v

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// tkTraceEvent is one traced phase, on one node.
type tkTraceEvent struct {
	k      FlowKey
	node   string
	p      TracePhase
	at     time.Time
	detail string
}

// tkTraceLog collects the events of every node of a lab.
type tkTraceLog struct {
	mu     sync.Mutex
	ev     []tkTraceEvent
	notify chan tkTraceEvent // PhaseFirstByte events
}

func (l *tkLab) traceAll() *tkTraceLog {
	tl := &tkTraceLog{notify: make(chan tkTraceEvent, 64)}
	for _, n := range l.nodes {
		name := n.name
		n.e.SetTracer(func(k FlowKey, p TracePhase, at time.Time, detail string) {
			ev := tkTraceEvent{k: k, node: name, p: p, at: at, detail: detail}
			tl.mu.Lock()
			tl.ev = append(tl.ev, ev)
			tl.mu.Unlock()
			if p == PhaseFirstByte {
				select {
				case tl.notify <- ev:
				default:
				}
			}
		})
	}
	return tl
}

func (tl *tkTraceLog) take() []tkTraceEvent {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	ev := tl.ev
	tl.ev = nil
	return ev
}

// tkPhaseStats accumulates, per phase, the time from the start of the
// takeover (PhaseIntercepted) to the first occurrence of the phase.
type tkPhaseStats struct {
	at      [tracePhases][]time.Duration
	retries map[string]int
	rounds  []int
}

func newTkPhaseStats() *tkPhaseStats { return &tkPhaseStats{retries: map[string]int{}} }

// add records one takeover's events (claimer to, old owner from).
func (s *tkPhaseStats) add(ev []tkTraceEvent, to string) {
	var t0 time.Time
	seen := [tracePhases]bool{}
	for _, e := range ev {
		if e.node == to && e.p == PhaseIntercepted && t0.IsZero() {
			t0 = e.at
		}
	}
	if t0.IsZero() {
		return
	}
	retries := 0
	for _, e := range ev {
		if e.p == PhaseRetry && e.node == to {
			retries++
			s.retries[e.detail]++
			continue
		}
		if seen[e.p] || (e.node != to && e.p != PhaseHandedOver && e.p != PhaseClaimReceived) {
			continue
		}
		seen[e.p] = true
		s.at[e.p] = append(s.at[e.p], e.at.Sub(t0))
	}
	s.rounds = append(s.rounds, retries)
}

func pctl(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	c := append([]time.Duration(nil), ds...)
	sort.Slice(c, func(i, j int) bool { return c[i] < c[j] })
	return c[min(int(q*float64(len(c))), len(c)-1)]
}

func (s *tkPhaseStats) report(b *testing.B) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%-13s %6s %10s %10s %10s\n", "phase", "n", "p50", "p90", "p99")
	for p := TracePhase(0); p < tracePhases; p++ {
		if p == PhaseRetry || len(s.at[p]) == 0 {
			continue
		}
		fmt.Fprintf(&sb, "%-13s %6d %10v %10v %10v\n", p, len(s.at[p]),
			pctl(s.at[p], 0.5).Round(time.Microsecond), pctl(s.at[p], 0.9).Round(time.Microsecond), pctl(s.at[p], 0.99).Round(time.Microsecond))
	}
	fmt.Fprintf(&sb, "retries: %v", s.retries)
	b.Log("time from the first misrouted packet to each phase:\n" + sb.String())
	fb := s.at[PhaseFirstByte]
	b.ReportMetric(float64(pctl(fb, 0.5).Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(pctl(fb, 0.99).Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(pctl(s.at[PhaseClaimDone], 0.5).Microseconds())/1000, "claimed-p50-ms")
	b.ReportMetric(float64(pctl(s.at[PhaseAccepted], 0.5).Microseconds())/1000, "accepted-p50-ms")
}

// BenchmarkTakeoverMigrate moves one endless download around a 3-node lab
// b.N times (n1 -> n2 -> n3 -> n1 ...), each once the previous takeover
// sent its first byte and the client got gap more bytes, and reports the
// latency of the pull-migrations by phase. settle: after the previous
// takeover, wait until every node's replica of the flow names its new
// owner (the replication caught up) before the next move; without it the
// next move may find a stale replica (the common case of flows that move
// again soon).
func BenchmarkTakeoverMigrate(b *testing.B) {
	for _, bc := range []struct {
		name   string
		gap    int64
		settle bool
		before bool // the engine as it was: 20 ms x round retries, hints too; no hint from a hand-over; abort before the grant
	}{
		{"settled/before", 256 << 10, true, true},
		{"settled/after", 256 << 10, true, false},
		{"quick/before", 64 << 10, false, true},
		{"quick/after", 64 << 10, false, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			if bc.before {
				pace := pullPace
				pullPace = pullPacing{hints: 0, first: time.Hour, step: 20 * time.Millisecond, most: 200 * time.Millisecond}
				abortInline = true
				defer func() { pullPace, abortInline = pace, false }()
			}
			l := newTkLab(b, tkConfig{nodes: 3})
			l.enableClientSACK()
			tl := l.traceAll()
			ctx := testCtxTB(b)
			st := newTkPhaseStats()
			cur, failed := 0, 0
			var d *tkDownload
			// fail counts a migration that did not continue the download
			// (a reset, a stall) and starts a new one on node cur.
			fail := func(format string, args ...any) {
				failed++
				if failed <= 3 {
					for _, ev := range tl.take() {
						b.Logf("%s %s %s %s", ev.at.Format("15:04:05.000000"), ev.node, ev.p, ev.detail)
					}
					l.logStats()
					b.Logf("failed: "+format, args...)
				}
				tl.take()
				if d != nil {
					d.conn.Close()
				}
				d = l.startDownload(ctx, tkDst4, 1<<40, 5)
				waitBytesTB(b, d, 1<<20)
			}
			fail("-")
			failed = 0
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if bc.settle && !l.waitReplicasOwner(d.key, l.nodes[cur].name) {
					fail("replicas of %s do not name %s", d.key, l.nodes[cur].name)
					continue
				}
				if err := d.waitMore(bc.gap); err != nil {
					fail("before migration %d: %v", i, err)
					continue
				}
				next := (cur + 1) % len(l.nodes)
				tl.take()
				for len(tl.notify) > 0 {
					<-tl.notify // a late first byte of an earlier takeover
				}
				flip := time.Now()
				l.route.Store(int32(next))
				cur = next
				deadline := time.After(5 * time.Second)
				ok := false
			wait:
				for {
					select {
					case ev := <-tl.notify:
						if ev.node == l.nodes[next].name && ev.at.After(flip) {
							ok = true
							break wait
						}
					case err := <-d.done:
						fail("migration %d to %s: download ended: %v", i, l.nodes[next].name, err)
						break wait
					case <-deadline:
						fail("migration %d to %s: no first byte in 5 s", i, l.nodes[next].name)
						break wait
					}
				}
				if ok {
					st.add(tl.take(), l.nodes[next].name)
				}
			}
			b.StopTimer()
			st.report(b)
			b.ReportMetric(float64(failed), "failed")
			b.ReportMetric(float64(l.resets()), "resets")
		})
	}
}

// BenchmarkTakeoverMigrateBatch moves flows downloads from one node to the
// next at once (a drain or a rehash moves many flows together, as in
// batonlab bench -only takeover's 24), b.N times, and reports the latency
// of every flow's pull-migration by phase.
func BenchmarkTakeoverMigrateBatch(b *testing.B) {
	const flows = 24
	for _, before := range []bool{true, false} {
		name := "after"
		if before {
			name = "before"
		}
		b.Run(name, func(b *testing.B) {
			if before {
				pace := pullPace
				pullPace = pullPacing{hints: 0, first: time.Hour, step: 20 * time.Millisecond, most: 200 * time.Millisecond}
				abortInline = true
				defer func() { pullPace, abortInline = pace, false }()
			}
			l := newTkLab(b, tkConfig{nodes: 3})
			l.enableClientSACK()
			tl := l.traceAll()
			tl.notify = make(chan tkTraceEvent, 4*flows)
			ctx := testCtxTB(b)
			ds := make([]*tkDownload, flows)
			for i := range ds {
				ds[i] = l.startDownload(ctx, tkDst4, 1<<40, uint64(i))
			}
			for _, d := range ds {
				waitBytesTB(b, d, 256<<10)
			}
			st := newTkPhaseStats()
			cur, failed := 0, 0
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for _, d := range ds {
					if !l.waitReplicasOwner(d.key, l.nodes[cur].name) {
						b.Fatalf("replicas of %s do not name %s", d.key, l.nodes[cur].name)
					}
					if err := d.waitMore(64 << 10); err != nil {
						b.Fatal(err)
					}
				}
				next := (cur + 1) % len(l.nodes)
				tl.take()
				for len(tl.notify) > 0 {
					<-tl.notify
				}
				flip := time.Now()
				l.route.Store(int32(next))
				cur = next
				got := map[FlowKey]bool{}
				deadline := time.After(10 * time.Second)
			wait:
				for len(got) < flows {
					select {
					case ev := <-tl.notify:
						if ev.node == l.nodes[next].name && ev.at.After(flip) {
							got[ev.k] = true
						}
					case <-deadline:
						failed += flows - len(got)
						break wait
					}
				}
				byFlow := map[FlowKey][]tkTraceEvent{}
				for _, ev := range tl.take() {
					byFlow[ev.k] = append(byFlow[ev.k], ev)
				}
				for k := range got {
					st.add(byFlow[k], l.nodes[next].name)
				}
			}
			b.StopTimer()
			st.report(b)
			b.ReportMetric(float64(failed), "failed")
			b.ReportMetric(float64(l.resets()), "resets")
		})
	}
}

// waitMore waits until the download received n more bytes; it returns the
// download's error if it ended first.
func (d *tkDownload) waitMore(n int64) error {
	want := d.conn.n.Load() + n
	deadline := time.Now().Add(5 * time.Second)
	for d.conn.n.Load() < want {
		select {
		case err := <-d.done:
			return fmt.Errorf("download ended: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("download stuck at %d bytes", d.conn.n.Load())
		}
		time.Sleep(50 * time.Microsecond)
	}
	return nil
}

// waitReplicasOwner waits until every other node's replica of k names
// owner, and reports whether they did within 5 s.
func (l *tkLab) waitReplicasOwner(k FlowKey, owner string) bool {
	deadline := time.Now().Add(5 * time.Second)
	for _, n := range l.nodes {
		if n.name == owner {
			continue
		}
		for {
			if s, ok := n.r.store.Lookup(k); ok && s.Owner == owner {
				break
			}
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(100 * time.Microsecond)
		}
	}
	return true
}

func waitBytesTB(tb testing.TB, d *tkDownload, n int64) {
	tb.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for d.conn.n.Load() < n {
		select {
		case err := <-d.done:
			tb.Fatalf("download ended: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			tb.Fatalf("download stuck at %d bytes (waiting for %d)", d.conn.n.Load(), n)
		}
		time.Sleep(50 * time.Microsecond)
	}
}

func testCtxTB(tb testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	tb.Cleanup(cancel)
	return ctx
}
