package handoff

import (
	"context"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// serverNode starts node "a" with peers b and c (unreachable) and returns
// it with the PKI directory (which also has a certificate for "intruder",
// a name that is not a member).
func serverNode(t *testing.T, insecureMode bool) (*Replication, *fakeSource, string) {
	t.Helper()
	pki := t.TempDir()
	if err := GenerateLabPKI(pki, []string{"a", "b", "c", "intruder"}); err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := ReplicationConfig{
		Self:     "a",
		Peers:    []Peer{{"b", "127.0.0.1:1"}, {"c", "127.0.0.1:1"}},
		Listen:   lis.Addr().String(),
		Prefixes: testPrefixes,
		Insecure: insecureMode,
		Logger:   testLogger(),
		listener: lis,
	}
	if !insecureMode {
		if cfg.TLS, err = LoadTLS(filepath.Join(pki, "ca.pem"), filepath.Join(pki, "a.pem"), filepath.Join(pki, "a-key.pem")); err != nil {
			t.Fatal(err)
		}
	}
	src := newFakeSource("a")
	r, err := NewReplication(cfg, src)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r, src, pki
}

// dialAs connects to r with the certificate of name (insecure when pki is
// empty).
func dialAs(t *testing.T, r *Replication, pki, name string) batonv1.PeerClient {
	t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if pki != "" {
		tm, err := LoadTLS(filepath.Join(pki, "ca.pem"), filepath.Join(pki, name+".pem"), filepath.Join(pki, name+"-key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		opts = []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tm.Client("a"))), grpc.WithAuthority("a")}
	}
	conn, err := grpc.NewClient("passthrough:///"+r.Addr().String(), opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return batonv1.NewPeerClient(conn)
}

type rawStream struct {
	t      *testing.T
	s      grpc.BidiStreamingClient[batonv1.FlowBatch, batonv1.BatchAck]
	cancel context.CancelFunc
	seq    uint64
}

func openStream(t *testing.T, c batonv1.PeerClient) *rawStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := c.Replicate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &rawStream{t: t, s: s, cancel: cancel}
}

// send sends a batch and returns its ack, or the stream's error.
func (rs *rawStream) send(b *batonv1.FlowBatch) (*batonv1.BatchAck, error) {
	rs.seq++
	b.Seq = rs.seq
	if err := rs.s.Send(b); err != nil && err != io.EOF {
		return nil, err
	}
	return rs.s.Recv()
}

func (rs *rawStream) mustSend(b *batonv1.FlowBatch) *batonv1.BatchAck {
	rs.t.Helper()
	ack, err := rs.send(b)
	if err != nil {
		rs.t.Fatalf("batch %d: %v", rs.seq, err)
	}
	if ack.Seq != rs.seq {
		rs.t.Fatalf("ack seq %d, want %d", ack.Seq, rs.seq)
	}
	return ack
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("error %v, want code %v", err, code)
	}
}

func TestPeerServerAuthentication(t *testing.T) {
	t.Cleanup(leakCheck(t))
	r, _, pki := serverNode(t, false)
	st := testState("b", testKey(1), 1)
	batch := func(sender string) *batonv1.FlowBatch {
		return &batonv1.FlowBatch{Sender: sender, Events: []*batonv1.FlowEvent{ev(kOpen, testState(sender, testKey(1), 1))}}
	}

	// A certificate of the CA whose name is not a member.
	_, err := openStream(t, dialAs(t, r, pki, "intruder")).send(batch("intruder"))
	wantCode(t, err, codes.PermissionDenied)
	if r.rejects.get("unknown", RejectNotMember) != 1 {
		t.Fatal("not_member not counted")
	}
	// A member's certificate claiming to be another member.
	_, err = openStream(t, dialAs(t, r, pki, "b")).send(batch("c"))
	wantCode(t, err, codes.PermissionDenied)
	if r.rejects.get("c", RejectIdentityMismatch) != 1 {
		t.Fatal("identity_mismatch not counted")
	}
	// Changing the sender within a stream.
	rs := openStream(t, dialAs(t, r, pki, "b"))
	if ack := rs.mustSend(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kOpen, st)}}); ack.Accepted != 1 {
		t.Fatalf("ack %v", ack)
	}
	if !r.Members().Up("b") {
		t.Fatal("b not up while its stream is open")
	}
	_, err = rs.send(batch("c"))
	wantCode(t, err, codes.PermissionDenied)
	if r.rejects.get("b", RejectIdentityMismatch) != 1 {
		t.Fatal("sender change not counted")
	}
	eventually(t, "b down after its stream ended", func() bool { return !r.Members().Up("b") })
	if r.Store().Len() != 1 || r.Store().Count("c") != 0 || r.Store().Count("intruder") != 0 {
		t.Fatalf("store %v", r.Store().Counts())
	}

	// Read-only calls need a member's certificate too.
	_, err = dialAs(t, r, pki, "intruder").Lookup(context.Background(), &batonv1.LookupRequest{Key: testKey(1).Proto()})
	wantCode(t, err, codes.PermissionDenied)
	if r.rejects.get("unknown", RejectNotMember) != 2 {
		t.Fatal("Lookup by a non-member not counted")
	}
}

func TestPeerServerBatches(t *testing.T) {
	t.Cleanup(leakCheck(t))
	r, src, pki := serverNode(t, false)
	rs := openStream(t, dialAs(t, r, pki, "b"))

	// Too many events: the whole batch is rejected, the stream goes on.
	var many []*batonv1.FlowEvent
	for i := 0; i <= MaxBatchEvents; i++ {
		many = append(many, ev(kOpen, testState("b", testKey(i), 1)))
	}
	ack := rs.mustSend(&batonv1.FlowBatch{Sender: "b", Events: many})
	if ack.Rejected != MaxBatchEvents+1 || ack.Accepted != 0 || ack.FirstReject != RejectTooLarge || r.Store().Len() != 0 {
		t.Fatalf("oversized batch: ack %v, store %d", ack, r.Store().Len())
	}
	if r.rejects.get("b", RejectTooLarge) != MaxBatchEvents+1 {
		t.Fatal("too_large not counted")
	}
	// Mixed batch: only the sender's own valid flows are taken.
	bad := testState("b", testKey(9), 1)
	bad.ServerMss = 1
	ack = rs.mustSend(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{
		ev(kOpen, testState("c", testKey(1), 1)), // owner_mismatch
		ev(kOpen, testState("b", testKey(2), 1)),
		ev(kOpen, bad), // bad_mss
		nil,            // bad_kind
	}})
	if ack.Accepted != 1 || ack.Rejected != 3 || ack.FirstReject != RejectOwnerMismatch {
		t.Fatalf("mixed batch ack %v", ack)
	}
	for reason, n := range map[string]uint64{RejectOwnerMismatch: 1, RejectBadMSS: 1, RejectBadKind: 1} {
		if got := r.rejects.get("b", reason); got != n {
			t.Errorf("%s counted %d, want %d", reason, got, n)
		}
	}
	// Resync: between begin and end the sender's set is collected; at the
	// end everything else from the sender is dropped.
	rs.mustSend(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{
		ev(kOpen, testState("b", testKey(3), 1)), ev(kOpen, testState("b", testKey(4), 1)),
	}})
	if r.Store().Count("b") != 3 {
		t.Fatalf("before resync: %v", r.Store().Counts())
	}
	rs.mustSend(&batonv1.FlowBatch{Sender: "b", ResyncBegin: true, Events: []*batonv1.FlowEvent{ev(kOpen, testState("b", testKey(3), 1))}})
	rs.mustSend(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kOpen, testState("b", testKey(5), 1))}})
	rs.mustSend(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kClose, testState("b", testKey(5), 1))}, ResyncEnd: true})
	if r.Store().Count("b") != 1 {
		t.Fatalf("after resync: %v", r.Store().Counts())
	}
	if _, ok := r.Store().Lookup(testKey(3)); !ok {
		t.Fatal("resynced flow missing")
	}
	// A message over the size limit ends the stream; nothing is stored.
	huge := testState("b", testKey(7), 1)
	huge.Checkpoint = make([]byte, MaxPeerMessageBytes+1)
	_, err := rs.send(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kOpen, huge)}})
	wantCode(t, err, codes.ResourceExhausted)
	if _, ok := r.Store().Lookup(testKey(7)); ok {
		t.Fatal("oversized message stored")
	}

	// Lookup: owned, replica, unknown, invalid.
	c := dialAs(t, r, pki, "c")
	ctx := context.Background()
	src.Open(testKey(100))
	resp, err := c.Lookup(ctx, &batonv1.LookupRequest{Key: testKey(100).Proto()})
	if err != nil || !resp.Found || !resp.Owned || resp.State.Owner != "a" {
		t.Fatalf("owned lookup: %v %v", resp, err)
	}
	resp, err = c.Lookup(ctx, &batonv1.LookupRequest{Key: testKey(3).Proto()})
	if err != nil || !resp.Found || resp.Owned || resp.State.Owner != "b" {
		t.Fatalf("replica lookup: %v %v", resp, err)
	}
	resp, err = c.Lookup(ctx, &batonv1.LookupRequest{Key: testKey(55).Proto()})
	if err != nil || resp.Found {
		t.Fatalf("unknown lookup: %v %v", resp, err)
	}
	_, err = c.Lookup(ctx, &batonv1.LookupRequest{})
	wantCode(t, err, codes.InvalidArgument)
	// ListOwned.
	ls, err := c.ListOwned(ctx, &batonv1.ListOwnedRequest{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for {
		st, err := ls.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if st.Owner != "a" {
			t.Fatalf("ListOwned: %v", st)
		}
		n++
	}
	if n != 1 {
		t.Fatalf("ListOwned returned %d flows, want 1", n)
	}
	// Claim and Release: only on behalf of the caller's own name; without
	// a takeover engine a claim is refused.
	_, err = c.Claim(ctx, &batonv1.ClaimRequest{})
	wantCode(t, err, codes.PermissionDenied)
	_, err = c.Claim(ctx, &batonv1.ClaimRequest{Claimer: "b", Key: testKey(100).Proto()})
	wantCode(t, err, codes.PermissionDenied)
	cr, err := c.Claim(ctx, &batonv1.ClaimRequest{Claimer: "c", Key: testKey(100).Proto()})
	if err != nil || cr.Granted || cr.Reason != claimNoTakeover {
		t.Fatalf("claim without an engine: %v %v", cr, err)
	}
	_, err = c.Release(ctx, &batonv1.ReleaseRequest{NewOwner: "b"})
	wantCode(t, err, codes.PermissionDenied)
}

func TestPeerServerInsecure(t *testing.T) {
	t.Cleanup(leakCheck(t))
	r, _, _ := serverNode(t, true)
	c := dialAs(t, r, "", "")
	ack := openStream(t, c).mustSend(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kOpen, testState("b", testKey(1), 1))}})
	if ack.Accepted != 1 || r.Store().Count("b") != 1 {
		t.Fatalf("insecure: ack %v store %v", ack, r.Store().Counts())
	}
	_, err := openStream(t, c).send(&batonv1.FlowBatch{Sender: "zz"})
	wantCode(t, err, codes.PermissionDenied)
	if r.rejects.get("unknown", RejectNotMember) != 1 {
		t.Fatal("not_member not counted in insecure mode")
	}
}

// TestPeerServerAckCoalescing: a batch after a quiet period is
// acknowledged at once; batches that follow within ackDelay of that ack
// are acknowledged by one cumulative ack (the seq of the newest, the
// totals of all) at the end of the interval, or at once for a batch with
// ack_now, with a rejection (the rejections being those of that batch),
// or when ackEvery batches are pending, or when the sender closes.
func TestPeerServerAckCoalescing(t *testing.T) {
	t.Cleanup(leakCheck(t))
	r, _, pki := serverNode(t, false)
	rs := openStream(t, dialAs(t, r, pki, "b"))
	sendOnly := func(b *batonv1.FlowBatch) {
		t.Helper()
		rs.seq++
		b.Seq = rs.seq
		if err := rs.s.Send(b); err != nil {
			t.Fatal(err)
		}
	}
	// Held acks go after at most ackDelay (the default): read acks, each
	// for a later batch, until the last batch's, and add them up.
	rs.mustSend(&batonv1.FlowBatch{Sender: "b", ResyncBegin: true, AckNow: true})
	for i := range 4 {
		sendOnly(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{
			ev(kOpen, testState("b", testKey(10+i), 1)), ev(kOpen, testState("b", testKey(20+i), 1)),
		}})
	}
	var accepted uint32
	for prev := uint64(1); prev != rs.seq; {
		ack, err := rs.s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if ack.Seq <= prev || ack.Seq > rs.seq || ack.Rejected != 0 {
			t.Fatalf("ack %v after the ack of batch %d (last sent %d)", ack, prev, rs.seq)
		}
		prev, accepted = ack.Seq, accepted+ack.Accepted
	}
	if accepted != 8 {
		t.Fatalf("acks add up to %d accepted events, want 8", accepted)
	}

	// A stream whose acks would wait an hour (a stream takes ackDelay
	// when it opens).
	old := ackDelay
	ackDelay = time.Hour
	t.Cleanup(func() { ackDelay = old })
	rs = openStream(t, dialAs(t, r, pki, "b"))
	// The first batch: at once.
	if ack := rs.mustSend(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kOpen, testState("b", testKey(29), 1))}}); ack.Accepted != 1 {
		t.Fatalf("first ack %v", ack)
	}
	// Three held, then ack_now: one ack for the four.
	for i := range 3 {
		sendOnly(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kOpen, testState("b", testKey(30+i), 1))}})
	}
	if ack := rs.mustSend(&batonv1.FlowBatch{Sender: "b", AckNow: true}); ack.Accepted != 3 || ack.Rejected != 0 {
		t.Fatalf("ack_now ack %v", ack)
	}
	// A rejection: at once, with the first reason.
	sendOnly(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kOpen, testState("b", testKey(33), 1))}})
	ack := rs.mustSend(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{
		ev(kOpen, testState("c", testKey(34), 1)), // owner_mismatch
		ev(kOpen, testState("b", testKey(35), 1)),
	}})
	if ack.Accepted != 2 || ack.Rejected != 1 || ack.FirstReject != RejectOwnerMismatch {
		t.Fatalf("rejection ack %v", ack)
	}
	// ackEvery batches: at once.
	for range ackEvery - 1 {
		sendOnly(&batonv1.FlowBatch{Sender: "b"})
	}
	if ack := rs.mustSend(&batonv1.FlowBatch{Sender: "b"}); ack.Accepted != 0 {
		t.Fatalf("ackEvery ack %v", ack)
	}
	// The sender closing its side: what is pending is acknowledged.
	sendOnly(&batonv1.FlowBatch{Sender: "b", Events: []*batonv1.FlowEvent{ev(kOpen, testState("b", testKey(36), 1))}})
	if err := rs.s.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if ack, err := rs.s.Recv(); err != nil || ack.Seq != rs.seq || ack.Accepted != 1 {
		t.Fatalf("ack after CloseSend: %v %v", ack, err)
	}
	if _, err := rs.s.Recv(); err != io.EOF {
		t.Fatalf("after the last ack: %v, want EOF", err)
	}
}
