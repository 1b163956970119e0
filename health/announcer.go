package health

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"time"
)

// Announcer tells the network which anycast prefixes this node serves. It
// is deliberately small (as MetalLB's speakers are): the node state
// machine decides what to announce, an announcer only carries it out.
// Implementations: BGP (an embedded speaker), None (routes managed
// outside Baton); tests use fakes.
type Announcer interface {
	// Name is "bgp", "none", ...
	Name() string
	// Start prepares the announcer (opens sessions, listens); it announces
	// nothing yet.
	Start(ctx context.Context) error
	// Advertise makes the set of announced prefixes exactly prefixes:
	// new ones are announced, missing ones withdrawn; nil withdraws
	// everything. It returns once the change has been handed to the
	// protocol (not once the network has converged).
	Advertise(ctx context.Context, prefixes []netip.Prefix) error
	// Status describes what is announced and the sessions.
	Status(ctx context.Context) AnnouncerStatus
	// Close withdraws everything and stops.
	Close(ctx context.Context) error
}

// AnnouncerStatus is what an announcer reports.
type AnnouncerStatus struct {
	// Announced are the prefixes announced now.
	Announced []Announcement
	// Sessions are the routing sessions (BGP neighbors).
	Sessions []Session
}

// Announcement is one announced prefix.
type Announcement struct {
	Prefix  netip.Prefix
	NextHop netip.Addr // invalid: the session's own address
	Since   time.Time
}

// Session is one routing session.
type Session struct {
	Neighbor          netip.Addr
	PeerASN, LocalASN uint32
	Passive           bool
	// State is the BGP FSM state in lower case: idle, connect, active,
	// opensent, openconfirm, established.
	State string
	// Established is when the session came up (zero when it is not up).
	Established time.Time
	// Advertised and Received count prefixes, over every family.
	Advertised, Received uint64
	// HoldTime is the negotiated hold time (0 when not up).
	HoldTime time.Duration
	// Flaps counts the times the session went down.
	Flaps uint32
}

// None announces nothing: the prefixes are routed to the node by other
// means (static routes, or a router that probes the node itself). It
// remembers what would be announced, for Status.
type None struct {
	mu     sync.Mutex
	wanted []netip.Prefix
}

// Name implements Announcer.
func (*None) Name() string { return "none" }

// Start implements Announcer.
func (*None) Start(context.Context) error { return nil }

// Advertise implements Announcer: it only records prefixes.
func (n *None) Advertise(_ context.Context, prefixes []netip.Prefix) error {
	n.mu.Lock()
	n.wanted = slices.Clone(prefixes)
	n.mu.Unlock()
	return nil
}

// Wanted returns what the node state machine asked to announce.
func (n *None) Wanted() []netip.Prefix {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.wanted)
}

// Status implements Announcer: nothing is announced, there are no
// sessions.
func (*None) Status(context.Context) AnnouncerStatus { return AnnouncerStatus{} }

// Close implements Announcer.
func (n *None) Close(ctx context.Context) error { return n.Advertise(ctx, nil) }
