package health

// This file is the bgp announcer: an embedded GoBGP speaker (no gRPC API,
// no zebra, no routes installed anywhere) that announces the anycast
// prefixes to the configured neighbors with the node's address as next
// hop, and withdraws them on request.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	api "github.com/osrg/gobgp/v3/api"
	gobgplog "github.com/osrg/gobgp/v3/pkg/log"
	"github.com/osrg/gobgp/v3/pkg/server"
	"google.golang.org/protobuf/types/known/anypb"
)

// BGPNeighbor is one BGP peer (a router).
type BGPNeighbor struct {
	Address netip.Addr
	ASN     uint32
	// Passive: never dial the neighbor, wait for it to connect. GoBGP
	// waits 5-10 s before its first dial and retries no faster than every
	// 5 s, so a router that dials is much quicker to (re)establish.
	Passive bool
}

// BGPConfig configures the bgp announcer.
type BGPConfig struct {
	// ASN is the node's autonomous system number.
	ASN uint32
	// RouterID is the node's BGP identifier (an IPv4 address).
	RouterID netip.Addr
	// ListenPort is where the speaker accepts sessions (179); passive
	// neighbors need it.
	ListenPort int
	// NextHop4 and NextHop6 are the next hops of the IPv4 and IPv6
	// prefixes. An invalid NextHop4 means the session's local address
	// (GoBGP fills it in); NextHop6 is required to announce IPv6 prefixes
	// over IPv4 sessions.
	NextHop4, NextHop6 netip.Addr
	// HoldTime is proposed to every neighbor (keepalives every third of
	// it); 0 means 90 s.
	HoldTime  time.Duration
	Neighbors []BGPNeighbor
	// Families to negotiate: IPv4 and/or IPv6 unicast (true = on).
	IPv4, IPv6 bool
	Logger     *slog.Logger
}

// BGP is the bgp announcer.
type BGP struct {
	cfg BGPConfig
	log *slog.Logger

	mu      sync.Mutex
	srv     *server.BgpServer
	started bool
	paths   map[netip.Prefix]*bgpPath
}

type bgpPath struct {
	uuid    []byte
	nextHop netip.Addr
	since   time.Time
}

// NewBGP returns a bgp announcer; Start opens the sessions.
func NewBGP(cfg BGPConfig) (*BGP, error) {
	if cfg.ASN == 0 {
		return nil, errors.New("bgp: no ASN")
	}
	if !cfg.RouterID.Is4() {
		return nil, fmt.Errorf("bgp: router id %v is not an IPv4 address", cfg.RouterID)
	}
	if len(cfg.Neighbors) == 0 {
		return nil, errors.New("bgp: no neighbors")
	}
	if cfg.ListenPort == 0 {
		cfg.ListenPort = 179
	}
	if cfg.HoldTime == 0 {
		cfg.HoldTime = 90 * time.Second
	}
	if !cfg.IPv4 && !cfg.IPv6 {
		cfg.IPv4 = true
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &BGP{cfg: cfg, log: cfg.Logger, paths: map[netip.Prefix]*bgpPath{}}, nil
}

// Name implements Announcer.
func (*BGP) Name() string { return "bgp" }

var (
	familyIPv4 = &api.Family{Afi: api.Family_AFI_IP, Safi: api.Family_SAFI_UNICAST}
	familyIPv6 = &api.Family{Afi: api.Family_AFI_IP6, Safi: api.Family_SAFI_UNICAST}
)

// Start implements Announcer: it starts the speaker (listening on
// ListenPort) and adds the neighbors. Nothing is announced yet.
func (b *BGP) Start(ctx context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.started {
		return nil
	}
	srv := server.NewBgpServer(server.LoggerOption(&gobgpLogger{log: b.log.With("component", "gobgp")}))
	go srv.Serve()
	err := srv.StartBgp(ctx, &api.StartBgpRequest{Global: &api.Global{
		Asn:        b.cfg.ASN,
		RouterId:   b.cfg.RouterID.String(),
		ListenPort: int32(b.cfg.ListenPort),
		// Routes the neighbors send are of no use to a node: keep none.
		ApplyPolicy: &api.ApplyPolicy{ImportPolicy: &api.PolicyAssignment{
			Name: "global", Direction: api.PolicyDirection_IMPORT, DefaultAction: api.RouteAction_REJECT}},
	}})
	if err != nil {
		srv.Stop()
		return fmt.Errorf("bgp.listen_port: %v", err)
	}
	hold := uint64(b.cfg.HoldTime / time.Second)
	for _, n := range b.cfg.Neighbors {
		var afs []*api.AfiSafi
		if b.cfg.IPv4 {
			afs = append(afs, &api.AfiSafi{Config: &api.AfiSafiConfig{Family: familyIPv4, Enabled: true}})
		}
		if b.cfg.IPv6 {
			afs = append(afs, &api.AfiSafi{Config: &api.AfiSafiConfig{Family: familyIPv6, Enabled: true}})
		}
		err := srv.AddPeer(ctx, &api.AddPeerRequest{Peer: &api.Peer{
			Conf:      &api.PeerConf{NeighborAddress: n.Address.String(), PeerAsn: n.ASN},
			Transport: &api.Transport{PassiveMode: n.Passive},
			Timers: &api.Timers{Config: &api.TimersConfig{
				HoldTime: hold, KeepaliveInterval: max(hold/3, 1), ConnectRetry: 5,
			}},
			AfiSafis: afs,
		}})
		if err != nil {
			srv.Stop()
			return fmt.Errorf("bgp.neighbors: %s: %v", n.Address, err)
		}
	}
	if err := awaitListening(ctx, srv, b.log); err != nil {
		srv.Stop()
		return err
	}
	b.srv, b.started = srv, true
	b.log.Info("bgp speaker started", "asn", b.cfg.ASN, "router_id", b.cfg.RouterID, "port", b.cfg.ListenPort,
		"neighbors", len(b.cfg.Neighbors))
	return nil
}

// listenWait bounds how long Start waits for the neighbors to leave Idle.
// A new GoBGP peer starts in Idle with an idle hold time of zero, so this
// takes microseconds to milliseconds; the bound only keeps a wedged speaker
// from holding the node's start forever.
const listenWait = 5 * time.Second

// awaitListening returns once no neighbor is in Idle. A GoBGP peer in Idle
// closes every connection it is handed (fsm.go, idle state), so a router
// that connected in the few milliseconds after AddPeer was reset and, with
// a connect-retry of 120 s (BIRD's default), stayed down for two minutes.
// Once Start returns, a router's first connection is accepted. On the bound
// it logs and goes on: the routers' connect-retry still brings the
// sessions up.
func awaitListening(ctx context.Context, srv *server.BgpServer, log *slog.Logger) error {
	deadline := time.Now().Add(listenWait)
	for {
		idle := 0
		err := srv.ListPeer(ctx, &api.ListPeerRequest{}, func(p *api.Peer) {
			if p.State == nil || p.State.SessionState == api.PeerState_IDLE {
				idle++
			}
		})
		if err != nil {
			return fmt.Errorf("bgp: list neighbors: %v", err)
		}
		if idle == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			log.Warn("bgp neighbors still idle after start; relying on their connect-retry", "idle", idle, "waited", listenWait)
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("bgp: waiting for neighbors to leave idle: %w", ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// path builds the GoBGP path of p.
func (b *BGP) path(p netip.Prefix) (*api.Path, netip.Addr, error) {
	nlri, err := anypb.New(&api.IPAddressPrefix{Prefix: p.Addr().String(), PrefixLen: uint32(p.Bits())})
	if err != nil {
		return nil, netip.Addr{}, err
	}
	origin, err := anypb.New(&api.OriginAttribute{Origin: 0}) // IGP
	if err != nil {
		return nil, netip.Addr{}, err
	}
	if p.Addr().Is4() {
		nh := b.cfg.NextHop4
		s := "0.0.0.0" // GoBGP: the session's local address
		if nh.IsValid() {
			s = nh.String()
		}
		a, err := anypb.New(&api.NextHopAttribute{NextHop: s})
		if err != nil {
			return nil, netip.Addr{}, err
		}
		return &api.Path{Family: familyIPv4, Nlri: nlri, Pattrs: []*anypb.Any{origin, a}}, nh, nil
	}
	nh := b.cfg.NextHop6
	if !nh.IsValid() {
		return nil, netip.Addr{}, fmt.Errorf("bgp: no IPv6 next hop to announce %s", p)
	}
	mp, err := anypb.New(&api.MpReachNLRIAttribute{Family: familyIPv6, NextHops: []string{nh.String()}, Nlris: []*anypb.Any{nlri}})
	if err != nil {
		return nil, netip.Addr{}, err
	}
	return &api.Path{Family: familyIPv6, Nlri: nlri, Pattrs: []*anypb.Any{origin, mp}}, nh, nil
}

// Advertise implements Announcer.
func (b *BGP) Advertise(ctx context.Context, prefixes []netip.Prefix) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.started {
		return errors.New("bgp: not started")
	}
	want := map[netip.Prefix]bool{}
	for _, p := range prefixes {
		want[p.Masked()] = true
	}
	var errs []error
	for p, ap := range b.paths {
		if want[p] {
			continue
		}
		if err := b.srv.DeletePath(ctx, &api.DeletePathRequest{TableType: api.TableType_GLOBAL, Uuid: ap.uuid}); err != nil {
			errs = append(errs, fmt.Errorf("withdraw %s: %w", p, err))
			continue
		}
		delete(b.paths, p)
	}
	for p := range want {
		if b.paths[p] != nil {
			continue
		}
		path, nh, err := b.path(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		resp, err := b.srv.AddPath(ctx, &api.AddPathRequest{TableType: api.TableType_GLOBAL, Path: path})
		if err != nil {
			errs = append(errs, fmt.Errorf("announce %s: %w", p, err))
			continue
		}
		b.paths[p] = &bgpPath{uuid: resp.Uuid, nextHop: nh, since: time.Now()}
	}
	return errors.Join(errs...)
}

// Status implements Announcer.
func (b *BGP) Status(ctx context.Context) AnnouncerStatus {
	b.mu.Lock()
	var st AnnouncerStatus
	for p, ap := range b.paths {
		st.Announced = append(st.Announced, Announcement{Prefix: p, NextHop: ap.nextHop, Since: ap.since})
	}
	srv := b.srv
	b.mu.Unlock()
	slices.SortFunc(st.Announced, func(a, b Announcement) int { return a.Prefix.Addr().Compare(b.Prefix.Addr()) })
	if srv == nil {
		return st
	}
	_ = srv.ListPeer(ctx, &api.ListPeerRequest{EnableAdvertised: true}, func(p *api.Peer) {
		s := Session{LocalASN: b.cfg.ASN}
		if p.Conf != nil {
			s.Neighbor, _ = netip.ParseAddr(p.Conf.NeighborAddress)
			s.PeerASN = p.Conf.PeerAsn
		}
		if p.Transport != nil {
			s.Passive = p.Transport.PassiveMode
		}
		if p.State != nil {
			s.State = strings.ToLower(p.State.SessionState.String())
			s.Flaps = p.State.Flops
			if p.State.LocalAsn != 0 {
				s.LocalASN = p.State.LocalAsn
			}
		}
		if p.Timers != nil && p.Timers.State != nil && s.State == "established" {
			if u := p.Timers.State.Uptime; u != nil {
				s.Established = u.AsTime()
			}
			s.HoldTime = time.Duration(p.Timers.State.NegotiatedHoldTime) * time.Second
		}
		for _, af := range p.AfiSafis {
			if af.State != nil {
				s.Advertised += af.State.Advertised
				s.Received += af.State.Received
			}
		}
		st.Sessions = append(st.Sessions, s)
	})
	slices.SortFunc(st.Sessions, func(a, b Session) int { return a.Neighbor.Compare(b.Neighbor) })
	return st
}

// Close implements Announcer: withdraw, then close every session with a
// Cease notification.
func (b *BGP) Close(ctx context.Context) error {
	err := b.Advertise(ctx, nil)
	b.mu.Lock()
	srv := b.srv
	b.srv, b.started = nil, false
	b.mu.Unlock()
	if srv == nil {
		return nil
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		err = nil
	}
	done := make(chan struct{})
	go func() { srv.Stop(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("bgp: stopping the speaker: %w", ctx.Err())
	}
	return err
}

// gobgpLogger adapts GoBGP's logger to slog. GoBGP's Info covers session
// state changes; its Debug (every message sent and received, keepalives
// included) is so chatty that it goes below slog's debug, at LevelTrace:
// batond's -log-level debug shows Baton's own debug lines, trace adds
// GoBGP's.
type gobgpLogger struct {
	log *slog.Logger
}

// LevelTrace is below slog.LevelDebug: GoBGP's debug messages.
const LevelTrace = slog.LevelDebug - 4

func (l *gobgpLogger) emit(level slog.Level, msg string, fields gobgplog.Fields) {
	if !l.log.Enabled(context.Background(), level) {
		return
	}
	attrs := make([]any, 0, 2*len(fields))
	keys := make([]string, 0, len(fields))
	for k := range fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		attrs = append(attrs, strings.ToLower(k), fields[k])
	}
	l.log.Log(context.Background(), level, msg, attrs...)
}

func (l *gobgpLogger) Panic(msg string, f gobgplog.Fields) {
	l.emit(slog.LevelError, msg, f)
	panic(msg)
}
func (l *gobgpLogger) Fatal(msg string, f gobgplog.Fields) {
	// GoBGP calls Fatal for errors it cannot continue from; batond
	// reports them rather than exiting from inside a library.
	l.emit(slog.LevelError, msg, f)
}
func (l *gobgpLogger) Error(msg string, f gobgplog.Fields) { l.emit(slog.LevelError, msg, f) }
func (l *gobgpLogger) Warn(msg string, f gobgplog.Fields) {
	if strings.HasPrefix(msg, "cannot set TTL") {
		// Every listener, every start: TTL security is not used.
		l.emit(slog.LevelDebug, msg, f)
		return
	}
	l.emit(slog.LevelWarn, msg, f)
}
func (l *gobgpLogger) Info(msg string, f gobgplog.Fields)  { l.emit(slog.LevelInfo, msg, f) }
func (l *gobgpLogger) Debug(msg string, f gobgplog.Fields) { l.emit(LevelTrace, msg, f) }
func (l *gobgpLogger) SetLevel(gobgplog.LogLevel)          {}
func (l *gobgpLogger) GetLevel() gobgplog.LogLevel {
	// GoBGP skips building messages below its level: follow slog's.
	if l.log.Enabled(context.Background(), LevelTrace) {
		return gobgplog.DebugLevel
	}
	return gobgplog.InfoLevel
}
