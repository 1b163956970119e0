package main

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	good := map[string]uint64{
		"1":             1,
		"4096":          4096,
		"200MB":         200e6,
		"200mb":         200e6,
		"200 MB":        200e6,
		"200M":          200e6,
		"1.5GB":         1.5e9,
		"1GiB":          1 << 30,
		"64KiB":         64 << 10,
		"64kib":         64 << 10,
		"512B":          512,
		"2TiB":          2 << 40,
		"0.5KB":         500,
		" 10KB ":        10e3,
		"1e3":           1000,
		"1099511627776": 1 << 40,
	}
	for in, want := range good {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "MB", "-1MB", "+5", "0", "0MB", "abc", "1.2.3MB", "10XB", "NaN", "Inf", "99999999999999999999", "20000000000TB", "0.1B"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestFormatSize(t *testing.T) {
	cases := map[uint64]string{
		0: "0B", 512: "512B", 1000: "1KB", 1500: "1.50KB",
		200e6: "200MB", 2.4e9: "2.40GB", 1e12: "1TB", 1 << 30: "1.07GB",
	}
	for in, want := range cases {
		if got := formatSize(in); got != want {
			t.Errorf("formatSize(%d) = %q, want %q", in, got, want)
		}
	}
}

func TestSizeFlagRoundTrip(t *testing.T) {
	var f sizeFlag
	if err := f.Set("200MB"); err != nil || uint64(f) != 200e6 || f.String() != "200MB" {
		t.Fatalf("sizeFlag: %d %q %v", f, f.String(), err)
	}
	if err := f.Set("nope"); err == nil {
		t.Fatal("sizeFlag accepted nope")
	}
}

func TestMedian(t *testing.T) {
	cases := []struct {
		in   []float64
		want float64
	}{
		{[]float64{3}, 3},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{0.6, 0.5, 9.9}, 0.6},
	}
	for _, c := range cases {
		orig := append([]float64(nil), c.in...)
		if got := median(c.in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
		for i := range orig {
			if orig[i] != c.in[i] {
				t.Errorf("median modified its input: %v", c.in)
			}
		}
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median(nil) is not NaN")
	}
}

func TestPercentile(t *testing.T) {
	var d []time.Duration
	for i := 1; i <= 100; i++ {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	for p, want := range map[float64]time.Duration{50: 50 * time.Millisecond, 99: 99 * time.Millisecond, 100: 100 * time.Millisecond, 0: time.Millisecond} {
		if got := percentile(d, p); got != want {
			t.Errorf("percentile(1..100ms, %v) = %v, want %v", p, got, want)
		}
	}
	if percentile(nil, 50) != 0 {
		t.Error("percentile(nil) != 0")
	}
}

func TestRates(t *testing.T) {
	if got := mbps(100e6, 2*time.Second); got != 50 {
		t.Errorf("mbps = %v, want 50", got)
	}
	if got := gbps(125e6, time.Second); got != 1 {
		t.Errorf("gbps = %v, want 1", got)
	}
	if mbps(1, 0) != 0 || gbps(1, -time.Second) != 0 {
		t.Error("rate over a non-positive duration is not 0")
	}
	if !math.IsNaN(ratio(1, 0)) || ratio(1, 4) != 0.25 {
		t.Error("ratio")
	}
	if fmtRatio(math.NaN()) != "-" || fmtRatio(0.054) != "0.05x" || fmtFloat(math.Inf(1), 1) != "-" {
		t.Error("fmtRatio/fmtFloat")
	}
}

func TestTable(t *testing.T) {
	tb := newTable("flow", "node", "MB/s").alignRight(0, 2)
	tb.add("1", "n1", "12.5")
	tb.add("10", "n22", "7.0")
	tb.add("3") // short row
	want := "" +
		"flow  node  MB/s\n" +
		"----  ----  ----\n" +
		"   1  n1    12.5\n" +
		"  10  n22    7.0\n" +
		"   3\n"
	if got := tb.String(); got != want {
		t.Errorf("table:\n%s\nwant:\n%s", got, want)
	}
}

func TestChoosePorts(t *testing.T) {
	// A fake ECMP: port p goes to node p%3, except that ports 100..109
	// all go to node 0, so balancing has to skip them.
	predict := func(p int) (int, error) {
		if p >= 100 && p < 110 {
			return 0, nil
		}
		return p % 3, nil
	}
	ports, pred, err := choosePorts(12, 3, 100, 1000, predict)
	if err != nil {
		t.Fatal(err)
	}
	if len(ports) != 12 || len(pred) != 12 {
		t.Fatalf("got %d ports, %d predictions", len(ports), len(pred))
	}
	count := map[int]int{}
	seen := map[int]bool{}
	for i, p := range ports {
		if seen[p] {
			t.Errorf("port %d twice", p)
		}
		seen[p] = true
		if n, _ := predict(p); n != pred[i] {
			t.Errorf("port %d: pred %d, want %d", p, pred[i], n)
		}
		count[pred[i]]++
	}
	for n := 0; n < 3; n++ {
		if count[n] != 4 {
			t.Errorf("node %d got %d flows, want 4 (%v)", n, count[n], ports)
		}
	}
	// Uneven counts: 5 flows over 3 nodes -> at most 2 per node.
	_, pred, err = choosePorts(5, 3, 1, 100, func(p int) (int, error) { return p % 3, nil })
	if err != nil {
		t.Fatal(err)
	}
	count = map[int]int{}
	for _, n := range pred {
		count[n]++
		if count[n] > 2 {
			t.Errorf("node %d over quota: %v", n, pred)
		}
	}
	// A node that never gets traffic: give up after limit ports.
	if _, _, err := choosePorts(6, 3, 1, 50, func(p int) (int, error) { return p % 2, nil }); err == nil {
		t.Error("choosePorts succeeded although node 2 is unreachable")
	}
	boom := errors.New("boom")
	if _, _, err := choosePorts(1, 1, 1, 10, func(int) (int, error) { return 0, boom }); !errors.Is(err, boom) {
		t.Errorf("predict error not passed on: %v", err)
	}
	if _, _, err := choosePorts(1, 2, 1, 10, func(int) (int, error) { return 5, nil }); err == nil {
		t.Error("out-of-range node index accepted")
	}
}

func TestParseDemoArgs(t *testing.T) {
	o, _, err := parseDemoArgs(nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.nodes != 3 || o.flows != 12 || o.size != 250e6 || o.ipv6 || o.batond == "" {
		t.Errorf("defaults: %+v", o)
	}
	o, _, err = parseDemoArgs([]string{"-nodes", "2", "-flows=4", "-size", "1GiB", "-v6", "-batond", "/x/batond"})
	if err != nil || o.nodes != 2 || o.flows != 4 || o.size != 1<<30 || !o.ipv6 || o.batond != "/x/batond" {
		t.Errorf("parsed %+v, %v", o, err)
	}
	bad := map[string][]string{
		"-nodes": {"-nodes", "0"},
		"-flows": {"-flows", "-1"},
		"-size":  {"-size", "lots"},
		"-bogus": {"-bogus"},
		"extra":  {"extra"},
	}
	for name, args := range bad {
		_, _, err := parseDemoArgs(args)
		if err == nil {
			t.Errorf("%v: no error", args)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, name) || strings.Contains(msg, "\n") {
			t.Errorf("%v: error %q should be one line naming %s", args, msg, name)
		}
	}
	if _, _, err := parseDemoArgs([]string{"-h"}); !errors.Is(err, errHelp) {
		t.Errorf("-h: %v", err)
	}
}

func TestParseBenchArgs(t *testing.T) {
	o, _, err := parseBenchArgs(nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.duration != 10*time.Second || o.mtu != 1500 || o.runs != 3 || o.workers != 8 || !o.ipv6 || o.out != "docs/bench/latest.json" {
		t.Errorf("defaults: %+v", o)
	}
	if o, _, err := parseBenchArgs([]string{"-v6=false", "-mtu", "1000"}); err != nil || o.mtu != 1000 {
		t.Errorf("IPv4-only MTU 1000: %+v %v", o, err)
	}
	for name, args := range map[string][]string{
		"-mtu":      {"-mtu", "1000"}, // IPv6 needs 1280
		"-duration": {"-duration", "10"},
		"-runs":     {"-runs", "0"},
		"-workers":  {"-workers", "0"},
		"-out":      {"-out", "results.txt"},
		"-profile":  {"-profile", "10ms"},
	} {
		_, _, err := parseBenchArgs(args)
		if err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%v: error %v should name %s", args, err, name)
		}
	}
}

func TestParseUpArgs(t *testing.T) {
	if o, _, err := parseUpArgs([]string{"-nodes", "8"}); err != nil || o.nodes != 8 {
		t.Errorf("%+v %v", o, err)
	}
	if _, _, err := parseUpArgs([]string{"-nodes", "9"}); err == nil || !strings.Contains(err.Error(), "-nodes") {
		t.Errorf("-nodes 9: %v", err)
	}
}

func TestNodeIndex(t *testing.T) {
	if nodeIndex("n1", 3) != 0 || nodeIndex("n3", 3) != 2 || nodeIndex("n4", 3) != -1 || nodeIndex("", 3) != -1 {
		t.Error("nodeIndex")
	}
}

func TestTimelineRates(t *testing.T) {
	ds := []*Download{{}, {}, {}}
	tl := &Timeline{flows: ds}
	tl.Samples = []Sample{
		{At: 0, Bytes: []int64{0, 0, 0}, Node: []int{-1, -1, -1}},
		{At: time.Second, Bytes: []int64{10e6, 20e6, 5e6}, Node: []int{0, 1, -1}},
	}
	total, per := tl.Rates(2)
	if total != 35 || per[0] != 10 || per[1] != 20 {
		t.Errorf("Rates = %v %v", total, per)
	}
}

func TestJSONNaN(t *testing.T) {
	b, err := json.Marshal(struct{ R jfloat }{jfloat(math.NaN())})
	if err != nil || string(b) != `{"R":null}` {
		t.Errorf("%s %v", b, err)
	}
	b, _ = json.Marshal(jfloat(0.5))
	if string(b) != "0.5" {
		t.Errorf("%s", b)
	}
}
