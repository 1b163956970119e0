package main

// This file holds the takeover figures' types (JSON) and their table: one
// column per scenario (drain, failing check, kill -9), side by side.

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/baton-anycast/baton/handoff"
)

// TakeoverResults are the takeover figures (bench_takeover.go).
type TakeoverResults struct {
	Lab       string             `json:"lab"`
	Nodes     int                `json:"nodes"`
	Replicas  int                `json:"replicas"`
	Routing   string             `json:"routing"`
	Flows     int                `json:"flows_per_scenario"`
	Server    string             `json:"server"`
	Service   string             `json:"service"`
	Scenarios []TakeoverScenario `json:"scenarios"`
}

// LatencyDist is a takeover latency distribution read from the nodes'
// histogram (buckets 19% wide), ms.
type LatencyDist struct {
	N    int    `json:"n"`
	P50  jfloat `json:"p50_ms"`
	P99  jfloat `json:"p99_ms"`
	Mean jfloat `json:"mean_ms"`
	Met  bool   `json:"meets_target"`
}

// TakeoverScenario is one scenario's figures.
type TakeoverScenario struct {
	Name   string `json:"name"`
	Target string `json:"node"`
	Event  string `json:"event"`
	// WithdrawMs: from the failure to the router's route without the
	// node. LastMigratedMs: from then to the last ownership change of the
	// last flow (negative: before the withdrawal). SettledMs: from the
	// failure until every flow was seen owned by the node the router
	// sends it to (polled every 50 ms).
	WithdrawMs     float64 `json:"failure_to_withdrawal_ms"`
	LastMigratedMs jfloat  `json:"withdrawal_to_last_flow_migrated_ms"`
	SettledMs      float64 `json:"failure_to_all_flows_settled_ms"`
	// Latency by kind of takeover (pull-migrate, pull-restore, push).
	Latency   map[string]LatencyDist `json:"takeover_latency"`
	Takeovers map[string]uint64      `json:"takeovers"`
	Failures  map[string]uint64      `json:"failures"`
	RSTs      map[string]uint64      `json:"rsts_sent"`
	// Per flow (over flows): the largest gap between two arrivals from
	// the failure to the end; the same in the second before the failure;
	// the sum of the gaps from the failure to the end longer than 5 ms and
	// than the flow's largest gap in the second before.
	StallMs       Dist `json:"stall_ms"`
	BaselineGapMs Dist `json:"baseline_largest_gap_ms"`
	DisruptionMs  Dist `json:"disruption_ms"`
	// Throughput of all the scenario's flows, MB/s: the second before the
	// failure, and a second from 0.5 s after every flow settled.
	RateBefore   float64 `json:"rate_before_mb_s"`
	RateAfter    float64 `json:"rate_after_mb_s"`
	RateRatio    jfloat  `json:"rate_ratio"`
	PerFlowRatio jfloat  `json:"per_flow_rate_ratio_median"`
	// Flows with every byte right and no reset or early end.
	Verified int            `json:"flows_verified"`
	Final    map[string]int `json:"flows_by_final_node"`
	// Moved counts flows that ended on another node than the one the
	// router sent them to once the failed node was withdrawn: the route
	// changed again during the scenario (e.g. a BGP session dropped).
	Moved  int      `json:"flows_moved_after_settling"`
	Paths  []string `json:"ownership_changes,omitempty"`
	Errors []string `json:"errors,omitempty"`
}

// stallTarget is the scenario's client stall target (p50).
func (s *TakeoverScenario) stallTarget() float64 {
	if s.Name == scKill {
		return ms(tkTargetStallCrash)
	}
	return ms(tkTargetStallDrain)
}

// printScenarioLine prints a scenario's summary as soon as it ends.
func printScenarioLine(s *TakeoverScenario) {
	fmt.Printf("    withdrawn %.1f ms after the failure; last flow migrated %s ms after that; takeovers %s; stall p50/p99 %.1f/%.1f ms; %d/%d flows verified\n",
		s.WithdrawMs, fmtFloat(float64(s.LastMigratedMs), 1), fmtCounts(s.Takeovers),
		s.StallMs.P50, s.StallMs.P99, s.Verified, s.StallMs.N)
	for _, e := range s.Errors {
		fmt.Printf("    ERROR: %s\n", e)
	}
}

func fmtCounts(m map[string]uint64) string {
	if len(m) == 0 {
		return "none"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// takeoverKinds are the latency rows, in order.
var takeoverKinds = []string{handoff.HowPullMigrate, handoff.HowPush, handoff.HowPullRestore}

// takeoverTable is the takeover figures, one column per scenario.
func takeoverTable(tr *TakeoverResults) *table {
	head := []string{fmt.Sprintf("takeover (%d nodes, %d replicas, %d flows per scenario, routing %s)", tr.Nodes, tr.Replicas, tr.Flows, tr.Routing)}
	right := []int{}
	for i, s := range tr.Scenarios {
		head = append(head, scenarioTitle(s.Name))
		right = append(right, i+1)
	}
	head = append(head, "target")
	t := newTable(head...).alignRight(right...)
	row := func(figure string, cell func(s *TakeoverScenario) string, target string) {
		cells := []string{figure}
		for i := range tr.Scenarios {
			cells = append(cells, cell(&tr.Scenarios[i]))
		}
		t.add(append(cells, target)...)
	}
	dist := func(d Dist) string {
		return fmtFloat(d.P50, 1) + " / " + fmtFloat(d.P99, 1) + " / " + fmtFloat(d.Max, 1)
	}
	row("takeovers by kind", func(s *TakeoverScenario) string { return fmtCounts(s.Takeovers) }, "")
	for _, kind := range takeoverKinds {
		var verdicts []string
		any := false
		for _, s := range tr.Scenarios {
			if ld, ok := s.Latency[kind]; ok {
				any = true
				verdicts = append(verdicts, scenarioTitle(s.Name)+" "+metStr(ld.Met))
			}
		}
		if !any {
			continue
		}
		row("takeover latency "+kind+", ms: p50 / p99 (n)", func(s *TakeoverScenario) string {
			ld, ok := s.Latency[kind]
			if !ok {
				return "-"
			}
			return fmt.Sprintf("%s / %s (%d)", fmtFloat(float64(ld.P50), 2), fmtFloat(float64(ld.P99), 2), ld.N)
		}, "p50 <= 1, p99 <= 5: "+strings.Join(verdicts, ", "))
	}
	var stallV []string
	for _, s := range tr.Scenarios {
		stallV = append(stallV, scenarioTitle(s.Name)+" "+metStr(s.StallMs.P50 <= s.stallTarget()))
	}
	row("client stall (largest gap per flow), ms: p50 / p99 / max", func(s *TakeoverScenario) string { return dist(s.StallMs) },
		"p50 <= 10 (drain), <= 50 (crash): "+strings.Join(stallV, ", "))
	row("  largest gap in the second before, ms: p50 / p99 / max", func(s *TakeoverScenario) string { return dist(s.BaselineGapMs) }, "")
	row("failure -> router withdrew the node, ms", func(s *TakeoverScenario) string { return fmtFloat(s.WithdrawMs, 1) }, "")
	row("withdrawal -> last flow migrated, ms", func(s *TakeoverScenario) string { return fmtFloat(float64(s.LastMigratedMs), 1) }, "")
	row("total disruption per flow (gaps > 5 ms and > the gap before), ms: p50 / p99 / max", func(s *TakeoverScenario) string { return dist(s.DisruptionMs) }, "")
	row("throughput of the flows, MB/s: before / after", func(s *TakeoverScenario) string {
		return fmtFloat(s.RateBefore, 1) + " / " + fmtFloat(s.RateAfter, 1)
	}, "")
	row("  after / before (all flows; median per flow)", func(s *TakeoverScenario) string {
		return fmtRatio(float64(s.RateRatio)) + "; " + fmtRatio(float64(s.PerFlowRatio))
	}, "")
	row("flows verified, no reset (must be all)", func(s *TakeoverScenario) string {
		return fmt.Sprintf("%d/%d", s.Verified, s.StallMs.N)
	}, "")
	row("takeover failures, by reason (any flow)", func(s *TakeoverScenario) string { return fmtCounts(s.Failures) }, "")
	row("RSTs sent, by reason (any flow)", func(s *TakeoverScenario) string { return fmtCounts(s.RSTs) }, "")
	return t
}

func scenarioTitle(name string) string {
	switch name {
	case scDrain:
		return "drain"
	case scCheck:
		return "failing check"
	case scKill:
		return "kill -9"
	}
	return name
}

func metStr(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// printTakeover prints the takeover table and what each scenario did.
func printTakeover(tr *TakeoverResults) {
	fmt.Printf("Takeover: %d flows of the %s service on one node, then that node fails (one scenario per column); latency from the nodes' %s histogram (misrouted packet, or the owner's detected death for a push, to the new owner's first data byte), stalls from the client\n\n",
		tr.Flows, tr.Service, latencyMetric)
	fmt.Print(takeoverTable(tr).String())
	for _, s := range tr.Scenarios {
		fmt.Printf("%s on %s: %s; flows finally on %s\n", scenarioTitle(s.Name), s.Target, s.Event, fmtFinal(s.Final))
		if s.Moved > 0 {
			fmt.Printf("    NOTE: %d flow(s) ended on another node than the router picked after the withdrawal: the route changed again during the scenario (a BGP session dropped under load?); see ownership_changes in the JSON\n", s.Moved)
		}
	}
}

func fmtFinal(m map[string]int) string {
	if len(m) == 0 {
		return "?"
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}
