// This file is the catalog of built-in services: it maps the names the
// daemon's config uses ("echo", "http", "stream", "whoami") to constructors
// and says whether each serves TCP or UDP.

package services

import (
	"fmt"
	"sort"
	"strings"
)

// Transport says whether a service serves TCP connections or UDP datagrams.
type Transport uint8

const (
	// TCP services implement TCPService.
	TCP Transport = iota + 1
	// UDP services implement UDPService.
	UDP
)

// String returns "tcp" or "udp".
func (t Transport) String() string {
	switch t {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	}
	return fmt.Sprintf("Transport(%d)", uint8(t))
}

// Entry describes one service in a catalog.
type Entry struct {
	Name      string
	Transport Transport

	newTCP func(nodeName string) TCPService
	newUDP func(nodeName string) UDPService
}

// Catalog maps service names to constructors. It is immutable.
type Catalog struct {
	entries map[string]Entry
	names   []string // sorted
}

var builtin = newCatalog(
	Entry{Name: "stream", Transport: TCP, newTCP: func(string) TCPService { return NewStream() }},
	Entry{Name: "echo", Transport: TCP, newTCP: func(string) TCPService { return NewEcho() }},
	Entry{Name: "http", Transport: TCP, newTCP: func(n string) TCPService { return NewHTTP(n) }},
	Entry{Name: "whoami", Transport: UDP, newUDP: func(n string) UDPService { return NewWhoami(n) }},
)

func newCatalog(entries ...Entry) *Catalog {
	c := &Catalog{entries: make(map[string]Entry, len(entries))}
	for _, e := range entries {
		c.entries[e.Name] = e
		c.names = append(c.names, e.Name)
	}
	sort.Strings(c.names)
	return c
}

// Builtin returns the catalog of the built-in services.
func Builtin() *Catalog { return builtin }

// Names returns the service names in sorted order.
func (c *Catalog) Names() []string { return append([]string(nil), c.names...) }

// Lookup returns the entry for name, or an error naming the known services.
func (c *Catalog) Lookup(name string) (Entry, error) {
	e, ok := c.entries[name]
	if !ok {
		return Entry{}, fmt.Errorf("services: unknown service %q (known: %s)", name, strings.Join(c.names, ", "))
	}
	return e, nil
}

// New returns a new instance of service name for the node called nodeName:
// a TCPService or a UDPService, as the entry's Transport says.
func (c *Catalog) New(name, nodeName string) (any, error) {
	e, err := c.Lookup(name)
	if err != nil {
		return nil, err
	}
	if e.Transport == UDP {
		return e.newUDP(nodeName), nil
	}
	return e.newTCP(nodeName), nil
}

// NewTCP returns a new instance of TCP service name; it fails if the name
// is unknown or names a UDP service.
func (c *Catalog) NewTCP(name, nodeName string) (TCPService, error) {
	e, err := c.Lookup(name)
	if err != nil {
		return nil, err
	}
	if e.Transport != TCP {
		return nil, fmt.Errorf("services: %q is a %s service, not tcp", name, e.Transport)
	}
	return e.newTCP(nodeName), nil
}

// NewUDP returns a new instance of UDP service name; it fails if the name
// is unknown or names a TCP service.
func (c *Catalog) NewUDP(name, nodeName string) (UDPService, error) {
	e, err := c.Lookup(name)
	if err != nil {
		return nil, err
	}
	if e.Transport != UDP {
		return nil, fmt.Errorf("services: %q is a %s service, not udp", name, e.Transport)
	}
	return e.newUDP(nodeName), nil
}

// New returns a new instance of built-in service name (see Catalog.New).
func New(name, nodeName string) (any, error) { return builtin.New(name, nodeName) }

// The built-in services implement their interfaces.
var (
	_ TCPService = (*Stream)(nil)
	_ TCPService = (*Echo)(nil)
	_ TCPService = (*HTTP)(nil)
	_ UDPService = (*Whoami)(nil)
)
