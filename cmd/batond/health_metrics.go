package main

// This file exports the health checks, the announcement and the BGP
// sessions to Prometheus (read at scrape time).

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/baton-anycast/baton/health"
)

type healthCollector struct {
	d *daemon

	checkUp, checkState, checkAttempts, checkDuration *prometheus.Desc
	announced                                         *prometheus.Desc
	bgpUp, bgpState, bgpAdvertised, bgpFlaps          *prometheus.Desc
}

func newHealthCollector(d *daemon) *healthCollector {
	n := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("baton_"+name, help, labels, prometheus.Labels{"node": d.cfg.Node})
	}
	return &healthCollector{
		d:             d,
		checkUp:       n("check_up", "1 while the health check is up (its last rise results passed), else 0.", "check", "kind", "critical"),
		checkState:    n("check_state", "1 for the health check's current verdict (init, up, down).", "check", "state"),
		checkAttempts: n("check_attempts_total", "Health check attempts, by result (ok, fail).", "check", "result"),
		checkDuration: n("check_duration_seconds", "How long the health check's last attempt took.", "check"),
		announced:     n("announced", "1 while the anycast prefix is announced by the announcer, else 0.", "prefix", "announcer"),
		bgpUp:         n("bgp_session_up", "1 while the BGP session to the neighbor is established, else 0.", "neighbor"),
		bgpState:      n("bgp_session_state", "1 for the BGP session's current FSM state.", "neighbor", "state"),
		bgpAdvertised: n("bgp_routes_advertised", "Prefixes advertised to the BGP neighbor.", "neighbor"),
		bgpFlaps:      n("bgp_session_flaps_total", "Times the BGP session went down.", "neighbor"),
	}
}

// Describe implements prometheus.Collector.
func (c *healthCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.checkUp, c.checkState, c.checkAttempts, c.checkDuration,
		c.announced, c.bgpUp, c.bgpState, c.bgpAdvertised, c.bgpFlaps} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *healthCollector) Collect(ch chan<- prometheus.Metric) {
	h := c.d.health
	if h == nil {
		return
	}
	gauge := func(d *prometheus.Desc, v float64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, l...)
	}
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	for _, s := range h.runner.Statuses() {
		crit := "false"
		if s.Critical {
			crit = "true"
		}
		gauge(c.checkUp, b(s.State == health.CheckUp), s.Name, s.Kind, crit)
		for _, st := range []health.CheckState{health.CheckInit, health.CheckUp, health.CheckDown} {
			gauge(c.checkState, b(s.State == st), s.Name, st.String())
		}
		ch <- prometheus.MustNewConstMetric(c.checkAttempts, prometheus.CounterValue, float64(s.Total-s.Failures), s.Name, "ok")
		ch <- prometheus.MustNewConstMetric(c.checkAttempts, prometheus.CounterValue, float64(s.Failures), s.Name, "fail")
		gauge(c.checkDuration, s.LastDuration.Seconds(), s.Name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st := h.announcer.Status(ctx)
	for _, p := range c.d.cfg.prefixes {
		on := false
		for _, a := range st.Announced {
			on = on || a.Prefix == p
		}
		gauge(c.announced, b(on), p.String(), h.announcer.Name())
	}
	states := []string{"idle", "connect", "active", "opensent", "openconfirm", "established"}
	for _, s := range st.Sessions {
		nb := s.Neighbor.String()
		gauge(c.bgpUp, b(s.State == "established"), nb)
		for _, name := range states {
			gauge(c.bgpState, b(s.State == name), nb, name)
		}
		gauge(c.bgpAdvertised, float64(s.Advertised), nb)
		ch <- prometheus.MustNewConstMetric(c.bgpFlaps, prometheus.CounterValue, float64(s.Flaps), nb)
	}
}
