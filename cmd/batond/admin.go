package main

// This file serves the admin API (proto/baton/v1/admin.proto) plus the
// standard grpc.health.v1 service and server reflection, so grpcurl works
// against a node without a copy of the .proto files.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// nodeState is the daemon's serving state, shared with the admin API.
type nodeState struct {
	mu       sync.Mutex
	state    batonv1.NodeState
	problems []string
	health   *health.Server
}

func (s *nodeState) set(st batonv1.NodeState, problems ...string) {
	s.mu.Lock()
	s.state = st
	s.problems = problems
	s.mu.Unlock()
	if s.health != nil {
		status := healthpb.HealthCheckResponse_NOT_SERVING
		if st == batonv1.NodeState_NODE_STATE_SERVING {
			status = healthpb.HealthCheckResponse_SERVING
		}
		s.health.SetServingStatus("", status)
		s.health.SetServingStatus(batonv1.Admin_ServiceDesc.ServiceName, status)
	}
}

func (s *nodeState) get() (batonv1.NodeState, []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state, append([]string(nil), s.problems...)
}

// adminServer implements batonv1.AdminServer.
type adminServer struct {
	batonv1.UnimplementedAdminServer
	d *daemon
}

// Health implements batonv1.AdminServer.Health.
func (a *adminServer) Health(ctx context.Context, _ *batonv1.HealthRequest) (*batonv1.HealthResponse, error) {
	st, problems := a.d.state.get()
	resp := &batonv1.HealthResponse{
		Node:            a.d.cfg.Node,
		State:           st,
		Problems:        problems,
		Version:         version,
		StartedUnixNano: a.d.started.UnixNano(),
		Anycast:         a.d.cfg.Anycast,
		Tun:             a.d.cfg.TUN.Name,
	}
	a.d.fillHealth(ctx, resp)
	return resp, nil
}

// Stats implements batonv1.AdminServer.Stats.
func (a *adminServer) Stats(context.Context, *batonv1.StatsRequest) (*batonv1.StatsResponse, error) {
	d := a.d
	ds := d.dev.Stats()
	ls := d.st.Endpoint().Stats()
	rs := d.st.Refused()
	resp := &batonv1.StatsResponse{
		Node:       d.cfg.Node,
		UptimeNano: int64(time.Since(d.started)),
		Device: &batonv1.DeviceStats{
			Name: d.dev.Name(), Mtu: uint32(d.dev.MTU()), Queues: uint32(d.dev.Queues()),
			RxPackets: ds.RxPackets, RxBytes: ds.RxBytes, TxPackets: ds.TxPackets, TxBytes: ds.TxBytes,
			RxErrors: ds.RxErrors, TxErrors: ds.TxErrors,
			KernelTxDropped: ds.KernelTxDropped, KernelRxDropped: ds.KernelRxDropped,
		},
		Link: &batonv1.LinkStats{
			RxPackets: ls.RxPackets, RxBytes: ls.RxBytes, TxPackets: ls.TxPackets, TxBytes: ls.TxBytes,
			RxConsumed: ls.RxConsumed, TxConsumed: ls.TxConsumed, RxNotIp: ls.RxNotIP,
			TxErrors: ls.TxErrors, Injected: ls.Injected,
		},
		Refused: &batonv1.RefusedStats{
			TcpNoService: rs.TCPNoService, TcpHandshakeFailed: rs.TCPHandshakeFail,
			UdpNoService: rs.UDPNoService, UdpSessionsFull: rs.UDPSessionsFull,
		},
	}
	svcs := d.st.ServiceStats()
	sort.Slice(svcs, func(i, j int) bool { return svcs[i].Name < svcs[j].Name })
	for _, s := range svcs {
		resp.Services = append(resp.Services, &batonv1.ServiceStats{
			Name: s.Name, Proto: s.Proto, Port: uint32(s.Port), Accepted: s.Accepted,
			Active: s.Active, BytesIn: s.BytesIn, BytesOut: s.BytesOut,
		})
	}
	drops := d.st.Endpoint().HookDrops()
	names := make([]string, 0, len(drops))
	for n := range drops {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		resp.HookDrops = append(resp.HookDrops, &batonv1.HookDrops{Hook: n, Inbound: drops[n][0], Outbound: drops[n][1]})
	}
	return resp, nil
}

// listenAdmin opens the admin listener. A unix socket is created with mode
// 0600 (only root may use it); a stale socket file left by a killed daemon
// is replaced, but a socket another live daemon answers on is not.
func listenAdmin(addr string) (net.Listener, func(), error) {
	path, isUnix := strings.CutPrefix(addr, "unix:")
	if !isUnix {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, nil, fmt.Errorf("admin: %v", err)
		}
		return l, func() {}, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, nil, fmt.Errorf("admin: %v", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, nil, fmt.Errorf("admin: %s is in use by a running process", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, nil, fmt.Errorf("admin: %v", err)
	}
	// Create the socket with no group/other permissions from the start, so
	// there is no window in which another user could connect.
	old := umask(0o177)
	l, err := net.Listen("unix", path)
	umask(old)
	if err != nil {
		return nil, nil, fmt.Errorf("admin: %v", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, nil, fmt.Errorf("admin: %v", err)
	}
	return l, func() { os.Remove(path) }, nil
}

// newAdminGRPC builds the gRPC server with the admin, health and reflection
// services.
func newAdminGRPC(d *daemon) *grpc.Server {
	opts := []grpc.ServerOption{grpc.MaxRecvMsgSize(1 << 20)}
	if !strings.HasPrefix(d.cfg.Admin, "unix:") {
		// On TCP the admin API requires a client certificate from the
		// cluster CA (mutual TLS); config validation made sure the
		// material exists.
		opts = append(opts, grpc.Creds(credentials.NewTLS(d.tlsm.Server)))
	}
	srv := grpc.NewServer(opts...)
	batonv1.RegisterAdminServer(srv, &adminServer{d: d})
	d.state.health = health.NewServer()
	healthpb.RegisterHealthServer(srv, d.state.health)
	reflection.Register(srv)
	return srv
}
