package main

import (
	"bufio"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParsePprofShown(t *testing.T) {
	for _, c := range []struct {
		out  string
		want float64
	}{
		{"Type: inuse_space\nShowing nodes accounting for 1.50MB, 45.10% of 3.33MB total\n      flat  flat%", 1.5 * (1 << 20)},
		{"Active filters:\n   focus=handoff\nShowing nodes accounting for 512.20kB, 5% of 10MB total\n", 512.2 * 1024},
		{"Showing nodes accounting for 0, 0% of 10MB total\n", 0},
		{"Showing nodes accounting for 2GB, 100% of 2GB total\n", 2 << 30},
		{"Showing nodes accounting for 100B, 100% of 100B total\n", 100},
	} {
		got, err := parsePprofShown(c.out)
		if err != nil || got != c.want {
			t.Errorf("%q: %v %v, want %v", c.out, got, err, c.want)
		}
	}
	if _, err := parsePprofShown("something else\n"); err == nil {
		t.Error("no total: want an error")
	}
}

func TestParseVmRSS(t *testing.T) {
	st := "Name:\tbatond\nVmPeak:\t  100 kB\nVmRSS:\t   20480 kB\nThreads:\t5\n"
	got, err := parseVmRSS(bufio.NewScanner(strings.NewReader(st)))
	if err != nil || got != 20480<<10 {
		t.Errorf("%d %v", got, err)
	}
	if _, err := parseVmRSS(bufio.NewScanner(strings.NewReader("Name:\tx\n"))); err == nil {
		t.Error("no VmRSS: want an error")
	}
	if _, err := parseVmRSS(bufio.NewScanner(strings.NewReader("VmRSS:\t12 MB\n"))); err == nil {
		t.Error("unit MB: want an error")
	}
}

func TestParseIntList(t *testing.T) {
	got, err := parseIntList(" 8, 64,", 1024)
	if err != nil || !slices.Equal(got, []int{8, 64}) {
		t.Errorf("%v %v", got, err)
	}
	if got, err := parseIntList("", 10); err != nil || len(got) != 0 {
		t.Errorf("empty: %v %v", got, err)
	}
	for _, bad := range []string{"0", "x", "2000", "-1"} {
		if _, err := parseIntList(bad, 1024); err == nil {
			t.Errorf("%q: want an error", bad)
		}
	}
}

func TestParseBenchArgsLists(t *testing.T) {
	o, _, err := parseBenchArgs([]string{"-parallel", "2", "-mem-flows", "", "-big-mtu", "0"})
	if err != nil || !slices.Equal(o.parallel, []int{2}) || len(o.memFlows) != 0 || o.bigMTU != 0 {
		t.Errorf("%+v %v", o, err)
	}
	o, _, err = parseBenchArgs(nil)
	if err != nil || !slices.Equal(o.parallel, []int{8, 64}) || !slices.Equal(o.memFlows, []int{10000, 100000}) || o.bigMTU != 65000 {
		t.Errorf("defaults: %+v %v", o, err)
	}
	for name, args := range map[string][]string{
		"-parallel":  {"-parallel", "0"},
		"-mem-flows": {"-mem-flows", "1,x"},
		"-big-mtu":   {"-big-mtu", "70000"},
	} {
		if _, _, err := parseBenchArgs(args); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%v: error %v should name %s", args, err, name)
		}
	}
}

func TestFlowNames(t *testing.T) {
	for _, c := range []struct {
		sf          SingleFlow
		label, name string
	}{
		{SingleFlow{Family: "IPv4"}, "single flow IPv4", "single-flow download IPv4 MTU 1500, Gb/s (median of 0)"},
		{SingleFlow{Family: "IPv4", Kind: kindUpload, Streams: 1, MTU: 65000}, "upload IPv4 MTU 65000", "single-flow upload IPv4 MTU 65000, Gb/s (median of 0)"},
		{SingleFlow{Family: "IPv6", Streams: 8, MTU: 1500, KernelGbps: []float64{1, 2}}, "8 flows IPv6", "8 parallel downloads IPv6 MTU 1500, Gb/s (median of 2)"},
	} {
		if got := flowLabel(c.sf); got != c.label {
			t.Errorf("flowLabel = %q, want %q", got, c.label)
		}
		if got := figureName(c.sf, 1500); got != c.name {
			t.Errorf("figureName = %q, want %q", got, c.name)
		}
	}
}

func TestUploadRequest(t *testing.T) {
	got := uploadRequest(netip.MustParseAddrPort("192.0.2.1:80"), 262144)
	want := "POST /healthz HTTP/1.1\r\nHost: 192.0.2.1:80\r\nContent-Length: 262144\r\n\r\n"
	if got != want {
		t.Errorf("%q", got)
	}
}

func TestLatencyRunAndVerdict(t *testing.T) {
	if latencyRun(time.Second) != time.Second || latencyRun(9*time.Second) != 3*time.Second {
		t.Error("latencyRun")
	}
	runs := []MemPoint{{Measured: true, Owner: MemPerFlow{Baton: 900}}, {Measured: true, Owner: MemPerFlow{Baton: 1100}}}
	f := func(p MemPoint) float64 { return p.Owner.Baton }
	if v := verdict(runs[:1], 1024, f); v != "<= 1024: met" {
		t.Error(v)
	}
	if v := verdict(runs, 1024, f); v != "<= 1024: MISSED" {
		t.Error(v)
	}
	if v := verdict([]MemPoint{runs[0], {}}, 1024, f); v != "<= 1024: not measured" {
		t.Error(v)
	}
}

func TestHoldReady(t *testing.T) {
	m := readyRE.FindStringSubmatch("starting\nready 15000\n")
	if m == nil || m[1] != "15000" {
		t.Errorf("%v", m)
	}
	if readyRE.MatchString("not ready 5\n") {
		t.Error("matched inside a line")
	}
}
