package handoff

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

func ev(kind batonv1.FlowEvent_Kind, st *batonv1.FlowState) *batonv1.FlowEvent {
	return &batonv1.FlowEvent{Kind: kind, State: st}
}

const (
	kOpen   = batonv1.FlowEvent_KIND_OPEN
	kUpdate = batonv1.FlowEvent_KIND_UPDATE
	kClose  = batonv1.FlowEvent_KIND_CLOSE
)

// Every reject reason of flow.go and of the store, through Apply.
func TestReplicaStoreRejectReasons(t *testing.T) {
	good := func() *batonv1.FlowState { return testState("n1", testKey(1), 5) }
	with := func(f func(*batonv1.FlowState)) *batonv1.FlowState { s := good(); f(s); return s }
	cases := []struct {
		name   string
		event  *batonv1.FlowEvent
		reason string
	}{
		{"nil event", nil, RejectBadKind},
		{"nil state", ev(kOpen, nil), RejectNoKey},
		{"nil key", ev(kOpen, with(func(s *batonv1.FlowState) { s.Key = nil })), RejectNoKey},
		{"address length", ev(kOpen, with(func(s *batonv1.FlowState) { s.Key.ClientAddr = []byte{1, 2, 3} })), RejectBadAddress},
		{"unspecified address", ev(kOpen, with(func(s *batonv1.FlowState) { s.Key.ClientAddr = []byte{0, 0, 0, 0} })), RejectBadAddress},
		{"mixed family", ev(kOpen, with(func(s *batonv1.FlowState) { s.Key.ClientAddr = make([]byte, 16); s.Key.ClientAddr[15] = 1 })), RejectMixedFamily},
		{"port 0", ev(kOpen, with(func(s *batonv1.FlowState) { s.Key.ClientPort = 0 })), RejectBadPort},
		{"port too big", ev(kOpen, with(func(s *batonv1.FlowState) { s.Key.AnycastPort = 70000 })), RejectBadPort},
		{"not anycast", ev(kOpen, with(func(s *batonv1.FlowState) { s.Key.AnycastAddr = []byte{203, 0, 113, 1} })), RejectNotAnycast},
		{"window scale", ev(kOpen, with(func(s *batonv1.FlowState) { s.ServerWindowScale = 15 })), RejectBadWindowScale},
		{"syn window scale", ev(kOpen, with(func(s *batonv1.FlowState) { s.ClientSyn.WindowScale = -2 })), RejectBadWindowScale},
		{"mss", ev(kOpen, with(func(s *batonv1.FlowState) { s.ServerMss = 10 })), RejectBadMSS},
		{"syn mss", ev(kOpen, with(func(s *batonv1.FlowState) { s.ClientSyn.Mss = 70000 })), RejectBadMSS},
		{"no owner", ev(kOpen, with(func(s *batonv1.FlowState) { s.Owner = "" })), RejectNoOwner},
		{"owner mismatch", ev(kOpen, with(func(s *batonv1.FlowState) { s.Owner = "n3" })), RejectOwnerMismatch},
		{"owner too long", ev(kOpen, with(func(s *batonv1.FlowState) { s.Owner = strings.Repeat("n", 65) })), RejectTooLarge},
		{"checkpoint too large", ev(kOpen, with(func(s *batonv1.FlowState) { s.Checkpoint = make([]byte, MaxCheckpointBytes+1) })), RejectTooLarge},
		{"phase unspecified", ev(kOpen, with(func(s *batonv1.FlowState) { s.Phase = 0 })), RejectBadPhase},
		{"phase unknown", ev(kUpdate, with(func(s *batonv1.FlowState) { s.Phase = 9 })), RejectBadPhase},
		{"kind unspecified", ev(0, good()), RejectBadKind},
		{"kind unknown", ev(17, good()), RejectBadKind},
		{"service name", ev(kOpen, with(func(s *batonv1.FlowState) { s.Service = strings.Repeat("s", 33) })), RejectBadService},
		{"close without key", ev(kClose, &batonv1.FlowState{Owner: "n1"}), RejectNoKey},
		{"close of another owner", ev(kClose, &batonv1.FlowState{Key: testKey(1).Proto(), Owner: "n3", Epoch: 9}), RejectOwnerMismatch},
	}
	for _, c := range cases {
		s := NewReplicaStore(10, testPrefixes)
		_, err := s.Apply("n1", c.event)
		if got := RejectReason(err); err == nil || got != c.reason {
			t.Errorf("%s: err %v (reason %q), want reason %q", c.name, err, got, c.reason)
		}
		if s.Len() != 0 {
			t.Errorf("%s: rejected event stored", c.name)
		}
	}
}

func TestReplicaStoreEpochFencing(t *testing.T) {
	s := NewReplicaStore(10, testPrefixes)
	k := testKey(1)
	mustApply := func(sender string, e *batonv1.FlowEvent) ApplyResult {
		t.Helper()
		r, err := s.Apply(sender, e)
		if err != nil {
			t.Fatalf("apply from %s: %v", sender, err)
		}
		return r
	}
	mustReject := func(sender string, e *batonv1.FlowEvent, reason string) {
		t.Helper()
		if _, err := s.Apply(sender, e); RejectReason(err) != reason {
			t.Fatalf("apply from %s: %v, want %s", sender, err, reason)
		}
	}
	if r := mustApply("n1", ev(kOpen, testState("n1", k, 5))); !r.Held || r.Key != k {
		t.Fatalf("open: %+v", r)
	}
	upd := testState("n1", k, 5)
	upd.ServerNextSeq = 9999
	mustApply("n1", ev(kUpdate, upd))
	if got, _ := s.Lookup(k); got.ServerNextSeq != 9999 {
		t.Fatalf("update not applied: %v", got)
	}
	// Lookup returns a copy.
	got, _ := s.Lookup(k)
	got.ServerNextSeq = 1
	if again, _ := s.Lookup(k); again.ServerNextSeq != 9999 {
		t.Fatal("Lookup returned the stored state")
	}
	mustReject("n1", ev(kUpdate, testState("n1", k, 4)), RejectStaleEpoch)
	mustReject("n2", ev(kOpen, testState("n2", k, 5)), RejectStaleEpoch)  // same epoch, other owner
	mustReject("n2", ev(kClose, testState("n2", k, 4)), RejectStaleEpoch) // lower epoch close
	mustReject("n1", ev(kClose, &batonv1.FlowState{Key: k.Proto(), Owner: "n1", Epoch: 3}), RejectStaleEpoch)
	// Higher epoch from another owner moves the flow.
	mustApply("n2", ev(kUpdate, testState("n2", k, 6)))
	if s.Count("n1") != 0 || s.Count("n2") != 1 || s.Len() != 1 {
		t.Fatalf("counts after move: %v", s.Counts())
	}
	// The old owner can no longer touch it.
	mustReject("n1", ev(kClose, &batonv1.FlowState{Key: k.Proto(), Owner: "n1", Epoch: 5}), RejectStaleEpoch)
	// A bare close (key, owner, epoch) from the owner removes it.
	if r := mustApply("n2", ev(kClose, &batonv1.FlowState{Key: k.Proto(), Owner: "n2", Epoch: 6})); r.Held {
		t.Fatal("close reported held")
	}
	if s.Len() != 0 || len(s.Counts()) != 0 {
		t.Fatalf("after close: %d, %v", s.Len(), s.Counts())
	}
	// Closing an unknown flow is accepted (idempotent).
	mustApply("n2", ev(kClose, testState("n2", k, 6)))
}

func TestReplicaStoreTableFull(t *testing.T) {
	s := NewReplicaStore(3, testPrefixes)
	for i := 0; i < 3; i++ {
		if _, err := s.Apply("n1", ev(kOpen, testState("n1", testKey(i), 1))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Apply("n1", ev(kOpen, testState("n1", testKey(3), 1))); RejectReason(err) != RejectTableFull {
		t.Fatalf("4th flow: %v, want table_full", err)
	}
	// Updates of held flows still pass, and a close makes room.
	if _, err := s.Apply("n1", ev(kUpdate, testState("n1", testKey(0), 1))); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Apply("n1", ev(kClose, testState("n1", testKey(0), 1))); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Apply("n1", ev(kOpen, testState("n1", testKey(3), 1))); err != nil {
		t.Fatalf("after a close: %v", err)
	}
}

func TestReplicaStoreReplaceAndRange(t *testing.T) {
	s := NewReplicaStore(100, testPrefixes)
	for i := 0; i < 10; i++ {
		s.Apply("n1", ev(kOpen, testState("n1", testKey(i), 1)))
		s.Apply("n2", ev(kOpen, testState("n2", testKey(100+i), 1)))
	}
	keep := map[FlowKey]struct{}{testKey(1): {}, testKey(2): {}, testKey(100): {}}
	if n := s.Replace("n1", keep); n != 8 {
		t.Fatalf("Replace dropped %d, want 8", n)
	}
	if s.Count("n1") != 2 || s.Count("n2") != 10 {
		t.Fatalf("counts %v", s.Counts())
	}
	n := 0
	s.Range(func(*batonv1.FlowState) bool { n++; return n < 5 })
	if n != 5 {
		t.Fatalf("Range did not stop: %d", n)
	}
	if s.Replace("n3", nil) != 0 {
		t.Fatal("Replace of an unknown owner dropped flows")
	}
}

// Garbage from a peer never crashes the receiving side.
func FuzzPeerBatch(f *testing.F) {
	seed := &batonv1.FlowBatch{Sender: "n1", Seq: 1, ResyncBegin: true, Events: []*batonv1.FlowEvent{
		ev(kOpen, testState("n1", testKey(1), 1)), ev(kClose, &batonv1.FlowState{Key: testKey(2).Proto(), Owner: "n1"}),
	}}
	b, _ := proto.Marshal(seed)
	f.Add(b)
	f.Add([]byte{})
	r, err := NewReplication(ReplicationConfig{Self: "n2", Peers: []Peer{{"n1", "127.0.0.1:1"}}, Listen: "127.0.0.1:0",
		Prefixes: testPrefixes, Insecure: true, MaxReplicaFlows: 64, Logger: testLogger()}, newFakeSource("n2"))
	if err != nil {
		f.Fatal(err)
	}
	srv := &peerServer{r: r}
	f.Fuzz(func(t *testing.T, data []byte) {
		var batch batonv1.FlowBatch
		if proto.Unmarshal(data, &batch) != nil {
			return
		}
		inResync, keep := false, map[FlowKey]struct{}(nil)
		ack := srv.apply("n1", &batch, &inResync, &keep)
		if ack.Accepted+ack.Rejected != uint32(len(batch.Events)) {
			t.Fatalf("ack %v for %d events", ack, len(batch.Events))
		}
		r.store.Range(func(st *batonv1.FlowState) bool {
			if _, err := ValidateState(st, testPrefixes); err != nil || st.Owner != "n1" {
				t.Fatalf("invalid state stored: %v %v", st, err)
			}
			return true
		})
	})
}
