package main

// This file holds the health part of batond's configuration: the checks
// (interval, timeout, rise, fall, per check), the announcer (bgp or none)
// with its BGP settings, and the drain timeout.

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// HealthConfig configures the health checks. Interval, Timeout, Rise and
// Fall apply to every check; Checks overrides them per check.
type HealthConfig struct {
	Interval time.Duration `yaml:"interval"`
	// Timeout bounds one attempt; 0 means the check's interval.
	Timeout time.Duration `yaml:"timeout"`
	Rise    int           `yaml:"rise"`
	Fall    int           `yaml:"fall"`
	Checks  []CheckConfig `yaml:"checks"`
	// OverrideFile is a TESTING AID: a file of "CHECK fail|pass" lines,
	// read at every attempt, that forces check results (end-to-end tests
	// fail a check on demand with it). Flag -check-override-file.
	OverrideFile string `yaml:"override_file"`
}

// CheckConfig overrides one check's settings; zero values inherit.
type CheckConfig struct {
	// Name is a service name (a check of that service) or "tun" or
	// "peers".
	Name     string        `yaml:"name"`
	Interval time.Duration `yaml:"interval"`
	Timeout  time.Duration `yaml:"timeout"`
	Rise     int           `yaml:"rise"`
	Fall     int           `yaml:"fall"`
	// Disabled removes the check.
	Disabled bool `yaml:"disabled"`
	// Critical overrides whether the check decides the node's health
	// (default: every check but peers).
	Critical *bool `yaml:"critical"`
}

// BGPConfig is the bgp announcer's speaker.
type BGPConfig struct {
	ASN        uint32           `yaml:"asn"`
	RouterID   string           `yaml:"router_id"`
	ListenPort int              `yaml:"listen_port"`
	NextHop4   string           `yaml:"next_hop4"`
	NextHop6   string           `yaml:"next_hop6"`
	HoldTime   time.Duration    `yaml:"hold_time"`
	Neighbors  []NeighborConfig `yaml:"neighbors"`

	routerID, nextHop4, nextHop6 netip.Addr // parsed, filled by validate
	neighbors                    []netip.Addr
}

// NeighborConfig is one BGP neighbor.
type NeighborConfig struct {
	Address string `yaml:"address"`
	ASN     uint32 `yaml:"asn"`
	// Passive: wait for the router to connect (recommended: GoBGP waits
	// 5-10 s before dialing and retries no faster than every 5 s).
	Passive bool `yaml:"passive"`
}

const (
	announceBGP  = "bgp"
	announceNone = "none"
)

// Node checks besides the services.
const (
	checkTUN   = "tun"
	checkPeers = "peers"
)

func defaultHealthConfig() HealthConfig {
	return HealthConfig{Interval: time.Second, Rise: 2, Fall: 3} // Timeout 0: the interval
}

func defaultBGPConfig() BGPConfig {
	return BGPConfig{ListenPort: 179, HoldTime: 90 * time.Second}
}

type healthFlags struct {
	announce, routerID, nh4, nh6, neighbors, override *string
	asn                                               *uint
	port, rise, fall                                  *int
	hold, interval, timeout, drain                    *time.Duration
}

func registerHealthFlags(fs *flag.FlagSet, cfg *Config) *healthFlags {
	return &healthFlags{
		announce:  fs.String("announce", cfg.Announce, "how the anycast prefixes reach the node: bgp (embedded speaker) or none (routes managed outside Baton)"),
		asn:       fs.Uint("bgp-asn", uint(cfg.BGP.ASN), "this node's BGP AS number"),
		routerID:  fs.String("bgp-router-id", "", "BGP router id, an IPv4 address (default: -bgp-next-hop4)"),
		port:      fs.Int("bgp-listen-port", cfg.BGP.ListenPort, "BGP listen port (passive neighbors connect to it)"),
		nh4:       fs.String("bgp-next-hop4", "", "next hop announced for IPv4 prefixes (default: the session's local address)"),
		nh6:       fs.String("bgp-next-hop6", "", "next hop announced for IPv6 prefixes (needed over IPv4 sessions)"),
		hold:      fs.Duration("bgp-hold-time", cfg.BGP.HoldTime, "BGP hold time proposed to neighbors (keepalives every third)"),
		neighbors: fs.String("bgp-neighbors", "", "BGP neighbors as address=asn[:passive],..."),
		interval:  fs.Duration("check-interval", cfg.Health.Interval, "time between two attempts of every health check"),
		timeout:   fs.Duration("check-timeout", cfg.Health.Timeout, "time limit of one health check attempt (0: the interval)"),
		rise:      fs.Int("check-rise", cfg.Health.Rise, "passes in a row that make a check up"),
		fall:      fs.Int("check-fall", cfg.Health.Fall, "failures in a row that make a check down"),
		override:  fs.String("check-override-file", "", "TESTING AID: file of 'CHECK fail|pass' lines that force check results"),
		drain:     fs.Duration("drain-timeout", cfg.DrainTimeout, "on SIGTERM, after withdrawing, wait up to this long for the node to own no flows (0: stop at once)"),
	}
}

// apply copies an explicitly set flag into cfg; ok is false for a flag
// that is not a health flag.
func (f *healthFlags) apply(name string, cfg *Config) (ok bool, err error) {
	switch name {
	case "announce":
		cfg.Announce = *f.announce
	case "bgp-asn":
		if *f.asn > 1<<32-1 {
			return true, fmt.Errorf("bgp.asn: %d out of range 1..4294967294", *f.asn)
		}
		cfg.BGP.ASN = uint32(*f.asn)
	case "bgp-router-id":
		cfg.BGP.RouterID = *f.routerID
	case "bgp-listen-port":
		cfg.BGP.ListenPort = *f.port
	case "bgp-next-hop4":
		cfg.BGP.NextHop4 = *f.nh4
	case "bgp-next-hop6":
		cfg.BGP.NextHop6 = *f.nh6
	case "bgp-hold-time":
		cfg.BGP.HoldTime = *f.hold
	case "bgp-neighbors":
		ns, err := parseNeighbors(*f.neighbors)
		if err != nil {
			return true, err
		}
		cfg.BGP.Neighbors = ns
	case "check-interval":
		cfg.Health.Interval = *f.interval
	case "check-timeout":
		cfg.Health.Timeout = *f.timeout
	case "check-rise":
		cfg.Health.Rise = *f.rise
	case "check-fall":
		cfg.Health.Fall = *f.fall
	case "check-override-file":
		cfg.Health.OverrideFile = *f.override
	case "drain-timeout":
		cfg.DrainTimeout = *f.drain
	default:
		return false, nil
	}
	return true, nil
}

// parseNeighbors parses address=asn[:passive],...
func parseNeighbors(s string) ([]NeighborConfig, error) {
	var out []NeighborConfig
	for _, f := range splitList(s) {
		addr, rest, ok := strings.Cut(f, "=")
		if !ok {
			return nil, fmt.Errorf("bgp.neighbors: %q is not address=asn[:passive]", f)
		}
		asn, mode, _ := strings.Cut(rest, ":")
		n, err := strconv.ParseUint(strings.TrimSpace(asn), 10, 32)
		if err != nil {
			return nil, fmt.Errorf("bgp.neighbors: %q: asn %q is not a number", f, asn)
		}
		nc := NeighborConfig{Address: strings.TrimSpace(addr), ASN: uint32(n)}
		switch strings.TrimSpace(mode) {
		case "":
		case "passive":
			nc.Passive = true
		default:
			return nil, fmt.Errorf("bgp.neighbors: %q: %q is not passive", f, mode)
		}
		out = append(out, nc)
	}
	return out, nil
}

// validateHealth checks the health, announce, bgp and drain settings.
func (c *Config) validateHealth() error {
	if c.DrainTimeout < 0 || c.DrainTimeout > 24*time.Hour {
		return fmt.Errorf("drain_timeout: %s out of range 0..24h", c.DrainTimeout)
	}
	h := &c.Health
	to := h.Timeout
	if to == 0 {
		to = h.Interval
	}
	if err := validateCheckTiming("health", h.Interval, to, h.Rise, h.Fall); err != nil {
		return err
	}
	known := map[string]bool{checkTUN: true, checkPeers: true, checkJoin: true}
	names := []string{}
	for _, s := range c.Service {
		known[s.Name] = true
		names = append(names, s.Name)
	}
	names = append(names, checkTUN, checkPeers)
	seen := map[string]bool{}
	for i, cc := range h.Checks {
		field := fmt.Sprintf("health.checks[%d]", i)
		if !known[cc.Name] {
			return fmt.Errorf("%s.name: %q is not a check of this node (known: %s)", field, cc.Name, strings.Join(names, ", "))
		}
		if seen[cc.Name] {
			return fmt.Errorf("%s.name: %q listed twice", field, cc.Name)
		}
		seen[cc.Name] = true
		iv, to, r, f := cc.Interval, cc.Timeout, cc.Rise, cc.Fall
		if iv == 0 {
			iv = h.Interval
		}
		if to == 0 {
			to = h.Timeout
		}
		if to == 0 {
			to = iv
		}
		if r == 0 {
			r = h.Rise
		}
		if f == 0 {
			f = h.Fall
		}
		if err := validateCheckTiming(field, iv, to, r, f); err != nil {
			return err
		}
	}
	switch c.Announce {
	case announceNone:
		if len(c.BGP.Neighbors) > 0 {
			return errors.New("announce: none, but bgp.neighbors are configured (set announce: bgp)")
		}
		return nil
	case announceBGP:
		return c.BGP.validate(c)
	}
	return fmt.Errorf("announce: %q is not bgp or none", c.Announce)
}

func validateCheckTiming(field string, interval, timeout time.Duration, rise, fall int) error {
	switch {
	case interval < 10*time.Millisecond || interval > time.Hour:
		return fmt.Errorf("%s.interval: %s out of range 10ms..1h", field, interval)
	case timeout < time.Millisecond || timeout > time.Minute:
		return fmt.Errorf("%s.timeout: %s out of range 1ms..1m", field, timeout)
	case timeout > interval:
		return fmt.Errorf("%s.timeout: %s is longer than the interval %s", field, timeout, interval)
	case rise < 1 || rise > 100:
		return fmt.Errorf("%s.rise: %d out of range 1..100", field, rise)
	case fall < 1 || fall > 100:
		return fmt.Errorf("%s.fall: %d out of range 1..100", field, fall)
	}
	return nil
}

func (b *BGPConfig) validate(c *Config) error {
	if b.ASN == 0 || b.ASN == 1<<32-1 {
		return fmt.Errorf("bgp.asn: %d out of range 1..4294967294 (announce is bgp)", b.ASN)
	}
	if b.ListenPort < 1 || b.ListenPort > 65535 {
		return fmt.Errorf("bgp.listen_port: %d out of range 1..65535", b.ListenPort)
	}
	if b.HoldTime < 3*time.Second || b.HoldTime > 65535*time.Second {
		return fmt.Errorf("bgp.hold_time: %s out of range 3s..65535s", b.HoldTime)
	}
	if b.HoldTime%time.Second != 0 {
		return fmt.Errorf("bgp.hold_time: %s is not whole seconds", b.HoldTime)
	}
	parse := func(field, s string, want4 bool) (netip.Addr, error) {
		if s == "" {
			return netip.Addr{}, nil
		}
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" || a.Is4() != want4 || a.Is4In6() {
			kind := "IPv6"
			if want4 {
				kind = "IPv4"
			}
			return netip.Addr{}, fmt.Errorf("%s: %q is not an %s address", field, s, kind)
		}
		return a, nil
	}
	var err error
	if b.nextHop4, err = parse("bgp.next_hop4", b.NextHop4, true); err != nil {
		return err
	}
	if b.nextHop6, err = parse("bgp.next_hop6", b.NextHop6, false); err != nil {
		return err
	}
	if b.routerID, err = parse("bgp.router_id", b.RouterID, true); err != nil {
		return err
	}
	if !b.routerID.IsValid() {
		if !b.nextHop4.IsValid() {
			return errors.New("bgp.router_id: missing: give an IPv4 address (or bgp.next_hop4, which it defaults to)")
		}
		b.routerID = b.nextHop4
	}
	if len(b.Neighbors) == 0 {
		return errors.New("bgp.neighbors: none (announce is bgp)")
	}
	b.neighbors = b.neighbors[:0]
	v4session := false
	for i, n := range b.Neighbors {
		field := fmt.Sprintf("bgp.neighbors[%d]", i)
		a, err := netip.ParseAddr(n.Address)
		if err != nil || a.Zone() != "" || a.Is4In6() {
			return fmt.Errorf("%s.address: %q is not an IP address", field, n.Address)
		}
		for j, o := range b.neighbors {
			if o == a {
				return fmt.Errorf("%s.address: %s is bgp.neighbors[%d] already", field, a, j)
			}
		}
		if n.ASN == 0 || n.ASN == 1<<32-1 {
			return fmt.Errorf("%s.asn: %d out of range 1..4294967294", field, n.ASN)
		}
		v4session = v4session || a.Is4()
		b.neighbors = append(b.neighbors, a)
	}
	for _, p := range c.prefixes {
		if p.Addr().Is6() && !b.nextHop6.IsValid() && v4session {
			return fmt.Errorf("bgp.next_hop6: missing: needed to announce %s over IPv4 sessions", p)
		}
	}
	return nil
}
