// Package handoff keeps Baton's TCP connections alive across nodes: it
// tracks every flow the local stack terminates (what a takeover needs that a
// mid-flow packet does not show), replicates that state to peer nodes, and
// (in the takeover work) restores flows another node owned.
//
// It sits on the stack's hook chain (stack.Hook) and puts packets on the path
// only through stack.Injector. It must never block the packet path: hooks
// update in-memory state and mark flows dirty; replication runs on its own
// goroutines with bounded queues, and a slow or dead peer costs counted
// drops, never latency for packets.
package handoff

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// FlowKey identifies a TCP connection: the client's address and port and
// the anycast address and port it connected to. It is comparable and used
// as a map key.
type FlowKey struct {
	Client  netip.AddrPort
	Anycast netip.AddrPort
}

// String formats the key as "client->anycast", e.g.
// "198.51.100.2:40000->192.0.2.1:80" or "[2001:db8::2]:40000->[2001:db8:a::1]:80".
func (k FlowKey) String() string {
	return k.Client.String() + "->" + k.Anycast.String()
}

// ParseFlowKey parses the String form.
func ParseFlowKey(s string) (FlowKey, error) {
	c, a, ok := strings.Cut(strings.TrimSpace(s), "->")
	if !ok {
		return FlowKey{}, fmt.Errorf("flow key %q: want CLIENT:PORT->ANYCAST:PORT", s)
	}
	client, err := netip.ParseAddrPort(c)
	if err != nil {
		return FlowKey{}, fmt.Errorf("flow key %q: client: %v", s, err)
	}
	anycast, err := netip.ParseAddrPort(a)
	if err != nil {
		return FlowKey{}, fmt.Errorf("flow key %q: anycast: %v", s, err)
	}
	k := FlowKey{Client: unmapPort(client), Anycast: unmapPort(anycast)}
	if k.Client.Addr().Is4() != k.Anycast.Addr().Is4() {
		return FlowKey{}, fmt.Errorf("flow key %q: mixes IPv4 and IPv6", s)
	}
	return k, nil
}

func unmapPort(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Bytes is a stable binary form of the key (for hashing): address lengths
// tell the family.
func (k FlowKey) Bytes() []byte {
	c, a := k.Client.Addr().AsSlice(), k.Anycast.Addr().AsSlice()
	b := make([]byte, 0, len(c)+len(a)+4)
	b = append(b, c...)
	b = append(b, byte(k.Client.Port()>>8), byte(k.Client.Port()))
	b = append(b, a...)
	b = append(b, byte(k.Anycast.Port()>>8), byte(k.Anycast.Port()))
	return b
}

// Proto converts the key to its wire form.
func (k FlowKey) Proto() *batonv1.FlowKey {
	return &batonv1.FlowKey{
		ClientAddr:  k.Client.Addr().AsSlice(),
		ClientPort:  uint32(k.Client.Port()),
		AnycastAddr: k.Anycast.Addr().AsSlice(),
		AnycastPort: uint32(k.Anycast.Port()),
	}
}

// Reject reasons for flow state received from peers. Each is a metric label
// and a log field; keep them short and stable.
const (
	RejectNoKey          = "no_key"
	RejectBadAddress     = "bad_address"
	RejectMixedFamily    = "mixed_family"
	RejectBadPort        = "bad_port"
	RejectNotAnycast     = "not_anycast"
	RejectBadWindowScale = "bad_window_scale"
	RejectBadMSS         = "bad_mss"
	RejectNoOwner        = "no_owner"
	RejectOwnerMismatch  = "owner_mismatch"
	RejectBadPhase       = "bad_phase"
	RejectTooLarge       = "too_large"
	RejectBadKind        = "bad_kind"
	RejectStaleEpoch     = "stale_epoch"
	RejectBadService     = "bad_service"
)

// RejectError is a validation failure with its reason.
type RejectError struct {
	Reason string
	Detail string
}

func (e *RejectError) Error() string { return e.Reason + ": " + e.Detail }

func reject(reason, format string, args ...any) error {
	return &RejectError{Reason: reason, Detail: fmt.Sprintf(format, args...)}
}

// RejectReason returns the reason of a RejectError, or "invalid".
func RejectReason(err error) string {
	var r *RejectError
	if errors.As(err, &r) {
		return r.Reason
	}
	return "invalid"
}

// KeyFromProto validates and converts a wire key.
func KeyFromProto(p *batonv1.FlowKey) (FlowKey, error) {
	if p == nil {
		return FlowKey{}, reject(RejectNoKey, "flow key missing")
	}
	c, ok1 := netip.AddrFromSlice(p.ClientAddr)
	a, ok2 := netip.AddrFromSlice(p.AnycastAddr)
	if !ok1 || !ok2 {
		return FlowKey{}, reject(RejectBadAddress, "address of %d/%d bytes", len(p.ClientAddr), len(p.AnycastAddr))
	}
	if len(p.ClientAddr) != len(p.AnycastAddr) {
		return FlowKey{}, reject(RejectMixedFamily, "client and anycast addresses of different families")
	}
	if c.IsUnspecified() || a.IsUnspecified() || c.IsMulticast() || a.IsMulticast() {
		return FlowKey{}, reject(RejectBadAddress, "unspecified or multicast address")
	}
	if p.ClientPort == 0 || p.ClientPort > 65535 || p.AnycastPort == 0 || p.AnycastPort > 65535 {
		return FlowKey{}, reject(RejectBadPort, "ports %d/%d", p.ClientPort, p.AnycastPort)
	}
	return FlowKey{
		Client:  netip.AddrPortFrom(c, uint16(p.ClientPort)),
		Anycast: netip.AddrPortFrom(a, uint16(p.AnycastPort)),
	}, nil
}

// Limits on flow state received from peers.
const (
	MaxCheckpointBytes = 16 << 10
	MaxNodeNameBytes   = 64
	MaxServiceBytes    = 32
	MinMSS             = 88 // RFC 9293 floor for IPv4 is 536 by default, but Linux accepts 88
	MaxMSS             = 65535 - 40
)

// MaxUnackedOutputBytes bounds FlowState.unacked_output (sync mode).
const MaxUnackedOutputBytes = maxSendBatchBytes / 2

// ValidateState checks a flow state received from a peer: the key must be
// inside one of the anycast prefixes, and every field must be sane.
func ValidateState(s *batonv1.FlowState, prefixes []netip.Prefix) (FlowKey, error) {
	if s == nil {
		return FlowKey{}, reject(RejectNoKey, "state missing")
	}
	k, err := KeyFromProto(s.Key)
	if err != nil {
		return FlowKey{}, err
	}
	inside := false
	for _, p := range prefixes {
		if p.Contains(k.Anycast.Addr()) {
			inside = true
			break
		}
	}
	if !inside {
		return FlowKey{}, reject(RejectNotAnycast, "%s is outside the anycast prefixes", k.Anycast.Addr())
	}
	if s.Owner == "" {
		return FlowKey{}, reject(RejectNoOwner, "no owner")
	}
	if len(s.Owner) > MaxNodeNameBytes {
		return FlowKey{}, reject(RejectTooLarge, "owner name of %d bytes", len(s.Owner))
	}
	if len(s.Service) > MaxServiceBytes {
		return FlowKey{}, reject(RejectBadService, "service name of %d bytes", len(s.Service))
	}
	if len(s.Checkpoint) > MaxCheckpointBytes {
		return FlowKey{}, reject(RejectTooLarge, "checkpoint of %d bytes (max %d)", len(s.Checkpoint), MaxCheckpointBytes)
	}
	if len(s.UnackedOutput) > MaxUnackedOutputBytes {
		return FlowKey{}, reject(RejectTooLarge, "unacknowledged output of %d bytes (max %d)", len(s.UnackedOutput), MaxUnackedOutputBytes)
	}
	if s.Phase < batonv1.FlowPhase_FLOW_PHASE_HANDSHAKE || s.Phase > batonv1.FlowPhase_FLOW_PHASE_CLOSED {
		return FlowKey{}, reject(RejectBadPhase, "phase %d", s.Phase)
	}
	for _, ws := range []int32{s.ClientWindowScale, s.ServerWindowScale} {
		if ws < -1 || ws > 14 {
			return FlowKey{}, reject(RejectBadWindowScale, "window scale %d (max 14)", ws)
		}
	}
	if o := s.ClientSyn; o != nil {
		if o.WindowScale < -1 || o.WindowScale > 14 {
			return FlowKey{}, reject(RejectBadWindowScale, "SYN window scale %d (max 14)", o.WindowScale)
		}
		if o.Mss != 0 && (o.Mss < MinMSS || o.Mss > MaxMSS) {
			return FlowKey{}, reject(RejectBadMSS, "SYN MSS %d", o.Mss)
		}
	}
	if s.ServerMss != 0 && (s.ServerMss < MinMSS || s.ServerMss > MaxMSS) {
		return FlowKey{}, reject(RejectBadMSS, "server MSS %d", s.ServerMss)
	}
	return k, nil
}
