package handoff

import (
	"testing"
	"time"
)

func BenchmarkTmpAckLag(b *testing.B) {
	c := benchPair(b)
	src := c.nodes["a"].src
	l := c.nodes["a"].r.links[0]
	i := 0
	for b.Loop() {
		k := testKey(i)
		i++
		before := l.lastLag.Load()
		src.Open(k)
		for l.lastLag.Load() == before {
			time.Sleep(20 * time.Microsecond)
		}
	}
	now := time.Now()
	b.ReportMetric(float64(l.window.quantile(now, 0.5))/1e3, "ack-p50-µs")
	b.ReportMetric(float64(l.window.quantile(now, 0.99))/1e3, "ack-p99-µs")
}
