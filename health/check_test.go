package health

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a Clock that moves only when Advance is called.
type fakeClock struct {
	mu      sync.Mutex
	cond    *sync.Cond
	now     time.Time
	waiters []fakeWaiter
}

type fakeWaiter struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock {
	c := &fakeClock{now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	c.cond = sync.NewCond(&c.mu)
	return c
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if d <= 0 {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, fakeWaiter{c.now.Add(d), ch})
	c.cond.Broadcast()
	return ch
}

// Advance moves the clock and fires the timers that are due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if !w.at.After(c.now) {
			w.ch <- c.now
		} else {
			kept = append(kept, w)
		}
	}
	c.waiters = kept
}

// waitWaiters blocks until n timers are pending (the goroutines under
// test are parked on the clock).
func (c *fakeClock) waitWaiters(n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.waiters) < n {
		c.cond.Wait()
	}
}

func TestCounterRiseFall(t *testing.T) {
	// Results are written as a string: '+' passed, '-' failed. want is
	// the verdict after each result: i(nit), u(p), d(own).
	cases := []struct {
		name       string
		rise, fall int
		results    string
		want       string
	}{
		{"starts init, up after rise", 2, 3, "++", "iu"},
		{"down after fall from init", 2, 3, "---", "iid"},
		{"a failure resets the rise", 3, 3, "++-+++", "iiiiiu"},
		{"up tolerates fall-1 failures", 2, 3, "++--+--", "iuuuuuu"},
		{"up to down after fall in a row", 2, 3, "++---", "iuuud"},
		{"down needs rise in a row", 2, 3, "++---+-++", "iuuuddddu"},
		{"intermittent failures never fall", 2, 2, "++-+-+-+", "iuuuuuuu"},
		{"rise 1 fall 1 follows every result", 1, 1, "+-+-", "udud"},
		{"thresholds below 1 count as 1", 0, 0, "-+", "du"},
	}
	letter := map[CheckState]byte{CheckInit: 'i', CheckUp: 'u', CheckDown: 'd'}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := NewCounter(Thresholds{Rise: tc.rise, Fall: tc.fall})
			var got []byte
			prev := c.State()
			for i, r := range []byte(tc.results) {
				changed := c.Record(r == '+')
				if changed != (c.State() != prev) {
					t.Fatalf("result %d: Record said changed=%v, state %v -> %v", i, changed, prev, c.State())
				}
				prev = c.State()
				got = append(got, letter[c.State()])
			}
			if string(got) != tc.want {
				t.Fatalf("results %s: verdicts %s, want %s", tc.results, got, tc.want)
			}
		})
	}
}

// scriptedProbe fails or passes according to results, one per call; it
// signals every call on calls.
type scriptedProbe struct {
	mu      sync.Mutex
	results []bool
	n       int
}

func (p *scriptedProbe) probe(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	ok := p.results[min(p.n, len(p.results)-1)]
	p.n++
	if !ok {
		return errors.New("scripted failure")
	}
	return nil
}

func (p *scriptedProbe) calls() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// TestRunnerFakeClock drives a runner with a fake clock: one probe per
// interval, verdict and timestamps from the clock, Changes on every new
// verdict, and the testing override.
func TestRunnerFakeClock(t *testing.T) {
	clk := newFakeClock()
	start := clk.Now()
	const interval = time.Second
	p := &scriptedProbe{results: []bool{true, true, false, false, false, true, true, true, true, true}}
	var ovMu sync.Mutex
	ov := OverrideNone
	r, err := NewRunner([]CheckSpec{{
		Name: "http", Kind: "http", Interval: interval, Timeout: time.Minute,
		Thresholds: Thresholds{Rise: 2, Fall: 3}, Critical: true, Probe: p.probe,
	}}, RunnerOptions{Clock: clk, Logger: quiet, Override: func(string) Override { ovMu.Lock(); defer ovMu.Unlock(); return ov }})
	if err != nil {
		t.Fatal(err)
	}
	if ok, probs := r.Verdict(); ok || len(probs) != 1 || !strings.Contains(probs[0], "not run yet") {
		t.Fatalf("before start: %v %v", ok, probs)
	}
	r.Start()
	defer r.Stop()
	// step waits for the check to park on the clock after attempt n
	// (1-based), then returns its status.
	step := func(n int) CheckStatus {
		t.Helper()
		clk.waitWaiters(1)
		st := r.Statuses()[0]
		if int(st.Total) != n {
			t.Fatalf("after attempt %d: %d attempts recorded", n, st.Total)
		}
		return st
	}
	want := []struct {
		state   CheckState
		healthy bool
		changed bool
	}{
		{CheckInit, false, false},
		{CheckUp, true, true},
		{CheckUp, true, false},
		{CheckUp, true, false},
		{CheckDown, false, true},
		{CheckDown, false, false},
		{CheckUp, false, true}, // healthy computed below
	}
	want[6].healthy = true
	for i, w := range want {
		st := step(i + 1)
		at := start.Add(time.Duration(i) * interval)
		if st.State != w.state || !st.LastTime.Equal(at) {
			t.Fatalf("attempt %d: state %v at %v, want %v at %v", i+1, st.State, st.LastTime, w.state, at)
		}
		if ok, _ := r.Verdict(); ok != w.healthy {
			t.Fatalf("attempt %d: healthy %v, want %v", i+1, ok, w.healthy)
		}
		select {
		case <-r.Changes():
			if !w.changed {
				t.Fatalf("attempt %d: Changes fired without a new verdict", i+1)
			}
			if !st.Since.Equal(at) {
				t.Fatalf("attempt %d: since %v, want %v", i+1, st.Since, at)
			}
		default:
			if w.changed {
				t.Fatalf("attempt %d: no Changes for a new verdict", i+1)
			}
		}
		if i < len(want)-1 {
			clk.Advance(interval)
		}
	}
	// The testing override fails the check without probing.
	ovMu.Lock()
	ov = OverrideFail
	ovMu.Unlock()
	calls := p.calls()
	clk.Advance(interval)
	for i := 0; i < 3; i++ {
		step(8 + i)
		clk.Advance(interval)
	}
	st := step(11)
	if st.State != CheckDown || st.Override != OverrideFail || !strings.Contains(st.LastResult, "testing override") {
		t.Fatalf("with the fail override: %+v", st)
	}
	if p.calls() != calls {
		t.Fatalf("the probe ran %d times under the override", p.calls()-calls)
	}
	if st.FailRun != 4 || st.OKRun != 0 || st.Failures != 7 {
		t.Fatalf("counters: fail run %d, ok run %d, failures %d", st.FailRun, st.OKRun, st.Failures)
	}
}

func TestRunnerRejectsBadSpecs(t *testing.T) {
	probe := func(context.Context) error { return nil }
	good := CheckSpec{Name: "a", Interval: time.Second, Timeout: time.Second, Thresholds: Thresholds{1, 1}, Probe: probe}
	bad := []func(*CheckSpec){
		func(s *CheckSpec) { s.Name = "" },
		func(s *CheckSpec) { s.Interval = 0 },
		func(s *CheckSpec) { s.Timeout = -1 },
		func(s *CheckSpec) { s.Rise = 0 },
		func(s *CheckSpec) { s.Probe = nil },
	}
	for i, f := range bad {
		s := good
		f(&s)
		if _, err := NewRunner([]CheckSpec{s}, RunnerOptions{}); err == nil {
			t.Errorf("case %d: no error", i)
		}
	}
	if _, err := NewRunner([]CheckSpec{good, good}, RunnerOptions{}); err == nil {
		t.Error("duplicate names accepted")
	}
}

// TestVerdictIgnoresNonCritical: a non-critical check that is down does
// not make the node unhealthy.
func TestVerdictIgnoresNonCritical(t *testing.T) {
	clk := newFakeClock()
	fail := func(context.Context) error { return errors.New("peer n3 down") }
	pass := func(context.Context) error { return nil }
	r, err := NewRunner([]CheckSpec{
		{Name: "tun", Interval: time.Second, Timeout: time.Second, Thresholds: Thresholds{1, 1}, Critical: true, Probe: pass},
		{Name: "peers", Interval: time.Second, Timeout: time.Second, Thresholds: Thresholds{1, 1}, Probe: fail},
	}, RunnerOptions{Clock: clk, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	r.Start()
	defer r.Stop()
	clk.waitWaiters(2)
	if ok, probs := r.Verdict(); !ok {
		t.Fatalf("unhealthy: %v", probs)
	}
	if st := r.Statuses()[1]; st.State != CheckDown {
		t.Fatalf("peers check %v", st.State)
	}
}
