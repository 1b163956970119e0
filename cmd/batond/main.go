// Command batond is the Baton node: it terminates the anycast prefixes on a
// TUN device with Baton's userspace stack, serves the built-in services on
// them, and answers the admin API.
//
// Start-up order matters: device, stack, services, admin and metrics first;
// the anycast routes into the TUN next, so the kernel sends no traffic to the
// node before everything that must answer it is up; then the health checks
// and the announcer (health.go), which announces the prefixes only once
// every critical check passes. Shutdown (SIGTERM or SIGINT) is the reverse:
// withdraw the announcement, wait until the node owns no flow (or
// -drain-timeout), close the BGP sessions, then the routes, so no new
// packet arrives, then the stack. A node killed with SIGKILL leaves nothing
// behind: the TUN device and the routes through it vanish with the process,
// and its BGP sessions close with its sockets.
//
// batond itself is a thin main: configuration (config.go), the admin API
// (admin.go) and metrics (metrics.go). The packet path lives in tun/ and
// stack/.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/baton-anycast/baton/handoff"
	"github.com/baton-anycast/baton/health"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
	"github.com/baton-anycast/baton/tun"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// run is main without os.Exit, for tests. It returns the exit status.
func run(args []string, stderr io.Writer) int {
	cfg, err := loadConfig(args, stderr)
	if err != nil {
		if errors.Is(err, errUsage) {
			return 2
		}
		fmt.Fprintf(stderr, "batond: %v\n", err)
		return 2
	}
	log := newLogger(cfg.Log, stderr)
	applyMemoryLimit(cfg, log)
	d := &daemon{cfg: cfg, log: log, started: time.Now()}
	if err := d.start(); err != nil {
		d.stop()
		fmt.Fprintf(stderr, "batond: %v\n", err)
		return 1
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	status := 0
	select {
	case sig := <-sigs:
		log.Info("shutting down", "signal", sig.String())
		d.drainForShutdown(sigs)
	case <-d.st.Failed():
		log.Error("TUN device failed; shutting down", "err", d.st.Endpoint().ReadError())
		d.failHealth(d.st.Endpoint().ReadError().Error())
		status = 1
	}
	d.stop()
	log.Info("stopped")
	return status
}

func newLogger(c LogConfig, w io.Writer) *slog.Logger {
	var level slog.Level
	if c.Level == "trace" {
		level = health.LevelTrace
	} else {
		_ = level.UnmarshalText([]byte(c.Level))
	}
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// daemon is one running node.
type daemon struct {
	cfg     *Config
	log     *slog.Logger
	started time.Time
	state   nodeState

	dev    tun.Device
	st     *stack.Stack
	routes *tun.Routes

	tlsm        *handoff.TLSMaterial
	tracker     *handoff.Tracker
	stopTracker func()
	repl        *handoff.Replication
	engine      *handoff.Engine // the takeover engine, or nil (standalone)
	sync        *handoff.Sync   // sync replication mode, or nil

	health *healthParts

	admin        *grpc.Server
	adminCleanup func()
	metrics      *http.Server
}

// start brings the node up; on error the caller calls stop to undo what was
// done. Errors are one line naming the field or resource at fault.
func (d *daemon) start() error {
	cfg := d.cfg
	d.state.set(batonv1.NodeState_NODE_STATE_STARTING, "starting")
	if err := tun.CheckNetAdmin(); err != nil {
		return err
	}
	if v4, v6, err := tun.Forwarding(); err == nil {
		for _, p := range cfg.prefixes {
			if (p.Addr().Is4() && !v4) || (p.Addr().Is6() && !v6) {
				d.log.Warn("IP forwarding is off in this network namespace: the kernel will not forward anycast packets from the uplink into the TUN",
					"ipv4_forwarding", v4, "ipv6_forwarding", v6)
				break
			}
		}
	}
	dev, err := tun.Open(tun.Config{
		Name: cfg.TUN.Name, MTU: cfg.TUN.MTU, Queues: cfg.TUN.Queues, TxQueueLen: cfg.TUN.TxQueueLen,
		Offload: cfg.TUN.Offload,
	})
	if errors.Is(err, tun.ErrInUse) {
		return fmt.Errorf("tun.name: interface %s already exists (in use by another process?)", cfg.TUN.Name)
	}
	if err != nil {
		return err
	}
	d.dev = dev
	st, err := stack.New(dev, stack.Config{NodeName: cfg.Node, Prefixes: cfg.prefixes, Logger: d.log})
	if err != nil {
		dev.Close()
		d.dev = nil
		return err
	}
	d.st = st
	for _, sc := range cfg.Service {
		if err := d.addService(sc); err != nil {
			return err
		}
	}
	if err := d.loadTLS(); err != nil {
		return err
	}
	if err := d.startHandoff(); err != nil {
		return err
	}
	if err := d.setupHealth(); err != nil {
		return err
	}
	if err := d.startAdmin(); err != nil {
		return err
	}
	if err := d.startMetrics(); err != nil {
		return err
	}
	routes, err := tun.NewRoutes(cfg.TUN.Name)
	if err != nil {
		return err
	}
	d.routes = routes
	if err := d.routes.Add(cfg.prefixes...); err != nil {
		return err
	}
	if err := d.startHealth(); err != nil {
		return err
	}
	d.log.Info("started; announcing once healthy", "announce", cfg.Announce, "node", cfg.Node, "anycast", cfg.Anycast, "tun", cfg.TUN.Name,
		"mtu", cfg.TUN.MTU, "queues", cfg.TUN.Queues, "tun_offload", cfg.TUN.Offload, "services", formatServices(cfg.Service),
		"admin", cfg.Admin, "metrics", cfg.Metrics)
	return nil
}

func (d *daemon) addService(sc ServiceConfig) error {
	svc, err := services.Builtin().New(sc.Name, d.cfg.Node)
	if err != nil {
		return fmt.Errorf("services.%s: %v", sc.Name, err)
	}
	switch s := svc.(type) {
	case services.TCPService:
		err = d.st.ServeTCP(uint16(sc.Port), s)
	case services.UDPService:
		err = d.st.ServeUDP(uint16(sc.Port), s)
	default:
		err = fmt.Errorf("service %q is neither TCP nor UDP", sc.Name)
	}
	if err != nil {
		return fmt.Errorf("services.%s: %v", sc.Name, err)
	}
	return nil
}

func (d *daemon) startAdmin() error {
	l, cleanup, err := listenAdmin(d.cfg.Admin)
	if err != nil {
		return err
	}
	d.adminCleanup = cleanup
	d.admin = newAdminGRPC(d)
	d.state.set(batonv1.NodeState_NODE_STATE_STARTING, "starting")
	go func() {
		if err := d.admin.Serve(l); err != nil {
			d.log.Error("admin server stopped", "err", err)
		}
	}()
	return nil
}

// debugFlow serves the takeover engine's view of one flow
// (/debug/flow?key=CLIENT->ANYCAST, as batonctl prints keys).
func (d *daemon) debugFlow(w http.ResponseWriter, r *http.Request) {
	k, err := handoff.ParseFlowKey(r.URL.Query().Get("key"))
	if err != nil {
		http.Error(w, "key: "+err.Error(), http.StatusBadRequest)
		return
	}
	if d.engine == nil {
		http.Error(w, "no takeover engine (a standalone node)", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = io.WriteString(w, d.engine.DebugFlow(k))
}

func (d *daemon) startMetrics() error {
	if d.cfg.Metrics == "" {
		return nil
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(newNodeCollector(d))
	reg.MustRegister(d.handoffCollectors()...)
	reg.MustRegister(newHealthCollector(d))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/debug/flow", d.debugFlow)
	if d.cfg.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	l, err := net.Listen("tcp", d.cfg.Metrics)
	if err != nil {
		return fmt.Errorf("metrics: %v", err)
	}
	d.metrics = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := d.metrics.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("metrics server stopped", "err", err)
		}
	}()
	return nil
}

// stop undoes start in reverse order; it is safe on a partly started daemon.
func (d *daemon) stop() {
	d.stopHealth()
	d.state.set(batonv1.NodeState_NODE_STATE_STOPPING, "stopping")
	if d.routes != nil {
		if err := d.routes.Remove(); err != nil {
			d.log.Error("removing anycast routes", "err", err)
		}
	}
	d.stopHandoff()
	if d.st != nil {
		d.st.Close() // closes the device too
	} else if d.dev != nil {
		d.dev.Close()
	}
	if d.metrics != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = d.metrics.Shutdown(ctx)
		cancel()
	}
	if d.admin != nil {
		stopped := make(chan struct{})
		go func() { d.admin.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(2 * time.Second):
			d.admin.Stop()
		}
	}
	if d.adminCleanup != nil {
		d.adminCleanup()
	}
}

func umask(m int) int { return syscall.Umask(m) }

func errorf(format string, args ...any) error { return fmt.Errorf(format, args...) }
