package main

// This file reads a Prometheus histogram out of scraped metrics
// (baton_takeover_latency_seconds, by kind, summed over nodes), takes the
// difference between two scrapes, and estimates its quantiles the way
// PromQL's histogram_quantile does (linear within a bucket). Pure.

import (
	"math"
	"slices"
	"strconv"
)

// histogram is one cumulative histogram: Counts[i] observations <= Les[i]
// (the last bound is +Inf).
type histogram struct {
	Les    []float64
	Counts []float64
	Sum    float64
	Count  float64
}

// histogramsBy collects the histogram name (without _bucket) from m, one
// per value of label by, summed over every other label (e.g. node).
func histogramsBy(m metricSet, name, by string) map[string]*histogram {
	type acc struct {
		counts     map[float64]float64
		sum, count float64
	}
	accs := map[string]*acc{}
	get := func(k string) *acc {
		a := accs[k]
		if a == nil {
			a = &acc{counts: map[float64]float64{}}
			accs[k] = a
		}
		return a
	}
	for _, s := range m {
		switch s.name {
		case name + "_bucket":
			le, err := strconv.ParseFloat(s.labels["le"], 64)
			if err != nil {
				continue
			}
			get(s.labels[by]).counts[le] += s.value
		case name + "_sum":
			get(s.labels[by]).sum += s.value
		case name + "_count":
			get(s.labels[by]).count += s.value
		}
	}
	out := map[string]*histogram{}
	for k, a := range accs {
		h := &histogram{Sum: a.sum, Count: a.count}
		for le := range a.counts {
			h.Les = append(h.Les, le)
		}
		slices.Sort(h.Les)
		for _, le := range h.Les {
			h.Counts = append(h.Counts, a.counts[le])
		}
		out[k] = h
	}
	return out
}

// sub returns h minus before (the observations between two scrapes). A
// nil before is an empty histogram. Buckets are matched by bound.
func (h *histogram) sub(before *histogram) *histogram {
	out := &histogram{Les: slices.Clone(h.Les), Counts: slices.Clone(h.Counts), Sum: h.Sum, Count: h.Count}
	if before == nil {
		return out
	}
	out.Sum -= before.Sum
	out.Count -= before.Count
	for i, le := range out.Les {
		if j := slices.Index(before.Les, le); j >= 0 {
			out.Counts[i] -= before.Counts[j]
		}
	}
	return out
}

// quantile estimates the q-quantile (0..1) like histogram_quantile: the
// bucket holding rank q*count, linear within it (from 0 for the first
// bucket); the largest finite bound if the rank falls in +Inf. NaN when
// empty.
func (h *histogram) quantile(q float64) float64 {
	if h == nil || len(h.Counts) == 0 {
		return math.NaN()
	}
	total := h.Counts[len(h.Counts)-1]
	if !(total > 0) {
		return math.NaN()
	}
	rank := q * total
	for i, c := range h.Counts {
		if c < rank {
			continue
		}
		if math.IsInf(h.Les[i], 1) {
			if i == 0 {
				return math.NaN()
			}
			return h.Les[i-1]
		}
		lo, below := 0.0, 0.0
		if i > 0 {
			lo, below = h.Les[i-1], h.Counts[i-1]
		}
		if c == below {
			return h.Les[i]
		}
		return lo + (h.Les[i]-lo)*(rank-below)/(c-below)
	}
	return h.Les[len(h.Les)-1]
}

// bucketWidth returns the relative width of the bucket holding v (its
// upper bound over its lower bound), 0 if unknown: the resolution of a
// quantile read from h near v.
func (h *histogram) bucketWidth(v float64) float64 {
	for i, le := range h.Les {
		if v <= le && i > 0 && h.Les[i-1] > 0 && !math.IsInf(le, 1) {
			return le / h.Les[i-1]
		}
	}
	return 0
}
