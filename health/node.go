package health

// This file is the node state machine: from the checks' verdict, the
// operator's drain and the daemon's lifecycle it derives the node's state,
// and it makes the announcer announce the prefixes exactly while the node
// is serving.
//
//	starting --all critical checks up--> serving <--> unhealthy
//	   |                                   |             |
//	   +---------------- drain ------------+-------------+--> draining --settled, no flows--> drained
//	                                  undrain: back to serving/unhealthy/starting
//	any state --> stopping (shutdown) | failed (the TUN device failed)
//
// starting lasts until the node has been healthy once: a node whose
// checks never passed attracts no traffic, and says so as "starting".

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// NodeState is the node's serving state.
type NodeState uint8

const (
	NodeStarting NodeState = iota + 1
	// NodeServing: healthy (every critical check up) and announced.
	NodeServing
	// NodeUnhealthy: a critical check is down after the node was serving;
	// withdrawn.
	NodeUnhealthy
	// NodeDraining: withdrawn on request (drain or shutdown); the node
	// still serves the flows it owns.
	NodeDraining
	// NodeDrained: withdrawn for at least DrainSettle, and the node owned
	// no flow.
	NodeDrained
	// NodeStopping: shutting down.
	NodeStopping
	// NodeFailed: the node cannot serve (the TUN device failed).
	NodeFailed
)

func (s NodeState) String() string {
	switch s {
	case NodeStarting:
		return "starting"
	case NodeServing:
		return "serving"
	case NodeUnhealthy:
		return "unhealthy"
	case NodeDraining:
		return "draining"
	case NodeDrained:
		return "drained"
	case NodeStopping:
		return "stopping"
	case NodeFailed:
		return "failed"
	}
	return fmt.Sprintf("NodeState(%d)", uint8(s))
}

// Verdicter is the checks' verdict (a *Runner).
type Verdicter interface {
	Verdict() (healthy bool, problems []string)
}

// FlowCounter counts the flows this node owns (the flow tracker's Len).
// Draining ends when it reaches zero.
type FlowCounter interface {
	Len() int
}

// MachineConfig configures a Machine.
type MachineConfig struct {
	// Prefixes are announced while the node is serving.
	Prefixes  []netip.Prefix
	Checks    Verdicter
	Flows     FlowCounter // nil: no flows
	Announcer Announcer
	// OnChange is called (serialized, never concurrently) with every new
	// state and its reasons.
	OnChange func(NodeState, []string)
	// Tick is how often Run re-evaluates without a change (drained
	// detection, retrying a failed announcement); default 100 ms.
	Tick time.Duration
	// DrainSettle is how long a drain lasts at least before the node
	// reports drained: the network takes time to stop sending new flows
	// after the withdrawal. Default 1 s.
	DrainSettle time.Duration
	Clock       Clock
	Logger      *slog.Logger
}

// Machine is the node state machine. Its methods are safe for concurrent
// use.
type Machine struct {
	cfg MachineConfig
	log *slog.Logger

	evalMu sync.Mutex // serializes evaluate (and the announcer calls)

	mu          sync.Mutex
	state       NodeState
	reasons     []string
	everHealthy bool
	draining    bool
	drainReason string
	drainStart  time.Time
	drained     bool
	shutdown    bool
	stopping    bool
	failed      string
	announced   bool // the announcer has the prefixes
	announceErr error
	changedAt   time.Time
}

// NewMachine returns a machine in NodeStarting; nothing is announced
// until Evaluate (or Run) finds the node healthy.
func NewMachine(cfg MachineConfig) *Machine {
	if cfg.Clock == nil {
		cfg.Clock = RealClock
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Tick <= 0 {
		cfg.Tick = 100 * time.Millisecond
	}
	if cfg.DrainSettle <= 0 {
		cfg.DrainSettle = time.Second
	}
	if cfg.Announcer == nil {
		cfg.Announcer = &None{}
	}
	return &Machine{cfg: cfg, log: cfg.Logger, state: NodeStarting,
		reasons: []string{"starting"}, changedAt: cfg.Clock.Now()}
}

// Run evaluates whenever changes receives (the runner's Changes) and
// every Tick, until ctx is done.
func (m *Machine) Run(ctx context.Context, changes <-chan struct{}) {
	for {
		m.Evaluate(ctx)
		select {
		case <-ctx.Done():
			return
		case <-changes:
		case <-m.cfg.Clock.After(m.cfg.Tick):
		}
	}
}

func (m *Machine) flows() int {
	if m.cfg.Flows == nil {
		return 0
	}
	return m.cfg.Flows.Len()
}

// Evaluate derives the state, announces or withdraws accordingly, and
// reports a change to OnChange.
func (m *Machine) Evaluate(ctx context.Context) NodeState {
	m.evalMu.Lock()
	defer m.evalMu.Unlock()
	healthy, problems := true, []string(nil)
	if m.cfg.Checks != nil {
		healthy, problems = m.cfg.Checks.Verdict()
	}
	m.mu.Lock()
	var st NodeState
	var reasons []string
	switch {
	case m.failed != "":
		st, reasons = NodeFailed, []string{m.failed}
	case m.stopping:
		st, reasons = NodeStopping, []string{"stopping"}
	case m.draining:
		n := m.flows()
		settled := m.cfg.Clock.Now().Sub(m.drainStart) >= m.cfg.DrainSettle
		if m.drained || (n == 0 && settled) {
			m.drained = true
			st = NodeDrained
		} else {
			st = NodeDraining
		}
		reasons = []string{m.drainReason}
		if n > 0 {
			reasons = append(reasons, fmt.Sprintf("%d flows still owned", n))
		}
	case healthy:
		st = NodeServing
		m.everHealthy = true
	case m.everHealthy:
		st, reasons = NodeUnhealthy, problems
	default:
		st, reasons = NodeStarting, append([]string{"starting"}, problems...)
	}
	want := st == NodeServing
	announced := m.announced
	m.mu.Unlock()

	var annErr error
	if want != announced || m.lastAnnounceErr() != nil {
		var ps []netip.Prefix
		if want {
			ps = m.cfg.Prefixes
		}
		annErr = m.cfg.Announcer.Advertise(ctx, ps)
		if annErr != nil {
			m.log.Error("announcer", "announcer", m.cfg.Announcer.Name(), "announce", want, "err", annErr)
		} else if want != announced {
			if want {
				m.log.Info("announcing", "announcer", m.cfg.Announcer.Name(), "prefixes", m.cfg.Prefixes)
			} else {
				m.log.Info("withdrawn", "announcer", m.cfg.Announcer.Name(), "state", st.String())
			}
		}
	}

	m.mu.Lock()
	if annErr == nil {
		m.announced = want
	}
	m.announceErr = annErr
	if annErr != nil {
		reasons = append(reasons, fmt.Sprintf("announcer %s: %v", m.cfg.Announcer.Name(), annErr))
	}
	changed := st != m.state || !slices.Equal(reasons, m.reasons)
	if st != m.state {
		m.changedAt = m.cfg.Clock.Now()
	}
	m.state, m.reasons = st, reasons
	m.mu.Unlock()
	if changed && m.cfg.OnChange != nil {
		m.cfg.OnChange(st, slices.Clone(reasons))
	}
	return st
}

func (m *Machine) lastAnnounceErr() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.announceErr
}

// State returns the state, its reasons and when it was entered.
func (m *Machine) State() (NodeState, []string, time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state, slices.Clone(m.reasons), m.changedAt
}

// Announced reports whether the announcer has the prefixes.
func (m *Machine) Announced() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.announced
}

// ErrNotDraining is returned by Undrain on a node that is not draining.
var ErrNotDraining = errors.New("node is not draining")

// ErrStopping is returned by Drain and Undrain while stopping or failed.
var ErrStopping = errors.New("node is stopping")

// Drain withdraws the prefixes and keeps them withdrawn until Undrain; the
// node goes draining, then drained once it owns no flow. It returns after
// the withdrawal was handed to the announcer.
func (m *Machine) Drain(ctx context.Context, reason string) (NodeState, error) {
	m.mu.Lock()
	if m.stopping || m.failed != "" || m.shutdown {
		st := m.state
		m.mu.Unlock()
		return st, ErrStopping
	}
	if !m.draining {
		m.draining, m.drained, m.drainReason = true, false, reason
		m.drainStart = m.cfg.Clock.Now()
	}
	m.mu.Unlock()
	return m.Evaluate(ctx), nil
}

// Undrain ends a drain: the node announces again once (or as soon as)
// its checks pass. Undraining a serving node is a no-op.
func (m *Machine) Undrain(ctx context.Context) (NodeState, error) {
	m.mu.Lock()
	switch {
	case m.stopping || m.failed != "" || m.shutdown:
		st := m.state
		m.mu.Unlock()
		return st, ErrStopping
	case !m.draining && m.state != NodeServing:
		st := m.state
		m.mu.Unlock()
		return st, ErrNotDraining
	}
	m.draining, m.drained, m.drainReason = false, false, ""
	m.mu.Unlock()
	return m.Evaluate(ctx), nil
}

// Shutdown starts a graceful stop: the prefixes are withdrawn (state
// draining, "shutting down") and Undrain is refused from now on.
func (m *Machine) Shutdown(ctx context.Context) NodeState {
	m.mu.Lock()
	m.shutdown = true
	if !m.draining {
		m.drainStart = m.cfg.Clock.Now()
	}
	m.draining, m.drained, m.drainReason = true, false, "shutting down"
	m.mu.Unlock()
	return m.Evaluate(ctx)
}

// Stop moves to stopping and withdraws.
func (m *Machine) Stop(ctx context.Context) {
	m.mu.Lock()
	m.stopping = true
	m.mu.Unlock()
	m.Evaluate(ctx)
}

// Fail moves to failed (for good) and withdraws.
func (m *Machine) Fail(ctx context.Context, reason string) {
	m.mu.Lock()
	m.failed = reason
	m.mu.Unlock()
	m.Evaluate(ctx)
}

// WaitNoFlows polls the flow count every poll until it is zero (true) or
// ctx is done (false). It returns the last count.
func (m *Machine) WaitNoFlows(ctx context.Context, poll time.Duration) (int, bool) {
	for {
		n := m.flows()
		if n == 0 {
			return 0, true
		}
		select {
		case <-ctx.Done():
			return n, false
		case <-m.cfg.Clock.After(poll):
		}
	}
}
