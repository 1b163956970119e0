package main

// This file serves the admin API's flow and peer views: ListFlows,
// GetFlow, ListPeers, Drain and Undrain.

import (
	"context"
	"sort"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

const (
	defaultPageSize = 100
	maxPageSize     = 1000
	// clusterTimeout bounds how long a cluster-wide view waits for peers.
	clusterTimeout = 3 * time.Second
)

// flowRow is one flow in a listing, with its key's text for sorting and
// paging.
type flowRow struct {
	key   string
	state *batonv1.FlowState
}

// ListFlows implements batonv1.AdminServer.ListFlows.
func (a *adminServer) ListFlows(ctx context.Context, req *batonv1.ListFlowsRequest) (*batonv1.ListFlowsResponse, error) {
	d := a.d
	size := int(req.PageSize)
	switch {
	case size == 0:
		size = defaultPageSize
	case size > maxPageSize:
		return nil, status.Errorf(codes.InvalidArgument, "page_size: %d is over %d", size, maxPageSize)
	}
	if d.tracker == nil {
		return nil, status.Error(codes.Unavailable, "node is starting")
	}
	// One entry per flow: the owner's state wins over replica copies
	// (replicas lag); among replicas, the highest epoch wins.
	byKey := map[string]*batonv1.FlowState{}
	add := func(st *batonv1.FlowState, owned bool) {
		k, err := handoff.KeyFromProto(st.Key)
		if err != nil {
			return
		}
		ks := k.String()
		if old, ok := byKey[ks]; ok && !owned && old.Epoch >= st.Epoch {
			return
		}
		byKey[ks] = st
	}
	d.tracker.Owned(func(st *batonv1.FlowState) bool { add(st, true); return true })
	resp := &batonv1.ListFlowsResponse{}
	if d.repl != nil {
		d.repl.Store().Range(func(st *batonv1.FlowState) bool { add(st, false); return true })
		if !req.LocalOnly {
			cctx, cancel := context.WithTimeout(ctx, clusterTimeout)
			resp.UnreachablePeers = d.repl.ListCluster(cctx, func(_ string, st *batonv1.FlowState) { add(st, true) })
			cancel()
		}
	}
	rows := make([]flowRow, 0, len(byKey))
	for ks, st := range byKey {
		if req.Owner != "" && st.Owner != req.Owner {
			continue
		}
		if req.Service != "" && st.Service != req.Service {
			continue
		}
		if req.Phase != batonv1.FlowPhase_FLOW_PHASE_UNSPECIFIED && st.Phase != req.Phase {
			continue
		}
		rows = append(rows, flowRow{ks, st})
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].key < rows[j].key })
	resp.Total = uint32(len(rows))
	start := sort.Search(len(rows), func(i int) bool { return rows[i].key > req.PageToken })
	if req.PageToken == "" {
		start = 0
	}
	end := min(start+size, len(rows))
	for _, r := range rows[start:end] {
		resp.Flows = append(resp.Flows, a.entry(r.state))
	}
	if end < len(rows) {
		resp.NextPageToken = rows[end-1].key
	}
	return resp, nil
}

// entry adds a flow's replica placement.
func (a *adminServer) entry(st *batonv1.FlowState) *batonv1.FlowEntry {
	e := &batonv1.FlowEntry{State: st}
	if a.d.repl != nil {
		if k, err := handoff.KeyFromProto(st.Key); err == nil {
			e.Replicas = a.d.repl.Placement(k, st.Owner)
		}
	}
	return e
}

// GetFlow implements batonv1.AdminServer.GetFlow.
func (a *adminServer) GetFlow(ctx context.Context, req *batonv1.GetFlowRequest) (*batonv1.GetFlowResponse, error) {
	d := a.d
	k, err := handoff.KeyFromProto(req.Key)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "key: %v", err)
	}
	if d.tracker == nil {
		return nil, status.Error(codes.Unavailable, "node is starting")
	}
	resp := &batonv1.GetFlowResponse{}
	if req.LocalOnly {
		if st, ok := d.tracker.Lookup(k); ok {
			resp.Copies = append(resp.Copies, &batonv1.FlowCopy{Node: d.cfg.Node, Owned: true, State: st})
		} else if d.repl != nil {
			if st, ok := d.repl.Store().Lookup(k); ok {
				resp.Copies = append(resp.Copies, &batonv1.FlowCopy{Node: d.cfg.Node, State: st})
			}
		}
	} else if d.repl != nil {
		cctx, cancel := context.WithTimeout(ctx, clusterTimeout)
		resp.Copies, resp.UnreachablePeers = d.repl.LookupCluster(cctx, k)
		cancel()
	} else if st, ok := d.tracker.Lookup(k); ok {
		resp.Copies = []*batonv1.FlowCopy{{Node: d.cfg.Node, Owned: true, State: st}}
	}
	// The flow as a whole: the owner's copy, else the newest replica.
	var best *batonv1.FlowCopy
	for _, c := range resp.Copies {
		if best == nil || (c.Owned && !best.Owned) ||
			(c.Owned == best.Owned && c.State.UpdatedUnixNano > best.State.UpdatedUnixNano) {
			best = c
		}
	}
	if best == nil {
		return nil, status.Errorf(codes.NotFound, "flow %s is not known to %s or its reachable peers", k, d.cfg.Node)
	}
	resp.Flow = a.entry(best.State)
	return resp, nil
}

// ListPeers implements batonv1.AdminServer.ListPeers.
func (a *adminServer) ListPeers(context.Context, *batonv1.ListPeersRequest) (*batonv1.ListPeersResponse, error) {
	resp := &batonv1.ListPeersResponse{Node: a.d.cfg.Node}
	if a.d.repl != nil {
		resp.Peers = a.d.repl.Peers()
		resp.Replicas = uint32(a.d.repl.Replicas())
	}
	return resp, nil
}

// Drain implements batonv1.AdminServer.Drain: the announcement is
// withdrawn (and the standard health service reports NOT_SERVING); the
// node keeps serving its flows and is drained once it owns none.
func (a *adminServer) Drain(ctx context.Context, _ *batonv1.DrainRequest) (*batonv1.DrainResponse, error) {
	if a.d.health == nil {
		return nil, status.Error(codes.Unavailable, "node is starting")
	}
	st, err := a.d.health.machine.Drain(ctx, "draining (batonctl drain)")
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "node is %s: %v", st, err)
	}
	a.d.log.Info("draining (batonctl drain)", "state", st.String())
	return &batonv1.DrainResponse{State: protoState(st)}, nil
}

// Undrain implements batonv1.AdminServer.Undrain: the node announces again
// as soon as its checks pass.
func (a *adminServer) Undrain(ctx context.Context, _ *batonv1.UndrainRequest) (*batonv1.UndrainResponse, error) {
	if a.d.health == nil {
		return nil, status.Error(codes.Unavailable, "node is starting")
	}
	st, err := a.d.health.machine.Undrain(ctx)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "node is %s: %v", st, err)
	}
	a.d.log.Info("undrained", "state", st.String())
	return &batonv1.UndrainResponse{State: protoState(st)}, nil
}
