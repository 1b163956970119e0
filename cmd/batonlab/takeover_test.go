package main

import (
	"encoding/xml"
	"io"
	"math"
	"strings"
	"testing"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

func TestFlowRecorderGapsAndRates(t *testing.T) {
	origin := time.Unix(1000, 0)
	r := newFlowRecorder(origin)
	at := func(d time.Duration, n int) { r.add(origin.Add(d), n) }
	// 1000 bytes every 10 ms for 1 s, a 300 ms stall, then 2000 bytes
	// every 10 ms for 1 s.
	var d time.Duration
	for ; d < time.Second; d += 10 * time.Millisecond {
		at(d, 1000)
	}
	d += 290 * time.Millisecond
	for end := d + time.Second; d < end; d += 10 * time.Millisecond {
		at(d, 2000)
	}
	rec := r.snapshot()
	if rec.Total != 100*1000+100*2000 || rec.First != 0 {
		t.Fatalf("total %d first %v", rec.Total, rec.First)
	}
	g := rec.largestGap(500*time.Millisecond, 2200*time.Millisecond)
	if g.Len() != 300*time.Millisecond || g.From != 990*time.Millisecond || g.Offset != 100*1000 {
		t.Fatalf("largest gap %+v", g)
	}
	if g := rec.largestGap(0, 900*time.Millisecond); g.Len() != 10*time.Millisecond {
		t.Fatalf("largest gap before the stall %+v", g)
	}
	// A gap straddling the window start counts.
	if g := rec.largestGap(1100*time.Millisecond, 1200*time.Millisecond); g.Len() != 300*time.Millisecond {
		t.Fatalf("straddling gap %+v", g)
	}
	// Disruption: gaps over 20 ms only, clipped to the window.
	if got := rec.disruption(0, 3*time.Second, 20*time.Millisecond); got != 300*time.Millisecond {
		t.Fatalf("disruption %v", got)
	}
	if got := rec.disruption(1100*time.Millisecond, 3*time.Second, 20*time.Millisecond); got != 190*time.Millisecond {
		t.Fatalf("clipped disruption %v", got)
	}
	if got := rec.rateIn(0, time.Second); math.Abs(got-0.1) > 1e-9 {
		t.Fatalf("rate before %v MB/s, want 0.1", got)
	}
	if got := rec.rateIn(1400*time.Millisecond, 2200*time.Millisecond); math.Abs(got-0.2) > 1e-9 {
		t.Fatalf("rate after %v MB/s, want 0.2", got)
	}
	if got := sumRates([]recording{rec, rec}, 0, time.Second); math.Abs(got-0.2) > 1e-9 {
		t.Fatalf("sum of rates %v", got)
	}
	if !math.IsNaN(rec.rateIn(10*time.Millisecond, 20*time.Millisecond)) {
		t.Fatal("a window without a whole bin has a rate")
	}
	// A flow that stopped: the open gap counts up to the window's end.
	if g := rec.largestGap(2*time.Second, 4*time.Second); g.To != 4*time.Second {
		t.Fatalf("open gap %+v", g)
	}
}

func TestFlowRecorderKeepsLargestGaps(t *testing.T) {
	origin := time.Unix(0, 0)
	r := newFlowRecorder(origin)
	at := time.Duration(0)
	for i := 0; i < recMaxGaps+10; i++ {
		r.add(origin.Add(at), 1)
		at += 2 * time.Millisecond
	}
	at += time.Second
	r.add(origin.Add(at), 1)
	rec := r.snapshot()
	if len(rec.Gaps) != recMaxGaps {
		t.Fatalf("%d gaps kept, want %d", len(rec.Gaps), recMaxGaps)
	}
	if g := rec.largestGap(0, at+time.Millisecond); g.Len() != time.Second+2*time.Millisecond {
		t.Fatalf("largest %v", g.Len())
	}
}

func TestDistOfPercentiles(t *testing.T) {
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	d := distOf(ds)
	if d.N != 100 || d.P50 != 50 || d.P90 != 90 || d.P99 != 99 || d.Max != 100 {
		t.Fatalf("%+v", d)
	}
	if ds[0] != 100*time.Millisecond {
		t.Fatal("distOf sorted its input")
	}
	if e := distOf(nil); e.N != 0 || e.P99 != 0 {
		t.Fatalf("empty: %+v", e)
	}
}

const histText = `# TYPE baton_takeover_latency_seconds histogram
baton_takeover_latency_seconds_bucket{kind="push",node="n1",le="0.001"} 2
baton_takeover_latency_seconds_bucket{kind="push",node="n1",le="0.002"} 6
baton_takeover_latency_seconds_bucket{kind="push",node="n1",le="0.004"} 10
baton_takeover_latency_seconds_bucket{kind="push",node="n1",le="+Inf"} 10
baton_takeover_latency_seconds_sum{kind="push",node="n1"} 0.02
baton_takeover_latency_seconds_count{kind="push",node="n1"} 10
baton_takeover_latency_seconds_bucket{kind="push",node="n2",le="0.001"} 0
baton_takeover_latency_seconds_bucket{kind="push",node="n2",le="0.002"} 0
baton_takeover_latency_seconds_bucket{kind="push",node="n2",le="0.004"} 0
baton_takeover_latency_seconds_bucket{kind="push",node="n2",le="+Inf"} 10
baton_takeover_latency_seconds_sum{kind="push",node="n2"} 1
baton_takeover_latency_seconds_count{kind="push",node="n2"} 10
baton_takeover_latency_seconds_bucket{kind="pull-migrate",node="n1",le="0.001"} 4
baton_takeover_latency_seconds_bucket{kind="pull-migrate",node="n1",le="0.002"} 4
baton_takeover_latency_seconds_bucket{kind="pull-migrate",node="n1",le="0.004"} 4
baton_takeover_latency_seconds_bucket{kind="pull-migrate",node="n1",le="+Inf"} 4
baton_takeover_latency_seconds_sum{kind="pull-migrate",node="n1"} 0.002
baton_takeover_latency_seconds_count{kind="pull-migrate",node="n1"} 4
baton_takeover_total{kind="push",node="n1"} 10
`

func TestHistogramQuantiles(t *testing.T) {
	m, err := parseMetrics(strings.NewReader(histText))
	if err != nil {
		t.Fatal(err)
	}
	hs := histogramsBy(m, latencyMetric, "kind")
	push, pull := hs["push"], hs["pull-migrate"]
	if push == nil || pull == nil || len(hs) != 2 {
		t.Fatalf("histograms %v", hs)
	}
	if push.Count != 20 || push.Counts[len(push.Counts)-1] != 20 || push.Counts[1] != 6 {
		t.Fatalf("push summed over nodes: %+v", push)
	}
	near := func(got, want float64) bool { return math.Abs(got-want) < 1e-12 }
	// Rank 10 of 20: in (0.002, 0.004], 4 of its 4 observations -> 0.004.
	if q := push.quantile(0.5); !near(q, 0.004) {
		t.Fatalf("push p50 %v", q)
	}
	// Rank 19.8 falls in +Inf: the largest finite bound.
	if q := push.quantile(0.99); q != 0.004 {
		t.Fatalf("push p99 %v", q)
	}
	// Rank 2 of 4 in the first bucket (0, 0.001]: linear from 0.
	if q := pull.quantile(0.5); !near(q, 0.0005) {
		t.Fatalf("pull p50 %v", q)
	}
	// Difference between scrapes: only n2's +Inf observations remain.
	n1only := histogramsBy(m[:6], latencyMetric, "kind")["push"]
	d := push.sub(n1only)
	if d.Count != 10 || d.Counts[0] != 0 || d.Counts[3] != 10 || !near(d.Sum, 1) {
		t.Fatalf("delta %+v", d)
	}
	if q := (&histogram{}).quantile(0.5); !math.IsNaN(q) {
		t.Fatalf("empty quantile %v", q)
	}
	if w := push.bucketWidth(0.003); w != 2 {
		t.Fatalf("bucket width %v", w)
	}
	if c := counterDelta(nil, m, "baton_takeover_total", "kind"); c["push"] != 10 || len(c) != 1 {
		t.Fatalf("counter delta %v", c)
	}
}

func TestPlotSVGWellFormed(t *testing.T) {
	svg := plotSVG(plotSpec{
		Title: `throughput <all> & "nodes"`, YLabel: "MB/s", Step: 500 * time.Millisecond,
		Series: []plotSeries{
			{Name: "all", Color: "black", Values: []float64{0, 10, 20, math.NaN(), 15, 30}},
			{Name: "n1 & co", Color: "#1f77b4", Values: []float64{0, 5, 10}},
			{Name: "empty", Color: "red"},
		},
		Markers: []plotMarker{{At: 1200 * time.Millisecond, Label: "kill -9 n1 <pid 42>"}},
	})
	dec := xml.NewDecoder(strings.NewReader(svg))
	var polylines, texts int
	var sawRoot bool
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v\n%s", err, svg)
		}
		if se, ok := tok.(xml.StartElement); ok {
			switch se.Name.Local {
			case "svg":
				sawRoot = true
				if se.Name.Space != "http://www.w3.org/2000/svg" {
					t.Fatalf("svg namespace %q", se.Name.Space)
				}
			case "polyline":
				polylines++
			case "text":
				texts++
			}
		}
	}
	// The NaN splits "all" in two polylines; "empty" draws none.
	if !sawRoot || polylines != 3 || texts < 5 {
		t.Fatalf("root %v, %d polylines, %d texts\n%s", sawRoot, polylines, texts, svg)
	}
	if !strings.Contains(svg, "kill -9 n1 &lt;pid 42&gt;") {
		t.Fatal("marker label not escaped")
	}
	if s := plotSVG(plotSpec{}); !strings.HasSuffix(s, "</svg>\n") {
		t.Fatal("an empty plot is not a document")
	}
}

func TestNiceStep(t *testing.T) {
	for _, c := range []struct {
		span float64
		n    int
		want float64
	}{{100, 5, 20}, {7, 10, 1}, {0.3, 6, 0.05}, {0, 5, 1}, {95, 6, 20}} {
		if got := niceStep(c.span, c.n); math.Abs(got-c.want) > 1e-12 {
			t.Errorf("niceStep(%v, %d) = %v, want %v", c.span, c.n, got, c.want)
		}
	}
}

func TestFlowSegmentsAndThroughput(t *testing.T) {
	origin := time.Unix(2000, 0)
	hist := []*batonv1.OwnershipChange{
		{Node: "n1", How: "open", UnixNano: origin.UnixNano()},
		{Node: "n2", How: "push", UnixNano: origin.Add(3 * time.Second).UnixNano(), AtOffset: 1200},
		{Node: "n3", How: "pull-migrate", UnixNano: origin.Add(3100 * time.Millisecond).UnixNano(), AtOffset: 1150},
	}
	// 200 bytes before the body: push at body offset 1000; the pull's
	// offset below it is clamped (ranges never go back).
	segs := flowSegments(hist, "n1", 200, 5000, origin)
	want := []segment{
		{Node: "n1", How: "open", From: 0, To: 1000},
		{Node: "n2", How: "push", From: 1000, To: 1000, Since: 3 * time.Second},
		{Node: "n3", How: "pull-migrate", From: 1000, To: 5000, Since: 3100 * time.Millisecond},
	}
	if len(segs) != len(want) {
		t.Fatalf("segments %+v", segs)
	}
	for i := range want {
		if segs[i] != want[i] {
			t.Fatalf("segment %d: %+v, want %+v", i, segs[i], want[i])
		}
	}
	if nodeAt(segs, time.Second) != "n1" || nodeAt(segs, 3050*time.Millisecond) != "n2" || nodeAt(segs, time.Hour) != "n3" {
		t.Fatal("nodeAt")
	}
	// No history: one segment, the whoami node.
	if s := flowSegments(nil, "n2", 100, 700, origin); len(s) != 1 || s[0] != (segment{Node: "n2", How: "open", To: 700}) {
		t.Fatalf("no history: %+v", s)
	}

	// Throughput: 1 MB per 50 ms bin for 1 s on one flow, served by n1
	// for the first half and n2 after.
	r := newFlowRecorder(origin)
	for d := time.Duration(0); d < time.Second; d += recBin {
		r.add(origin.Add(d), 1e6)
	}
	rec := r.snapshot()
	series := throughputSeries([]recording{rec}, []string{"n1", "n2"}, func(_ int, t time.Duration) string {
		if t < 500*time.Millisecond {
			return "n1"
		}
		return "n2"
	})
	if len(series) != 3 || len(series[0].Values) != 4 {
		t.Fatalf("series %+v", series)
	}
	for k, v := range series[0].Values {
		if math.Abs(v-20) > 1e-9 {
			t.Fatalf("total step %d: %v MB/s, want 20", k, v)
		}
	}
	if series[1].Values[0] != 20 || series[1].Values[3] != 0 || series[2].Values[3] != 20 {
		t.Fatalf("per node %v %v", series[1].Values, series[2].Values)
	}
	line := timelineLine(1, 20001, want, rec, 500*time.Millisecond)
	if !strings.Contains(line, "n2 0.0MB..0.0MB (push at 3.00s)") || !strings.Contains(line, "stall at the failover") {
		t.Fatalf("timeline line %q", line)
	}
}
