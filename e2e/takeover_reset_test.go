package e2e

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// TestTakeoverCannotResume (scenario f): the owner of two echo sessions is
// killed with SIGKILL. One session is caught up (everything the client
// sent came back): its replicated state covers it, and it continues on a
// replica. The other's client sends without reading, so the owner has
// acknowledged input whose echo the client has not received (it sits in
// the dead node's buffers): with asynchronous replication no copy of those
// bytes exists, so echo cannot continue the exact stream. The client gets
// a reset (the honest failure), after receiving only correct bytes, and the
// survivors count the failure as cannot_resume.
func TestTakeoverCannotResume(t *testing.T) {
	t.Parallel()
	const (
		target = 0
		chunk  = 64 << 10
	)
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btkf", 2, nil)
	l := c.Lab

	ports := portsTo(t, l, echoPort, target, 2, 25000)
	idle, stuck := dialEcho(t, ctx, l, ports[0]), dialEcho(t, ctx, l, ports[1])
	if err := idle.round(chunk); err != nil {
		t.Fatal(err)
	}
	if err := stuck.round(chunk); err != nil {
		t.Fatal(err)
	}

	// stuck's client writes without reading until its connection fails:
	// its receive buffer fills, echo blocks writing, the owner's receive
	// window closes and the client's writes block.
	wrote := make(chan error, 1)
	go func() {
		for range 4096 { // 256 MiB, far beyond every buffer on the way
			if err := stuck.send(chunk); err != nil {
				wrote <- err
				return
			}
		}
		wrote <- errors.New("wrote 256 MiB without blocking")
	}()

	// Wait until the replicas hold the stalled state: the owner
	// acknowledged more input than the client acknowledged output.
	key := handoff.FlowKey{Client: netip.AddrPortFrom(l.ClientAddr4, uint16(stuck.port)), Anycast: netip.AddrPortFrom(l.Anycast4, echoPort)}
	idleKey := handoff.FlowKey{Client: netip.AddrPortFrom(l.ClientAddr4, uint16(idle.port)), Anycast: netip.AddrPortFrom(l.Anycast4, echoPort)}
	var owed uint64
	err := waitFor(ctx, time.Minute, func() error {
		// The caught-up session is caught up in every copy too: the
		// client's ack of its last echo may come a delayed-ack later
		// than its read (CI once killed the owner before it was
		// replicated, and the session was reset, honestly).
		for _, i := range []int{target, 1, 2} {
			resp, err := c.admins[i].GetFlow(ctx, &batonv1.GetFlowRequest{Key: idleKey.Proto(), LocalOnly: true})
			if err != nil {
				return err
			}
			if s := resp.Flow.GetState(); s.GetServerAckedBytes() != s.GetClientAckedBytes() {
				return fmt.Errorf("n%d: idle session owes %d bytes", i+1, s.GetServerAckedBytes()-s.GetClientAckedBytes())
			}
		}
		var prev *batonv1.FlowState
		for _, i := range []int{target, 1, 2} {
			resp, err := c.admins[i].GetFlow(ctx, &batonv1.GetFlowRequest{Key: key.Proto(), LocalOnly: true})
			if err != nil {
				return err
			}
			s := resp.Flow.GetState()
			if s.GetServerAckedBytes() <= s.GetClientAckedBytes() {
				return fmt.Errorf("n%d: input %d, output %d acked: nothing owed", i+1, s.GetServerAckedBytes(), s.GetClientAckedBytes())
			}
			if prev != nil && (s.ServerAckedBytes != prev.ServerAckedBytes || s.ClientAckedBytes != prev.ClientAckedBytes) {
				return fmt.Errorf("n%d's copy differs from the owner's", i+1)
			}
			prev = s
		}
		owed = prev.ServerAckedBytes - prev.ClientAckedBytes
		return nil
	})
	if err != nil {
		t.Fatalf("the stalled state did not settle: %v", err)
	}
	t.Logf("echo owes the client %d bytes held only by the owner", owed)

	resets := clientResets(t, l)
	if err := c.procs[target].Kill(); err != nil {
		t.Fatal(err)
	}
	if err := l.SetNexthops([]int{1, 2}); err != nil {
		t.Fatal(err)
	}

	// The caught-up session continues.
	for range 8 {
		if err := idle.round(chunk); err != nil {
			t.Fatalf("caught-up echo session after the crash: %v", err)
		}
	}
	// The stalled one: what arrives is exact, then the connection is
	// reset before the owed bytes could be delivered.
	_ = stuck.SetReadDeadline(time.Now().Add(time.Minute))
	buf := make([]byte, chunk)
	var rerr error
	for rerr == nil {
		rerr = stuck.readSome(buf)
	}
	var werr error
	select {
	case werr = <-wrote:
	case <-time.After(time.Minute):
		t.Fatal("the stalled session's writer did not fail")
	}
	// The reset's error goes to whichever of the reader and the writer
	// asks first; the other sees the end of the stream (EOF, EPIPE).
	if !errors.Is(rerr, syscall.ECONNRESET) && !errors.Is(rerr, io.EOF) {
		t.Fatalf("stalled echo session: %v after %d of %d bytes, want a reset", rerr, stuck.recv, stuck.sent)
	}
	if !errors.Is(rerr, syscall.ECONNRESET) && !errors.Is(werr, syscall.ECONNRESET) {
		t.Fatalf("stalled echo session not reset: reader %v, writer %v", rerr, werr)
	}
	t.Logf("stalled echo session reset after %d exact bytes of %d sent (reader: %v; writer: %v)", stuck.recv, stuck.sent, rerr, werr)
	if n := clientResets(t, l) - resets; n != 1 {
		t.Errorf("%d client connections reset, want 1", n)
	}
	c.logMetrics()
	if n := c.total("failures_total", `reason="cannot_resume"`); n < 1 {
		t.Error("no takeover failure counted as cannot_resume")
	}
	if n := c.total("rst_sent_total", `reason="cannot_resume"`); n < 1 {
		t.Error("no reset counted as cannot_resume")
	}
	if err := idle.round(chunk); err != nil {
		t.Fatalf("caught-up echo session at the end: %v", err)
	}
}
