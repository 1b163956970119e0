package main

// This file holds the cluster part of batond's configuration: the peer
// network (who the other nodes are, where they listen, how they
// authenticate) and the flow table bounds.

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/baton-anycast/baton/handoff"
	"github.com/baton-anycast/baton/stack/services"
)

// ClusterConfig is the peer network.
type ClusterConfig struct {
	// Listen is the peer gRPC address (host:port); empty disables the peer
	// network (a standalone node).
	Listen string `yaml:"listen"`
	// Peers are the other nodes (static membership).
	Peers []PeerConfig `yaml:"peers"`
	// Replicas is how many peers hold each flow's state (k).
	Replicas int `yaml:"replicas"`
	// TLS is the node's certificate, key and the cluster CA (mutual TLS).
	TLS TLSConfig `yaml:"tls"`
	// Insecure runs the peer network without TLS: for debugging only.
	Insecure bool `yaml:"insecure"`
	// Takeover is the takeover policy per service name: "migrate" (claim
	// a flow from its live owner and continue it here), "forward" (tunnel
	// its packets to the owner) or "default" (migrate for services that
	// can resume connections, forward for the others).
	Takeover map[string]string `yaml:"takeover"`
	// Replication is the replication mode per service name: "async" (the
	// default: state follows the packets) or "sync" (output commit: a
	// flow's outbound packets wait until its replicas hold the state they
	// reveal, so a crash takeover is lossless; see handoff/sync.go).
	Replication map[string]string `yaml:"replication"`
	// Lease is how long this node keeps sending for its flows after a
	// majority of the cluster last acknowledged it, and how long peers wait
	// (plus a margin) before taking over a peer they cannot reach but did
	// not find dead (handoff/lease.go). 0: handoff.DefaultLease.
	Lease time.Duration `yaml:"lease"`
}

// PeerConfig is one other node.
type PeerConfig struct {
	Name    string `yaml:"name"`
	Address string `yaml:"address"`
}

// TLSConfig names PEM files.
type TLSConfig struct {
	CA   string `yaml:"ca"`
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// FlowsConfig bounds the flow table.
type FlowsConfig struct {
	// Max is the number of flows tracked (and replicated); flows past it
	// are served but not tracked.
	Max int `yaml:"max"`
	// MaxHandshake bounds the tracked flows still in the handshake (SYN
	// seen, not acked), within Max, so that a SYN flood cannot fill the
	// table: when it is reached, a new SYN evicts the oldest half-open
	// flow. 0 means a quarter of Max (handoff.DefaultMaxHandshaking).
	MaxHandshake int `yaml:"max_handshake"`
	// IdleTimeout removes flows that saw no packet for this long.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// MaxReplicas is the number of other nodes' flows held as replicas.
	MaxReplicas int `yaml:"max_replicas"`
}

type clusterFlags struct {
	listen, peers, ca, cert, key *string
	takeover, replMode           *string
	replicas, maxFlows, maxHS    *int
	insecure                     *bool
	idle, lease                  *time.Duration
}

func registerClusterFlags(fs *flag.FlagSet, cfg *Config) *clusterFlags {
	return &clusterFlags{
		listen:   fs.String("peer-listen", "", "peer gRPC listen address host:port (empty: standalone node)"),
		peers:    fs.String("peers", "", "other nodes as name=host:port,..."),
		replicas: fs.Int("replicas", cfg.Cluster.Replicas, "peers that hold each flow's state"),
		ca:       fs.String("tls-ca", "", "cluster CA certificate (PEM) for peers and TCP admin"),
		cert:     fs.String("tls-cert", "", "this node's certificate (PEM); its name must be the node name"),
		key:      fs.String("tls-key", "", "this node's private key (PEM)"),
		insecure: fs.Bool("peer-insecure", false, "peer network without TLS (debugging only: anyone can inject flow state)"),
		takeover: fs.String("takeover-policy", "", "takeover policy per service as name=migrate|forward|default,... (default: migrate for services that can resume, forward for others)"),
		replMode: fs.String("replication-mode", "", "replication mode per service as name=async|sync,... (default async; sync holds output until replicas have the state)"),
		maxFlows: fs.Int("max-flows", cfg.Flows.Max, "flows tracked and replicated; more are served untracked"),
		maxHS:    fs.Int("max-handshake-flows", cfg.Flows.MaxHandshake, "tracked flows still in the handshake, within -max-flows; a new SYN beyond evicts the oldest (0: a quarter of -max-flows)"),
		idle:     fs.Duration("flow-idle-timeout", cfg.Flows.IdleTimeout, "forget flows idle this long"),
		lease:    fs.Duration("lease", cfg.Cluster.Lease, "lease: a node cut off from a majority for this long stops sending for its flows, and peers take over an unreachable (not dead) node only after it (0: 3s)"),
	}
}

// apply copies an explicitly set flag into cfg.
func (f *clusterFlags) apply(name string, cfg *Config) error {
	switch name {
	case "peer-listen":
		cfg.Cluster.Listen = *f.listen
	case "peers":
		peers, err := parsePeers(*f.peers)
		if err != nil {
			return err
		}
		cfg.Cluster.Peers = peers
	case "replicas":
		cfg.Cluster.Replicas = *f.replicas
	case "tls-ca":
		cfg.Cluster.TLS.CA = *f.ca
	case "tls-cert":
		cfg.Cluster.TLS.Cert = *f.cert
	case "tls-key":
		cfg.Cluster.TLS.Key = *f.key
	case "peer-insecure":
		cfg.Cluster.Insecure = *f.insecure
	case "takeover-policy":
		m := map[string]string{}
		for _, kv := range splitList(*f.takeover) {
			name, pol, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("takeover-policy: %q is not name=policy", kv)
			}
			m[strings.TrimSpace(name)] = strings.TrimSpace(pol)
		}
		cfg.Cluster.Takeover = m
	case "replication-mode":
		m := map[string]string{}
		for _, kv := range splitList(*f.replMode) {
			name, mode, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("replication-mode: %q is not name=mode", kv)
			}
			m[strings.TrimSpace(name)] = strings.TrimSpace(mode)
		}
		cfg.Cluster.Replication = m
	case "max-flows":
		cfg.Flows.Max = *f.maxFlows
	case "max-handshake-flows":
		cfg.Flows.MaxHandshake = *f.maxHS
	case "flow-idle-timeout":
		cfg.Flows.IdleTimeout = *f.idle
	case "lease":
		cfg.Cluster.Lease = *f.lease
	}
	return nil
}

func parsePeers(s string) ([]PeerConfig, error) {
	var out []PeerConfig
	for _, f := range splitList(s) {
		name, addr, ok := strings.Cut(f, "=")
		if !ok {
			return nil, fmt.Errorf("peers: %q is not name=host:port", f)
		}
		out = append(out, PeerConfig{Name: strings.TrimSpace(name), Address: strings.TrimSpace(addr)})
	}
	return out, nil
}

func (c *ClusterConfig) validate(self, admin string) error {
	if c.Listen == "" {
		if len(c.Peers) > 0 {
			return errors.New("cluster.listen: peers are configured but no peer listen address")
		}
	} else if err := validateAddr("cluster.listen", c.Listen, false); err != nil {
		return err
	}
	if c.Replicas < 1 || c.Replicas > 16 {
		return fmt.Errorf("cluster.replicas: %d out of range 1..16", c.Replicas)
	}
	if c.Lease != 0 && (c.Lease < 1500*time.Millisecond || c.Lease > time.Minute) {
		return fmt.Errorf("cluster.lease: %s out of range 1.5s..1m (heartbeats go every second)", c.Lease)
	}
	for name, pol := range c.Takeover {
		e, err := services.Builtin().Lookup(name)
		if err != nil {
			return fmt.Errorf("cluster.takeover.%s: %v", name, err)
		}
		if e.Transport != services.TCP {
			return fmt.Errorf("cluster.takeover.%s: a %s service has no connections to take over", name, e.Transport)
		}
		if _, err := handoff.ParsePolicy(pol); err != nil {
			return fmt.Errorf("cluster.takeover.%s: %v", name, err)
		}
	}
	for name, mode := range c.Replication {
		e, err := services.Builtin().Lookup(name)
		if err != nil {
			return fmt.Errorf("cluster.replication.%s: %v", name, err)
		}
		if e.Transport != services.TCP {
			return fmt.Errorf("cluster.replication.%s: a %s service has no connections to replicate", name, e.Transport)
		}
		if mode != "sync" && mode != "async" {
			return fmt.Errorf("cluster.replication.%s: replication mode %q: want async or sync", name, mode)
		}
		if mode == "sync" && c.Listen == "" {
			return fmt.Errorf("cluster.replication.%s: sync mode needs the peer network (cluster.listen)", name)
		}
	}
	seen := map[string]bool{self: true}
	for i, p := range c.Peers {
		if p.Name == "" || len(p.Name) > 64 || strings.ContainsAny(p.Name, " \t/") {
			return fmt.Errorf("cluster.peers[%d].name: %q is not a node name", i, p.Name)
		}
		if p.Name == self {
			return fmt.Errorf("cluster.peers[%d].name: %q is this node itself", i, p.Name)
		}
		if seen[p.Name] {
			return fmt.Errorf("cluster.peers[%d].name: %q listed twice", i, p.Name)
		}
		seen[p.Name] = true
		if _, err := netip.ParseAddrPort(p.Address); err != nil {
			return fmt.Errorf("cluster.peers[%d].address: %q is not ip:port", i, p.Address)
		}
	}
	needTLS := (c.Listen != "" && !c.Insecure) || !strings.HasPrefix(admin, "unix:")
	if c.Insecure && (c.TLS.CA != "" || c.TLS.Cert != "" || c.TLS.Key != "") {
		return errors.New("cluster.insecure: set together with TLS files; pick one")
	}
	if needTLS {
		for _, f := range []struct{ field, path string }{
			{"cluster.tls.ca", c.TLS.CA}, {"cluster.tls.cert", c.TLS.Cert}, {"cluster.tls.key", c.TLS.Key},
		} {
			if f.path == "" {
				why := "the peer network needs mutual TLS (or -peer-insecure)"
				if !strings.HasPrefix(admin, "unix:") {
					why = "a TCP admin address needs mutual TLS"
				}
				return fmt.Errorf("%s: missing: %s", f.field, why)
			}
			if _, err := os.Stat(f.path); err != nil {
				return fmt.Errorf("%s: %v", f.field, err)
			}
		}
	}
	return nil
}

func (f *FlowsConfig) validate() error {
	if f.Max < 1 || f.Max > 10_000_000 {
		return fmt.Errorf("flows.max: %d out of range 1..10000000", f.Max)
	}
	if f.MaxHandshake == 0 {
		f.MaxHandshake = handoff.DefaultMaxHandshaking(f.Max)
	}
	if f.MaxHandshake < 1 || f.MaxHandshake > f.Max {
		return fmt.Errorf("flows.max_handshake: %d out of range 1..%d (flows.max)", f.MaxHandshake, f.Max)
	}
	if f.IdleTimeout < time.Second || f.IdleTimeout > 24*time.Hour {
		return fmt.Errorf("flows.idle_timeout: %s out of range 1s..24h", f.IdleTimeout)
	}
	if f.MaxReplicas == 0 {
		f.MaxReplicas = 4 * f.Max
	}
	if f.MaxReplicas < 1 || f.MaxReplicas > 40_000_000 {
		return fmt.Errorf("flows.max_replicas: %d out of range 1..40000000", f.MaxReplicas)
	}
	return nil
}
