package main

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseMetrics(t *testing.T) {
	text := `# HELP baton_replication_events_sent_total Flow events sent to a peer, by kind.
# TYPE baton_replication_events_sent_total counter
baton_replication_events_sent_total{kind="open",node="n1",peer="n2"} 4570
baton_replication_events_sent_total{kind="open",node="n1",peer="n3"} 4571
baton_replication_events_sent_total{kind="close",node="n1",peer="n2"} 12
baton_flows_opened_total{node="n1"} 1.5e+06
odd{a="x\"y, z}",b="2"} 3
plain 7
`
	m, err := parseMetrics(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	if got := m.sum("baton_replication_events_sent_total", "kind", "open"); got != 9141 {
		t.Errorf("open = %v", got)
	}
	if got := m.sum("baton_replication_events_sent_total", "peer", "n2", "kind", "open"); got != 4570 {
		t.Errorf("open n2 = %v", got)
	}
	if got := m.sum("baton_flows_opened_total"); got != 1.5e6 {
		t.Errorf("opened = %v", got)
	}
	if got := m.sum("odd", "a", `x"y, z}`, "b", "2"); got != 3 {
		t.Errorf("escaped label: %v", got)
	}
	if got := m.sum("plain"); got != 7 {
		t.Errorf("plain = %v", got)
	}
	if got := m.sum("missing"); got != 0 {
		t.Errorf("missing = %v", got)
	}
	for _, bad := range []string{"novalue", `x{a="1"`, "x{a=1} 2", "x notanumber"} {
		if _, err := parseMetrics(strings.NewReader(bad + "\n")); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestParseProcStatCPU(t *testing.T) {
	// pid (comm with spaces) state ppid ... utime(14) stime(15) ...
	stat := "1234 (batond (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 99 0 0"
	d, err := parseProcStatCPU(stat)
	if err != nil || d != 3*time.Second {
		t.Errorf("got %v %v, want 3s", d, err)
	}
	if _, err := parseProcStatCPU("1 (x) S 1 2"); err == nil {
		t.Error("short stat: no error")
	}
}

func TestWithoutClusterFlags(t *testing.T) {
	args := []string{"bin/batond", "-node", "n1", "-anycast", "192.0.2.1/32",
		"-peer-listen", "203.0.113.2:7400", "-peers", "n2=a,n3=b", "-replicas", "2",
		"-tls-ca", "ca.pem", "-tls-cert=n1.pem", "-tls-key", "n1-key.pem", "-peer-insecure", "-mtu", "1500"}
	want := []string{"bin/batond", "-node", "n1", "-anycast", "192.0.2.1/32", "-mtu", "1500"}
	if got := withoutClusterFlags(args); !slices.Equal(got, want) {
		t.Errorf("got %q\nwant %q", got, want)
	}
}

func TestTableSection(t *testing.T) {
	tb := newTable("figure", "a", "b").alignRight(1, 2)
	tb.add("x", "1", "2")
	tb.section("part two", "with", "without")
	tb.add("y", "10", "20")
	want := "" +
		"figure       a        b\n" +
		"--------  ----  -------\n" +
		"x            1        2\n" +
		"--------  ----  -------\n" +
		"part two  with  without\n" +
		"--------  ----  -------\n" +
		"y           10       20\n"
	if got := tb.String(); got != want {
		t.Errorf("table:\n%s\nwant:\n%s", got, want)
	}
}

func TestReplCells(t *testing.T) {
	// Two TUN devices: figure, water, offload, kernel, water/k, offload/k, target.
	got := replCells(2, "f", "with", "without", "r", "t")
	want := []string{"f", "with", "", "without", "r", "", "t"}
	if !slices.Equal(got, want) {
		t.Errorf("n=2: %q", got)
	}
	if got := replCells(1, "f", "w", "wo", "r", "t"); !slices.Equal(got, []string{"f", "w", "wo", "r", "t"}) {
		t.Errorf("n=1: %q", got)
	}
}

func TestReplRunFigures(t *testing.T) {
	run := &ReplConnRun{Conns: 1000, OpenSent: map[string]uint64{"n2": 990, "n3": 980},
		CPUms: map[string]float64{"n1": 400, "n2": 100, "n3": 50}}
	if got := run.replicated(); got != 980 {
		t.Errorf("replicated = %d", got)
	}
	own, oth := run.cpuPerConn()
	if own != 400 || oth != 150 {
		t.Errorf("cpu per conn = %v %v", own, oth)
	}
	d := newDist([]time.Duration{time.Millisecond, 2 * time.Millisecond, 3 * time.Millisecond, 10 * time.Millisecond})
	if d.N != 4 || d.P50 != 2 || d.P99 != 10 || d.Max != 10 {
		t.Errorf("dist %+v", d)
	}
}

func TestClusterReplicas(t *testing.T) {
	for n, want := range map[int]int{1: 0, 2: 1, 3: 2, 8: 2} {
		if got := clusterReplicas(n); got != want {
			t.Errorf("clusterReplicas(%d) = %d, want %d", n, got, want)
		}
	}
}

func TestParseBenchOnly(t *testing.T) {
	o, _, err := parseBenchArgs([]string{"-only", "replication", "-repl-flows", "50"})
	if err != nil || o.only != onlyReplication || o.replFlows != 50 || o.writes() {
		t.Errorf("%+v %v", o, err)
	}
	o, _, err = parseBenchArgs([]string{"-only", "kernel", "-out", "x.json"})
	if err != nil || !o.writes() {
		t.Errorf("-out with -only: %+v %v", o, err)
	}
	if o, _, _ := parseBenchArgs(nil); !o.writes() || o.replFlows != 300 {
		t.Errorf("defaults: %+v", o)
	}
	for name, args := range map[string][]string{
		"-only":       {"-only", "everything"},
		"-repl-flows": {"-repl-flows", "0"},
	} {
		if _, _, err := parseBenchArgs(args); err == nil || !strings.Contains(err.Error(), name) {
			t.Errorf("%v: error %v should name %s", args, err, name)
		}
	}
	if o, _, err := parseDemoArgs([]string{"-standalone"}); err != nil || !o.standalone {
		t.Errorf("demo -standalone: %+v %v", o, err)
	}
	if o, _, err := parseUpArgs([]string{"-standalone"}); err != nil || !o.standalone {
		t.Errorf("up -standalone: %+v %v", o, err)
	}
}
