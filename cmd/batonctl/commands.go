package main

// This file holds batonctl's commands and their human-readable tables.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

var filepathGlob = filepath.Glob

func noArgs(args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("unexpected argument %q", args[0])
	}
	return nil
}

func cmdHealth(ctx context.Context, c batonv1.AdminClient, args []string) (proto.Message, func(io.Writer, proto.Message), error) {
	if err := noArgs(args); err != nil {
		return nil, nil, err
	}
	resp, err := c.Health(ctx, &batonv1.HealthRequest{})
	if err != nil {
		return nil, nil, err
	}
	return resp, printHealth, nil
}

func printHealth(w io.Writer, m proto.Message) {
	h := m.(*batonv1.HealthResponse)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "node\t%s\n", h.Node)
	fmt.Fprintf(tw, "state\t%s\n", stateName(h.State))
	fmt.Fprintf(tw, "version\t%s\n", h.Version)
	fmt.Fprintf(tw, "up since\t%s\n", time.Unix(0, h.StartedUnixNano).UTC().Format(time.RFC3339))
	fmt.Fprintf(tw, "anycast\t%s\n", strings.Join(h.Anycast, ", "))
	fmt.Fprintf(tw, "tun\t%s\n", h.Tun)
	for _, p := range h.Problems {
		fmt.Fprintf(tw, "problem\t%s\n", p)
	}
	if h.StateSinceUnixNano != 0 {
		fmt.Fprintf(tw, "state since\t%s (%s ago)\n", time.Unix(0, h.StateSinceUnixNano).UTC().Format(time.RFC3339), age(h.StateSinceUnixNano))
	}
	if h.Announcer != "" {
		fmt.Fprintf(tw, "announcer\t%s\n", announcerText(h.Announcer))
		fmt.Fprintf(tw, "owned flows\t%d\n", h.OwnedFlows)
	}
	tw.Flush()
	printChecks(w, h)
}

func announcerText(a string) string {
	if a == "none" {
		return "none (routes managed outside Baton)"
	}
	return a
}

// printChecks prints the health checks, the announcements and the BGP
// sessions of a Health answer (health.go in batond).
func printChecks(w io.Writer, h *batonv1.HealthResponse) {
	if len(h.Checks) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "CHECK\tKIND\tSTATUS\tSINCE\tLAST\tTOOK\tRISE\tFALL\tEVERY\tTARGET\tLAST RESULT\n")
		for _, c := range h.Checks {
			status := strings.ToLower(strings.TrimPrefix(c.State.String(), "CHECK_STATE_"))
			if !c.Critical {
				status += " (info)"
			}
			if c.Override != "" {
				status += " [forced " + c.Override + "]"
			}
			last := "-"
			if c.LastUnixNano != 0 {
				last = age(c.LastUnixNano) + " ago"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\t%d/%d\t%s\t%s\t%s\n", c.Name, c.Kind, status,
				age(c.SinceUnixNano), last, time.Duration(c.LastDurationNano).Round(time.Microsecond),
				c.OkRun, c.Rise, c.FailRun, c.Fall, time.Duration(c.IntervalNano), c.Target, c.LastResult)
		}
		tw.Flush()
	}
	if len(h.Announcements) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "PREFIX\tANNOUNCED\tNEXT HOP\tSINCE\n")
		for _, a := range h.Announcements {
			on, since, nh := "no", "-", a.NextHop
			if a.Announced {
				on, since = "yes", age(a.SinceUnixNano)
			}
			if h.Announcer == "none" {
				on = "not by Baton"
			}
			if nh == "" {
				nh = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", a.Prefix, on, nh, since)
		}
		tw.Flush()
	}
	if len(h.BgpSessions) > 0 {
		fmt.Fprintln(w)
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "BGP NEIGHBOR\tASN\tMODE\tSTATE\tUPTIME\tHOLD\tADVERTISED\tRECEIVED\tFLAPS\n")
		for _, s := range h.BgpSessions {
			mode, up := "active", "-"
			if s.Passive {
				mode = "passive"
			}
			if s.EstablishedUnixNano != 0 {
				up = age(s.EstablishedUnixNano)
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%d\t%d\t%d\n", s.Neighbor, s.PeerAsn, mode, s.State, up,
				time.Duration(s.HoldTimeNano), s.RoutesAdvertised, s.RoutesReceived, s.Flaps)
		}
		tw.Flush()
	}
}

func stateName(s batonv1.NodeState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "NODE_STATE_"))
}

func cmdStats(ctx context.Context, c batonv1.AdminClient, args []string) (proto.Message, func(io.Writer, proto.Message), error) {
	if err := noArgs(args); err != nil {
		return nil, nil, err
	}
	resp, err := c.Stats(ctx, &batonv1.StatsRequest{})
	if err != nil {
		return nil, nil, err
	}
	if resp.Device == nil || resp.Link == nil || resp.Refused == nil {
		return nil, nil, errors.New("batond sent incomplete stats")
	}
	return resp, printStats, nil
}

func printStats(w io.Writer, m proto.Message) {
	s := m.(*batonv1.StatsResponse)
	fmt.Fprintf(w, "node %s, up %s\n\n", s.Node, time.Duration(s.UptimeNano).Round(time.Second))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	d := s.Device
	fmt.Fprintf(tw, "DEVICE\tPACKETS\tBYTES\tERRORS\tKERNEL DROPS\t\n")
	fmt.Fprintf(tw, "%s rx\t%d\t%s\t%d\t%d\t\n", d.Name, d.RxPackets, bytesStr(d.RxBytes), d.RxErrors, d.KernelTxDropped)
	fmt.Fprintf(tw, "%s tx\t%d\t%s\t%d\t%d\t\n", d.Name, d.TxPackets, bytesStr(d.TxBytes), d.TxErrors, d.KernelRxDropped)
	tw.Flush()
	fmt.Fprintln(w)

	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	l := s.Link
	fmt.Fprintf(tw, "LINK\tPACKETS\tBYTES\tCONSUMED\t\n")
	fmt.Fprintf(tw, "to stack\t%d\t%s\t%d\t\n", l.RxPackets, bytesStr(l.RxBytes), l.RxConsumed)
	fmt.Fprintf(tw, "from stack\t%d\t%s\t%d\t\n", l.TxPackets, bytesStr(l.TxBytes), l.TxConsumed)
	tw.Flush()
	fmt.Fprintf(w, "not IP %d, write errors %d, injected %d\n\n", l.RxNotIp, l.TxErrors, l.Injected)

	if len(s.HookDrops) > 0 {
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "HOOK\tDROPPED IN\tDROPPED OUT\t\n")
		for _, h := range s.HookDrops {
			fmt.Fprintf(tw, "%s\t%d\t%d\t\n", h.Hook, h.Inbound, h.Outbound)
		}
		tw.Flush()
		fmt.Fprintln(w)
	}

	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "SERVICE\tPORT\tACCEPTED\tACTIVE\tIN\tOUT\t\n")
	for _, sv := range s.Services {
		fmt.Fprintf(tw, "%s\t%s/%d\t%d\t%d\t%s\t%s\t\n", sv.Name, sv.Proto, sv.Port, sv.Accepted, sv.Active, bytesStr(sv.BytesIn), bytesStr(sv.BytesOut))
	}
	tw.Flush()
	r := s.Refused
	fmt.Fprintf(w, "\nrefused: tcp no service %d, tcp handshake failed %d, udp no service %d, udp sessions full %d\n",
		r.TcpNoService, r.TcpHandshakeFailed, r.UdpNoService, r.UdpSessionsFull)
}

func bytesStr(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func cmdFlows(ctx context.Context, c batonv1.AdminClient, args []string) (proto.Message, func(io.Writer, proto.Message), error) {
	fs := flag.NewFlagSet("flows", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	owner := fs.String("owner", "", "only flows owned by this node")
	service := fs.String("service", "", "only flows of this service")
	phase := fs.String("phase", "", "only flows in this phase: handshake, established, closing")
	local := fs.Bool("local", false, "only this node's table (owned flows and replicas it holds)")
	limit := fs.Int("limit", 0, "stop after this many flows (0: all)")
	if err := fs.Parse(args); err != nil {
		return nil, nil, fmt.Errorf("flows: %v", err)
	}
	if fs.NArg() > 0 {
		return nil, nil, fmt.Errorf("flows: unexpected argument %q", fs.Arg(0))
	}
	req := &batonv1.ListFlowsRequest{Owner: *owner, Service: *service, LocalOnly: *local, PageSize: 1000}
	if *phase != "" {
		v, ok := batonv1.FlowPhase_value["FLOW_PHASE_"+strings.ToUpper(*phase)]
		if !ok || v == 0 {
			return nil, nil, fmt.Errorf("flows: -phase: %q is not handshake, established, closing or closed", *phase)
		}
		req.Phase = batonv1.FlowPhase(v)
	}
	if *limit < 0 {
		return nil, nil, fmt.Errorf("flows: -limit: %d is negative", *limit)
	}
	all := &batonv1.ListFlowsResponse{}
	for {
		resp, err := c.ListFlows(ctx, req)
		if err != nil {
			return nil, nil, err
		}
		all.Flows = append(all.Flows, resp.Flows...)
		all.Total = resp.Total
		all.UnreachablePeers = resp.UnreachablePeers
		if resp.NextPageToken == "" || (*limit > 0 && len(all.Flows) >= *limit) {
			break
		}
		req.PageToken = resp.NextPageToken
	}
	if *limit > 0 && len(all.Flows) > *limit {
		all.Flows = all.Flows[:*limit]
	}
	return all, printFlows, nil
}

func printFlows(w io.Writer, m proto.Message) {
	r := m.(*batonv1.ListFlowsResponse)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "FLOW\tSERVICE\tPHASE\tOWNER\tEPOCH\tREPLICAS\tSENT\tACKED\tAGE\n")
	for _, f := range r.Flows {
		s := f.State
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n",
			flowKeyString(s.Key), s.Service, phaseName(s.Phase), s.Owner, s.Epoch,
			strings.Join(f.Replicas, ","), bytesStr(uint64(s.ServerNextSeq-s.ServerIsn-1)),
			bytesStr(uint64(s.ClientAck-s.ServerIsn-1)), age(s.OpenedUnixNano))
	}
	tw.Flush()
	fmt.Fprintf(w, "%d flows", r.Total)
	if len(r.Flows) < int(r.Total) {
		fmt.Fprintf(w, " (%d shown)", len(r.Flows))
	}
	fmt.Fprintln(w)
	if len(r.UnreachablePeers) > 0 {
		fmt.Fprintf(w, "warning: flows owned by unreachable peers are missing: %s\n", strings.Join(r.UnreachablePeers, ", "))
	}
}

func cmdFlow(ctx context.Context, c batonv1.AdminClient, args []string) (proto.Message, func(io.Writer, proto.Message), error) {
	if len(args) != 1 {
		return nil, nil, errors.New("flow: want one flow key, e.g. 198.51.100.2:40000->192.0.2.1:80")
	}
	k, err := handoff.ParseFlowKey(args[0])
	if err != nil {
		return nil, nil, err
	}
	resp, err := c.GetFlow(ctx, &batonv1.GetFlowRequest{Key: k.Proto()})
	if err != nil {
		return nil, nil, err
	}
	return resp, printFlow, nil
}

func printFlow(w io.Writer, m proto.Message) {
	r := m.(*batonv1.GetFlowResponse)
	s := r.Flow.GetState()
	if s == nil {
		fmt.Fprintln(w, "flow not found")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "flow\t%s\n", flowKeyString(s.Key))
	fmt.Fprintf(tw, "service\t%s\n", s.Service)
	fmt.Fprintf(tw, "phase\t%s\n", phaseName(s.Phase))
	fmt.Fprintf(tw, "owner\t%s (epoch %d)\n", s.Owner, s.Epoch)
	fmt.Fprintf(tw, "replicas\t%s\n", strings.Join(r.Flow.Replicas, ", "))
	fmt.Fprintf(tw, "opened\t%s (%s ago)\n", time.Unix(0, s.OpenedUnixNano).UTC().Format(time.RFC3339Nano), age(s.OpenedUnixNano))
	fmt.Fprintf(tw, "client ISN / server ISN\t%d / %d\n", s.ClientIsn, s.ServerIsn)
	if o := s.ClientSyn; o != nil {
		fmt.Fprintf(tw, "client SYN\tmss %d, wscale %d, sack %v, timestamps %v\n", o.Mss, o.WindowScale, o.SackPermitted, o.Timestamps)
	}
	fmt.Fprintf(tw, "window scale client/server\t%d / %d\n", s.ClientWindowScale, s.ServerWindowScale)
	fmt.Fprintf(tw, "sack / timestamps\t%v / %v (tsval client %d, server %d)\n", s.Sack, s.Timestamps, s.ClientTsval, s.ServerTsval)
	fmt.Fprintf(tw, "server sent / client acked\t%d / %d bytes\n", uint32(s.ServerNextSeq-s.ServerIsn-1), uint32(s.ClientAck-s.ServerIsn-1))
	fmt.Fprintf(tw, "server acked (client bytes)\t%d\n", uint32(s.ServerAck-s.ClientIsn-1))
	fmt.Fprintf(tw, "FIN client / server\t%v / %v\n", s.ClientFin, s.ServerFin)
	fmt.Fprintf(tw, "checkpoint\t%d bytes at seq %d (output offset %d)\n", len(s.Checkpoint), s.CheckpointSeq, s.CheckpointOffset)
	fmt.Fprintf(tw, "positions\tsent %d, client acked %d, server acked %d bytes\n", s.ServerSentBytes, s.ClientAckedBytes, s.ServerAckedBytes)
	for i, h := range s.History {
		label := ""
		if i == 0 {
			label = "history"
		}
		fmt.Fprintf(tw, "%s\t%s epoch %d: %s at output offset %d (%s)\n", label, h.Node, h.Epoch, h.How, h.AtOffset,
			time.Unix(0, h.UnixNano).UTC().Format(time.RFC3339Nano))
	}
	tw.Flush()
	if len(r.Copies) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "NODE\tROLE\tEPOCH\tPHASE\tSENT\tUPDATED\n")
		for _, cp := range r.Copies {
			role := "replica"
			if cp.Owned {
				role = "owner"
			}
			st := cp.State
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%s ago\n", cp.Node, role, st.Epoch, phaseName(st.Phase),
				uint32(st.ServerNextSeq-st.ServerIsn-1), age(st.UpdatedUnixNano))
		}
		tw.Flush()
	}
	if len(r.UnreachablePeers) > 0 {
		fmt.Fprintf(w, "warning: could not ask %s\n", strings.Join(r.UnreachablePeers, ", "))
	}
}

func cmdPeers(ctx context.Context, c batonv1.AdminClient, args []string) (proto.Message, func(io.Writer, proto.Message), error) {
	if err := noArgs(args); err != nil {
		return nil, nil, err
	}
	resp, err := c.ListPeers(ctx, &batonv1.ListPeersRequest{})
	if err != nil {
		return nil, nil, err
	}
	return resp, printPeers, nil
}

func printPeers(w io.Writer, m proto.Message) {
	r := m.(*batonv1.ListPeersResponse)
	fmt.Fprintf(w, "node %s, %d replicas per flow\n\n", r.Node, r.Replicas)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "PEER\tADDRESS\tSTATE\tLAST SEEN\tLAG\tLAG P99\tFLOWS SENT\tFLOWS HELD\tEVENTS\tSENT\tRECEIVED\tDROPPED\tREJECTED\tLAST ERROR\n")
	for _, p := range r.Peers {
		state := "down"
		if p.Up {
			state = "up"
		}
		seen := "never"
		if p.LastSeenUnixNano != 0 {
			seen = age(p.LastSeenUnixNano) + " ago"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\t%d\t%d\t%s\n", p.Name, p.Address, state, seen,
			time.Duration(p.LagNano).Round(time.Microsecond), time.Duration(p.LagP99Nano).Round(time.Microsecond),
			p.FlowsSent, p.FlowsHeld, p.EventsSent, bytesStr(p.BytesSent), bytesStr(p.BytesReceived),
			p.EventsDropped, p.EventsRejected, p.LastError)
	}
	tw.Flush()
}

func cmdDrain(ctx context.Context, c batonv1.AdminClient, args []string) (proto.Message, func(io.Writer, proto.Message), error) {
	if err := noArgs(args); err != nil {
		return nil, nil, err
	}
	resp, err := c.Drain(ctx, &batonv1.DrainRequest{})
	if err != nil {
		return nil, nil, err
	}
	return resp, func(w io.Writer, m proto.Message) {
		fmt.Fprintf(w, "node is %s\n", stateName(m.(*batonv1.DrainResponse).State))
	}, nil
}

func cmdUndrain(ctx context.Context, c batonv1.AdminClient, args []string) (proto.Message, func(io.Writer, proto.Message), error) {
	if err := noArgs(args); err != nil {
		return nil, nil, err
	}
	resp, err := c.Undrain(ctx, &batonv1.UndrainRequest{})
	if err != nil {
		return nil, nil, err
	}
	return resp, func(w io.Writer, m proto.Message) {
		fmt.Fprintf(w, "node is %s\n", stateName(m.(*batonv1.UndrainResponse).State))
	}, nil
}

func flowKeyString(k *batonv1.FlowKey) string {
	key, err := handoff.KeyFromProto(k)
	if err != nil {
		return "invalid key"
	}
	return key.String()
}

func phaseName(p batonv1.FlowPhase) string {
	return strings.ToLower(strings.TrimPrefix(p.String(), "FLOW_PHASE_"))
}

func age(unixNano int64) string {
	if unixNano == 0 {
		return "-"
	}
	return time.Since(time.Unix(0, unixNano)).Round(time.Second).String()
}
