package main

// This file holds the pure helpers: size parsing and printing, rates,
// medians and plain-text tables. They do no I/O, so they are unit tested.

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// sizeUnits maps the accepted suffixes to their multipliers. Decimal
// suffixes are powers of 1000, as in MB/s; the binary ones have an "i".
var sizeUnits = []struct {
	suffix string
	mult   uint64
}{
	// Longest suffixes first, so that "MiB" is not read as "B".
	{"kib", 1 << 10}, {"mib", 1 << 20}, {"gib", 1 << 30}, {"tib", 1 << 40},
	{"kb", 1e3}, {"mb", 1e6}, {"gb", 1e9}, {"tb", 1e12},
	{"k", 1e3}, {"m", 1e6}, {"g", 1e9}, {"t", 1e12},
	{"b", 1},
}

// parseSize parses a byte count such as "200MB", "1.5GB", "64KiB" or
// "1048576". Fractions are allowed with a suffix; the result is rounded
// down to a whole byte and must be at least 1.
func parseSize(s string) (uint64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	if t == "" {
		return 0, errors.New("empty size")
	}
	mult := uint64(1)
	for _, u := range sizeUnits {
		if num, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(num), u.mult
			break
		}
	}
	if t == "" || strings.HasPrefix(t, "-") || strings.HasPrefix(t, "+") {
		return 0, fmt.Errorf("%q is not a size like 200MB, 1GiB or 4096", s)
	}
	var n uint64
	if strings.ContainsAny(t, ".eE") {
		f, err := strconv.ParseFloat(t, 64)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return 0, fmt.Errorf("%q is not a size like 200MB, 1GiB or 4096", s)
		}
		v := f * float64(mult)
		if v >= 1<<63 {
			return 0, fmt.Errorf("%q is too large", s)
		}
		n = uint64(v)
	} else {
		v, err := strconv.ParseUint(t, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%q is not a size like 200MB, 1GiB or 4096", s)
		}
		if v > math.MaxUint64/mult {
			return 0, fmt.Errorf("%q is too large", s)
		}
		n = v * mult
	}
	if n == 0 {
		return 0, fmt.Errorf("%q is zero bytes", s)
	}
	return n, nil
}

// sizeFlag is a flag.Value holding a byte count.
type sizeFlag uint64

func (f *sizeFlag) String() string { return formatSize(uint64(*f)) }

func (f *sizeFlag) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*f = sizeFlag(n)
	return nil
}

// formatSize prints n in the largest decimal unit that keeps it readable:
// "200MB", "1.5GB", "512B". Whole multiples print without decimals.
func formatSize(n uint64) string {
	units := []struct {
		name string
		v    uint64
	}{{"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}}
	for _, u := range units {
		if n >= u.v {
			if n%u.v == 0 {
				return strconv.FormatUint(n/u.v, 10) + u.name
			}
			return strconv.FormatFloat(float64(n)/float64(u.v), 'f', 2, 64) + u.name
		}
	}
	return strconv.FormatUint(n, 10) + "B"
}

// mbps returns the rate in MB/s (10^6 bytes per second); 0 for d <= 0.
func mbps(bytes int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(bytes) / 1e6 / d.Seconds()
}

// gbps returns the rate in Gb/s (10^9 bits per second); 0 for d <= 0.
func gbps(bytes int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(bytes) * 8 / 1e9 / d.Seconds()
}

// median returns the median of xs (the mean of the middle two for an even
// count), NaN for none. xs is not modified.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// percentile returns the p-th percentile (0..100) of sorted xs by the
// nearest-rank method, 0 for none.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

// ratio returns a/b, NaN if b is not positive.
func ratio(a, b float64) float64 {
	if !(b > 0) {
		return math.NaN()
	}
	return a / b
}

// table is a plain-text table: a header row and rows of cells, columns
// separated by two spaces. Columns listed in right are right-aligned. A
// section row is a second header inside the table, between rules, for
// rows whose columns mean something else.
type table struct {
	header   []string
	rows     [][]string
	right    map[int]bool
	sections map[int]bool // indexes of section rows in rows
}

func newTable(header ...string) *table {
	return &table{header: header, right: map[int]bool{}, sections: map[int]bool{}}
}

// alignRight right-aligns the given columns (numbers).
func (t *table) alignRight(cols ...int) *table {
	for _, c := range cols {
		t.right[c] = true
	}
	return t
}

func (t *table) add(cells ...string) { t.rows = append(t.rows, cells) }

// section adds a sub-header row, rendered between rules.
func (t *table) section(cells ...string) {
	t.sections[len(t.rows)] = true
	t.rows = append(t.rows, cells)
}

// String renders the table with a rule under the header. Rows shorter than
// the header are padded with empty cells; trailing spaces are trimmed.
func (t *table) String() string {
	ncol := len(t.header)
	for _, r := range t.rows {
		ncol = max(ncol, len(r))
	}
	width := make([]int, ncol)
	all := append([][]string{t.header}, t.rows...)
	for _, r := range all {
		for i, c := range r {
			width[i] = max(width[i], len([]rune(c)))
		}
	}
	var b strings.Builder
	line := func(r []string) {
		var sb strings.Builder
		for i := 0; i < ncol; i++ {
			c := ""
			if i < len(r) {
				c = r[i]
			}
			pad := strings.Repeat(" ", width[i]-len([]rune(c)))
			if i > 0 {
				sb.WriteString("  ")
			}
			if t.right[i] {
				sb.WriteString(pad + c)
			} else {
				sb.WriteString(c + pad)
			}
		}
		b.WriteString(strings.TrimRight(sb.String(), " "))
		b.WriteByte('\n')
	}
	line(t.header)
	rule := make([]string, ncol)
	for i := range rule {
		rule[i] = strings.Repeat("-", width[i])
	}
	line(rule)
	for i, r := range t.rows {
		if t.sections[i] {
			line(rule)
			line(r)
			line(rule)
			continue
		}
		line(r)
	}
	return b.String()
}

// fmtFloat prints x with prec decimals, "-" for NaN.
func fmtFloat(x float64, prec int) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "-"
	}
	return strconv.FormatFloat(x, 'f', prec, 64)
}

// fmtRatio prints a ratio as "0.42x", "-" for NaN.
func fmtRatio(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "-"
	}
	return strconv.FormatFloat(x, 'f', 2, 64) + "x"
}

// choosePorts picks n distinct source ports, trying first, first+1, ...,
// and keeps a port only while the node predict says it reaches has fewer
// than ceil(n/nodes) flows, so the flows spread evenly over the nodes.
// It gives up after scanning limit ports. It returns the ports and the
// predicted node of each.
func choosePorts(n, nodes, first, limit int, predict func(port int) (int, error)) (ports, pred []int, err error) {
	if nodes < 1 {
		return nil, nil, errors.New("no nodes")
	}
	quota := (n + nodes - 1) / nodes
	count := make([]int, nodes)
	for port := first; len(ports) < n; port++ {
		if port > 65535 || port-first >= limit {
			return nil, nil, fmt.Errorf("found only %d of %d source ports spreading evenly over %d nodes in %d..%d",
				len(ports), n, nodes, first, port-1)
		}
		node, err := predict(port)
		if err != nil {
			return nil, nil, err
		}
		if node < 0 || node >= nodes {
			return nil, nil, fmt.Errorf("port %d: predicted node index %d out of range", port, node)
		}
		if count[node] >= quota {
			continue
		}
		count[node]++
		ports = append(ports, port)
		pred = append(pred, node)
	}
	return ports, pred, nil
}
