package main

// This file draws a throughput-over-time plot as SVG by hand (no plotting
// dependency): one polyline per series, axes with ticks, vertical markers
// (the failover) and a legend. Pure: plotSVG returns the document.

import (
	"encoding/xml"
	"fmt"
	"math"
	"strings"
	"time"
)

// plotSeries is one line of the plot: a value per step of plotSpec.Step,
// starting at time 0.
type plotSeries struct {
	Name   string
	Color  string // any SVG color
	Values []float64
	Width  float64 // stroke width, default 1.5
}

// plotMarker is a vertical line at At, labelled.
type plotMarker struct {
	At    time.Duration
	Label string
	Color string
}

// plotSpec describes a plot.
type plotSpec struct {
	Title, YLabel string
	Step          time.Duration // time between two values of a series
	Series        []plotSeries
	Markers       []plotMarker
	Width, Height int // pixels; defaults 900 x 420
}

const (
	plotLeft, plotRight, plotTop, plotBottom = 70, 170, 40, 50
)

// niceStep returns a round tick step (1, 2 or 5 times a power of ten) that
// cuts span into at most about n parts.
func niceStep(span float64, n int) float64 {
	if !(span > 0) || n < 1 {
		return 1
	}
	raw := span / float64(n)
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

// esc escapes s for SVG text and attribute values.
func esc(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

// plotSVG renders spec as a standalone SVG document.
func plotSVG(spec plotSpec) string {
	w, h := spec.Width, spec.Height
	if w <= 0 {
		w = 900
	}
	if h <= 0 {
		h = 420
	}
	step := spec.Step
	if step <= 0 {
		step = time.Second
	}
	// Extent of the data.
	n := 0
	ymax := 0.0
	for _, s := range spec.Series {
		n = max(n, len(s.Values))
		for _, v := range s.Values {
			if !math.IsNaN(v) && !math.IsInf(v, 0) {
				ymax = max(ymax, v)
			}
		}
	}
	tmax := (time.Duration(max(n-1, 1)) * step).Seconds()
	for _, m := range spec.Markers {
		tmax = max(tmax, m.At.Seconds())
	}
	ystep := niceStep(ymax, 6)
	ytop := math.Max(ystep, math.Ceil(ymax/ystep)*ystep)
	pw, ph := float64(w-plotLeft-plotRight), float64(h-plotTop-plotBottom)
	x := func(t float64) float64 { return plotLeft + pw*t/tmax }
	y := func(v float64) float64 { return plotTop + ph*(1-v/ytop) }

	var b strings.Builder
	fmt.Fprintf(&b, `<?xml version="1.0" encoding="UTF-8"?>`+"\n")
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", w, h, w, h)
	fmt.Fprintf(&b, `<rect x="0" y="0" width="%d" height="%d" fill="white"/>`+"\n", w, h)
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">%s</text>`+"\n", plotLeft, esc(spec.Title))
	// Grid and axes.
	for v := 0.0; v <= ytop+ystep/2; v += ystep {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x(0), y(v), x(tmax), y(v))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="end">%s</text>`+"\n", x(0)-6, y(v)+4, esc(fmtFloat(v, decimals(ystep))))
	}
	tstep := niceStep(tmax, 10)
	for t := 0.0; t <= tmax+tstep/100; t += tstep {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#888"/>`+"\n", x(t), y(0), x(t), y(0)+5)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x(t), y(0)+18, esc(fmtFloat(t, decimals(tstep))))
	}
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x(0), y(0), x(tmax), y(0))
	fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", x(0), y(0), x(0), y(ytop))
	fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">time since the downloads started, s</text>`+"\n", x(tmax/2), h-10)
	fmt.Fprintf(&b, `<text x="16" y="%.1f" text-anchor="middle" transform="rotate(-90 16 %.1f)">%s</text>`+"\n", y(ytop/2), y(ytop/2), esc(spec.YLabel))
	// Markers under the lines.
	for i, m := range spec.Markers {
		c := m.Color
		if c == "" {
			c = "red"
		}
		mx := x(m.At.Seconds())
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-dasharray="6 4" stroke-width="1.5"/>`+"\n", mx, y(0), mx, y(ytop), esc(c))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" fill="%s">%s</text>`+"\n", mx+4, y(ytop)+14+float64(i)*14, esc(c), esc(m.Label))
	}
	// Series.
	for i, s := range spec.Series {
		sw := s.Width
		if sw <= 0 {
			sw = 1.5
		}
		var pts []string
		flush := func() {
			if len(pts) > 0 {
				fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="%.1f" points="%s"/>`+"\n", esc(s.Color), sw, strings.Join(pts, " "))
				pts = pts[:0]
			}
		}
		for j, v := range s.Values {
			if math.IsNaN(v) || math.IsInf(v, 0) {
				flush()
				continue
			}
			pts = append(pts, fmt.Sprintf("%.1f,%.1f", x((time.Duration(j)*step).Seconds()), y(v)))
		}
		flush()
		ly := float64(plotTop + 10 + 18*i)
		lx := float64(w - plotRight + 15)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="3"/>`+"\n", lx, ly, lx+20, ly, esc(s.Color))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f">%s</text>`+"\n", lx+26, ly+4, esc(s.Name))
	}
	b.WriteString("</svg>\n")
	return b.String()
}

// decimals is how many decimals print a multiple of step exactly enough.
func decimals(step float64) int {
	if step >= 1 {
		return 0
	}
	return int(math.Ceil(-math.Log10(step)))
}
