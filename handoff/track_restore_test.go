package handoff

// The tracker's unwrapped positions, ownership history, Restore and Remove.

import (
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// Positions advance by sequence deltas across the 32-bit wrap, never go
// backwards, and do not count SYN or FIN.
func TestTrackerUnwrappedPositions(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	// Both ISNs just below the wrap.
	c := trkConn4(t, tr, 40000, 0xffffff00, 0xfffff000)
	c.handshake(trkOpts{mss: 1460, ts: true, tsval: 1}, trkOpts{mss: 1460, ts: true, tsval: 2})
	if s := c.state(); s.ServerSentBytes != 0 || s.ClientAckedBytes != 0 || s.ServerAckedBytes != 0 {
		t.Fatalf("after the handshake: %d/%d/%d", s.ServerSentBytes, s.ClientAckedBytes, s.ServerAckedBytes)
	}
	c.clientData(300) // crosses the client's wrap
	c.serverAck()
	const chunk = 60000
	var sent uint64
	for range 100 { // 6 MB: crosses the server's wrap
		c.serverData(chunk)
		sent += chunk
	}
	c.ack()
	s := c.state()
	if s.ServerSentBytes != sent || s.ClientAckedBytes != sent || s.ServerAckedBytes != 300 {
		t.Fatalf("sent %d acked %d server acked %d, want %d %d 300", s.ServerSentBytes, s.ClientAckedBytes, s.ServerAckedBytes, sent, sent)
	}
	// A retransmission and an old ack move nothing.
	c.out(trkSeg{seq: c.sNext - chunk, ack: c.cNext, flags: header.TCPFlagAck, payload: make([]byte, 100), opts: c.tsOpts(c.sTS, c.cTS)})
	c.in(trkSeg{seq: c.cNext, ack: c.sNext - 1000, flags: header.TCPFlagAck, opts: c.tsOpts(c.cTS, c.sTS)})
	if s2 := c.state(); s2.ServerSentBytes != sent || s2.ClientAckedBytes != sent {
		t.Fatalf("moved backwards or by a retransmission: %d %d", s2.ServerSentBytes, s2.ClientAckedBytes)
	}
	// FINs are not bytes.
	c.clientFin()
	c.serverAck()
	c.serverFin()
	s = c.state()
	if s.ServerAckedBytes != 300 {
		t.Fatalf("server acked %d after the client's FIN, want 300", s.ServerAckedBytes)
	}
	c.in(trkSeg{seq: c.cNext, ack: c.sNext, flags: header.TCPFlagAck, opts: c.tsOpts(c.cTS, c.sTS)})
	if _, ok := tr.Lookup(c.key()); ok {
		t.Fatal("flow still tracked after both FINs were acked")
	}
	if s.History == nil || s.History[0].How != HowOpen || s.History[0].Node != "n1" || s.History[0].Epoch != 1 {
		t.Fatalf("history %v", s.History)
	}
}

// The checkpoint offset is the service's output offset given to
// SetCheckpoint.
func TestTrackerCheckpointOffset(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := trkConn4(t, tr, 40001, 100, 200)
	c.handshake(trkOpts{mss: 1460}, trkOpts{mss: 1460})
	tr.SetCheckpoint(c.key(), 12345, []byte("cp"))
	if s := c.state(); s.CheckpointOffset != 12345 || s.CheckpointSeq != 200+1+12345 {
		t.Fatalf("checkpoint at %d (seq %d)", s.CheckpointOffset, s.CheckpointSeq)
	}
}

// Restore registers a flow with the given positions; it is reported as an
// open with a history entry, tracked in the client's space from then on,
// and Remove takes it out as moved.
func TestTrackerRestore(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := trkConn4(t, tr, 40002, 0xfffffff0, 0x7ffffff0)
	c.handshake(trkOpts{mss: 1400, hasWS: true, ws: 7, sackPerm: true, ts: true, tsval: 10}, trkOpts{mss: 1460, hasWS: true, ws: 6, sackPerm: true, ts: true, tsval: 20})
	c.clientData(50)
	c.serverAck()
	for range 10 {
		c.serverData(1000)
	}
	c.ack()
	tr.SetCheckpoint(c.key(), 0, []byte("req"))
	orig := c.state()
	trkTake(t, tr)

	// Another node's tracker restores it.
	tr2, _ := newTrkTracker(TrackerConfig{Node: "n2"})
	st := withEpoch(orig, orig.Epoch+1)
	if err := tr2.Restore(st, HowPullMigrate, 8000); err != nil {
		t.Fatal(err)
	}
	got, ok := tr2.Lookup(c.key())
	if !ok {
		t.Fatal("restored flow not owned")
	}
	if got.Owner != "n2" || got.Epoch != 2 || got.ClientIsn != orig.ClientIsn || got.ServerIsn != orig.ServerIsn ||
		got.ClientWindowScale != 7 || got.ServerWindowScale != 6 || !got.Sack || !got.Timestamps ||
		got.ClientSyn.GetMss() != 1400 || got.ServerSentBytes != 10000 || got.ClientAckedBytes != 10000 ||
		got.ServerAckedBytes != 50 || string(got.Checkpoint) != "req" {
		t.Fatalf("restored state %v", got)
	}
	if n := len(got.History); n != 2 || got.History[1].How != HowPullMigrate || got.History[1].Node != "n2" || got.History[1].AtOffset != 8000 || got.History[1].Epoch != 2 {
		t.Fatalf("history %v", got.History)
	}
	ch := trkTake(t, tr2)
	if ev := ch[c.key().String()]; ev.Kind != batonv1.FlowEvent_KIND_OPEN {
		t.Fatalf("restored flow reported as %v", ev.Kind)
	}
	// It keeps tracking in the client's space.
	c.tr = tr2
	c.serverData(500)
	c.ack()
	if s := c.state(); s.ServerSentBytes != 10500 || s.ClientAckedBytes != 10500 {
		t.Fatalf("after more data: %d/%d", s.ServerSentBytes, s.ClientAckedBytes)
	}
	if e, ok := tr2.Epoch(c.key()); !ok || e != 2 {
		t.Fatalf("epoch %d %v", e, ok)
	}
	if !tr2.Remove(c.key()) || tr2.Has(c.key()) || tr2.Stats().Closed.Moved != 1 || tr2.Stats().Restored != 1 {
		t.Fatalf("remove: %+v", tr2.Stats())
	}
	if ev := trkTake(t, tr2)[c.key().String()]; ev.Kind != batonv1.FlowEvent_KIND_CLOSE {
		t.Fatalf("removed flow reported as %v", ev.Kind)
	}
	trkCheckInvariants(t, tr2)
}

// The history keeps the newest trkMaxHistory entries.
func TestTrackerHistoryBound(t *testing.T) {
	tr, _ := newTrkTracker(TrackerConfig{})
	c := trkConn4(t, tr, 40003, 1, 2)
	c.handshake(trkOpts{mss: 1460}, trkOpts{mss: 1460})
	for i := range 40 {
		tr.AddHistory(c.key(), "peer"+string(rune('a'+i%26)), HowForward)
	}
	h := c.state().History
	if len(h) != trkMaxHistory || h[len(h)-1].Node != "peern" {
		t.Fatalf("history of %d, last %v", len(h), h[len(h)-1])
	}
	tr.AddHistory(c.key(), "peern", HowForward)
	if len(c.state().History) != trkMaxHistory || c.state().History[trkMaxHistory-2].Node != "peerm" {
		t.Fatal("a repeated entry was added again")
	}
}
