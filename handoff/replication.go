package handoff

// Replication wires flow-state replication together: the peer gRPC server
// (peer_server.go) that holds other owners' flows in a ReplicaStore
// (replica.go), the replicator (replicator.go) that places this node's
// flows on k peers by rendezvous hashing (placement.go) over the live
// members (members.go), one link per peer (peer_link.go) streaming events
// over mutual TLS (tls.go), and the metrics (replication_metrics.go).

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// Defaults of ReplicationConfig.
const (
	DefaultReplicas = 2
	DefaultQueueLen = 65536
	// DefaultCoalesceWindow: 1 ms keeps a new flow's state on its replicas
	// well inside the 5 ms target while batching the changes of many
	// connections (and dropping those of connections shorter than it).
	DefaultCoalesceWindow = time.Millisecond
)

// gRPC keepalive: the server pings every client every second and drops a
// connection whose ping is not answered within 2 s. Clients may not ping
// more often than every 10 s (gRPC's floor), so outbound liveness comes
// from heartbeats and acks (see members.go).
var (
	serverKeepalive            = keepalive.ServerParameters{Time: time.Second, Timeout: 2 * time.Second}
	serverKeepaliveEnforcement = keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}
	clientKeepalive            = keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 2 * time.Second, PermitWithoutStream: true}
)

// ReplicationConfig configures a node's replication.
type ReplicationConfig struct {
	// Self is this node's name; with TLS, its certificate must carry it.
	Self string
	// Peers are the other nodes (static membership).
	Peers []Peer
	// Listen is the peer gRPC listen address, host:port.
	Listen string
	// Replicas is how many peers hold each flow (k); default 2.
	Replicas int
	// Prefixes are the anycast prefixes: replicas outside them are
	// rejected.
	Prefixes []netip.Prefix
	// TLS is the node's mutual TLS material; nil only when Insecure.
	TLS *TLSMaterial
	// Insecure runs the peer network without TLS: any host that can reach
	// the listener can inject flow state. Debugging only.
	Insecure bool
	// MaxReplicaFlows bounds the replica store (default 262144).
	MaxReplicaFlows int
	// QueueLen bounds each peer's event queue (default 65536).
	QueueLen int
	// CoalesceWindow is how long the replicator lets changes accumulate
	// after the tracker signals one (default DefaultCoalesceWindow;
	// negative: none). It trades at most that much replication latency
	// for far fewer, larger messages.
	CoalesceWindow time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger

	listener net.Listener // tests: serve on this instead of Listen
}

// Replication is a node's flow-state replication: it serves the Peer
// service, replicates the flows of a FlowSource to their replicas and
// holds other nodes' flows.
type Replication struct {
	cfg        ReplicationConfig
	log        *slog.Logger
	src        FlowSource
	members    *Members
	store      *ReplicaStore
	placer     *placer
	links      []*link // sorted by peer name
	linkByName map[string]*link
	repl       *replicator
	rejects    *rejects
	lagHist    *prometheus.HistogramVec
	collector  *replCollector

	insecureWarn sync.Once

	// engine answers Claim, Release and Forward and watches replicated
	// epochs (takeover.go); nil when no takeover engine runs.
	engine atomic.Pointer[Engine]

	mu      sync.Mutex
	started bool
	closed  bool
	srv     *grpc.Server
	lis     net.Listener
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

// NewReplication checks cfg and builds the node's replication; Start runs
// it.
func NewReplication(cfg ReplicationConfig, src FlowSource) (*Replication, error) {
	if src == nil {
		return nil, errors.New("replication: no flow source")
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = DefaultReplicas
	}
	if cfg.QueueLen == 0 {
		cfg.QueueLen = DefaultQueueLen
	}
	if cfg.CoalesceWindow == 0 {
		cfg.CoalesceWindow = DefaultCoalesceWindow
	}
	if cfg.MaxReplicaFlows == 0 {
		cfg.MaxReplicaFlows = DefaultMaxReplicaFlows
	}
	switch {
	case cfg.Replicas < 0:
		return nil, fmt.Errorf("replication: replicas %d < 0", cfg.Replicas)
	case cfg.QueueLen < 0:
		return nil, fmt.Errorf("replication: queue length %d < 0", cfg.QueueLen)
	case cfg.MaxReplicaFlows < 0:
		return nil, fmt.Errorf("replication: max replica flows %d < 0", cfg.MaxReplicaFlows)
	case cfg.Listen == "" && cfg.listener == nil:
		return nil, errors.New("replication: no listen address")
	case len(cfg.Prefixes) == 0:
		return nil, errors.New("replication: no anycast prefixes")
	case cfg.Insecure && cfg.TLS != nil:
		return nil, errors.New("replication: insecure and TLS material both set")
	case !cfg.Insecure && cfg.TLS == nil:
		return nil, errors.New("replication: TLS material required (or insecure)")
	case cfg.TLS != nil && !cfg.TLS.HasName(cfg.Self):
		return nil, fmt.Errorf("replication: certificate names %v do not include the node name %q", cfg.TLS.Names, cfg.Self)
	}
	members, err := NewMembers(cfg.Self, cfg.Peers)
	if err != nil {
		return nil, fmt.Errorf("replication: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	names := []string{cfg.Self}
	for _, p := range members.Peers() {
		names = append(names, p.Name)
	}
	r := &Replication{
		cfg:        cfg,
		log:        cfg.Logger,
		src:        src,
		members:    members,
		store:      NewReplicaStore(cfg.MaxReplicaFlows, cfg.Prefixes),
		placer:     newPlacer(names),
		linkByName: make(map[string]*link),
		rejects:    newRejects(cfg.Logger),
		lagHist:    newLagHistogram(cfg.Self),
	}
	for _, p := range members.Peers() {
		l := &link{r: r, peer: p, idx: r.placer.idx[p.Name], q: newPeerQueue(cfg.QueueLen)}
		l.lagObs = r.lagHist.WithLabelValues(p.Name)
		r.links = append(r.links, l)
		r.linkByName[p.Name] = l
	}
	r.repl = newReplicator(r)
	r.collector = newReplCollector(r)
	return r, nil
}

// Start listens on the peer address, serves the Peer service and starts
// replicating to the peers.
func (r *Replication) Start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started || r.closed {
		return errors.New("replication: already started")
	}
	lis := r.cfg.listener
	if lis == nil {
		var err error
		if lis, err = net.Listen("tcp", r.cfg.Listen); err != nil {
			return fmt.Errorf("replication: listen: %w", err)
		}
	}
	for _, l := range r.links {
		conn, err := grpc.NewClient("passthrough:///"+l.peer.Addr, r.dialOptions(l)...)
		if err != nil {
			lis.Close()
			r.closeConns()
			return fmt.Errorf("replication: peer %s: %w", l.peer.Name, err)
		}
		l.conn, l.client = conn, batonv1.NewPeerClient(conn)
	}
	creds := insecure.NewCredentials()
	if r.cfg.TLS != nil {
		creds = credentials.NewTLS(r.cfg.TLS.Server)
	}
	r.srv = grpc.NewServer(
		grpc.Creds(countingCreds{TransportCredentials: creds, r: r}),
		grpc.MaxRecvMsgSize(MaxPeerMessageBytes),
		grpc.KeepaliveParams(serverKeepalive),
		grpc.KeepaliveEnforcementPolicy(serverKeepaliveEnforcement),
		grpc.StaticStreamWindowSize(peerStreamWindow),
		grpc.StaticConnWindowSize(peerConnWindow),
		grpc.WaitForHandlers(true),
	)
	ps := &peerServer{r: r}
	batonv1.RegisterPeerServer(r.srv, ps)
	registerDepart(r.srv, ps) // takeover_depart.go
	r.lis = lis
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.started = true
	r.wg.Add(2 + len(r.links))
	go func() {
		defer r.wg.Done()
		if err := r.srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			r.log.Error("replication: peer server failed", "err", err)
		}
	}()
	go func() { defer r.wg.Done(); r.repl.run(ctx) }()
	for _, l := range r.links {
		go func() { defer r.wg.Done(); l.run(ctx) }()
	}
	r.log.Info("replication: started", "node", r.cfg.Self, "listen", lis.Addr().String(),
		"peers", len(r.links), "replicas", r.cfg.Replicas, "insecure", r.cfg.Insecure)
	return nil
}

// Static HTTP/2 flow-control windows on peer connections, both ways.
// gRPC's default (dynamic) windows come with its bandwidth estimator, which
// sends a PING whenever data arrives and none is outstanding: on a
// replication stream, where batches and acks go every millisecond or so,
// about one PING and one PING ack per message each way, each a TLS record
// and a write(2). The static windows turn the estimator off; they are as
// large as the most a link has in flight (maxInflightBytes).
const (
	peerStreamWindow = maxInflightBytes
	peerConnWindow   = 2 * maxInflightBytes
)

func (r *Replication) dialOptions(l *link) []grpc.DialOption {
	opts := []grpc.DialOption{
		grpc.WithKeepaliveParams(clientKeepalive),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: backoffMin, Multiplier: 1.6, Jitter: 0.2, MaxDelay: backoffMax},
			MinConnectTimeout: 3 * time.Second,
		}),
		grpc.WithStatsHandler(byteCounter{l}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxPeerMessageBytes)),
		grpc.WithStaticStreamWindowSize(peerStreamWindow),
		grpc.WithStaticConnWindowSize(peerConnWindow),
	}
	if r.cfg.TLS != nil {
		// The authority is the name the server's certificate must carry.
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(r.cfg.TLS.Client(l.peer.Name))),
			grpc.WithAuthority(l.peer.Name))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	return opts
}

func (r *Replication) closeConns() {
	for _, l := range r.links {
		if l.conn != nil {
			l.conn.Close()
		}
	}
}

// Close stops replication: the server, every stream and goroutine. The
// replicas held are kept (Store stays readable).
func (r *Replication) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.closed = true
	if !r.started {
		return
	}
	r.cancel()
	r.srv.Stop() // closes the listener, ends the handlers and waits for them
	r.wg.Wait()
	r.closeConns()
}

// Addr is the address the peer server listens on (nil before Start).
func (r *Replication) Addr() net.Addr {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.lis == nil {
		return nil
	}
	return r.lis.Addr()
}

// Store is the replica store (flows held for other owners).
func (r *Replication) Store() *ReplicaStore { return r.store }

// Members is the cluster membership (live peers, change notification).
func (r *Replication) Members() *Members { return r.members }

// Collector exports the replication metrics (baton_replication_*,
// baton_peer_*).
func (r *Replication) Collector() prometheus.Collector { return r.collector }

// Replicas is k, the number of peers that hold each flow.
func (r *Replication) Replicas() int { return r.cfg.Replicas }

// Placement returns the nodes that should hold replicas of a flow owned by
// owner, over the members live now.
func (r *Replication) Placement(k FlowKey, owner string) []string {
	return Replicas(k, owner, r.members.Live(), r.cfg.Replicas)
}

// Peers describes the link to every peer, sorted by name.
func (r *Replication) Peers() []*batonv1.PeerInfo {
	now := time.Now()
	out := make([]*batonv1.PeerInfo, 0, len(r.links))
	for _, l := range r.links {
		info := &batonv1.PeerInfo{
			Name:           l.peer.Name,
			Address:        l.peer.Addr,
			Up:             r.members.Up(l.peer.Name),
			LagNano:        l.lastLag.Load(),
			LagP99Nano:     int64(l.window.quantile(now, 0.99)),
			FlowsSent:      uint32(max(l.flowsSent.Load(), 0)),
			FlowsHeld:      uint32(r.store.Count(l.peer.Name)),
			EventsSent:     l.eventsSent(),
			BytesSent:      l.bytesSent.Load(),
			BytesReceived:  l.bytesRecv.Load(),
			EventsDropped:  l.droppedFull.Load() + l.droppedLarge.Load(),
			EventsRejected: l.rejectedByPeer.Load(),
			LastError:      l.lastError(),
		}
		if t := r.members.LastSeen(l.peer.Name); !t.IsZero() {
			info.LastSeenUnixNano = t.UnixNano()
		}
		out = append(out, info)
	}
	return out
}

// clientFor returns the client of a live peer's link (nil when the peer
// is down or replication is not running).
func (r *Replication) clientFor(l *link) batonv1.PeerClient {
	r.mu.Lock()
	running := r.started && !r.closed
	r.mu.Unlock()
	if !running || !r.members.Up(l.peer.Name) {
		return nil
	}
	return l.client
}

// peerClient returns the client of a live peer by name (nil when it is
// down, unknown, or replication is not running).
func (r *Replication) peerClient(name string) batonv1.PeerClient {
	l := r.linkByName[name]
	if l == nil {
		return nil
	}
	return r.clientFor(l)
}

// LookupCluster returns every copy of a flow's state in the cluster: this
// node's (owned or replica) and those of every live peer, sorted by node.
// unreachable lists the peers that are down or did not answer.
func (r *Replication) LookupCluster(ctx context.Context, k FlowKey) (copies []*batonv1.FlowCopy, unreachable []string) {
	if st, ok := r.src.Lookup(k); ok {
		copies = append(copies, &batonv1.FlowCopy{Node: r.cfg.Self, Owned: true, State: st})
	}
	if st, ok := r.store.Lookup(k); ok {
		copies = append(copies, &batonv1.FlowCopy{Node: r.cfg.Self, State: st})
	}
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	req := &batonv1.LookupRequest{Key: k.Proto()}
	for _, l := range r.links {
		c := r.clientFor(l)
		if c == nil {
			unreachable = append(unreachable, l.peer.Name)
			continue
		}
		wg.Go(func() {
			resp, err := c.Lookup(ctx, req)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				unreachable = append(unreachable, l.peer.Name)
			case resp.Found && resp.State != nil:
				copies = append(copies, &batonv1.FlowCopy{Node: l.peer.Name, Owned: resp.Owned, State: resp.State})
			}
		})
	}
	wg.Wait()
	sort.SliceStable(copies, func(i, j int) bool { return copies[i].Node < copies[j].Node })
	sort.Strings(unreachable)
	return copies, unreachable
}

// ListCluster asks every live peer for the flows it owns (ListOwned) and
// calls fn with each, one call at a time; this node's own flows are not
// included. unreachable lists the peers that are down or failed (fn may
// have seen part of a failed peer's flows).
func (r *Replication) ListCluster(ctx context.Context, fn func(node string, st *batonv1.FlowState)) (unreachable []string) {
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	for _, l := range r.links {
		c := r.clientFor(l)
		if c == nil {
			unreachable = append(unreachable, l.peer.Name)
			continue
		}
		wg.Go(func() {
			err := func() error {
				stream, err := c.ListOwned(ctx, &batonv1.ListOwnedRequest{})
				if err != nil {
					return err
				}
				for {
					st, err := stream.Recv()
					if err != nil {
						return err
					}
					mu.Lock()
					fn(l.peer.Name, st)
					mu.Unlock()
				}
			}()
			if err != nil && !errors.Is(err, io.EOF) {
				mu.Lock()
				unreachable = append(unreachable, l.peer.Name)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	sort.Strings(unreachable)
	return unreachable
}
