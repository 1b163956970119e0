package main

// This file holds batond's configuration: the YAML file format, the flags
// that override it, and the validation that turns every mistake into one
// line naming the field.

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/baton-anycast/baton/stack/services"
)

// Config is batond's whole configuration. The YAML keys are the flag names.
type Config struct {
	Node    string          `yaml:"node"`
	Anycast []string        `yaml:"anycast"`
	TUN     TUNConfig       `yaml:"tun"`
	Service []ServiceConfig `yaml:"services"`
	Admin   string          `yaml:"admin"`
	Metrics string          `yaml:"metrics"`
	Pprof   bool            `yaml:"pprof"`
	Log     LogConfig       `yaml:"log"`
	Cluster ClusterConfig   `yaml:"cluster"`
	Flows   FlowsConfig     `yaml:"flows"`
	// Health checks, the announcer and draining (health_config.go).
	Health       HealthConfig  `yaml:"health"`
	Announce     string        `yaml:"announce"`
	BGP          BGPConfig     `yaml:"bgp"`
	DrainTimeout time.Duration `yaml:"drain_timeout"`
	// MemoryLimit is the Go runtime's soft memory limit, e.g. 256MiB
	// (memory.go); empty leaves the runtime's own (GOMEMLIMIT).
	MemoryLimit string `yaml:"memory_limit"`

	prefixes []netip.Prefix // parsed Anycast, filled by Validate
	memLimit int64          // parsed MemoryLimit in bytes (0: not set)
}

// TUNConfig is the TUN device.
type TUNConfig struct {
	Name       string `yaml:"name"`
	MTU        int    `yaml:"mtu"`
	Queues     int    `yaml:"queues"`
	TxQueueLen int    `yaml:"txqueuelen"`
	// Offload opens the TUN with a virtio header so gVisor's TCP can hand
	// the kernel 64 KiB segments (tun.Config.Offload). Flag -tun-offload.
	Offload bool `yaml:"offload"`
}

// ServiceConfig is one service on one port.
type ServiceConfig struct {
	Name string `yaml:"name"`
	Port int    `yaml:"port"`
}

// LogConfig is the logger.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug, info, warn, error
	Format string `yaml:"format"` // text or json
}

// defaultServices are the services a node serves when none are configured.
var defaultServices = []ServiceConfig{
	{Name: "stream", Port: 9000},
	{Name: "echo", Port: 7},
	{Name: "http", Port: 80},
	{Name: "whoami", Port: 53},
}

func defaultConfig() Config {
	host, _ := os.Hostname()
	return Config{
		Node: host,
		TUN:  TUNConfig{Name: "any0", MTU: 1500, Queues: 1, TxQueueLen: 1000},
		// Service ports: see defaultServices.
		Service: append([]ServiceConfig(nil), defaultServices...),
		Admin:   "", // set from the node name in Validate
		Metrics: "127.0.0.1:9470",
		Log:     LogConfig{Level: "info", Format: "text"},
		Cluster: ClusterConfig{Replicas: 2},
		Flows:   FlowsConfig{Max: 65536, IdleTimeout: 5 * time.Minute},

		Health:       defaultHealthConfig(),
		Announce:     announceNone,
		BGP:          defaultBGPConfig(),
		DrainTimeout: 30 * time.Second,
	}
}

// errUsage marks errors that should print the usage text.
var errUsage = errors.New("usage")

// loadConfig builds the configuration from defaults, then the YAML file named
// by -config, then the flags that were set explicitly (flags win).
func loadConfig(args []string, stderr io.Writer) (*Config, error) {
	cfg := defaultConfig()
	fs := flag.NewFlagSet("batond", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configPath = fs.String("config", "", "YAML configuration file (flags override it)")
		node       = fs.String("node", cfg.Node, "node name (shown to clients by whoami and http /whoami)")
		anycast    = fs.String("anycast", "", "comma-separated anycast prefixes to terminate, e.g. 192.0.2.1/32,2001:db8:a::1/128")
		tunName    = fs.String("tun", cfg.TUN.Name, "TUN interface name")
		mtu        = fs.Int("mtu", cfg.TUN.MTU, "TUN MTU in bytes")
		queues     = fs.Int("queues", cfg.TUN.Queues, "TUN queues (more than 1 enables multiqueue, one reader each)")
		txqlen     = fs.Int("txqueuelen", cfg.TUN.TxQueueLen, "kernel queue length of the TUN in packets")
		tunOffload = fs.Bool("tun-offload", cfg.TUN.Offload, "open the TUN with segmentation offload (IFF_VNET_HDR): TCP sends 64 KiB segments to the kernel")
		svcs       = fs.String("services", formatServices(cfg.Service), "services as name=port,... (known: "+strings.Join(serviceNames(), ", ")+")")
		admin      = fs.String("admin", "", "admin API address: unix:/path or host:port (default unix:/run/baton/<node>.sock)")
		metrics    = fs.String("metrics", cfg.Metrics, "Prometheus metrics listen address (empty disables)")
		pprof      = fs.Bool("pprof", false, "serve /debug/pprof on the metrics address")
		logLevel   = fs.String("log-level", cfg.Log.Level, "log level: trace (debug and GoBGP's messages), debug, info, warn, error")
		logFormat  = fs.String("log-format", cfg.Log.Format, "log format: text or json")
		memLimit   = fs.String("memory-limit", "", "soft memory limit of the Go runtime, e.g. 256MiB: the garbage collector works harder near it, nothing is refused (default: none, or GOMEMLIMIT)")
		cf         = registerClusterFlags(fs, &cfg)
		hf         = registerHealthFlags(fs, &cfg)
	)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, errUsage
		}
		return nil, fmt.Errorf("flags: %w", err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("flags: unexpected argument %q", fs.Arg(0))
	}
	if *configPath != "" {
		data, err := os.ReadFile(*configPath)
		if err != nil {
			return nil, fmt.Errorf("config: %v", err)
		}
		if err := parseYAML(data, &cfg); err != nil {
			return nil, fmt.Errorf("config %s: %w", *configPath, err)
		}
	}
	var ferr error
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "node":
			cfg.Node = *node
		case "anycast":
			cfg.Anycast = splitList(*anycast)
		case "tun":
			cfg.TUN.Name = *tunName
		case "mtu":
			cfg.TUN.MTU = *mtu
		case "queues":
			cfg.TUN.Queues = *queues
		case "txqueuelen":
			cfg.TUN.TxQueueLen = *txqlen
		case "tun-offload":
			cfg.TUN.Offload = *tunOffload
		case "services":
			s, err := parseServices(*svcs)
			if err != nil && ferr == nil {
				ferr = err
			}
			cfg.Service = s
		case "admin":
			cfg.Admin = *admin
		case "metrics":
			cfg.Metrics = *metrics
		case "pprof":
			cfg.Pprof = *pprof
		case "log-level":
			cfg.Log.Level = *logLevel
		case "log-format":
			cfg.Log.Format = *logFormat
		case "memory-limit":
			cfg.MemoryLimit = *memLimit
		default:
			if ok, err := hf.apply(f.Name, &cfg); ok {
				if err != nil && ferr == nil {
					ferr = err
				}
			} else if err := cf.apply(f.Name, &cfg); err != nil && ferr == nil {
				ferr = err
			}
		}
	})
	if ferr != nil {
		return nil, ferr
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// parseYAML decodes a config file strictly: an unknown key is an error that
// names it (a typo must not silently fall back to a default).
func parseYAML(data []byte, cfg *Config) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // empty file
		}
		// yaml.v3 lists every problem on its own line under a header
		// ("yaml: unmarshal errors:"); report the first problem.
		lines := strings.Split(strings.TrimPrefix(err.Error(), "yaml: "), "\n")
		msg := strings.TrimSpace(lines[0])
		if len(lines) > 1 && strings.HasSuffix(msg, ":") {
			msg = strings.TrimSpace(lines[1])
			if extra := len(lines) - 2; extra > 0 {
				msg += fmt.Sprintf(" (and %d more)", extra)
			}
		}
		return errors.New(msg)
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func formatServices(s []ServiceConfig) string {
	parts := make([]string, len(s))
	for i, sc := range s {
		parts[i] = sc.Name + "=" + strconv.Itoa(sc.Port)
	}
	return strings.Join(parts, ",")
}

// parseServices parses name=port,name=port. An empty string means no
// services.
func parseServices(s string) ([]ServiceConfig, error) {
	var out []ServiceConfig
	for _, f := range splitList(s) {
		name, port, ok := strings.Cut(f, "=")
		if !ok {
			return nil, fmt.Errorf("services: %q is not name=port", f)
		}
		p, err := strconv.Atoi(strings.TrimSpace(port))
		if err != nil {
			return nil, fmt.Errorf("services.%s.port: %q is not a number", strings.TrimSpace(name), port)
		}
		out = append(out, ServiceConfig{Name: strings.TrimSpace(name), Port: p})
	}
	return out, nil
}

// Validate checks every field and fills derived ones. The error names the
// field and the problem in one line.
func (c *Config) Validate() error {
	if c.Node == "" {
		return errors.New("node: empty name")
	}
	if len(c.Node) > 64 || strings.ContainsAny(c.Node, " \t\r\n/") {
		return fmt.Errorf("node: %q must be at most 64 characters without spaces or slashes", c.Node)
	}
	if len(c.Anycast) == 0 {
		return errors.New("anycast: no prefix given (e.g. --anycast 192.0.2.1/32)")
	}
	c.prefixes = c.prefixes[:0]
	for i, s := range c.Anycast {
		p, err := parseAnycastPrefix(s)
		if err != nil {
			return fmt.Errorf("anycast[%d]: %w", i, err)
		}
		for j, q := range c.prefixes {
			if p.Overlaps(q) {
				return fmt.Errorf("anycast[%d]: %s overlaps anycast[%d] %s", i, p, j, q)
			}
		}
		c.prefixes = append(c.prefixes, p)
	}
	if err := validateTUN(&c.TUN, c.prefixes); err != nil {
		return err
	}
	if err := validateServices(c.Service); err != nil {
		return err
	}
	if c.Admin == "" {
		c.Admin = "unix:/run/baton/" + c.Node + ".sock"
	}
	if err := validateAddr("admin", c.Admin, true); err != nil {
		return err
	}
	if c.Metrics != "" {
		if err := validateAddr("metrics", c.Metrics, false); err != nil {
			return err
		}
	} else if c.Pprof {
		return errors.New("pprof: needs a metrics address to serve on")
	}
	if err := c.Cluster.validate(c.Node, c.Admin); err != nil {
		return err
	}
	if err := c.Flows.validate(); err != nil {
		return err
	}
	if err := c.validateHealth(); err != nil {
		return err
	}
	if err := c.validateMemoryLimit(); err != nil {
		return err
	}
	switch c.Log.Level {
	case "trace", "debug", "info", "warn", "error":
	default:
		return fmt.Errorf("log.level: %q is not one of trace, debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "text", "json":
	default:
		return fmt.Errorf("log.format: %q is not text or json", c.Log.Format)
	}
	return nil
}

func parseAnycastPrefix(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(strings.TrimSpace(s))
	if err != nil {
		if a, aerr := netip.ParseAddr(strings.TrimSpace(s)); aerr == nil {
			return netip.Prefix{}, fmt.Errorf("%q has no prefix length (did you mean %s/%d?)", s, a, a.BitLen())
		}
		return netip.Prefix{}, fmt.Errorf("%q is not a valid prefix", s)
	}
	if p.Addr().Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("%q has a zone", s)
	}
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%s has host bits set (did you mean %s?)", p, p.Masked())
	}
	a := p.Addr()
	switch {
	case a.Is4In6():
		return netip.Prefix{}, fmt.Errorf("%s is an IPv4-mapped IPv6 prefix; write it as IPv4", p)
	case a.IsUnspecified() && p.Bits() == 0:
		return netip.Prefix{}, fmt.Errorf("%s would take over every address", p)
	case a.IsLoopback(), a.IsMulticast(), a.IsLinkLocalUnicast(), a.IsLinkLocalMulticast(), a.IsInterfaceLocalMulticast():
		return netip.Prefix{}, fmt.Errorf("%s is not a unicast address range that can be routed", p)
	case a.Is4() && p.Bits() < 8, a.Is6() && p.Bits() < 16:
		return netip.Prefix{}, fmt.Errorf("%s is wider than a /8 (IPv4) or /16 (IPv6)", p)
	}
	return p, nil
}

func validateTUN(t *TUNConfig, prefixes []netip.Prefix) error {
	if t.Name == "" {
		return errors.New("tun.name: empty")
	}
	if len(t.Name) > 15 {
		return fmt.Errorf("tun.name: %q is longer than 15 bytes", t.Name)
	}
	if strings.ContainsAny(t.Name, " /:\t\n") || t.Name == "." || t.Name == ".." {
		return fmt.Errorf("tun.name: %q is not a valid interface name", t.Name)
	}
	minMTU := 576
	for _, p := range prefixes {
		if p.Addr().Is6() {
			minMTU = 1280 // IPv6 requires it
		}
	}
	if t.MTU < minMTU || t.MTU > 65535 {
		return fmt.Errorf("tun.mtu: %d out of range %d..65535", t.MTU, minMTU)
	}
	if t.Queues < 1 || t.Queues > 16 {
		return fmt.Errorf("tun.queues: %d out of range 1..16", t.Queues)
	}
	if t.TxQueueLen < 0 || t.TxQueueLen > 1<<20 {
		return fmt.Errorf("tun.txqueuelen: %d out of range 0..1048576", t.TxQueueLen)
	}
	return nil
}

func validateServices(svcs []ServiceConfig) error {
	used := map[string]string{} // "tcp/80" -> service
	names := map[string]bool{}
	for _, s := range svcs {
		entry, err := services.Builtin().Lookup(s.Name)
		if err != nil {
			return err
		}
		proto := entry.Transport.String()
		if names[s.Name] {
			return fmt.Errorf("services.%s: listed twice", s.Name)
		}
		names[s.Name] = true
		if s.Port < 1 || s.Port > 65535 {
			return fmt.Errorf("services.%s.port: %d out of range 1..65535", s.Name, s.Port)
		}
		key := proto + "/" + strconv.Itoa(s.Port)
		if other, dup := used[key]; dup {
			return fmt.Errorf("services.%s.port: %s port %d is already used by %s", s.Name, proto, s.Port, other)
		}
		used[key] = s.Name
	}
	return nil
}

func serviceNames() []string { return services.Builtin().Names() }

func validateAddr(field, s string, unixOK bool) error {
	if strings.HasPrefix(s, "unix:") {
		if !unixOK {
			return fmt.Errorf("%s: %q: unix sockets are not supported here", field, s)
		}
		path := strings.TrimPrefix(s, "unix:")
		if path == "" || !strings.HasPrefix(path, "/") {
			return fmt.Errorf("%s: %q needs an absolute socket path", field, s)
		}
		if len(path) > 107 {
			return fmt.Errorf("%s: socket path is longer than 107 bytes", field)
		}
		return nil
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return fmt.Errorf("%s: %q is not host:port or unix:/path", field, s)
	}
	if ap.Port() == 0 {
		return fmt.Errorf("%s: %q needs a port", field, s)
	}
	return nil
}
