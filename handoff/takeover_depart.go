package handoff

// This file is the departure handover: a node that stops gracefully hands
// every flow it still owns to another node before it goes, exactly.
//
// A drain (withdrawal) moves a flow whose client keeps sending: its
// packets land on another node, which pulls it (takeover_pull.go). An idle
// flow (an echo session between two messages, a download whose reader is
// not reading) sends nothing, so it stays owned by the draining node; if
// that node simply exited, its flow would come back from replicated state
// (a push) or not at all. Instead, the departing node asks each flow's
// successor (the first live node by rendezvous weight, the one a push
// would pick: designated()) to take it over now, with the Depart RPC. The
// successor runs an ordinary pull for the flow: it claims it from the
// departing node, which is still alive, so the hand-over is the claim's
// (claim.go: fence, exact snapshot of what the client saw, abort, grant at
// epoch+1) and the successor restores exactly that state. The successor
// answers once the flow is restored there (or the pull failed); on a
// refusal or an error the departing node tries the next candidate.
//
// Depart is a peer RPC of its own ("baton.v1.Depart/Handover"), declared
// here with the Peer service's message types: ClaimRequest (key; claimer
// = the departing node, authenticated like a Claim; epoch = its epoch)
// and ClaimResponse (granted once the callee owns the flow).

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

const (
	departMethod = "/baton.v1.Depart/Handover"
	// departParallel bounds the hand-overs in flight.
	departParallel = 16
	// departRounds and departRetry bound the retries of a flow whose
	// state cannot be handed over at the moment.
	departRounds = 20
	departRetry  = 50 * time.Millisecond
	// departCallTimeout bounds one Depart call: the callee's pull (a
	// lookup, a claim, the synthetic handshake) within its window.
	departCallTimeout = DefaultTakeoverWindow + 2*time.Second
)

// HowDepart labels, in the departing node's takeover counter, the flows it
// handed over as it left (the successor records an ordinary pull-migrate).
const HowDepart = "depart"

// DepartResult counts what Depart did.
type DepartResult struct {
	// Flows is how many flows this node owned when Depart started;
	// Handed how many it handed over (or lost to a pull meanwhile);
	// Left how many it still owns.
	Flows, Handed, Left int
}

// Depart hands every flow this node owns over to its successor (see the
// file comment) and returns when each is handed over or every candidate
// refused it, or when ctx ends. Call it after withdrawing, before Close.
func (e *Engine) Depart(ctx context.Context) DepartResult {
	var keys []FlowKey
	e.tr.Owned(func(st *batonv1.FlowState) bool {
		if k, err := KeyFromProto(st.Key); err == nil {
			keys = append(keys, k)
		}
		return true
	})
	res := DepartResult{Flows: len(keys)}
	if len(keys) == 0 {
		return res
	}
	start := time.Now()
	var (
		wg     sync.WaitGroup
		sem    = make(chan struct{}, departParallel)
		handed atomic.Int64
	)
	for _, k := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			if err := e.departFlow(ctx, k); err != nil {
				e.log.Warn("takeover: departure: flow not handed over", "flow", k.String(), "err", err)
				return
			}
			handed.Add(1)
		}()
	}
	wg.Wait()
	res.Handed = int(handed.Load())
	for _, k := range keys {
		if _, owned := e.tr.Epoch(k); owned {
			res.Left++
		}
	}
	e.log.Info("takeover: departure handover done", "flows", res.Flows, "handed", res.Handed, "left", res.Left,
		"after", time.Since(start).Round(time.Millisecond))
	return res
}

// departFlow hands k over to the first candidate that takes it. A
// refusal because of the flow's state now (cannot_resume: an echo owes its
// client bytes not yet acknowledged; busy: a claim is under way) is tried
// again shortly, a little later each time, up to departRounds times.
func (e *Engine) departFlow(ctx context.Context, k FlowKey) error {
	var last error
	for round := 0; round < departRounds; round++ {
		if round > 0 {
			if err := sleepCtx(ctx, time.Duration(min(round, 5))*departRetry); err != nil {
				return err
			}
		}
		live := e.r.members.Live()
		cands := Replicas(k, e.self, live, len(live))
		if len(cands) == 0 {
			return errors.New("no live peer")
		}
		again := false
		for _, peer := range cands {
			epoch, owned := e.tr.Epoch(k)
			if !owned {
				return nil // closed, or pulled by the node its client reached
			}
			if f := e.lookup(k); f != nil && f.get() == esHold {
				again = true // a claim is handing it over right now
				break
			}
			resp, err := e.callDepart(ctx, peer, k, epoch)
			if err == nil && resp.Granted {
				e.m.takeover(HowDepart)
				return nil
			}
			if err != nil {
				last = err
			} else {
				last = errors.New(peer + " refused: " + resp.Reason)
				if resp.Reason == claimCannotResume || resp.Reason == claimBusy {
					again = true
					break
				}
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
		if !again {
			break
		}
	}
	if _, owned := e.tr.Epoch(k); !owned {
		return nil
	}
	return last
}

// callDepart asks peer to take k over.
func (e *Engine) callDepart(ctx context.Context, peer string, k FlowKey, epoch uint64) (*batonv1.ClaimResponse, error) {
	l := e.r.linkByName[peer]
	if l == nil || e.r.clientFor(l) == nil {
		return nil, errors.New("peer " + peer + " is down")
	}
	ctx, cancel := context.WithTimeout(ctx, departCallTimeout)
	defer cancel()
	resp := new(batonv1.ClaimResponse)
	err := l.conn.Invoke(ctx, departMethod, &batonv1.ClaimRequest{Key: k.Proto(), Claimer: e.self, Epoch: epoch}, resp)
	return resp, err
}

// handleDepart is the successor's side: pull k now (claiming it from the
// departing caller) and answer once it is restored here.
func (e *Engine) handleDepart(ctx context.Context, caller string, req *batonv1.ClaimRequest) (*batonv1.ClaimResponse, error) {
	k, err := KeyFromProto(req.GetKey())
	if err != nil {
		return nil, err
	}
	if !prefixesContain(e.prefixes, k.Anycast.Addr()) {
		return nil, reject(RejectNotAnycast, "%s is outside the anycast prefixes", k.Anycast.Addr())
	}
	if e.closed.Load() {
		return refuse(claimNoTakeover), nil
	}
	if _, owned := e.tr.Epoch(k); owned {
		return &batonv1.ClaimResponse{Granted: true}, nil
	}
	f, _ := e.entry(k, esDeciding)
	f.mu.Lock()
	switch f.get() {
	case esMoved, esUnknown:
		// It left this node before (or was unknown here): take it again,
		// as a packet of it arriving here would.
		e.setStateLocked(f, esDeciding)
		f.trigger = time.Now()
		f.run = nil
	case esHold:
		f.mu.Unlock()
		return refuse(claimBusy), nil
	case esForward:
		if f.owner != caller {
			f.mu.Unlock()
			return refuse(claimCannotResume), nil
		}
		// Forwarded to the departing node because its service could not
		// hand the stream over then: try again (its forwarder is left to
		// the flows still forwarded to it).
		f.fwd = nil
		e.setStateLocked(f, esDeciding)
		f.trigger = time.Now()
		f.run = nil
	case esReset:
		f.mu.Unlock()
		return refuse(claimReset), nil
	}
	st := f.get()
	f.mu.Unlock()
	if st == esDeciding {
		e.startPull(f) // joins a pull under way
	}
	f.mu.Lock()
	run := f.run
	f.mu.Unlock()
	if run != nil {
		select {
		case <-run.done:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if _, owned := e.tr.Epoch(k); owned {
		e.log.Debug("takeover: flow taken over from a departing node", "flow", k.String(), "from", caller)
		return &batonv1.ClaimResponse{Granted: true}, nil
	}
	switch f.get() {
	case esReset:
		return refuse(claimReset), nil
	case esForward:
		return refuse(claimCannotResume), nil
	}
	return refuse(claimNotOwner), nil
}

// departServer serves the Depart RPC on the peer server.
type departServer struct{ s *peerServer }

func (d departServer) handover(ctx context.Context, req *batonv1.ClaimRequest) (*batonv1.ClaimResponse, error) {
	caller, err := d.s.callerAs(ctx, req.GetClaimer())
	if err != nil {
		return nil, err
	}
	e := d.s.r.engine.Load()
	if e == nil {
		return refuse(claimNoTakeover), nil
	}
	resp, err := e.handleDepart(ctx, caller, req)
	if err != nil {
		if _, ok := status.FromError(err); ok && status.Code(err) != codes.Unknown {
			return nil, err
		}
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return resp, nil
}

var departServiceDesc = grpc.ServiceDesc{
	ServiceName: "baton.v1.Depart",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Handover",
		Handler: func(srv any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
			in := new(batonv1.ClaimRequest)
			if err := dec(in); err != nil {
				return nil, err
			}
			d := srv.(departServer)
			if icpt == nil {
				return d.handover(ctx, in)
			}
			info := &grpc.UnaryServerInfo{Server: srv, FullMethod: departMethod}
			return icpt(ctx, in, info, func(ctx context.Context, req any) (any, error) {
				return d.handover(ctx, req.(*batonv1.ClaimRequest))
			})
		},
	}},
	Metadata: "handoff/takeover_depart.go",
}

// registerDepart adds the Depart service to the peer server.
func registerDepart(srv *grpc.Server, ps *peerServer) {
	srv.RegisterService(&departServiceDesc, departServer{s: ps})
}
