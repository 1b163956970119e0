package main

// This file wires the handoff layer into the node: the flow tracker on the
// stack's hook chain, and replication to the peers.

import (
	"context"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/baton-anycast/baton/handoff"
)

// loadTLS loads the node's certificate, key and cluster CA when configured
// (the peer network and a TCP admin listener use them).
func (d *daemon) loadTLS() error {
	t := d.cfg.Cluster.TLS
	if t.CA == "" && t.Cert == "" && t.Key == "" {
		return nil
	}
	m, err := handoff.LoadTLS(t.CA, t.Cert, t.Key)
	if err != nil {
		return err
	}
	if !m.HasName(d.cfg.Node) {
		return errorf("cluster.tls.cert: certificate is not for node %q (names: %v)", d.cfg.Node, m.Names)
	}
	d.tlsm = m
	return nil
}

// startHandoff adds the flow tracker to the stack and, when a peer network
// is configured, starts replication. It runs before the routes exist, so
// every flow the node ever serves is tracked.
func (d *daemon) startHandoff() error {
	cfg := d.cfg
	d.tracker = handoff.NewTracker(handoff.TrackerConfig{
		Node:        cfg.Node,
		Prefixes:    cfg.prefixes,
		MaxFlows:    cfg.Flows.Max,
		IdleTimeout: cfg.Flows.IdleTimeout,
		ServiceFor:  d.st.TCPServiceName,
		Logger:      d.log,
	})
	d.st.Endpoint().AddHook(d.tracker)
	d.st.SetCheckpointSink(d.tracker.CheckpointSink())
	ctx, cancel := context.WithCancel(context.Background())
	d.stopTracker = cancel
	go d.tracker.Run(ctx)

	if cfg.Cluster.Listen == "" {
		return nil
	}
	tlsm := d.tlsm
	if cfg.Cluster.Insecure {
		d.log.Warn("peer network WITHOUT TLS (-peer-insecure): any host that reaches the peer port can read and inject flow state")
		tlsm = nil
	}
	peers := make([]handoff.Peer, len(cfg.Cluster.Peers))
	for i, p := range cfg.Cluster.Peers {
		peers[i] = handoff.Peer{Name: p.Name, Addr: p.Address}
	}
	repl, err := handoff.NewReplication(handoff.ReplicationConfig{
		Self:            cfg.Node,
		Peers:           peers,
		Listen:          cfg.Cluster.Listen,
		Replicas:        cfg.Cluster.Replicas,
		Prefixes:        cfg.prefixes,
		TLS:             tlsm,
		Insecure:        cfg.Cluster.Insecure,
		MaxReplicaFlows: cfg.Flows.MaxReplicas,
		Logger:          d.log,
	}, d.tracker)
	if err != nil {
		return err
	}
	if err := repl.Start(); err != nil {
		return err
	}
	d.repl = repl
	return nil
}

func (d *daemon) stopHandoff() {
	if d.repl != nil {
		d.repl.Close()
	}
	if d.stopTracker != nil {
		d.stopTracker()
	}
}

// handoffCollectors are the handoff layer's metrics.
func (d *daemon) handoffCollectors() []prometheus.Collector {
	var cs []prometheus.Collector
	if d.tracker != nil {
		cs = append(cs, newTrackerCollector(d.cfg.Node, d.tracker))
	}
	if d.repl != nil {
		cs = append(cs, d.repl.Collector())
	}
	return cs
}

// trackerCollector exports the flow tracker's counters.
type trackerCollector struct {
	t                                *handoff.Tracker
	tracked, created, opened, closed *prometheus.Desc
	untracked, bad                   *prometheus.Desc
}

func newTrackerCollector(node string, t *handoff.Tracker) *trackerCollector {
	n := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("baton_flows_"+name, help, labels, prometheus.Labels{"node": node})
	}
	return &trackerCollector{
		t:         t,
		tracked:   n("tracked", "Flows in the flow table now."),
		created:   n("created_total", "Flows that entered the table (client SYN)."),
		opened:    n("opened_total", "Flows that completed the handshake."),
		closed:    n("closed_total", "Flows removed from the table, by reason.", "reason"),
		untracked: n("untracked_total", "New flows served but not tracked or replicated: the table was full."),
		bad:       n("bad_packets_total", "TCP packets of anycast flows the tracker could not use, by reason.", "reason"),
	}
}

// Describe implements prometheus.Collector.
func (c *trackerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.tracked, c.created, c.opened, c.closed, c.untracked, c.bad} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *trackerCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.t.Stats()
	cnt := func(d *prometheus.Desc, v uint64, l ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), l...)
	}
	ch <- prometheus.MustNewConstMetric(c.tracked, prometheus.GaugeValue, float64(s.Tracked))
	cnt(c.created, s.Created)
	cnt(c.opened, s.Opened)
	cnt(c.closed, s.Closed.FIN, "fin")
	cnt(c.closed, s.Closed.RST, "rst")
	cnt(c.closed, s.Closed.Idle, "idle")
	cnt(c.closed, s.Closed.Replaced, "replaced")
	cnt(c.untracked, s.Untracked)
	cnt(c.bad, s.Malformed, "malformed")
	cnt(c.bad, s.BadChecksum, "bad_checksum")
	cnt(c.bad, s.Fragments, "fragment")
	cnt(c.bad, s.IgnoredSYN, "ignored_syn")
	cnt(c.bad, s.CheckpointRejected.TooLarge, "checkpoint_too_large")
	cnt(c.bad, s.CheckpointRejected.UnknownFlow, "checkpoint_unknown_flow")
}
