package handoff

// Membership: a static list of peers from the configuration, and which of
// them are up. There is no separate failure detector: liveness comes from
// the replication streams themselves.
//
// A peer is up while
//   - an outbound Replicate stream to it is established and acknowledged
//     recently: the stream counts from its first acknowledgement, the sender
//     sends a heartbeat (an empty batch) after 1 s without traffic, and a
//     batch unacknowledged for 2 s (ackTimeout) tears the stream down; or
//   - an inbound Replicate stream from it is open. The peer server pings
//     every client every 1 s and closes the connection when a ping is not
//     answered within 2 s (gRPC keepalive), which ends the stream.
//
// So a dead peer (process or network) is noticed within about 3 s. gRPC
// clamps client-side keepalive pings to at least 10 s, which is why the
// outbound direction relies on heartbeats and acknowledgements instead.

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"
)

// Peer is another node of the cluster.
type Peer struct {
	// Name is the node name; its certificate must carry it as CommonName
	// or DNS SAN.
	Name string
	// Addr is its peer gRPC address, host:port.
	Addr string
}

// Members is the cluster membership: the configured peers and which are up.
// Its methods are safe for concurrent use.
type Members struct {
	self  string
	peers []Peer // sorted by name

	mu      sync.Mutex
	state   map[string]*memberState
	live    []string // sorted, self included
	changed chan struct{}
	lease   time.Duration // lease.go; 0: DefaultLease
}

type memberState struct {
	out      bool // outbound stream established and acked
	in       int  // inbound streams open
	lastSeen time.Time
	// Lease bookkeeping (lease.go): when the newest batch this peer
	// acknowledged was sent; whether its process was found gone; its
	// latest report of what it hears.
	support time.Time
	dead    bool
	report  heardReport
}

func (s *memberState) up() bool { return s.out || s.in > 0 }

// NewMembers builds the membership of node self with its peers (self must
// not be among them).
func NewMembers(self string, peers []Peer) (*Members, error) {
	if err := checkNodeName(self); err != nil {
		return nil, fmt.Errorf("members: self: %w", err)
	}
	m := &Members{
		self:    self,
		peers:   append([]Peer(nil), peers...),
		state:   make(map[string]*memberState, len(peers)),
		live:    []string{self},
		changed: make(chan struct{}),
	}
	for _, p := range peers {
		if err := checkNodeName(p.Name); err != nil {
			return nil, fmt.Errorf("members: peer: %w", err)
		}
		if p.Name == self {
			return nil, fmt.Errorf("members: peer %q is this node itself", p.Name)
		}
		if _, dup := m.state[p.Name]; dup {
			return nil, fmt.Errorf("members: peer %q listed twice", p.Name)
		}
		if p.Addr == "" {
			return nil, fmt.Errorf("members: peer %q has no address", p.Name)
		}
		m.state[p.Name] = &memberState{}
	}
	if len(peers)+1 > maxMembers {
		return nil, fmt.Errorf("members: %d members, at most %d supported", len(peers)+1, maxMembers)
	}
	sort.Slice(m.peers, func(i, j int) bool { return m.peers[i].Name < m.peers[j].Name })
	return m, nil
}

func checkNodeName(n string) error {
	if n == "" {
		return errors.New("empty node name")
	}
	if len(n) > MaxNodeNameBytes {
		return fmt.Errorf("node name %q longer than %d bytes", n, MaxNodeNameBytes)
	}
	return nil
}

// Self is this node's name.
func (m *Members) Self() string { return m.self }

// Peers returns the configured peers, sorted by name.
func (m *Members) Peers() []Peer { return append([]Peer(nil), m.peers...) }

// IsPeer reports whether name is a configured peer (not self).
func (m *Members) IsPeer(name string) bool {
	_, ok := m.state[name] // the key set never changes after NewMembers
	return ok
}

// Live returns the members that are up, sorted, self included.
func (m *Members) Live() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.live)
}

// Watch returns the live members and a channel closed at the next change.
func (m *Members) Watch() ([]string, <-chan struct{}) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.live), m.changed
}

// Up reports whether a peer is up.
func (m *Members) Up(name string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.state[name]
	return ok && s.up()
}

// LastSeen is when the peer last acknowledged a batch or sent one (zero if
// never).
func (m *Members) LastSeen(name string) time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	if s, ok := m.state[name]; ok {
		return s.lastSeen
	}
	return time.Time{}
}

// update changes one peer's state under the lock and publishes a change
// when its liveness flipped.
func (m *Members) update(name string, fn func(*memberState)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.state[name]
	if !ok {
		return
	}
	was, wasDead := s.up(), s.dead
	fn(s)
	if s.up() == was {
		if s.dead != wasDead {
			m.notifyLocked()
		}
		return
	}
	live := []string{m.self}
	for n, st := range m.state {
		if st.up() {
			live = append(live, n)
		}
	}
	sort.Strings(live)
	m.live = live
	m.notifyLocked()
}

// notifyLocked wakes the watchers (Watch).
func (m *Members) notifyLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
}

func (m *Members) setOutbound(name string, up bool) {
	m.update(name, func(s *memberState) {
		s.out = up
		if up {
			s.lastSeen = time.Now()
			s.dead = false
		}
	})
}

func (m *Members) inboundOpened(name string) {
	m.update(name, func(s *memberState) { s.in++; s.lastSeen = time.Now(); s.dead = false })
}

func (m *Members) inboundClosed(name string) {
	m.update(name, func(s *memberState) {
		if s.in > 0 {
			s.in--
		}
	})
}

func (m *Members) seen(name string, t time.Time) {
	m.mu.Lock()
	if s, ok := m.state[name]; ok {
		s.lastSeen = t
		if s.dead {
			s.dead = false // it is back (lease.go)
			m.notifyLocked()
		}
	}
	m.mu.Unlock()
}
