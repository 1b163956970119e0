package main

// This file wires the handoff layer into the node: the flow tracker on the
// stack's hook chain, replication to the peers, and the takeover engine
// that continues flows other nodes started.
//
// Hook order (hooks are layers, the first added outermost): the anycast
// filter (added by the stack), the sync mode's hold hook (only with a
// sync-mode service), the takeover's fence hook, the flow tracker, the
// sync mode's log hook, the takeover's interception and translation hook.
// The fence must be outside the tracker (a flow being handed over is
// exactly what the tracker recorded), the translation inside it (the
// tracker sees restored flows in the client's sequence space both ways).
// The hold hook must be outside the tracker (a held packet is already in
// the state its replicas must acknowledge) and outside the fence (it
// drops what it holds for a fenced flow itself); the log hook inside the
// tracker (the output of any state the tracker reports is logged).

import (
	"context"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/baton-anycast/baton/handoff"
	"github.com/baton-anycast/baton/stack/services"
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
		Node:           cfg.Node,
		Prefixes:       cfg.prefixes,
		MaxFlows:       cfg.Flows.Max,
		MaxHandshaking: cfg.Flows.MaxHandshake,
		IdleTimeout:    cfg.Flows.IdleTimeout,
		ServiceFor:     d.st.TCPServiceName,
		Logger:         d.log,
		// The health probes connect to the anycast address from this
		// host's own addresses: those flows live and die here.
		IgnoreClient: localAddrs(d.log),
	})
	d.st.SetCheckpointSink(d.tracker.CheckpointSink())
	ctx, cancel := context.WithCancel(context.Background())
	d.stopTracker = cancel
	go d.tracker.Run(ctx)

	if cfg.Cluster.Listen == "" {
		d.st.Endpoint().AddHook(d.tracker)
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
	repl.Members().SetLease(cfg.Cluster.Lease)
	engine, err := handoff.NewEngine(handoff.EngineConfig{
		Stack:       d.st,
		Tracker:     d.tracker,
		Replication: repl,
		Service:     d.takeoverServices(),
		Policy:      d.takeoverPolicy,
		Logger:      d.log,
	})
	if err != nil {
		return err
	}
	ep := d.st.Endpoint()
	var sy *handoff.Sync
	if ports := d.syncPorts(); len(ports) > 0 {
		sy = repl.EnableSync(handoff.SyncConfig{
			Sync:     func(port uint16) bool { return ports[port] },
			Service:  d.takeoverServices(),
			Injector: ep,
			MTU:      int(ep.MTU()),
			Fenced:   engine.FlowFenced,
			Logger:   d.log,
		})
		d.sync = sy
		ep.AddHook(sy.HoldHook())
	}
	ep.AddHook(engine.FenceHook())
	ep.AddHook(d.tracker)
	if sy != nil {
		ep.AddHook(sy.LogHook())
	}
	ep.AddHook(engine.Hook()) // last: innermost
	d.st.SetResumeSource(engine)
	if err := repl.Start(); err != nil {
		return err
	}
	d.repl = repl
	d.engine = engine
	engine.Start()
	return nil
}

// takeoverServices gives the takeover engine the TCP service on each
// port. They are instances of their own, built like the stack's: the
// engine only asks them CanResume, which depends on the service's kind
// and the resume point, not on the instance; the stack's instance serves
// the restored connection.
func (d *daemon) takeoverServices() func(port uint16) services.TCPService {
	byPort := map[uint16]services.TCPService{}
	for _, sc := range d.cfg.Service {
		if svc, err := services.Builtin().NewTCP(sc.Name, d.cfg.Node); err == nil {
			byPort[uint16(sc.Port)] = svc
		}
	}
	return func(port uint16) services.TCPService { return byPort[port] }
}

// syncPorts are the TCP ports of the services in sync replication mode.
func (d *daemon) syncPorts() map[uint16]bool {
	ports := map[uint16]bool{}
	for _, sc := range d.cfg.Service {
		if d.cfg.Cluster.Replication[sc.Name] == "sync" {
			ports[uint16(sc.Port)] = true
		}
	}
	return ports
}

// takeoverPolicy is the configured takeover policy of a service.
func (d *daemon) takeoverPolicy(service string) handoff.Policy {
	p, _ := handoff.ParsePolicy(d.cfg.Cluster.Takeover[service]) // validated
	return p
}

func (d *daemon) stopHandoff() {
	if d.sync != nil {
		d.sync.Close()
	}
	if d.repl != nil {
		if e := d.repl.Engine(); e != nil {
			e.Close()
		}
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
		if d.sync != nil {
			cs = append(cs, d.sync.Collector())
		}
		if e := d.repl.Engine(); e != nil {
			cs = append(cs, e.Collector())
		}
	}
	return cs
}

// trackerCollector exports the flow tracker's counters.
type trackerCollector struct {
	t                                *handoff.Tracker
	tracked, created, opened, closed *prometheus.Desc
	restored                         *prometheus.Desc
	untracked, bad                   *prometheus.Desc
	handshaking, evicted, untrackHS  *prometheus.Desc
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
		restored:  n("restored_total", "Flows taken over from another node (restored here)."),
		closed:    n("closed_total", "Flows removed from the table, by reason.", "reason"),
		untracked: n("untracked_total", "New flows served but not tracked or replicated: the table was full."),
		bad:       n("bad_packets_total", "TCP packets of anycast flows the tracker could not use, by reason.", "reason"),

		handshaking: n("handshaking", "Flows in the flow table still in the handshake (at most -max-handshake-flows)."),
		evicted:     n("handshake_evicted_total", "Flows in the handshake evicted for a newer SYN: -max-handshake-flows were in the handshake (also in closed_total{reason=\"idle\"})."),
		untrackHS:   n("untracked_handshake_total", "New flows served but not tracked or replicated: -max-handshake-flows were in the handshake even after an eviction."),
	}
}

// Describe implements prometheus.Collector.
func (c *trackerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.tracked, c.created, c.opened, c.restored, c.closed, c.untracked, c.bad, c.handshaking, c.evicted, c.untrackHS} {
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
	cnt(c.restored, s.Restored)
	cnt(c.closed, s.Closed.FIN, "fin")
	cnt(c.closed, s.Closed.RST, "rst")
	cnt(c.closed, s.Closed.Idle, "idle")
	cnt(c.closed, s.Closed.Replaced, "replaced")
	cnt(c.closed, s.Closed.Moved, "moved")
	cnt(c.untracked, s.Untracked)
	hs := c.t.HandshakeStats()
	ch <- prometheus.MustNewConstMetric(c.handshaking, prometheus.GaugeValue, float64(hs.Handshaking))
	cnt(c.evicted, hs.Evicted)
	cnt(c.untrackHS, hs.Untracked)
	cnt(c.bad, s.Malformed, "malformed")
	cnt(c.bad, s.BadChecksum, "bad_checksum")
	cnt(c.bad, s.Fragments, "fragment")
	cnt(c.bad, s.IgnoredSYN, "ignored_syn")
	cnt(c.bad, s.Ignored, "local_client")
	cnt(c.bad, s.CheckpointRejected.TooLarge, "checkpoint_too_large")
	cnt(c.bad, s.CheckpointRejected.UnknownFlow, "checkpoint_unknown_flow")
}

// localAddrs returns a test for this network namespace's own addresses,
// read once at start with netlink.
func localAddrs(log interface{ Warn(string, ...any) }) func(netip.Addr) bool {
	set := map[netip.Addr]bool{}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		log.Warn("cannot list local addresses; health probe flows will be tracked", "err", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			set[ip.Unmap()] = true
		}
	}
	return func(a netip.Addr) bool { return set[a] }
}
