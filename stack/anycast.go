package stack

import "net/netip"

// AnycastFilter is the first hook of every chain. The NIC runs in
// promiscuous and spoofing mode (see stack.go) so that gVisor terminates
// every address of the anycast prefixes without one NIC address per host
// address; this hook is what keeps that from meaning "every address": it
// drops inbound packets not addressed to an anycast prefix and outbound
// packets not sourced from one, so the node can neither be used as an open
// relay nor leak packets with a foreign source address.
//
// It implements Hook.
type AnycastFilter struct {
	prefixes []netip.Prefix
}

// NewAnycastFilter returns a filter for the given prefixes.
func NewAnycastFilter(prefixes []netip.Prefix) *AnycastFilter {
	ps := make([]netip.Prefix, len(prefixes))
	for i, p := range prefixes {
		ps[i] = p.Masked()
	}
	return &AnycastFilter{prefixes: ps}
}

// Name implements Hook.Name.
func (*AnycastFilter) Name() string { return "anycast-filter" }

// Contains reports whether a is inside one of the anycast prefixes.
func (f *AnycastFilter) Contains(a netip.Addr) bool {
	for _, p := range f.prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Inbound implements Hook.Inbound: only packets to an anycast address pass.
func (f *AnycastFilter) Inbound(p *Packet) Verdict {
	_, dst, ok := p.Addrs()
	if ok && f.Contains(dst) {
		return Pass
	}
	return Drop
}

// Outbound implements Hook.Outbound: only packets from an anycast address
// pass.
func (f *AnycastFilter) Outbound(p *Packet) Verdict {
	src, _, ok := p.Addrs()
	if ok && f.Contains(src) {
		return Pass
	}
	return Drop
}
