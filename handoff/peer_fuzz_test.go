package handoff

// Fuzz target of the peer server's request handlers other than Replicate
// (FuzzPeerBatch covers its batch validation): Claim, Release, Lookup, the
// Depart handover and Forward, each fed a request unmarshalled from
// arbitrary bytes and called as the authenticated peer n2 would reach
// them (its verified certificate in the call's context), on a node of a
// two-node cluster. Nothing may panic; a request is answered or refused with
// InvalidArgument (or PermissionDenied when it names another caller); a
// claim is granted and a lookup finds something only for a flow the node
// holds, and a Forward acknowledges every packet it was given.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// fuzzForwardStream is a Forward call whose client sends one batch.
type fuzzForwardStream struct {
	grpc.ServerStream
	ctx   context.Context
	batch *batonv1.ForwardBatch
	ack   *batonv1.ForwardAck
}

func (s *fuzzForwardStream) Context() context.Context { return s.ctx }

func (s *fuzzForwardStream) Recv() (*batonv1.ForwardBatch, error) {
	if b := s.batch; b != nil {
		s.batch = nil
		return b, nil
	}
	return nil, io.EOF
}

func (s *fuzzForwardStream) SendAndClose(a *batonv1.ForwardAck) error { s.ack = a; return nil }

// asPeer returns a context carrying leaf as the caller's verified
// certificate.
func asPeer(ctx context.Context, leaf *x509.Certificate) context.Context {
	return peer.NewContext(ctx, &peer.Peer{
		Addr:     &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1},
		AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}},
	})
}

// Request selectors of FuzzPeerRequests.
const (
	fuzzClaim = iota
	fuzzRelease
	fuzzLookup
	fuzzDepart
	fuzzForward
	fuzzKinds
)

func FuzzPeerRequests(f *testing.F) {
	key := func(client, anycast netip.AddrPort) *batonv1.FlowKey {
		return FlowKey{Client: client, Anycast: anycast}.Proto()
	}
	in := key(netip.AddrPortFrom(trkClient4, 40000), trkAnycast4)
	out := key(netip.AddrPortFrom(trkClient4, 40000), netip.MustParseAddrPort("203.0.113.9:9000"))
	in6 := key(netip.AddrPortFrom(trkClient6, 40000), trkAnycast6)
	for _, m := range []struct {
		kind uint8
		msg  proto.Message
	}{
		{fuzzClaim, &batonv1.ClaimRequest{Key: in, Claimer: "n2", Epoch: 7}},
		{fuzzClaim, &batonv1.ClaimRequest{Key: out, Claimer: "n2", Epoch: 1}},
		{fuzzClaim, &batonv1.ClaimRequest{Key: in6, Claimer: "n1"}},
		{fuzzRelease, &batonv1.ReleaseRequest{Key: in, NewOwner: "n2", Epoch: 1 << 62}},
		{fuzzLookup, &batonv1.LookupRequest{Key: in6}},
		{fuzzDepart, &batonv1.ClaimRequest{Key: in, Claimer: "n2", Epoch: 3}},
		{fuzzDepart, &batonv1.ClaimRequest{Key: out, Claimer: "n2"}},
		{fuzzForward, &batonv1.ForwardBatch{Sender: "n2", Packets: [][]byte{
			trkSeg{src: netip.AddrPortFrom(trkClient4, 40001), dst: trkAnycast4, seq: 5, ack: 9, flags: 0x10}.bytes(), {0x45, 0, 0, 20}}}},
		{fuzzForward, &batonv1.ForwardBatch{Sender: "n2", LatePackets: [][]byte{
			trkSeg{src: netip.AddrPortFrom(trkClient4, 40002), dst: trkAnycast4, seq: 7, ack: 3, flags: 0x10}.bytes(), {0x60, 0, 0}}}},
		{fuzzForward, &batonv1.ForwardBatch{Sender: "intruder"}},
	} {
		b, err := proto.Marshal(m.msg)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(m.kind, b)
	}
	f.Add(uint8(fuzzClaim), []byte{})

	l := newTkLab(f, tkConfig{nodes: 2})
	srv := &peerServer{r: l.nodes[0].r}
	leaf := l.nodes[1].r.cfg.TLS.Leaf
	okCode := func(t *testing.T, err error) {
		t.Helper()
		switch status.Code(err) {
		case codes.OK, codes.InvalidArgument, codes.PermissionDenied:
		default:
			t.Fatalf("unexpected error %v", err)
		}
	}
	// holds reports whether n1 owns the flow or keeps a copy of it (a
	// packet forwarded by an earlier input may have opened one).
	holds := func(pk *batonv1.FlowKey) bool {
		k, err := KeyFromProto(pk)
		if err != nil {
			return false
		}
		_, copyHeld := l.nodes[0].r.store.Lookup(k)
		return l.nodes[0].tr.Has(k) || copyHeld
	}
	f.Fuzz(func(t *testing.T, kind uint8, data []byte) {
		ctx, cancel := context.WithTimeout(asPeer(context.Background(), leaf), 300*time.Millisecond)
		defer cancel()
		switch kind % fuzzKinds {
		case fuzzClaim:
			var req batonv1.ClaimRequest
			if proto.Unmarshal(data, &req) != nil {
				return
			}
			owned := holds(req.Key)
			resp, err := srv.Claim(ctx, &req)
			okCode(t, err)
			if req.Claimer != "n2" && err == nil {
				t.Fatalf("claim on behalf of %q accepted from n2", req.Claimer)
			}
			if (resp.GetGranted() || resp.GetState() != nil) && !owned {
				t.Fatalf("a flow n1 does not own granted: %v", resp)
			}
		case fuzzRelease:
			var req batonv1.ReleaseRequest
			if proto.Unmarshal(data, &req) != nil {
				return
			}
			_, err := srv.Release(ctx, &req)
			okCode(t, err)
			if req.NewOwner != "n2" && err == nil {
				t.Fatalf("release on behalf of %q accepted from n2", req.NewOwner)
			}
		case fuzzLookup:
			var req batonv1.LookupRequest
			if proto.Unmarshal(data, &req) != nil {
				return
			}
			held := holds(req.Key)
			resp, err := srv.Lookup(ctx, &req)
			okCode(t, err)
			if resp.GetFound() && !held {
				t.Fatalf("lookup found %v on a node not holding it", resp)
			}
		case fuzzDepart:
			var req batonv1.ClaimRequest
			if proto.Unmarshal(data, &req) != nil {
				return
			}
			resp, err := departServer{s: srv}.handover(ctx, &req)
			switch status.Code(err) {
			case codes.OK, codes.InvalidArgument, codes.PermissionDenied, codes.DeadlineExceeded, codes.Canceled:
			default:
				t.Fatalf("unexpected error %v", err)
			}
			if req.Claimer != "n2" && err == nil {
				t.Fatalf("handover on behalf of %q accepted from n2", req.Claimer)
			}
			if resp.GetState() != nil {
				t.Fatalf("handover answered with a state: %v", resp)
			}
		case fuzzForward:
			var b batonv1.ForwardBatch
			if proto.Unmarshal(data, &b) != nil {
				return
			}
			s := &fuzzForwardStream{ctx: ctx, batch: &b}
			err := srv.Forward(s)
			okCode(t, err)
			if err != nil {
				if b.Sender == "n2" {
					t.Fatalf("forward from n2 refused: %v", err)
				}
				return
			}
			if b.Sender != "n2" {
				t.Fatalf("forward on behalf of %q accepted from n2", b.Sender)
			}
			if n := len(b.Packets) + len(b.LatePackets); s.ack == nil || s.ack.Accepted+s.ack.Rejected != uint64(n) {
				t.Fatalf("ack %v for %d packets", s.ack, n)
			}
		}
	})
}
