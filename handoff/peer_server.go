package handoff

// The peer server: the callee side of the Peer service. It authenticates
// every caller by its certificate (node name = CommonName or DNS SAN; in
// insecure mode the FlowBatch.sender field is trusted, with a warning),
// accepts flow state only from a configured peer about flows that peer
// owns, and never trusts anything else it receives: every rejection is
// counted by reason and logged (rate-limited) with the peer's name.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

const (
	// MaxBatchEvents is the most events a received batch may carry; a
	// bigger batch is rejected whole (too_large).
	MaxBatchEvents = 1024
	// MaxPeerMessageBytes is the largest gRPC message the peer server
	// accepts.
	MaxPeerMessageBytes = 4 << 20
)

// Ack coalescing on a Replicate stream: one ack covers every batch applied
// since the previous one, and acks go at most every ackDelay: a batch
// after a quiet period is acknowledged at once, batches that follow within
// ackDelay of the last ack wait for the end of that interval. An ack goes
// at once also for a batch with ack_now (its sender waits for it), with a
// rejection (so that an ack's rejections are always those of its newest
// batch), or when ackEvery batches are pending.
var (
	ackDelay = 3 * time.Millisecond
	ackEvery = 16
)

type peerServer struct {
	batonv1.UnimplementedPeerServer
	r *Replication
}

// identity returns the node names in the caller's verified certificate and
// its address.
func identity(ctx context.Context) (names []string, addr string) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, ""
	}
	if p.Addr != nil {
		addr = p.Addr.String()
	}
	if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
		names = certNames(ti.State.PeerCertificates[0])
	}
	return names, addr
}

// printable shortens a remote-chosen string for a log line.
func printable(s string) string {
	if len(s) > MaxNodeNameBytes {
		s = s[:MaxNodeNameBytes] + "..."
	}
	return fmt.Sprintf("%q", s)
}

// authorizeSender checks a batch's sender against the caller's identity.
// It returns a reject reason ("" when accepted).
func (s *peerServer) authorizeSender(sender string, names []string) (reason, detail string) {
	r := s.r
	if !r.members.IsPeer(sender) {
		return RejectNotMember, fmt.Sprintf("sender %s is not a configured peer", printable(sender))
	}
	if r.cfg.Insecure {
		r.insecureWarn.Do(func() {
			r.log.Warn("replication: insecure peer network: trusting the sender named in each batch", "sender", sender)
		})
		return "", ""
	}
	if !slices.Contains(names, sender) {
		return RejectIdentityMismatch, fmt.Sprintf("sender %s, certificate names %s", printable(sender), printable(strings.Join(names, ",")))
	}
	return "", ""
}

// authorizeCall lets read-only calls through from configured peers only
// (any caller in insecure mode).
func (s *peerServer) authorizeCall(ctx context.Context) error {
	if s.r.cfg.Insecure {
		return nil
	}
	names, addr := identity(ctx)
	for _, n := range names {
		if s.r.members.IsPeer(n) {
			return nil
		}
	}
	detail := fmt.Sprintf("certificate names %s", printable(strings.Join(names, ",")))
	s.r.rejects.add("unknown", RejectNotMember, 1, detail, "remote", addr)
	return status.Errorf(codes.PermissionDenied, "%s: %s", RejectNotMember, detail)
}

// Replicate receives a peer's flow events and acknowledges the batches
// (cumulatively, see ackDelay).
func (s *peerServer) Replicate(stream batonv1.Peer_ReplicateServer) error {
	r := s.r
	names, addr := identity(stream.Context())
	var (
		sender   string
		lk       *link
		inResync bool
		keep     map[FlowKey]struct{}
	)
	defer func() {
		if sender != "" {
			r.members.inboundClosed(sender)
		}
	}()
	a := newAcker(stream)
	defer a.stop()
	for {
		b, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				// The sender is done: acknowledge what is pending.
				return a.stop()
			}
			s.countRecvError(err, sender, names, addr)
			return err
		}
		if sender == "" {
			if reason, detail := s.authorizeSender(b.Sender, names); reason != "" {
				label := "unknown"
				if r.members.IsPeer(b.Sender) {
					label = b.Sender
				}
				r.rejects.add(label, reason, 1, detail, "remote", addr)
				return status.Errorf(codes.PermissionDenied, "%s: %s", reason, detail)
			}
			sender = b.Sender
			lk = r.linkByName[sender]
			r.members.inboundOpened(sender)
		} else if b.Sender != sender {
			detail := fmt.Sprintf("sender changed from %q to %s within a stream", sender, printable(b.Sender))
			r.rejects.add(sender, RejectIdentityMismatch, 1, detail, "remote", addr)
			return status.Errorf(codes.PermissionDenied, "%s: %s", RejectIdentityMismatch, detail)
		}
		if lk != nil {
			lk.bytesRecv.Add(uint64(proto.Size(b)))
		}
		ack := s.apply(sender, b, &inResync, &keep)
		if err := a.add(ack, b.AckNow || ack.Rejected > 0); err != nil {
			return err
		}
	}
}

// acker sends a Replicate stream's acks from a goroutine of its own, one
// ack for the batches applied since the previous one (ackDelay).
type acker struct {
	stream batonv1.Peer_ReplicateServer
	delay  time.Duration // ackDelay and ackEvery when the stream opened
	every  int
	wake   chan struct{} // cap 1
	quit   chan struct{}
	done   chan struct{}

	mu      sync.Mutex
	pending *batonv1.BatchAck // nil: nothing to acknowledge
	n       int               // batches pending
	last    time.Time         // when the previous ack was taken to be sent
	now     bool              // a pending batch wants its ack at once
	err     error             // the Send that failed
	stopped bool
}

func newAcker(stream batonv1.Peer_ReplicateServer) *acker {
	a := &acker{stream: stream, delay: ackDelay, every: ackEvery,
		wake: make(chan struct{}, 1), quit: make(chan struct{}), done: make(chan struct{})}
	go a.run()
	return a
}

// add merges the ack of one applied batch into the pending ack; now sends
// it at once. It returns the error of a failed Send.
func (a *acker) add(ack *batonv1.BatchAck, now bool) error {
	a.mu.Lock()
	if a.err != nil {
		err := a.err
		a.mu.Unlock()
		return err
	}
	first := a.pending == nil
	if first {
		a.pending, a.n = ack, 1
	} else {
		p := a.pending
		p.Seq = ack.Seq
		p.Accepted += ack.Accepted
		p.Rejected += ack.Rejected
		if p.FirstReject == "" {
			p.FirstReject = ack.FirstReject
		}
		a.n++
	}
	a.now = a.now || now
	// Wake the goroutine only when it has something new to do: start
	// its timer, or send now.
	signal := first || a.now || a.n >= a.every
	a.mu.Unlock()
	if signal {
		select {
		case a.wake <- struct{}{}:
		default:
		}
	}
	return nil
}

// take returns the pending ack when it is due, else how long until it is.
func (a *acker) take() (*batonv1.BatchAck, time.Duration) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.pending == nil {
		return nil, 0
	}
	now := time.Now()
	if wait := a.delay - now.Sub(a.last); !a.now && a.n < a.every && wait > 0 {
		return nil, wait
	}
	p := a.pending
	a.pending, a.n, a.now, a.last = nil, 0, false, now
	return p, 0
}

func (a *acker) run() {
	defer close(a.done)
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		select {
		case <-a.quit:
			return
		case <-a.wake:
		}
		for {
			p, wait := a.take()
			if p == nil && wait == 0 {
				break
			}
			if p == nil {
				t.Reset(wait)
				select {
				case <-a.quit:
					t.Stop()
					return
				case <-a.wake:
					t.Stop()
				case <-t.C:
				}
				continue
			}
			if err := a.stream.Send(p); err != nil {
				a.mu.Lock()
				a.err = err
				a.mu.Unlock()
				return
			}
		}
	}
}

// stop ends the goroutine and sends the pending ack, if any (the stream
// is still usable); it returns the error of a failed Send. Idempotent.
func (a *acker) stop() error {
	a.mu.Lock()
	if a.stopped {
		err := a.err
		a.mu.Unlock()
		return err
	}
	a.stopped = true
	a.mu.Unlock()
	close(a.quit)
	<-a.done
	a.mu.Lock()
	p, err := a.pending, a.err
	a.pending = nil
	a.mu.Unlock()
	if err == nil && p != nil {
		err = a.stream.Send(p)
	}
	return err
}

// apply applies one batch and builds its ack (merged into the stream's
// pending ack by the acker). Between a batch with
// resync_begin and one with resync_end, the keys the sender holds are
// collected; at resync_end everything else held from it is dropped.
func (s *peerServer) apply(sender string, b *batonv1.FlowBatch, inResync *bool, keep *map[FlowKey]struct{}) *batonv1.BatchAck {
	r := s.r
	ack := &batonv1.BatchAck{Seq: b.Seq}
	now := time.Now()
	r.members.seen(sender, now)
	r.members.report(sender, b.Heard, now) // lease.go
	if n := len(b.Events); n > MaxBatchEvents {
		ack.Rejected, ack.FirstReject = uint32(n), RejectTooLarge
		r.rejects.add(sender, RejectTooLarge, n, fmt.Sprintf("batch %d of %d events (max %d)", b.Seq, n, MaxBatchEvents))
		return ack
	}
	if b.ResyncBegin {
		*inResync, *keep = true, make(map[FlowKey]struct{})
	}
	var (
		firstErr error
		counts   map[string]int
	)
	for _, ev := range b.Events {
		res, err := r.store.Apply(sender, ev)
		if err != nil {
			reason := RejectReason(err)
			if counts == nil {
				counts = map[string]int{}
			}
			counts[reason]++
			if firstErr == nil {
				firstErr = err
				ack.FirstReject = reason
			}
			ack.Rejected++
			continue
		}
		ack.Accepted++
		if e := r.engine.Load(); e != nil && res.Held {
			e.foreignState(ev.State)
		}
		if *inResync {
			if res.Held {
				(*keep)[res.Key] = struct{}{}
			} else {
				delete(*keep, res.Key)
			}
		}
	}
	for reason, n := range counts {
		detail := reason
		if RejectReason(firstErr) == reason {
			detail = firstErr.Error()
		}
		r.rejects.add(sender, reason, n, detail)
	}
	if b.ResyncEnd && *inResync {
		dropped := r.store.Replace(sender, *keep)
		r.log.Debug("replication: resync from peer done", "peer", sender, "flows", len(*keep), "dropped", dropped)
		*inResync, *keep = false, nil
	}
	return ack
}

// Lookup returns what this node knows about a flow: owned, or a replica.
func (s *peerServer) Lookup(ctx context.Context, req *batonv1.LookupRequest) (*batonv1.LookupResponse, error) {
	if err := s.authorizeCall(ctx); err != nil {
		return nil, err
	}
	k, err := KeyFromProto(req.GetKey())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if st, ok := s.r.src.Lookup(k); ok {
		return &batonv1.LookupResponse{Found: true, State: st, Owned: true}, nil
	}
	if st, ok := s.r.store.Lookup(k); ok {
		return &batonv1.LookupResponse{Found: true, State: st}, nil
	}
	return &batonv1.LookupResponse{}, nil
}

// ListOwned streams the flows this node owns.
func (s *peerServer) ListOwned(_ *batonv1.ListOwnedRequest, stream batonv1.Peer_ListOwnedServer) error {
	if err := s.authorizeCall(stream.Context()); err != nil {
		return err
	}
	// Collect first: the tracker must not wait for the network.
	var states []*batonv1.FlowState
	s.r.src.Owned(func(st *batonv1.FlowState) bool {
		states = append(states, st)
		return true
	})
	for _, st := range states {
		if err := stream.Send(st); err != nil {
			return err
		}
	}
	return nil
}

// callerAs authorizes a call made on behalf of the node named claimed: it
// must be a configured peer and, with TLS, the name in the caller's
// certificate.
func (s *peerServer) callerAs(ctx context.Context, claimed string) (string, error) {
	names, addr := identity(ctx)
	if reason, detail := s.authorizeSender(claimed, names); reason != "" {
		label := "unknown"
		if s.r.members.IsPeer(claimed) {
			label = claimed
		}
		s.r.rejects.add(label, reason, 1, detail, "remote", addr)
		return "", status.Errorf(codes.PermissionDenied, "%s: %s", reason, detail)
	}
	return claimed, nil
}

// Claim hands a flow this node owns over to the caller (claim.go).
func (s *peerServer) Claim(ctx context.Context, req *batonv1.ClaimRequest) (*batonv1.ClaimResponse, error) {
	caller, err := s.callerAs(ctx, req.GetClaimer())
	if err != nil {
		return nil, err
	}
	e := s.r.engine.Load()
	if e == nil {
		return &batonv1.ClaimResponse{Reason: claimNoTakeover}, nil
	}
	resp, err := e.handleClaim(ctx, caller, req)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return resp, nil
}

// Release makes this node give up a flow the caller owns at a higher
// epoch (claim.go).
func (s *peerServer) Release(ctx context.Context, req *batonv1.ReleaseRequest) (*batonv1.ReleaseResponse, error) {
	caller, err := s.callerAs(ctx, req.GetNewOwner())
	if err != nil {
		return nil, err
	}
	e := s.r.engine.Load()
	if e == nil {
		return &batonv1.ReleaseResponse{}, nil
	}
	resp, err := e.handleRelease(caller, req)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return resp, nil
}

// Forward delivers client packets the caller tunnels to this node, the
// owner of their flows (forward.go).
func (s *peerServer) Forward(stream batonv1.Peer_ForwardServer) error {
	var (
		sender string
		ack    batonv1.ForwardAck
		seen   = map[FlowKey]bool{}
	)
	for {
		b, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&ack)
		}
		if err != nil {
			names, addr := identity(stream.Context())
			s.countRecvError(err, sender, names, addr)
			return err
		}
		if sender == "" {
			if sender, err = s.callerAs(stream.Context(), b.Sender); err != nil {
				return err
			}
		} else if b.Sender != sender {
			return status.Errorf(codes.PermissionDenied, "%s: sender changed within a stream", RejectIdentityMismatch)
		}
		e := s.r.engine.Load()
		for j, pkts := range [2][][]byte{b.Packets, b.LatePackets} {
			late := j == 1
			for _, pkt := range pkts {
				if e == nil {
					ack.Rejected++
					continue
				}
				k, ok := e.forwardIn(pkt)
				if !ok {
					ack.Rejected++
					continue
				}
				ack.Accepted++
				if !late && !seen[k] && len(seen) < 4096 {
					seen[k] = true
					e.tr.AddHistory(k, sender, HowForward)
				}
			}
		}
	}
}

// countRecvError counts a message a peer stream could not deliver: over
// the size limit (too_large) or not decoding (malformed). It is counted
// for the stream's sender, else the member named by the caller's
// certificate, else "unknown".
func (s *peerServer) countRecvError(err error, sender string, names []string, addr string) {
	var reason string
	switch st, _ := status.FromError(err); {
	case st.Code() == codes.ResourceExhausted:
		reason = RejectTooLarge
	case st.Code() == codes.Internal && strings.Contains(st.Message(), "unmarshal"):
		reason = RejectMalformed
	default:
		return
	}
	label := "unknown"
	if sender != "" {
		label = sender
	} else {
		for _, n := range names {
			if s.r.members.IsPeer(n) {
				label = n
				break
			}
		}
	}
	s.r.rejects.add(label, reason, 1, err.Error(), "remote", addr)
}

// countingCreds counts failed TLS handshakes on the peer listener (a
// certificate from another CA, none at all, ...): they never reach a
// handler.
type countingCreds struct {
	credentials.TransportCredentials
	r *Replication
}

func (c countingCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	nc, ai, err := c.TransportCredentials.ServerHandshake(conn)
	if err != nil {
		c.r.rejects.add("unknown", RejectTLSHandshake, 1, err.Error(), "remote", conn.RemoteAddr().String())
	}
	return nc, ai, err
}

func (c countingCreds) Clone() credentials.TransportCredentials {
	return countingCreds{TransportCredentials: c.TransportCredentials.Clone(), r: c.r}
}
