package main

// This file exports the node's counters to Prometheus. The packet path keeps
// plain atomic counters (no Prometheus call per packet); this collector reads
// them at scrape time.

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

type nodeCollector struct {
	d *daemon

	devPackets, devBytes, devErrors, devKernelDrops  *prometheus.Desc
	linkPackets, linkConsumed, linkNotIP, linkInject *prometheus.Desc
	hookDrops                                        *prometheus.Desc
	svcConns, svcActive, svcBytes                    *prometheus.Desc
	refused                                          *prometheus.Desc
	state                                            *prometheus.Desc
}

func newNodeCollector(d *daemon) *nodeCollector {
	n := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("baton_"+name, help, labels, prometheus.Labels{"node": d.cfg.Node})
	}
	return &nodeCollector{
		d:              d,
		devPackets:     n("tun_packets_total", "Packets read from (rx) or written to (tx) the TUN device.", "dir"),
		devBytes:       n("tun_bytes_total", "Bytes read from (rx) or written to (tx) the TUN device.", "dir"),
		devErrors:      n("tun_errors_total", "Failed TUN reads (rx) or writes (tx).", "dir"),
		devKernelDrops: n("tun_kernel_dropped_total", "Packets the kernel dropped at the TUN: tx = routed into the TUN but not read in time, rx = written by the node but dropped.", "dir"),
		linkPackets:    n("link_packets_total", "Packets delivered to the stack (rx) or written by it (tx) after the hook chain.", "dir"),
		linkConsumed:   n("link_consumed_total", "Packets a hook took over instead of passing them on.", "dir"),
		linkNotIP:      n("link_not_ip_total", "Packets read from the TUN that are not IPv4 or IPv6."),
		linkInject:     n("link_injected_total", "Packets put on the path by the handoff layer."),
		hookDrops:      n("hook_dropped_total", "Packets dropped by a hook of the chain.", "hook", "dir"),
		svcConns:       n("service_sessions_total", "TCP connections or UDP sessions a service accepted.", "service", "proto", "port"),
		svcActive:      n("service_sessions_active", "TCP connections or UDP sessions a service is serving now.", "service", "proto", "port"),
		svcBytes:       n("service_bytes_total", "Payload bytes a service received (in) or sent (out).", "service", "proto", "port", "dir"),
		refused:        n("refused_total", "Connections or datagrams refused before a service saw them.", "reason"),
		state:          n("node_state", "1 for the node's current state.", "state"),
	}
}

// Describe implements prometheus.Collector.
func (c *nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.devPackets, c.devBytes, c.devErrors, c.devKernelDrops,
		c.linkPackets, c.linkConsumed, c.linkNotIP, c.linkInject, c.hookDrops,
		c.svcConns, c.svcActive, c.svcBytes, c.refused, c.state} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *nodeCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	st, _ := c.d.state.get()
	ch <- prometheus.MustNewConstMetric(c.state, prometheus.GaugeValue, 1, st.String())
	if c.d.dev == nil || c.d.st == nil {
		return
	}
	ds := c.d.dev.Stats()
	counter(c.devPackets, ds.RxPackets, "rx")
	counter(c.devPackets, ds.TxPackets, "tx")
	counter(c.devBytes, ds.RxBytes, "rx")
	counter(c.devBytes, ds.TxBytes, "tx")
	counter(c.devErrors, ds.RxErrors, "rx")
	counter(c.devErrors, ds.TxErrors, "tx")
	counter(c.devKernelDrops, ds.KernelTxDropped, "tx")
	counter(c.devKernelDrops, ds.KernelRxDropped, "rx")

	ls := c.d.st.Endpoint().Stats()
	counter(c.linkPackets, ls.RxPackets, "rx")
	counter(c.linkPackets, ls.TxPackets, "tx")
	counter(c.linkConsumed, ls.RxConsumed, "rx")
	counter(c.linkConsumed, ls.TxConsumed, "tx")
	counter(c.linkNotIP, ls.RxNotIP)
	counter(c.linkInject, ls.Injected)
	for hook, v := range c.d.st.Endpoint().HookDrops() {
		counter(c.hookDrops, v[0], hook, "rx")
		counter(c.hookDrops, v[1], hook, "tx")
	}
	for _, s := range c.d.st.ServiceStats() {
		port := strconv.Itoa(int(s.Port))
		counter(c.svcConns, s.Accepted, s.Name, s.Proto, port)
		ch <- prometheus.MustNewConstMetric(c.svcActive, prometheus.GaugeValue, float64(s.Active), s.Name, s.Proto, port)
		counter(c.svcBytes, s.BytesIn, s.Name, s.Proto, port, "in")
		counter(c.svcBytes, s.BytesOut, s.Name, s.Proto, port, "out")
	}
	r := c.d.st.Refused()
	counter(c.refused, r.TCPNoService, "tcp_no_service")
	counter(c.refused, r.TCPHandshakeFail, "tcp_handshake_failed")
	counter(c.refused, r.UDPNoService, "udp_no_service")
	counter(c.refused, r.UDPSessionsFull, "udp_sessions_full")
}
