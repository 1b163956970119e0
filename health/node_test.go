package health

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var quiet = slog.New(slog.DiscardHandler)

// fakeAnnouncer records what it was asked to announce.
type fakeAnnouncer struct {
	mu      sync.Mutex
	calls   [][]netip.Prefix
	current []netip.Prefix
	fail    error
}

func (f *fakeAnnouncer) Name() string                { return "fake" }
func (f *fakeAnnouncer) Start(context.Context) error { return nil }
func (f *fakeAnnouncer) Advertise(_ context.Context, ps []netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, slices.Clone(ps))
	if f.fail != nil {
		return f.fail
	}
	f.current = slices.Clone(ps)
	return nil
}
func (f *fakeAnnouncer) Status(context.Context) AnnouncerStatus { return AnnouncerStatus{} }
func (f *fakeAnnouncer) Close(ctx context.Context) error        { return f.Advertise(ctx, nil) }

func (f *fakeAnnouncer) state() (announced bool, calls int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.current) > 0, len(f.calls)
}

type fakeVerdict struct {
	mu      sync.Mutex
	healthy bool
}

func (v *fakeVerdict) set(h bool) { v.mu.Lock(); v.healthy = h; v.mu.Unlock() }
func (v *fakeVerdict) Verdict() (bool, []string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.healthy {
		return true, nil
	}
	return false, []string{"check http down: refused"}
}

type fakeFlows struct{ n atomic.Int64 }

func (f *fakeFlows) Len() int { return int(f.n.Load()) }

func TestMachine(t *testing.T) {
	ctx := context.Background()
	prefixes := []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("2001:db8:a::1/128")}
	ann := &fakeAnnouncer{}
	v := &fakeVerdict{}
	flows := &fakeFlows{}
	clk := newFakeClock()
	var changes []NodeState
	m := NewMachine(MachineConfig{Prefixes: prefixes, Checks: v, Flows: flows, Announcer: ann, Logger: quiet,
		Clock: clk, DrainSettle: time.Second,
		OnChange: func(s NodeState, _ []string) { changes = append(changes, s) }})

	// expect evaluates and checks the state and the announcement.
	expect := func(step string, want NodeState, announced bool) {
		t.Helper()
		if got := m.Evaluate(ctx); got != want {
			t.Fatalf("%s: state %v, want %v", step, got, want)
		}
		if a, _ := ann.state(); a != announced || m.Announced() != announced {
			t.Fatalf("%s: announced %v (machine says %v), want %v", step, a, m.Announced(), announced)
		}
	}
	expect("checks failing at start", NodeStarting, false)
	if _, calls := ann.state(); calls != 0 {
		t.Fatalf("a starting node called the announcer %d times", calls)
	}
	if st, reasons, _ := m.State(); st != NodeStarting || len(reasons) != 2 {
		t.Fatalf("starting reasons %v", reasons)
	}
	v.set(true)
	expect("checks pass", NodeServing, true)
	if ann.calls[0] == nil || !slices.Equal(ann.calls[0], prefixes) {
		t.Fatalf("announced %v, want %v", ann.calls[0], prefixes)
	}
	expect("still healthy", NodeServing, true)
	if _, calls := ann.state(); calls != 1 {
		t.Fatalf("announcer called %d times for one change", calls)
	}
	v.set(false)
	expect("a check fails", NodeUnhealthy, false)
	v.set(true)
	expect("it passes again", NodeServing, true)

	// Drain with flows: draining until they are gone, then drained, and
	// drained stays (new flows while drained do not undo it).
	flows.n.Store(2)
	if st, err := m.Drain(ctx, "draining (batonctl drain)"); err != nil || st != NodeDraining {
		t.Fatalf("drain: %v %v", st, err)
	}
	if a, _ := ann.state(); a {
		t.Fatal("still announced after Drain returned")
	}
	expect("draining with flows", NodeDraining, false)
	v.set(false)
	flows.n.Store(0)
	expect("flows gone, not settled", NodeDraining, false)
	clk.Advance(time.Second)
	expect("flows gone, settled", NodeDrained, false)
	flows.n.Store(1)
	expect("a flow while drained", NodeDrained, false)
	if st, err := m.Undrain(ctx); err != nil || st != NodeUnhealthy {
		t.Fatalf("undrain while a check fails: %v %v", st, err)
	}
	v.set(true)
	expect("undrained and healthy", NodeServing, true)
	if _, err := m.Undrain(ctx); err != nil {
		t.Fatalf("undrain a serving node: %v", err)
	}

	// A failing announcer is retried at every evaluation and reported.
	v.set(false)
	expect("unhealthy", NodeUnhealthy, false)
	ann.fail = errors.New("session down")
	v.set(true)
	expect("announce fails", NodeServing, false)
	if _, reasons, _ := m.State(); len(reasons) != 1 {
		t.Fatalf("reasons %v, want the announcer error", reasons)
	}
	_, before := ann.state()
	ann.fail = nil
	expect("announce retried", NodeServing, true)
	if _, after := ann.state(); after != before+1 {
		t.Fatalf("announcer called %d times to retry", after-before)
	}

	// Shutdown: withdrawn, undrain refused; then stopping.
	if st := m.Shutdown(ctx); st != NodeDraining {
		t.Fatalf("shutdown: %v", st)
	}
	if _, err := m.Undrain(ctx); !errors.Is(err, ErrStopping) {
		t.Fatalf("undrain during shutdown: %v", err)
	}
	done, cancel := context.WithCancel(ctx)
	cancel()
	if n, ok := m.WaitNoFlows(done, time.Millisecond); ok || n != 1 {
		t.Fatalf("WaitNoFlows with a flow: %d %v", n, ok)
	}
	flows.n.Store(0)
	if n, ok := m.WaitNoFlows(ctx, time.Millisecond); !ok || n != 0 {
		t.Fatalf("WaitNoFlows without flows: %d %v", n, ok)
	}
	m.Stop(ctx)
	if st, _, _ := m.State(); st != NodeStopping {
		t.Fatalf("stop: %v", st)
	}
	// Every change of state or of its reasons (the check's problem at
	// the start, a flow while drained, the announcer's error).
	want := []NodeState{NodeStarting, NodeServing, NodeUnhealthy, NodeServing, NodeDraining, NodeDraining, NodeDrained, NodeDrained,
		NodeUnhealthy, NodeServing, NodeUnhealthy, NodeServing, NodeServing, NodeDraining, NodeStopping}
	if !slices.Equal(changes, want) {
		t.Fatalf("OnChange saw %v\nwant %v", changes, want)
	}
}

func TestMachineStartingDrainAndFail(t *testing.T) {
	ctx := context.Background()
	ann := &fakeAnnouncer{}
	v := &fakeVerdict{}
	clk := newFakeClock()
	m := NewMachine(MachineConfig{Prefixes: []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32")}, Checks: v, Announcer: ann,
		Logger: quiet, Clock: clk, DrainSettle: time.Second})
	if st, err := m.Undrain(ctx); !errors.Is(err, ErrNotDraining) || st != NodeStarting {
		t.Fatalf("undrain a starting node: %v %v", st, err)
	}
	if st, _ := m.Drain(ctx, "drain"); st != NodeDraining {
		t.Fatalf("drain without flows: %v", st)
	}
	clk.Advance(time.Second)
	if st := m.Evaluate(ctx); st != NodeDrained {
		t.Fatalf("drain without flows, settled: %v", st)
	}
	if st, _ := m.Undrain(ctx); st != NodeStarting {
		t.Fatalf("undrain a node never healthy: %v", st)
	}
	v.set(true)
	if st := m.Evaluate(ctx); st != NodeServing {
		t.Fatalf("healthy: %v", st)
	}
	m.Fail(ctx, "tun any0: read: device gone")
	if st, reasons, _ := m.State(); st != NodeFailed || reasons[0] != "tun any0: read: device gone" {
		t.Fatalf("failed: %v %v", st, reasons)
	}
	if a, _ := ann.state(); a {
		t.Fatal("a failed node is announced")
	}
	if _, err := m.Drain(ctx, "drain"); !errors.Is(err, ErrStopping) {
		t.Fatalf("drain a failed node: %v", err)
	}
	m.Stop(ctx)
	if st, _, _ := m.State(); st != NodeFailed {
		t.Fatalf("failed then stopped: %v", st)
	}
}

// TestMachineRun: Run reacts to the runner's Changes and to its tick
// (drained detection), with a fake clock.
func TestMachineRun(t *testing.T) {
	clk := newFakeClock()
	ann := &fakeAnnouncer{}
	v := &fakeVerdict{}
	flows := &fakeFlows{}
	flows.n.Store(1)
	states := make(chan NodeState, 16)
	m := NewMachine(MachineConfig{Prefixes: []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32")}, Checks: v,
		Flows: flows, Announcer: ann, Clock: clk, Tick: time.Second, DrainSettle: time.Second, Logger: quiet,
		OnChange: func(s NodeState, _ []string) { states <- s }})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	changes := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() { m.Run(ctx, changes); close(done) }()
	v.set(true)
	changes <- struct{}{}
	if s := <-states; s != NodeServing {
		t.Fatalf("after a change: %v", s)
	}
	if _, err := m.Drain(ctx, "drain"); err != nil {
		t.Fatal(err)
	}
	if s := <-states; s != NodeDraining {
		t.Fatalf("after drain: %v", s)
	}
	flows.n.Store(0)
	// Wait until Run is parked on its tick, then let the tick fire.
	clk.waitWaiters(1)
	clk.Advance(time.Second)
	if s := <-states; s != NodeDrained {
		t.Fatalf("after the tick: %v", s)
	}
	cancel()
	<-done
}
