// This file is the UDP "whoami" service: every datagram, empty ones
// included, gets one datagram back holding the node name followed by "\n"
// (the same bytes as the http service's /whoami body), whatever it carried.
// The newline makes `nc -u` output readable; clients trim it.

package services

import (
	"context"
	"net/netip"
)

// Whoami is the UDP whoami service.
type Whoami struct {
	reply []byte
}

// NewWhoami returns the whoami service of the node called nodeName.
func NewWhoami(nodeName string) *Whoami {
	return &Whoami{reply: []byte(nodeName + "\n")}
}

// Name returns "whoami".
func (w *Whoami) Name() string { return "whoami" }

// HandleDatagram returns nodeName+"\n" for any datagram. The slice is the
// caller's to keep or modify.
func (w *Whoami) HandleDatagram(_ context.Context, _ netip.AddrPort, _ []byte) []byte {
	return append([]byte(nil), w.reply...)
}
