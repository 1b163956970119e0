package handoff

// Sync replication mode, in process: an echo flow whose owner crashes
// right after echoing continues exactly on another node with sync mode,
// and does not without it.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
)

// tkEnableSync turns sync mode on for a lab node's service.
func tkEnableSync(r *Replication, e *Engine, st *stack.Stack, tap *tkTap) *Sync {
	return r.EnableSync(SyncConfig{
		Sync:     func(port uint16) bool { return port == tkStreamPort },
		Service:  e.cfg.Service,
		Injector: st.Endpoint(),
		MTU:      int(st.Endpoint().MTU()),
		// A killed node emits nothing, held packets included.
		Fenced: func(k FlowKey) bool { return tap.dead.Load() || e.FlowFenced(k) },
		Logger: testLogger(),
	})
}

func echoService() services.TCPService { return services.NewEcho() }

// echoRound writes msg and reads its echo back.
func echoRound(c net.Conn, msg []byte) error {
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if !bytes.Equal(got, msg) {
		return errEchoMismatch
	}
	return nil
}

func echoMsg(i, size int) []byte {
	b := make([]byte, size)
	for j := range b {
		b[j] = byte('a' + (i*7+j)%26)
	}
	return b
}

// echoCrash runs a few echo rounds through n1, kills n1 the moment the
// last echo has arrived, routes the client to n2 and runs one more round.
// The replicator's coalesce window is widened so that, without sync mode,
// the replicas are certainly behind what the client saw.
func echoCrash(t *testing.T, syncMode bool) (*tkLab, error) {
	l := newTkLab(t, tkConfig{nodes: 3, service: echoService, syncMode: syncMode, coalesce: 30 * time.Millisecond})
	ctx := testCtx(t)
	c, err := l.client.DialTCP(ctx, tkDst4)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	la := c.LocalAddr().(*net.TCPAddr).AddrPort()
	k := FlowKey{Client: netip.AddrPortFrom(la.Addr().Unmap(), la.Port()), Anycast: tkDst4}
	for i := range 4 {
		if err := echoRound(c, echoMsg(i, 3000)); err != nil {
			t.Fatalf("round %d before the crash: %v", i, err)
		}
		if i == 0 {
			// Both replicas hold the flow: what follows is about
			// how far behind the client their state may be.
			for _, n := range l.nodes[1:] {
				eventually(t, n.name+" to hold the flow", func() bool {
					_, ok := n.r.Store().Lookup(k)
					return ok
				})
			}
		}
	}
	l.kill(0) // right after echoing
	l.route.Store(1)
	_ = c.SetDeadline(time.Now().Add(6 * time.Second))
	before := map[string]string{}
	for _, n := range l.nodes[1:] {
		if st, ok := n.r.Store().Lookup(k); ok {
			before[n.name] = fmt.Sprintf("sent %d client_acked %d server_acked %d unacked_output %d",
				st.ServerSentBytes, st.ClientAckedBytes, st.ServerAckedBytes, len(st.UnackedOutput))
		}
	}
	err = echoRound(c, echoMsg(9, 3000))
	l.logStats()
	if err != nil {
		t.Logf("replica states at the crash: %v", before)
	}
	return l, err
}

func TestSyncEchoCrashLossless(t *testing.T) {
	l, err := echoCrash(t, true)
	if err != nil {
		t.Fatalf("echo after the crash: %v", err)
	}
	if n := l.resets(); n != 0 {
		t.Fatalf("client got %d resets", n)
	}
	s := l.nodes[0].sy.Stats()
	t.Logf("n1 sync: held %d, hold mean %v, degraded %v, dropped %v", s.Held, mean(s), s.Degraded, s.Dropped)
	if s.Held == 0 {
		t.Fatal("n1 held no packet: sync mode did nothing")
	}
	for r, n := range s.Degraded {
		if n != 0 {
			t.Fatalf("n1 released %d packets degraded (%s)", n, r)
		}
	}
}

// Without sync mode the same crash cannot continue exactly: the replicas'
// state is behind what the client saw acknowledged (it does not send that
// input again), so the flow must be reset (takeover_ahead.go: client_ahead,
// or cannot_resume when the replicas hold the owed state), never hang
// and never deliver wrong bytes.
func TestSyncEchoCrashAsyncFails(t *testing.T) {
	l, err := echoCrash(t, false)
	if err == nil {
		t.Fatal("echo continued exactly without sync mode: the scenario does not test sync mode")
	}
	if errors.Is(err, errEchoMismatch) {
		t.Fatalf("wrong bytes: %v", err)
	}
	if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the client hung instead of being reset: %v", err)
	}
	if n := l.resets(); n == 0 {
		t.Fatalf("the client got no reset (%v)", err)
	}
	ahead := l.sum(func(s TakeoverStats) uint64 { return s.Failures[reasonClientAhead] })
	cannot := l.sum(func(s TakeoverStats) uint64 { return s.Failures[reasonCannotResume] })
	rsts := l.sum(func(s TakeoverStats) uint64 { return s.RSTs[reasonClientAhead] + s.RSTs[reasonCannotResume] })
	if ahead+cannot == 0 || rsts == 0 {
		t.Fatalf("no failure or reset counted as client_ahead or cannot_resume (failures %d+%d, resets %d)", ahead, cannot, rsts)
	}
	t.Logf("without sync mode: %v (client resets: %d, client_ahead %d, cannot_resume %d)", err, l.resets(), ahead, cannot)
}

var errEchoMismatch = errors.New("echo differs from what was sent")

func mean(s SyncStats) time.Duration {
	if s.HoldCount == 0 {
		return 0
	}
	return s.HoldSum / time.Duration(s.HoldCount)
}
