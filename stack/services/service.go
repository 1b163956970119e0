// Package services holds the services Baton serves on its anycast addresses
// (stream, echo, http, whoami) and the interfaces every service implements.
//
// A service sees ordinary net.Conn connections and datagrams: it never learns
// which node it runs on beyond the name it is given, and it must not reach
// into the stack, the TUN device or the handoff layer. What a takeover needs
// from a service (where it is in its output, how to continue) it exposes
// through the interfaces here, so the handoff layer can move a connection
// between nodes without knowing the service's protocol.
//
// Every byte a service sends must be a deterministic function of what the
// client sent (no clocks, no randomness, no per-node values except where the
// protocol is "tell me who you are"), because a takeover continues a byte
// stream on another node and the bytes must match.
package services

import (
	"context"
	"net"
	"net/netip"
)

// TCPService serves connections accepted on one TCP port.
type TCPService interface {
	// Name identifies the service in config, metrics and logs.
	Name() string
	// ServeConn serves one connection until the client is done, the
	// connection fails or ctx is cancelled. The caller closes conn after
	// ServeConn returns; the returned error is logged, never sent.
	ServeConn(ctx context.Context, conn net.Conn) error
}

// UDPService answers datagrams received on one UDP port.
type UDPService interface {
	// Name identifies the service in config, metrics and logs.
	Name() string
	// HandleDatagram returns the reply to req from a client, or nil for no
	// reply. It must not keep req after returning.
	HandleDatagram(ctx context.Context, from netip.AddrPort, req []byte) []byte
}
