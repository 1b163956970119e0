package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigErrors(t *testing.T) {
	base := []string{"-node", "n1", "-anycast", "192.0.2.1/32"}
	cases := []struct {
		name string
		args []string
		yaml string
		want string // substring of the one-line error
	}{
		{"no anycast", []string{"-node", "n1"}, "", "anycast: no prefix given"},
		{"invalid prefix", []string{"-anycast", "192.0.2.300/32"}, "", `anycast[0]: "192.0.2.300/32" is not a valid prefix`},
		{"missing length", []string{"-anycast", "192.0.2.1"}, "", "has no prefix length (did you mean 192.0.2.1/32?)"},
		{"host bits", []string{"-anycast", "192.0.2.1/24"}, "", "anycast[0]: 192.0.2.1/24 has host bits set (did you mean 192.0.2.0/24?)"},
		{"overlap", []string{"-anycast", "192.0.2.0/24,192.0.2.1/32"}, "", "anycast[1]: 192.0.2.1/32 overlaps anycast[0] 192.0.2.0/24"},
		{"overlap v6", []string{"-anycast", "2001:db8:a::/64,2001:db8:a::1/128"}, "", "anycast[1]: 2001:db8:a::1/128 overlaps anycast[0] 2001:db8:a::/64"},
		{"loopback", []string{"-anycast", "127.0.0.1/32"}, "", "anycast[0]: 127.0.0.1/32 is not a unicast address range"},
		{"too wide", []string{"-anycast", "10.0.0.0/7"}, "", "wider than a /8"},
		{"everything", []string{"-anycast", "0.0.0.0/0"}, "", "would take over every address"},
		{"bad port", []string{"-services", "http=70000"}, "", "services.http.port: 70000 out of range 1..65535"},
		{"port zero", []string{"-services", "echo=0"}, "", "services.echo.port: 0 out of range"},
		{"port not a number", []string{"-services", "echo=seven"}, "", `services.echo.port: "seven" is not a number`},
		{"port clash", []string{"-services", "echo=80,http=80"}, "", "services.http.port: tcp port 80 is already used by echo"},
		{"unknown service", []string{"-services", "gopher=70"}, "", `services: unknown service "gopher" (known: echo, http, stream, whoami)`},
		{"not name=port", []string{"-services", "echo"}, "", `services: "echo" is not name=port`},
		{"service twice", []string{"-services", "echo=7,echo=8"}, "", "services.echo: listed twice"},
		{"tun name long", []string{"-tun", "a-very-long-tun-name"}, "", `tun.name: "a-very-long-tun-name" is longer than 15 bytes`},
		{"mtu small", []string{"-mtu", "100"}, "", "tun.mtu: 100 out of range 576..65535"},
		{"mtu v6", []string{"-anycast", "2001:db8:a::1/128", "-mtu", "1000"}, "", "tun.mtu: 1000 out of range 1280..65535"},
		{"queues", []string{"-queues", "0"}, "", "tun.queues: 0 out of range 1..16"},
		{"lease short", []string{"-anycast", "192.0.2.1/32", "-lease", "1s"}, "", "cluster.lease: 1s out of range 1.5s..1m"},
		{"lease yaml", nil, "anycast: [192.0.2.1/32]\ncluster:\n  lease: 2m\n", "cluster.lease: 2m0s out of range 1.5s..1m"},
		{"admin relative", []string{"-admin", "unix:rel.sock"}, "", "admin: \"unix:rel.sock\" needs an absolute socket path"},
		{"admin garbage", []string{"-admin", "localhost"}, "", `admin: "localhost" is not host:port or unix:/path`},
		{"metrics unix", []string{"-metrics", "unix:/x"}, "", "metrics: \"unix:/x\": unix sockets are not supported here"},
		{"log level", []string{"-log-level", "loud"}, "", `log.level: "loud" is not one of trace, debug, info, warn, error`},
		{"extra arg", []string{"extra"}, "", `flags: unexpected argument "extra"`},
		{"unknown flag", []string{"-bogus"}, "", "flags: flag provided but not defined: -bogus"},
		{"yaml unknown key", nil, "node: n1\nanycast: [192.0.2.1/32]\nanycst: [x]\n", "field anycst not found"},
		{"yaml bad type", nil, "node: n1\nanycast: [192.0.2.1/32]\ntun: {mtu: big}\n", "cannot unmarshal"},
		{"yaml bad port", nil, "node: n1\nanycast: [192.0.2.1/32]\nservices: [{name: http, port: -1}]\n", "services.http.port: -1 out of range"},
		{"node spaces", []string{"-node", "n 1"}, "", `node: "n 1" must be at most 64 characters`},
		{"takeover policy", []string{"-takeover-policy", "stream=teleport"}, "", `cluster.takeover.stream: takeover policy "teleport": want migrate, forward or default`},
		{"takeover udp", []string{"-takeover-policy", "whoami=forward"}, "", "cluster.takeover.whoami: a udp service has no connections to take over"},
		{"takeover unknown", []string{"-takeover-policy", "gopher=forward"}, "", `cluster.takeover.gopher: services: unknown service "gopher"`},
		{"takeover not name=policy", []string{"-takeover-policy", "stream"}, "", `takeover-policy: "stream" is not name=policy`},
		{"yaml takeover", nil, "node: n1\nanycast: [192.0.2.1/32]\ncluster: {takeover: {echo: sideways}}\n", "cluster.takeover.echo"},
		{"replication mode", []string{"-replication-mode", "echo=eventually"}, "", `cluster.replication.echo: replication mode "eventually": want async or sync`},
		{"replication udp", []string{"-replication-mode", "whoami=sync"}, "", "cluster.replication.whoami: a udp service has no connections to replicate"},
		{"replication unknown", []string{"-replication-mode", "gopher=sync"}, "", `cluster.replication.gopher: services: unknown service "gopher"`},
		{"replication not name=mode", []string{"-replication-mode", "echo"}, "", `replication-mode: "echo" is not name=mode`},
		{"yaml replication", nil, "node: n1\nanycast: [192.0.2.1/32]\ncluster: {replication: {echo: Sync}}\n", `cluster.replication.echo: replication mode "Sync": want async or sync`},
		{"yaml replication standalone", nil, "node: n1\nanycast: [192.0.2.1/32]\ncluster: {replication: {echo: sync}}\n", "cluster.replication.echo: sync mode needs the peer network (cluster.listen)"},
		{"max flows", []string{"-max-flows", "0"}, "", "flows.max: 0 out of range 1..10000000"},
		{"max handshake over max", []string{"-max-flows", "100", "-max-handshake-flows", "101"}, "", "flows.max_handshake: 101 out of range 1..100 (flows.max)"},
		{"max handshake negative", []string{"-max-handshake-flows", "-1"}, "", "flows.max_handshake: -1 out of range 1..65536 (flows.max)"},
		{"yaml max handshake", nil, "node: n1\nanycast: [192.0.2.1/32]\nflows: {max: 10, max_handshake: 20}\n", "flows.max_handshake: 20 out of range 1..10 (flows.max)"},
		{"memory limit unit", []string{"-memory-limit", "256MB"}, "", `memory_limit: "256MB" is not a size (a whole number of bytes with an optional unit B, KiB, MiB, GiB or TiB, e.g. 256MiB)`},
		{"memory limit small", []string{"-memory-limit", "1MiB"}, "", "memory_limit: 1MiB is below 32MiB"},
		{"memory limit overflow", []string{"-memory-limit", "99999999999TiB"}, "", `memory_limit: "99999999999TiB" is not a size`},
		{"yaml memory limit", nil, "node: n1\nanycast: [192.0.2.1/32]\nmemory_limit: 1.5GiB\n", `memory_limit: "1.5GiB" is not a size`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append([]string(nil), base...), tc.args...)
			if tc.args == nil || strings.HasPrefix(tc.name, "no anycast") {
				args = tc.args
			}
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
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error spans lines: %q", err)
			}
		})
	}
}

func TestConfigFileAndFlagPrecedence(t *testing.T) {
	p := filepath.Join(t.TempDir(), "baton.yaml")
	yaml := `node: from-file
anycast: [192.0.2.1/32, "2001:db8:a::1/128"]
tun: {name: anyf, mtu: 9000, queues: 2}
services:
  - {name: stream, port: 9001}
  - {name: whoami, port: 5353}
metrics: "127.0.0.1:9999"
log: {level: debug, format: json}
`
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadConfig([]string{"-config", p, "-node", "from-flag", "-mtu", "1500"}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"node (flag wins)", cfg.Node, "from-flag"},
		{"mtu (flag wins)", cfg.TUN.MTU, 1500},
		{"tun name (file)", cfg.TUN.Name, "anyf"},
		{"queues (file)", cfg.TUN.Queues, 2},
		{"prefixes", len(cfg.prefixes), 2},
		{"services", formatServices(cfg.Service), "stream=9001,whoami=5353"},
		{"metrics", cfg.Metrics, "127.0.0.1:9999"},
		{"log", cfg.Log.Format, "json"},
		{"admin default", cfg.Admin, "unix:/run/baton/from-flag.sock"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestRunBadConfigExitsNonZero(t *testing.T) {
	var stderr bytes.Buffer
	code := run([]string{"-node", "n1", "-anycast", "192.0.2.1/33"}, &stderr)
	if code == 0 {
		t.Fatal("run succeeded with a bad prefix")
	}
	want := "batond: anycast[0]: \"192.0.2.1/33\" is not a valid prefix\n"
	if stderr.String() != want {
		t.Fatalf("stderr = %q, want %q", stderr.String(), want)
	}
}

func FuzzConfigYAML(f *testing.F) {
	f.Add([]byte("node: n1\nanycast: [192.0.2.1/32]\n"))
	f.Add([]byte("services: [{name: http, port: 80}]\ntun: {mtu: 1500}\n"))
	f.Add([]byte("anycast: [\"2001:db8::/64\", 192.0.2.0/24]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg := defaultConfig()
		if err := parseYAML(data, &cfg); err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error: %q", err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error: %q", err)
			}
			return
		}
		if len(cfg.prefixes) == 0 || cfg.TUN.MTU < 576 {
			t.Fatalf("invalid config accepted: %+v", cfg)
		}
	})
}
