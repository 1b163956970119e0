package main

// This file wires the health package into the node: the checks, the node
// state machine and the announcer (set up before the admin API, started
// after the node's routes), draining on SIGTERM, and the health part of
// the Health RPC.
//
// Start: the checks probe through the node's own data path once the
// routes into the TUN exist; the announcer (bgp) opens its sessions at
// once but announces only when every critical check is up.
// Stop: SIGTERM withdraws first (state draining, "shutting down"), waits
// until the node owns no flow or -drain-timeout, then stop() closes the
// BGP sessions before anything else goes down.

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/baton-anycast/baton/health"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

// healthParts are the daemon's health objects.
type healthParts struct {
	runner    *health.Runner
	machine   *health.Machine
	announcer health.Announcer
	cancel    context.CancelFunc
	done      chan struct{}
}

// protoState maps the health package's states onto the admin API's enum
// (serving is NODE_STATE_SERVING: healthy and announced).
func protoState(s health.NodeState) batonv1.NodeState {
	switch s {
	case health.NodeStarting:
		return batonv1.NodeState_NODE_STATE_STARTING
	case health.NodeServing:
		return batonv1.NodeState_NODE_STATE_SERVING
	case health.NodeUnhealthy:
		return batonv1.NodeState_NODE_STATE_UNHEALTHY
	case health.NodeDraining:
		return batonv1.NodeState_NODE_STATE_DRAINING
	case health.NodeDrained:
		return batonv1.NodeState_NODE_STATE_DRAINED
	case health.NodeStopping:
		return batonv1.NodeState_NODE_STATE_STOPPING
	case health.NodeFailed:
		return batonv1.NodeState_NODE_STATE_FAILED
	}
	return batonv1.NodeState_NODE_STATE_UNSPECIFIED
}

// probeTargets are the addresses service checks probe on port: the first
// address of the first anycast prefix of each family.
func probeTargets(prefixes []netip.Prefix, port int) []netip.AddrPort {
	var out []netip.AddrPort
	var v4, v6 bool
	for _, p := range prefixes {
		if (p.Addr().Is4() && v4) || (p.Addr().Is6() && v6) {
			continue
		}
		v4, v6 = v4 || p.Addr().Is4(), v6 || p.Addr().Is6()
		out = append(out, netip.AddrPortFrom(p.Addr(), uint16(port)))
	}
	return out
}

func targetString(ts []netip.AddrPort) string {
	s := make([]string, len(ts))
	for i, t := range ts {
		s[i] = t.String()
	}
	return strings.Join(s, " ")
}

// checkSpecs builds the node's checks: one per service, the TUN, and the
// peer links (not critical) when a cluster is configured.
func (d *daemon) checkSpecs() ([]health.CheckSpec, error) {
	cfg := d.cfg
	dial := health.KernelDialer()
	var specs []health.CheckSpec
	for _, sc := range cfg.Service {
		entry, err := services.Builtin().Lookup(sc.Name)
		if err != nil {
			return nil, err
		}
		ts := probeTargets(cfg.prefixes, sc.Port)
		s := health.CheckSpec{Name: sc.Name, Target: targetString(ts), Critical: true}
		switch {
		case sc.Name == "http":
			s.Kind, s.Target = "http", "GET /healthz "+s.Target
			s.Probe = health.HTTPGet(dial, ts, "/healthz")
		case sc.Name == "whoami":
			s.Kind = "udp"
			s.Probe = health.UDPQuery(dial, ts, []byte("baton-health\n"), cfg.Node+"\n")
		case entry.Transport == services.UDP:
			s.Kind = "udp"
			s.Probe = health.UDPQuery(dial, ts, []byte("baton-health\n"), "")
		default:
			s.Kind = "tcp"
			s.Probe = health.TCPConnect(dial, ts)
		}
		specs = append(specs, s)
	}
	specs = append(specs, health.CheckSpec{Name: checkTUN, Kind: "tun", Target: cfg.TUN.Name, Critical: true,
		Probe: health.TUNProbe(cfg.TUN.Name, d.st.Endpoint().ReadError)})
	if d.repl != nil {
		repl := d.repl
		specs = append(specs, health.CheckSpec{Name: checkPeers, Kind: "peers",
			Target: fmt.Sprintf("%d peers", len(cfg.Cluster.Peers)),
			Probe: func(context.Context) error {
				var down []string
				ps := repl.Peers()
				for _, p := range ps {
					if !p.Up {
						down = append(down, p.Name)
					}
				}
				if len(down) > 0 {
					return fmt.Errorf("%d of %d peer links down: %s", len(down), len(ps), strings.Join(down, ", "))
				}
				return nil
			}})
	}
	if j := d.joinCheck(); j != nil { // depart.go
		specs = append(specs, *j)
	}
	// Defaults, then per-check settings.
	h := cfg.Health
	out := specs[:0]
	for _, s := range specs {
		s.Interval, s.Timeout, s.Rise, s.Fall = h.Interval, h.Timeout, h.Rise, h.Fall
		disabled := false
		for _, cc := range h.Checks {
			if cc.Name != s.Name {
				continue
			}
			disabled = cc.Disabled
			if cc.Interval != 0 {
				s.Interval = cc.Interval
			}
			if cc.Timeout != 0 {
				s.Timeout = cc.Timeout
			}
			if cc.Rise != 0 {
				s.Rise = cc.Rise
			}
			if cc.Fall != 0 {
				s.Fall = cc.Fall
			}
			if cc.Critical != nil {
				s.Critical = *cc.Critical
			}
		}
		if s.Timeout == 0 {
			s.Timeout = s.Interval
		}
		if !disabled {
			out = append(out, s)
		}
	}
	return out, nil
}

// setupHealth builds the checks, the announcer and the state machine; it
// starts none of them. It runs after the handoff layer (the peers check
// and the flow count need it) and before the admin API.
func (d *daemon) setupHealth() error {
	cfg := d.cfg
	specs, err := d.checkSpecs()
	if err != nil {
		return err
	}
	opts := health.RunnerOptions{Logger: d.log}
	if cfg.Health.OverrideFile != "" {
		d.log.Warn("TESTING AID in use: health check results can be forced from a file", "file", cfg.Health.OverrideFile)
		opts.Override = health.OverrideFile(cfg.Health.OverrideFile)
	}
	runner, err := health.NewRunner(specs, opts)
	if err != nil {
		return err
	}
	var ann health.Announcer = &health.None{}
	if cfg.Announce == announceBGP {
		b := cfg.BGP
		var v4, v6 bool
		for _, p := range cfg.prefixes {
			v4, v6 = v4 || p.Addr().Is4(), v6 || p.Addr().Is6()
		}
		bc := health.BGPConfig{ASN: b.ASN, RouterID: b.routerID, ListenPort: b.ListenPort,
			NextHop4: b.nextHop4, NextHop6: b.nextHop6, HoldTime: b.HoldTime, IPv4: v4, IPv6: v6, Logger: d.log}
		for i, n := range b.Neighbors {
			bc.Neighbors = append(bc.Neighbors, health.BGPNeighbor{Address: b.neighbors[i], ASN: n.ASN, Passive: n.Passive})
		}
		if ann, err = health.NewBGP(bc); err != nil {
			return err
		}
	}
	var flows health.FlowCounter
	if d.tracker != nil {
		flows = d.tracker
	}
	last := health.NodeState(0)
	machine := health.NewMachine(health.MachineConfig{
		Prefixes: cfg.prefixes, Checks: runner, Flows: flows, Announcer: ann, Logger: d.log,
		OnChange: func(st health.NodeState, reasons []string) {
			d.state.set(protoState(st), reasons...)
			if st != last { // reasons alone change at every check result
				d.log.Info("node state", "state", st.String(), "reasons", reasons)
				last = st
			}
		},
	})
	d.health = &healthParts{runner: runner, machine: machine, announcer: ann}
	return nil
}

// startHealth starts the announcer (BGP sessions; nothing announced yet),
// the checks and the state machine. It runs last in start: the checks
// need the routes into the TUN.
func (d *daemon) startHealth() error {
	h := d.health
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	err := h.announcer.Start(ctx)
	cancel()
	if err != nil {
		return err
	}
	h.runner.Start()
	rctx, rcancel := context.WithCancel(context.Background())
	h.cancel, h.done = rcancel, make(chan struct{})
	go func() {
		defer close(h.done)
		h.machine.Run(rctx, h.runner.Changes())
	}()
	return nil
}

// drainForShutdown is SIGTERM's first step: withdraw, stop the checks (a
// probe would be a new flow), and wait until the node owns no flow, the
// drain timeout, or another signal.
func (d *daemon) drainForShutdown(sigs <-chan os.Signal) {
	h := d.health
	if h == nil || h.done == nil {
		return
	}
	h.machine.Shutdown(context.Background())
	h.runner.Stop()
	timeout := d.cfg.DrainTimeout
	n := 0
	if d.tracker != nil {
		n = d.tracker.Len()
	}
	switch {
	case n == 0:
		d.log.Info("withdrawn; no flows to drain")
		return
	case timeout == 0:
		d.log.Info("withdrawn; drain timeout is 0: stopping with flows", "flows", n)
		return
	}
	d.log.Info("withdrawn; draining before stopping", "flows", n, "drain_timeout", timeout)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	go func() {
		select {
		case sig := <-sigs:
			d.log.Warn("second signal: stopping without waiting for the flows", "signal", sig.String())
			cancel()
		case <-ctx.Done():
		}
	}()
	start := time.Now()
	d.depart(ctx, departSettle(timeout)) // depart.go: hand over the idle flows
	if left, ok := h.machine.WaitNoFlows(ctx, 50*time.Millisecond); ok {
		d.log.Info("drained: no flows left", "after", time.Since(start).Round(time.Millisecond))
	} else {
		d.log.Warn("drain ended with flows left", "flows", left, "after", time.Since(start).Round(time.Millisecond))
	}
}

// failHealth marks the node failed (withdrawn for good).
func (d *daemon) failHealth(reason string) {
	if d.health == nil {
		d.state.set(batonv1.NodeState_NODE_STATE_FAILED, reason)
		return
	}
	d.health.machine.Fail(context.Background(), reason)
}

// stopHealth withdraws and closes the announcer's sessions; stop calls it
// first, before the routes and the stack go.
func (d *daemon) stopHealth() {
	h := d.health
	if h == nil {
		return
	}
	if h.cancel != nil {
		h.cancel()
		<-h.done
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	h.machine.Stop(ctx)
	h.runner.Stop()
	if err := h.announcer.Close(ctx); err != nil {
		d.log.Error("closing the announcer", "err", err)
	}
}

// fillHealth adds the checks, announcements and BGP sessions to a Health
// answer.
func (d *daemon) fillHealth(ctx context.Context, resp *batonv1.HealthResponse) {
	h := d.health
	if h == nil {
		return
	}
	_, _, since := h.machine.State()
	resp.StateSinceUnixNano = since.UnixNano()
	if d.tracker != nil {
		resp.OwnedFlows = uint32(d.tracker.Len())
	}
	for _, s := range h.runner.Statuses() {
		cs := &batonv1.CheckStatus{
			Name: s.Name, Kind: s.Kind, Target: s.Target, Critical: s.Critical,
			SinceUnixNano: s.Since.UnixNano(), LastDurationNano: int64(s.LastDuration),
			LastOk: s.LastOK, LastResult: s.LastResult, OkRun: uint32(s.OKRun), FailRun: uint32(s.FailRun),
			Rise: uint32(s.Rise), Fall: uint32(s.Fall), IntervalNano: int64(s.Interval), TimeoutNano: int64(s.Timeout),
			Total: s.Total, Failures: s.Failures, Override: s.Override.String(),
		}
		if !s.LastTime.IsZero() {
			cs.LastUnixNano = s.LastTime.UnixNano()
		}
		switch s.State {
		case health.CheckInit:
			cs.State = batonv1.CheckState_CHECK_STATE_INIT
		case health.CheckUp:
			cs.State = batonv1.CheckState_CHECK_STATE_UP
		case health.CheckDown:
			cs.State = batonv1.CheckState_CHECK_STATE_DOWN
		}
		resp.Checks = append(resp.Checks, cs)
	}
	resp.Announcer = h.announcer.Name()
	st := h.announcer.Status(ctx)
	for _, p := range d.cfg.prefixes {
		a := &batonv1.Announcement{Prefix: p.String()}
		for _, an := range st.Announced {
			if an.Prefix == p {
				a.Announced, a.SinceUnixNano = true, an.Since.UnixNano()
				if an.NextHop.IsValid() {
					a.NextHop = an.NextHop.String()
				}
			}
		}
		resp.Announcements = append(resp.Announcements, a)
	}
	for _, s := range st.Sessions {
		bs := &batonv1.BGPSession{Neighbor: s.Neighbor.String(), PeerAsn: s.PeerASN, LocalAsn: s.LocalASN,
			Passive: s.Passive, State: s.State, RoutesAdvertised: s.Advertised, RoutesReceived: s.Received,
			HoldTimeNano: int64(s.HoldTime), Flaps: s.Flaps}
		if !s.Established.IsZero() {
			bs.EstablishedUnixNano = s.Established.UnixNano()
		}
		resp.BgpSessions = append(resp.BgpSessions, bs)
	}
}
