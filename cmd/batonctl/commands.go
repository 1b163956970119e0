package main

// This file holds batonctl's commands and their human-readable tables.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/proto"

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
	tw.Flush()
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
