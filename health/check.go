package health

// This file runs the checks: one goroutine per check probes on its
// interval, and a Counter turns the results into a verdict with the
// check's rise and fall thresholds.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// CheckState is a check's verdict.
type CheckState uint8

const (
	// CheckInit: no verdict yet (fewer than Rise passes and fewer than
	// Fall failures in a row since the start).
	CheckInit CheckState = iota
	// CheckUp: the last Rise results (at least) passed.
	CheckUp
	// CheckDown: the last Fall results (at least) failed.
	CheckDown
)

func (s CheckState) String() string {
	switch s {
	case CheckInit:
		return "init"
	case CheckUp:
		return "up"
	case CheckDown:
		return "down"
	}
	return fmt.Sprintf("CheckState(%d)", uint8(s))
}

// Thresholds are a check's rise and fall counts.
type Thresholds struct {
	// Rise is how many passes in a row make a check up.
	Rise int
	// Fall is how many failures in a row make a check down.
	Fall int
}

// Counter applies rise/fall thresholds to a sequence of results. A check
// starts in CheckInit; Rise passes in a row make it up, Fall failures in a
// row make it down; a result of the other kind resets the run. An up check
// that fails fewer than Fall times in a row stays up (and a down check
// that passes fewer than Rise times stays down): this is HAProxy's rise
// and fall, and IP SLA tracking's delay up and delay down counted in
// probes.
type Counter struct {
	th              Thresholds
	state           CheckState
	okRun, failRun  int
	total, failures uint64
}

// NewCounter returns a counter in CheckInit. Thresholds below 1 count as 1.
func NewCounter(th Thresholds) *Counter {
	th.Rise, th.Fall = max(th.Rise, 1), max(th.Fall, 1)
	return &Counter{th: th}
}

// Record adds one result and reports whether the verdict changed.
func (c *Counter) Record(ok bool) bool {
	c.total++
	if ok {
		c.okRun++
		c.failRun = 0
		if c.state != CheckUp && c.okRun >= c.th.Rise {
			c.state = CheckUp
			return true
		}
		return false
	}
	c.failures++
	c.failRun++
	c.okRun = 0
	if c.state != CheckDown && c.failRun >= c.th.Fall {
		c.state = CheckDown
		return true
	}
	return false
}

// State is the current verdict.
func (c *Counter) State() CheckState { return c.state }

// Runs returns the current runs of passes and failures (one is 0).
func (c *Counter) Runs() (ok, failed int) { return c.okRun, c.failRun }

// Probe runs one check attempt; nil means it passed. It must return when
// ctx is done (the check's timeout).
type Probe func(ctx context.Context) error

// CheckSpec describes one check.
type CheckSpec struct {
	// Name identifies the check ("http", "tun", ...); unique per runner.
	Name string
	// Kind says what is probed: "tcp", "http", "udp", "tun", "peers".
	Kind string
	// Target describes what is probed, for operators.
	Target string
	// Interval is the time between the starts of two probes.
	Interval time.Duration
	// Timeout bounds one probe.
	Timeout time.Duration
	Thresholds
	// Critical checks decide the node's health; the others are reported
	// only (the peer links: a dead peer must not make its survivors
	// withdraw).
	Critical bool
	Probe    Probe
}

// Override forces a check's results without probing. It is a TESTING AID
// (batond -check-override-file): end-to-end tests use it to make a
// service check fail on demand.
type Override uint8

const (
	// OverrideNone: probe normally.
	OverrideNone Override = iota
	// OverrideFail: every attempt fails without probing.
	OverrideFail
	// OverridePass: every attempt passes without probing.
	OverridePass
)

func (o Override) String() string {
	switch o {
	case OverrideFail:
		return "fail"
	case OverridePass:
		return "pass"
	}
	return ""
}

// CheckStatus is a snapshot of one check.
type CheckStatus struct {
	CheckSpec
	State CheckState
	// Since is when State was entered (the runner's start for CheckInit).
	Since time.Time
	// The last attempt: when it started, how long it took, whether it
	// passed, and "ok" or why it failed. LastTime is zero before the
	// first attempt.
	LastTime     time.Time
	LastDuration time.Duration
	LastOK       bool
	LastResult   string
	// OKRun and FailRun are the current runs toward Rise and Fall.
	OKRun, FailRun int
	// Total and Failures count every attempt.
	Total, Failures uint64
	// Override is the testing override in force at the last attempt.
	Override Override
}

type check struct {
	spec CheckSpec

	mu     sync.Mutex
	ctr    *Counter
	status CheckStatus
}

// RunnerOptions configure a Runner.
type RunnerOptions struct {
	// Clock defaults to RealClock.
	Clock Clock
	// Override, if set, is asked before every attempt (TESTING AID).
	Override func(check string) Override
	// Logger receives verdict changes; nil means slog.Default().
	Logger *slog.Logger
}

// Runner runs checks, each on its own goroutine.
type Runner struct {
	clock    Clock
	override func(string) Override
	log      *slog.Logger
	checks   []*check
	changes  chan struct{}

	startOnce, stopOnce sync.Once
	stop                chan struct{}
	wg                  sync.WaitGroup
}

// NewRunner validates the specs and returns a runner that has not started.
func NewRunner(specs []CheckSpec, o RunnerOptions) (*Runner, error) {
	if o.Clock == nil {
		o.Clock = RealClock
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	r := &Runner{clock: o.Clock, override: o.Override, log: o.Logger,
		changes: make(chan struct{}, 1), stop: make(chan struct{})}
	seen := map[string]bool{}
	now := r.clock.Now()
	for _, s := range specs {
		switch {
		case s.Name == "":
			return nil, errors.New("health: check without a name")
		case seen[s.Name]:
			return nil, fmt.Errorf("health: check %q listed twice", s.Name)
		case s.Interval <= 0 || s.Timeout <= 0:
			return nil, fmt.Errorf("health: check %q: interval and timeout must be positive", s.Name)
		case s.Rise < 1 || s.Fall < 1:
			return nil, fmt.Errorf("health: check %q: rise and fall must be at least 1", s.Name)
		case s.Probe == nil:
			return nil, fmt.Errorf("health: check %q has no probe", s.Name)
		}
		seen[s.Name] = true
		c := &check{spec: s, ctr: NewCounter(s.Thresholds)}
		c.status = CheckStatus{CheckSpec: s, State: CheckInit, Since: now}
		c.status.Probe = nil
		r.checks = append(r.checks, c)
	}
	return r, nil
}

// Start starts probing: every check probes at once, then every Interval.
func (r *Runner) Start() {
	r.startOnce.Do(func() {
		for _, c := range r.checks {
			r.wg.Add(1)
			go r.loop(c)
		}
	})
}

// Stop stops probing and waits for the probes in flight (each is bounded
// by its timeout). Verdicts stay as they were.
func (r *Runner) Stop() {
	r.stopOnce.Do(func() { close(r.stop) })
	r.wg.Wait()
}

// Changes receives a value (coalesced) whenever a verdict changes.
func (r *Runner) Changes() <-chan struct{} { return r.changes }

func (r *Runner) loop(c *check) {
	defer r.wg.Done()
	for {
		r.attempt(c)
		select {
		case <-r.stop:
			return
		case <-r.clock.After(c.spec.Interval):
		}
		select {
		case <-r.stop:
			return
		default:
		}
	}
}

// attempt runs one probe of c (or applies the override) and records it.
func (r *Runner) attempt(c *check) {
	ov := OverrideNone
	if r.override != nil {
		ov = r.override(c.spec.Name)
	}
	start := r.clock.Now()
	var err error
	switch ov {
	case OverrideFail:
		err = errors.New("forced to fail (testing override)")
	case OverridePass:
	default:
		ctx, cancel := context.WithTimeout(context.Background(), c.spec.Timeout)
		err = c.spec.Probe(ctx)
		if err != nil && ctx.Err() != nil {
			err = fmt.Errorf("timeout after %s: %w", c.spec.Timeout, err)
		}
		cancel()
	}
	r.record(c, start, r.clock.Now().Sub(start), err, ov)
}

// record adds a result to c at now and notifies Changes on a new verdict.
func (r *Runner) record(c *check, at time.Time, took time.Duration, err error, ov Override) {
	c.mu.Lock()
	changed := c.ctr.Record(err == nil)
	s := &c.status
	s.LastTime, s.LastDuration, s.LastOK, s.Override = at, took, err == nil, ov
	s.LastResult = "ok"
	if err != nil {
		s.LastResult = oneLine(err.Error())
	}
	s.OKRun, s.FailRun = c.ctr.Runs()
	s.Total, s.Failures = c.ctr.total, c.ctr.failures
	old := s.State
	if changed {
		s.State = c.ctr.State()
		s.Since = at.Add(took)
	}
	st := *s
	c.mu.Unlock()
	if !changed {
		return
	}
	attrs := []any{"check", st.Name, "from", old.String(), "to", st.State.String(), "last", st.LastResult}
	if st.State == CheckDown {
		r.log.Warn("health check down", attrs...)
	} else {
		r.log.Info("health check "+st.State.String(), attrs...)
	}
	select {
	case r.changes <- struct{}{}:
	default:
	}
}

// Statuses returns every check's status, in the order of the specs.
func (r *Runner) Statuses() []CheckStatus {
	out := make([]CheckStatus, len(r.checks))
	for i, c := range r.checks {
		c.mu.Lock()
		out[i] = c.status
		c.mu.Unlock()
	}
	return out
}

// Verdict reports whether every critical check is up, and a line per
// critical check that is not.
func (r *Runner) Verdict() (healthy bool, problems []string) {
	for _, s := range r.Statuses() {
		if !s.Critical || s.State == CheckUp {
			continue
		}
		switch {
		case s.State == CheckDown:
			problems = append(problems, fmt.Sprintf("check %s down: %s", s.Name, s.LastResult))
		case s.LastTime.IsZero():
			problems = append(problems, fmt.Sprintf("check %s: not run yet", s.Name))
		case s.LastOK:
			problems = append(problems, fmt.Sprintf("check %s rising: %d of %d passes", s.Name, s.OKRun, s.Rise))
		default:
			problems = append(problems, fmt.Sprintf("check %s failing (%d of %d): %s", s.Name, s.FailRun, s.Fall, s.LastResult))
		}
	}
	return len(problems) == 0, problems
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}
