package e2e

// A churn soak: short connections opened and closed for a long time
// against a 3-node cluster, sampling each batond's goroutines, resident
// memory and tracked flows. Off unless BATON_SOAK is a duration (e.g.
// BATON_SOAK=10m); make test (CI) runs it for 10 minutes.

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
)

// soakSample is one node's figures at one moment.
type soakSample struct {
	goroutines, rssMB, tracked, replicas float64
}

func sampleNode(ctx context.Context, l *lab.Lab, i int) soakSample {
	m := unlabelled(nodeMetrics(ctx, l, i))
	return soakSample{
		goroutines: metricValue(m, "go_goroutines", ""),
		rssMB:      metricValue(m, "process_resident_memory_bytes", "") / (1 << 20),
		tracked:    metricValue(m, "baton_flows_tracked", ""),
		replicas:   metricValue(m, "baton_replication_replica_flows", ""),
	}
}

// unlabelled gives the samples without labels (go_goroutines,
// process_resident_memory_bytes) an empty label set, for metricValue,
// which matches "name{".
func unlabelled(m string) string {
	var b strings.Builder
	for _, line := range strings.Split(m, "\n") {
		if f := strings.Fields(line); len(f) == 2 && !strings.Contains(f[0], "{") && !strings.HasPrefix(line, "#") {
			line = f[0] + "{} " + f[1]
		}
		b.WriteString(line + "\n")
	}
	return b.String()
}

// TestSoakChurn: 8 workers open echo connections one after another (1-8
// KiB echoed, checked, closed; 50 ms apart), plus a 1 MiB download every
// 5 s, for BATON_SOAK; every 30 s each node's goroutines, resident memory,
// tracked flows and replicas are logged, and once more 70 s after the
// churn stopped (past gVisor's 60 s TIME-WAIT). Every connection must be
// served exactly, and no node may grow: against its figures once warm
// (the first sample at least 90 s in, when the caches and pools have
// filled), the last churn sample and the one after the churn may have at
// most soakGoroutineSlack more goroutines and soakRSSGrowth more resident
// memory.
func TestSoakChurn(t *testing.T) {
	const (
		soakGoroutineSlack = 16   // transient streams, timers, in-flight connections
		soakRSSGrowth      = 1.25 // x the warm resident size, plus 8 MiB
	)
	d, err := time.ParseDuration(os.Getenv("BATON_SOAK"))
	if err != nil || d <= 0 {
		t.Skip("set BATON_SOAK to a duration (e.g. 10m) to run the churn soak")
	}
	ctx, cancel := context.WithTimeout(context.Background(), d+5*time.Minute)
	t.Cleanup(cancel)
	c := startCluster(t, ctx, 3, "bty", 2, nil)
	l := c.Lab
	// Client ports are the kernel's; reuse TIME-WAIT ones.
	if err := l.Client.SetSysctl("net.ipv4.tcp_tw_reuse", "1"); err != nil {
		t.Fatal(err)
	}
	sample := func(when string) []soakSample {
		var parts []string
		var out []soakSample
		for i := range 3 {
			s := sampleNode(ctx, l, i)
			out = append(out, s)
			parts = append(parts, fmt.Sprintf("%s goroutines %.0f rss %.1f MB tracked %.0f replicas %.0f",
				lab.NodeName(i), s.goroutines, s.rssMB, s.tracked, s.replicas))
		}
		t.Logf("%s: %s", when, strings.Join(parts, "; "))
		return out
	}
	grew := func(when string, warm, now []soakSample) {
		for i := range now {
			if now[i].goroutines > warm[i].goroutines+soakGoroutineSlack {
				t.Errorf("%s %s: %.0f goroutines, %.0f once warm", lab.NodeName(i), when, now[i].goroutines, warm[i].goroutines)
			}
			if now[i].rssMB > warm[i].rssMB*soakRSSGrowth+8 {
				t.Errorf("%s %s: resident memory %.1f MB, %.1f MB once warm", lab.NodeName(i), when, now[i].rssMB, warm[i].rssMB)
			}
		}
	}
	sample("start")
	stop := make(chan struct{})
	var conns, bytes, fails atomic.Int64
	var wg sync.WaitGroup
	fail := func(err error) {
		if fails.Add(1) <= 10 {
			t.Error(err)
		}
	}
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dst := netip.AddrPortFrom(l.Anycast4, echoPort).String()
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				case <-time.After(50 * time.Millisecond):
				}
				conn, err := l.Client.Dial(ctx, "tcp4", dst, 0)
				if err != nil {
					fail(fmt.Errorf("worker %d: dial: %w", w, err))
					continue
				}
				s := &echoSession{Conn: conn, seed: uint64(w)<<32 | uint64(n)}
				_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
				size := 1024 * (1 + n%8)
				if err := s.round(size); err != nil {
					fail(fmt.Errorf("worker %d: %w", w, err))
				} else {
					conns.Add(1)
					bytes.Add(int64(size))
				}
				conn.Close()
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := 0; ; n++ {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Second):
			}
			dl := startDownload(t, ctx, l, l.Anycast4, 0, 1<<20, 0)
			<-dl.done
			if dl.err != nil {
				fail(fmt.Errorf("download %d: %w", n, dl.err))
			}
		}
	}()
	start := time.Now()
	var warm, last []soakSample
	for time.Since(start) < d {
		time.Sleep(min(30*time.Second, d-time.Since(start)))
		last = sample(fmt.Sprintf("after %s (%d connections, %d bytes echoed)", time.Since(start).Round(time.Second), conns.Load(), bytes.Load()))
		if warm == nil && (time.Since(start) >= 90*time.Second || time.Since(start) >= d/2) {
			warm = last
			t.Log("(the figures above are the warm ones)")
		}
	}
	close(stop)
	wg.Wait()
	time.Sleep(70 * time.Second)
	after := sample("70 s after the churn stopped")
	grew("at the end of the churn", warm, last)
	grew("70 s after the churn", warm, after)
	t.Logf("churn: %d connections served exactly, %d failures, over %s", conns.Load(), fails.Load(), d)
}
