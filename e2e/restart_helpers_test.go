package e2e

// The client workload of the restart, health and kill scenarios
// (restart_test.go, health_flows_test.go): paced stream downloads that
// span a whole scenario, interactive echo sessions with idle periods, both
// checked byte by byte, and the client namespace's count of connections
// reset under it. Helpers are prefixed rr so they do not clash with other
// scenario files of the package.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

const (
	rrStreamPort = 9000
	rrEchoPort   = 7
)

// rrCluster is a BGP lab whose nodes run batond as one cluster with the
// fast health checks.
type rrCluster struct {
	*lab.Lab
	t      *testing.T
	ctx    context.Context
	procs  []*lab.Proc
	admins []batonv1.AdminClient
	extra  []string
}

// rrStartCluster builds a BGP lab of n nodes with 2 replicas per flow and
// starts batond on each (healthArgs, a drain timeout long enough for the
// departure handover, then extra), announced and peered.
func rrStartCluster(t *testing.T, ctx context.Context, n int, prefix string, extra ...string) *rrCluster {
	t.Helper()
	l := buildLab(t, ctx, n, prefix)
	if l.Routing != lab.RoutingBGP {
		t.Fatalf("lab routing %q, want %q", l.Routing, lab.RoutingBGP)
	}
	if err := l.EnableCluster(2); err != nil {
		t.Fatal(err)
	}
	// Checks that tolerate a loaded 2-core machine (healthArgs' 100 ms x 3
	// flaps under 60 sessions: a withdrawal moves flows), a drain timeout long enough for
	// the departure handover.
	c := &rrCluster{Lab: l, t: t, ctx: ctx, procs: make([]*lab.Proc, n), admins: make([]batonv1.AdminClient, n),
		extra: append([]string{"-drain-timeout", "30s", "-check-interval", "500ms", "-check-timeout", "500ms",
			"-check-fall", "5"}, extra...)}
	if os.Getenv("BATON_E2E_DEBUG") != "" { // every takeover in the node logs
		c.extra = append([]string{"-log-level", "debug"}, c.extra...)
	}
	t.Cleanup(func() { // before the lab's teardown
		if t.Failed() {
			c.logMetrics()
			rrKeepLogs(t, l)
		}
	})
	for i := range n {
		c.start(i)
	}
	all := make([]int, n)
	for i := range all {
		all[i] = i
	}
	waitNexthops(t, ctx, l, all...)
	if err := waitPeersUp(ctx, c.admins); err != nil {
		t.Fatal(err)
	}
	return c
}

// start starts batond on node i and waits until the router uses it.
func (c *rrCluster) start(i int) {
	c.t.Helper()
	p, err := c.StartBatond(c.ctx, batond, i, healthArgs(c.Lab, i, c.extra...)...)
	if err != nil {
		c.t.Fatal(err)
	}
	c.procs[i] = p
	c.admins[i] = adminClient(c.t, c.Lab, i)
}

// owned returns node i's owned flow count (-1 when it does not answer).
func (c *rrCluster) owned(i int) int {
	ctx, cancel := context.WithTimeout(c.ctx, 5*time.Second)
	defer cancel()
	h, err := c.admins[i].Health(ctx, &batonv1.HealthRequest{})
	if err != nil {
		return -1
	}
	return int(h.OwnedFlows)
}

// logMetrics logs every running node's takeover metrics.
func (c *rrCluster) logMetrics() {
	for i, p := range c.procs {
		if p != nil && !p.Exited() {
			c.t.Logf("%s takeover metrics:\n%s", lab.NodeName(i), takeoverMetrics(c.ctx, c.Lab, i))
		}
	}
}

// rrStamp formats the time of a failure, to find it in the node logs.
const rrStamp = "15:04:05.000"

// rrKeepLogs copies the lab's logs (every process, whole) out of its log
// directory, which the teardown removes, for a failed test.
func rrKeepLogs(t *testing.T, l *lab.Lab) {
	dir, err := os.MkdirTemp("", "baton-e2e-logs-"+t.Name()+"-")
	if err != nil {
		return
	}
	ents, _ := os.ReadDir(l.LogDir)
	for _, e := range ents {
		if b, err := os.ReadFile(filepath.Join(l.LogDir, e.Name())); err == nil && strings.HasSuffix(e.Name(), ".log") {
			_ = os.WriteFile(filepath.Join(dir, e.Name()), b, 0o644)
		}
	}
	t.Logf("logs kept in %s", dir)
}

// pacedReader reads at the rate (bytes/s) rate holds at the time (a
// token bucket of rrBurst bytes).
type pacedReader struct {
	r      io.Reader
	rate   *atomic.Int64
	tokens float64
	last   time.Time
	n      atomic.Int64
	// maxWait is the longest Read of the connection (ns) until done (the
	// scenario is over).
	maxWait atomic.Int64
	done    *atomic.Bool
}

const rrBurst = 128 << 10

func (p *pacedReader) Read(b []byte) (int, error) {
	for {
		now := time.Now()
		p.tokens = min(p.tokens+now.Sub(p.last).Seconds()*float64(p.rate.Load()), rrBurst)
		p.last = now
		if p.tokens >= 1 {
			if float64(len(b)) > p.tokens {
				b = b[:int(p.tokens)]
			}
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	t0 := time.Now()
	n, err := p.r.Read(b)
	if d := int64(time.Since(t0)); d > p.maxWait.Load() && !p.done.Load() {
		p.maxWait.Store(d) // the reader is slower than the stream: a long wait is a stall
	}
	p.tokens -= float64(n)
	p.n.Add(int64(n))
	return n, err
}

// rrDownload is one paced stream download.
type rrDownload struct {
	port int
	pr   *pacedReader
	err  error
	done chan struct{}
}

// rrStartDownloads opens a download of size bytes from each port, read at
// the rate rate holds, each checked byte by byte and by SHA-256; a reset
// is reported as such.
func rrStartDownloads(t *testing.T, ctx context.Context, l *lab.Lab, ports []int, size uint64, rate *atomic.Int64, over *atomic.Bool) []*rrDownload {
	t.Helper()
	dst := netip.AddrPortFrom(l.Anycast4, rrStreamPort)
	var ds []*rrDownload
	for _, port := range ports {
		c, err := l.Client.Dial(ctx, "tcp4", dst.String(), port)
		if err != nil {
			t.Fatalf("port %d: %v", port, err)
		}
		t.Cleanup(func() { c.Close() })
		d := &rrDownload{port: port, pr: &pacedReader{r: c, rate: rate, last: time.Now(), done: over}, done: make(chan struct{})}
		seed := uint64(port) * 31
		if _, err := io.WriteString(c, services.StreamRequest(size, seed)); err != nil {
			t.Fatal(err)
		}
		go func() {
			defer close(d.done)
			h := sha256.New()
			got, ok, err := services.ReadStream(io.TeeReader(d.pr, h), size, seed)
			switch {
			case errors.Is(err, syscall.ECONNRESET):
				d.err = fmt.Errorf("download port %d: RESET after %d bytes at %s", port, got, time.Now().Format(rrStamp))
			case err != nil || !ok:
				d.err = fmt.Errorf("download port %d: after %d bytes: %v", port, got, err)
			case [32]byte(h.Sum(nil)) != services.PatternSHA256(seed, 0, size):
				d.err = fmt.Errorf("download port %d: SHA-256 differs", port)
			}
		}()
		ds = append(ds, d)
	}
	return ds
}

// rrEcho is one interactive echo session: it sends a chunk of seeded
// random bytes every 50-250 ms and checks the echo, with an idle period of
// 1-4 s every four exchanges (8-15 s for every third session: those are
// idle across a whole drain), until stop closes.
type rrEcho struct {
	port      int
	conn      net.Conn
	rounds    atomic.Int64
	bytes     atomic.Int64
	maxStall  atomic.Int64 // the longest exchange (send to full echo), ns
	err       error
	done      chan struct{}
	idleShift int  // which exchanges follow an idle period
	sleepy    bool // idle periods of 8-15 s: idle across a node's drain
}

// rrStartEchoes starts an echo session from each port.
func rrStartEchoes(t *testing.T, ctx context.Context, l *lab.Lab, ports []int, stop <-chan struct{}) []*rrEcho {
	t.Helper()
	dst := netip.AddrPortFrom(l.Anycast4, rrEchoPort)
	var es []*rrEcho
	for n, port := range ports {
		c, err := l.Client.Dial(ctx, "tcp4", dst.String(), port)
		if err != nil {
			t.Fatalf("port %d: %v", port, err)
		}
		t.Cleanup(func() { c.Close() })
		e := &rrEcho{port: port, conn: c, done: make(chan struct{}), idleShift: n % 4, sleepy: n%3 == 0}
		go e.run(stop)
		es = append(es, e)
	}
	return es
}

func (e *rrEcho) run(stop <-chan struct{}) {
	defer close(e.done)
	rng := rand.New(rand.NewPCG(uint64(e.port), 99))
	exchange := func() error {
		msg := make([]byte, 1+rng.IntN(6000))
		for i := range msg {
			msg[i] = byte(rng.Uint32())
		}
		start := time.Now()
		_ = e.conn.SetDeadline(start.Add(60 * time.Second))
		if _, err := e.conn.Write(msg); err != nil {
			return err
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(e.conn, got); err != nil {
			return err
		}
		if !bytes.Equal(got, msg) {
			return fmt.Errorf("echo differs in round %d", e.rounds.Load())
		}
		if d := int64(time.Since(start)); d > e.maxStall.Load() {
			e.maxStall.Store(d)
		}
		e.rounds.Add(1)
		e.bytes.Add(int64(len(msg)))
		return nil
	}
	wait := func(d time.Duration) bool {
		select {
		case <-stop:
			return false
		case <-time.After(d):
			return true
		}
	}
	for i := 0; ; i++ {
		pause := time.Duration(50+rng.IntN(200)) * time.Millisecond
		if (i+e.idleShift)%4 == 0 {
			pause = time.Duration(1000+rng.IntN(3000)) * time.Millisecond // idle
			if e.sleepy {
				pause = time.Duration(8000+rng.IntN(7000)) * time.Millisecond
			}
		}
		if !wait(pause) {
			break
		}
		if err := exchange(); err != nil {
			e.err = e.wrap(err)
			return
		}
	}
	// A last exchange after the scenario, then a clean close: the echo
	// service mirrors the half-close.
	if err := exchange(); err != nil {
		e.err = e.wrap(err)
		return
	}
	if cw, ok := e.conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		if b, err := io.ReadAll(e.conn); err != nil || len(b) != 0 {
			e.err = e.wrap(fmt.Errorf("after the half-close: %d bytes, %v", len(b), err))
		}
	}
}

func (e *rrEcho) wrap(err error) error {
	if errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("echo port %d: RESET after %d rounds at %s", e.port, e.rounds.Load(), time.Now().Format(rrStamp))
	}
	return fmt.Errorf("echo port %d: after %d rounds: %w", e.port, e.rounds.Load(), err)
}

// rrWorkload is the scenario's downloads and echo sessions.
type rrWorkload struct {
	ds    []*rrDownload
	es    []*rrEcho
	rate  atomic.Int64
	over  atomic.Bool
	stop  chan struct{}
	once  sync.Once
	start time.Time
}

// rrStartWorkload starts nd downloads of size bytes paced at rate and ne
// echo sessions, from ports spread over every node (first up).
func rrStartWorkload(t *testing.T, ctx context.Context, l *lab.Lab, nd, ne, first int, size uint64, rate int64) *rrWorkload {
	t.Helper()
	w := &rrWorkload{stop: make(chan struct{}), start: time.Now()}
	w.rate.Store(rate)
	w.ds = rrStartDownloads(t, ctx, l, portsTo(t, l, rrStreamPort, -1, nd, first), size, &w.rate, &w.over)
	w.es = rrStartEchoes(t, ctx, l, portsTo(t, l, rrEchoPort, -1, ne, first+2000), w.stop)
	t.Cleanup(w.end)
	return w
}

// rrEndRate is the downloads' rate once the scenario is over: fast, but
// not so fast that the 2-core machine's health checks time out.
const rrEndRate = 2 << 20

// end speeds the downloads up and stops the echo sessions.
func (w *rrWorkload) end() {
	w.once.Do(func() {
		w.over.Store(true)
		w.rate.Store(rrEndRate)
		close(w.stop)
	})
}

// healthy fails the test if a session already failed.
func (w *rrWorkload) healthy(t *testing.T) {
	t.Helper()
	for _, d := range w.ds {
		select {
		case <-d.done:
			if d.err != nil {
				t.Fatal(d.err)
			}
		default:
		}
	}
	for _, e := range w.es {
		select {
		case <-e.done:
			if e.err != nil {
				t.Fatal(e.err)
			}
		default:
		}
	}
}

// finish ends the workload and waits (bounded) for every session; every
// error is reported. It logs the echo sessions' exchanges and slowest
// exchange.
func (w *rrWorkload) finish(t *testing.T) {
	t.Helper()
	w.end()
	deadline := time.After(4 * time.Minute)
	for _, d := range w.ds {
		select {
		case <-d.done:
		case <-deadline:
			t.Fatalf("download port %d did not finish (%d bytes)", d.port, d.pr.n.Load())
		}
		if d.err != nil {
			t.Error(d.err)
		}
	}
	var rounds, maxStall, dlMax, dlSum int64
	for _, d := range w.ds {
		m := d.pr.maxWait.Load()
		dlMax, dlSum = max(dlMax, m), dlSum+m
	}
	if len(w.ds) > 0 {
		t.Logf("downloads: longest wait for data per flow during the scenario: max %s, mean %s",
			time.Duration(dlMax).Round(time.Millisecond), time.Duration(dlSum/int64(len(w.ds))).Round(time.Millisecond))
	}
	for _, e := range w.es {
		select {
		case <-e.done:
		case <-deadline:
			t.Fatalf("echo port %d did not finish (%d rounds)", e.port, e.rounds.Load())
		}
		if e.err != nil {
			t.Error(e.err)
		}
		rounds += e.rounds.Load()
		maxStall = max(maxStall, e.maxStall.Load())
	}
	t.Logf("workload: %d downloads, %d echo sessions (%d exchanges, slowest exchange %s) over %s",
		len(w.ds), len(w.es), rounds, time.Duration(maxStall).Round(time.Millisecond), time.Since(w.start).Round(time.Millisecond))
}
