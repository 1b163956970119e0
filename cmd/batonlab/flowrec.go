package main

// This file records, on the client, when each flow's bytes arrive: a
// flowRecorder per flow keeps the bytes per time bin (for throughput over
// time and before/after rates) and every gap between two arrivals of at
// least recMinGap (for stalls). The takeover benchmark and the failover
// demo both read them; the functions on recordings are pure.

import (
	"math"
	"slices"
	"sync"
	"time"
)

const (
	// recBin is the width of a recorder's byte-count bins.
	recBin = 50 * time.Millisecond
	// recMinGap is the smallest gap between two arrivals that is kept.
	recMinGap = time.Millisecond
	// recMaxGaps bounds the gaps kept per flow; past it only gaps larger
	// than the smallest kept one replace it.
	recMaxGaps = 8192
)

// gap is a time without any byte arriving on a flow, relative to the
// recorder's origin, and the stream offset where it happened.
type gap struct {
	From, To time.Duration
	Offset   int64
}

func (g gap) Len() time.Duration { return g.To - g.From }

// flowRecorder records one flow's arrivals. Safe for concurrent use.
type flowRecorder struct {
	origin time.Time
	bin    time.Duration

	mu    sync.Mutex
	bins  []int64
	total int64
	first time.Duration // first arrival, -1 before it
	last  time.Duration
	gaps  []gap
}

// newFlowRecorder returns a recorder whose times count from origin (share
// one origin between the flows that are compared or plotted together).
func newFlowRecorder(origin time.Time) *flowRecorder {
	return &flowRecorder{origin: origin, bin: recBin, first: -1}
}

// add records n bytes arriving at t.
func (r *flowRecorder) add(t time.Time, n int) {
	if n <= 0 {
		return
	}
	at := t.Sub(r.origin)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.first < 0 {
		r.first = at
	} else if g := at - r.last; g >= recMinGap {
		r.keepGap(gap{From: r.last, To: at, Offset: r.total})
	}
	r.last = at
	b := max(int(at/r.bin), 0)
	for len(r.bins) <= b {
		r.bins = append(r.bins, 0)
	}
	r.bins[b] += int64(n)
	r.total += int64(n)
}

func (r *flowRecorder) keepGap(g gap) {
	if len(r.gaps) < recMaxGaps {
		r.gaps = append(r.gaps, g)
		return
	}
	i := 0
	for j := range r.gaps {
		if r.gaps[j].Len() < r.gaps[i].Len() {
			i = j
		}
	}
	if g.Len() > r.gaps[i].Len() {
		r.gaps = append(slices.Delete(r.gaps, i, i+1), g)
	}
}

// Received returns the bytes recorded so far.
func (r *flowRecorder) Received() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}

// recording is a copy of a recorder's data.
type recording struct {
	Bin   time.Duration
	Bins  []int64
	Total int64
	First time.Duration // -1: nothing arrived
	Last  time.Duration
	Gaps  []gap // in time order
}

// snapshot copies the recorder's data.
func (r *flowRecorder) snapshot() recording {
	r.mu.Lock()
	defer r.mu.Unlock()
	g := slices.Clone(r.gaps)
	slices.SortFunc(g, func(a, b gap) int { return int(a.From - b.From) })
	return recording{Bin: r.bin, Bins: slices.Clone(r.bins), Total: r.total, First: r.first, Last: r.last, Gaps: g}
}

// gapsIn returns the gaps of at least minLen that overlap [from, to).
func (rec recording) gapsIn(from, to, minLen time.Duration) []gap {
	var out []gap
	for _, g := range rec.Gaps {
		if g.To > from && g.From < to && g.Len() >= minLen {
			out = append(out, g)
		}
	}
	return out
}

// largestGap returns the largest gap overlapping [from, to), the zero gap
// if none. A gap still open at to (no byte after rec.Last) counts up to to.
func (rec recording) largestGap(from, to time.Duration) gap {
	var best gap
	for _, g := range rec.gapsIn(from, to, 0) {
		if g.Len() > best.Len() {
			best = g
		}
	}
	if rec.First >= 0 && rec.Last < to && to-max(rec.Last, from) > best.Len() && to > from {
		best = gap{From: rec.Last, To: to, Offset: rec.Total}
	}
	return best
}

// disruption is the total time of the gaps of at least minLen overlapping
// [from, to), clipped to it.
func (rec recording) disruption(from, to, minLen time.Duration) time.Duration {
	var sum time.Duration
	for _, g := range rec.gapsIn(from, to, minLen) {
		sum += min(g.To, to) - max(g.From, from)
	}
	return sum
}

// bytesIn returns the bytes of the bins entirely inside [from, to) and the
// time they cover.
func (rec recording) bytesIn(from, to time.Duration) (int64, time.Duration) {
	if rec.Bin <= 0 || to <= from {
		return 0, 0
	}
	first := int((from + rec.Bin - 1) / rec.Bin)
	last := int(to / rec.Bin) // exclusive
	var n int64
	for b := max(first, 0); b < last; b++ {
		if b < len(rec.Bins) {
			n += rec.Bins[b]
		}
	}
	if last <= first {
		return 0, 0
	}
	return n, time.Duration(last-first) * rec.Bin
}

// rateIn is the flow's rate over [from, to) in MB/s (whole bins), NaN if
// the window holds no whole bin.
func (rec recording) rateIn(from, to time.Duration) float64 {
	n, d := rec.bytesIn(from, to)
	if d <= 0 {
		return nan()
	}
	return mbps(n, d)
}

// sumRates adds the flows' rates over [from, to), MB/s.
func sumRates(recs []recording, from, to time.Duration) float64 {
	var sum int64
	var d time.Duration
	for _, r := range recs {
		n, w := r.bytesIn(from, to)
		sum += n
		d = max(d, w)
	}
	if d <= 0 {
		return nan()
	}
	return mbps(sum, d)
}

func nan() float64 { return math.NaN() }

// distOf is the distribution of ds in ms (ds is not modified).
func distOf(ds []time.Duration) Dist {
	s := slices.Clone(ds)
	slices.Sort(s)
	return newDist(s)
}
