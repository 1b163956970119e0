package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestHealthConfigErrors(t *testing.T) {
	base := []string{"-node", "n1", "-anycast", "192.0.2.1/32,2001:db8:a::1/128"}
	bgp := []string{"-announce", "bgp", "-bgp-asn", "64512", "-bgp-next-hop4", "203.0.113.2",
		"-bgp-next-hop6", "2001:db8:200:1::2", "-bgp-neighbors", "203.0.113.1=64512:passive"}
	with := func(over ...string) []string { return append(append([]string(nil), bgp...), over...) }
	cases := []struct {
		name string
		args []string
		yaml string
		want string
	}{
		{"announce", []string{"-announce", "ospf"}, "", `announce: "ospf" is not bgp or none`},
		{"none with neighbors", []string{"-bgp-neighbors", "203.0.113.1=64512"}, "", "announce: none, but bgp.neighbors are configured"},
		{"asn missing", []string{"-announce", "bgp", "-bgp-neighbors", "203.0.113.1=64512"}, "", "bgp.asn: 0 out of range 1..4294967294 (announce is bgp)"},
		{"asn too big", with("-bgp-asn", "4294967296"), "", "bgp.asn: 4294967296 out of range"},
		{"router id", with("-bgp-router-id", "2001:db8::1"), "", `bgp.router_id: "2001:db8::1" is not an IPv4 address`},
		{"router id missing", []string{"-announce", "bgp", "-bgp-asn", "1", "-bgp-neighbors", "203.0.113.1=1", "-bgp-next-hop6", "2001:db8::2"}, "", "bgp.router_id: missing"},
		{"next hop 4", with("-bgp-next-hop4", "2001:db8::1"), "", `bgp.next_hop4: "2001:db8::1" is not an IPv4 address`},
		{"next hop 6", with("-bgp-next-hop6", "203.0.113.2"), "", `bgp.next_hop6: "203.0.113.2" is not an IPv6 address`},
		{"next hop 6 missing", with("-bgp-next-hop6", ""), "", "bgp.next_hop6: missing: needed to announce 2001:db8:a::1/128 over IPv4 sessions"},
		{"no neighbors", with("-bgp-neighbors", ""), "", "bgp.neighbors: none (announce is bgp)"},
		{"neighbor syntax", with("-bgp-neighbors", "203.0.113.1"), "", `bgp.neighbors: "203.0.113.1" is not address=asn[:passive]`},
		{"neighbor mode", with("-bgp-neighbors", "203.0.113.1=1:active"), "", `is not passive`},
		{"neighbor address", with("-bgp-neighbors", "router=64512"), "", `bgp.neighbors[0].address: "router" is not an IP address`},
		{"neighbor twice", with("-bgp-neighbors", "203.0.113.1=1,203.0.113.1=2"), "", "bgp.neighbors[1].address: 203.0.113.1 is bgp.neighbors[0] already"},
		{"neighbor asn", with("-bgp-neighbors", "203.0.113.1=0"), "", "bgp.neighbors[0].asn: 0 out of range"},
		{"hold time", with("-bgp-hold-time", "2s"), "", "bgp.hold_time: 2s out of range 3s..65535s"},
		{"hold time fraction", with("-bgp-hold-time", "3500ms"), "", "bgp.hold_time: 3.5s is not whole seconds"},
		{"listen port", with("-bgp-listen-port", "0"), "", "bgp.listen_port: 0 out of range 1..65535"},
		{"interval", []string{"-check-interval", "1ms"}, "", "health.interval: 1ms out of range 10ms..1h"},
		{"timeout over interval", []string{"-check-timeout", "2s"}, "", "health.timeout: 2s is longer than the interval 1s"},
		{"check timeout over its interval", nil, "health: {checks: [{name: http, interval: 100ms}], timeout: 500ms, interval: 1s}\n",
			"health.checks[0].timeout: 500ms is longer than the interval 100ms"},
		{"rise", []string{"-check-rise", "0"}, "", "health.rise: 0 out of range 1..100"},
		{"fall", []string{"-check-fall", "101"}, "", "health.fall: 101 out of range 1..100"},
		{"drain", []string{"-drain-timeout", "-1s"}, "", "drain_timeout: -1s out of range 0..24h"},
		{"unknown check", nil, "health: {checks: [{name: gopher}]}\n", `health.checks[0].name: "gopher" is not a check of this node (known: stream, echo, http, whoami, tun, peers)`},
		{"check twice", nil, "health: {checks: [{name: tun}, {name: tun}]}\n", `health.checks[1].name: "tun" listed twice`},
		{"check fall", nil, "health: {checks: [{name: http, fall: -2}]}\n", "health.checks[0].fall: -2 out of range 1..100"},
		{"yaml neighbor", nil, "announce: bgp\nbgp: {asn: 64512, next_hop4: 203.0.113.2, next_hop6: '2001:db8::2', neighbors: [{address: 203.0.113.1}]}\n",
			"bgp.neighbors[0].asn: 0 out of range"},
		{"yaml unknown bgp key", nil, "bgp: {asm: 1}\n", "field asm not found"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append([]string(nil), base...), tc.args...)
			if tc.yaml != "" {
				p := filepath.Join(t.TempDir(), "baton.yaml")
				if err := os.WriteFile(p, []byte(tc.yaml), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append([]string{"-config", p}, args...)
			}
			_, err := loadConfig(args, &bytes.Buffer{})
			if err == nil {
				t.Fatalf("loadConfig(%q) succeeded, want error containing %q", args, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q, want one line containing %q", err, tc.want)
			}
		})
	}
}

func TestHealthConfigFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "baton.yaml")
	yaml := `node: edge1
anycast: [192.0.2.1/32, "2001:db8:a::1/128"]
announce: bgp
bgp:
  asn: 64512
  router_id: 203.0.113.2
  listen_port: 1179
  next_hop4: 203.0.113.2
  next_hop6: "2001:db8:200:1::2"
  hold_time: 9s
  neighbors:
    - {address: 203.0.113.1, asn: 64512, passive: true}
    - {address: "2001:db8:200:1::1", asn: 64513}
health:
  interval: 500ms
  rise: 3
  checks:
    - {name: http, interval: 200ms, timeout: 100ms, fall: 5}
    - {name: echo, disabled: true}
drain_timeout: 1m
`
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig([]string{"-config", p, "-check-fall", "4", "-drain-timeout", "0"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	b := cfg.BGP
	checks := []struct {
		name      string
		got, want any
	}{
		{"announce", cfg.Announce, "bgp"},
		{"asn", b.ASN, uint32(64512)},
		{"router id", b.routerID.String(), "203.0.113.2"},
		{"port", b.ListenPort, 1179},
		{"hold", b.HoldTime, 9 * time.Second},
		{"neighbors", len(b.Neighbors), 2},
		{"passive", b.Neighbors[0].Passive && !b.Neighbors[1].Passive, true},
		{"neighbor 6", b.neighbors[1].String(), "2001:db8:200:1::1"},
		{"interval (file)", cfg.Health.Interval, 500 * time.Millisecond},
		{"timeout (default: the interval)", cfg.Health.Timeout, time.Duration(0)},
		{"rise (file)", cfg.Health.Rise, 3},
		{"fall (flag)", cfg.Health.Fall, 4},
		{"drain (flag wins)", cfg.DrainTimeout, time.Duration(0)},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestHealthDefaults(t *testing.T) {
	cfg, err := loadConfig([]string{"-node", "n1", "-anycast", "192.0.2.1/32"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Announce != "none" || cfg.DrainTimeout != 30*time.Second || cfg.Health.Rise != 2 || cfg.Health.Fall != 3 ||
		cfg.Health.Interval != time.Second || cfg.BGP.ListenPort != 179 || cfg.BGP.HoldTime != 90*time.Second {
		t.Fatalf("defaults: announce %s drain %s health %+v bgp port %d hold %s", cfg.Announce, cfg.DrainTimeout,
			cfg.Health, cfg.BGP.ListenPort, cfg.BGP.HoldTime)
	}
}
