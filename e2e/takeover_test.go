package e2e

// Takeover end to end: real batond processes, the kernel's ECMP router
// moving flows, and a real Linux TCP client that checks every byte (SHA-256
// against services.PatternSHA256, and byte by byte as the bytes arrive) and
// treats a connection reset as a failure.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/stack/services"
)

const (
	takeoverDownloads = 5
	takeoverSize      = 200 << 20
	streamPort        = 9000
)

// countingReader counts the bytes read through it. With a limit set, it
// reads no further than limit bytes until the limit is raised (the client
// stops reading, its window closes and the server stops sending).
type countingReader struct {
	r     io.Reader
	ctx   context.Context
	n     atomic.Int64
	limit atomic.Int64 // > 0: read at most this many bytes
}

func (c *countingReader) Read(p []byte) (int, error) {
	for {
		lim := c.limit.Load()
		if lim <= 0 {
			break
		}
		if left := lim - c.n.Load(); left > 0 {
			p = p[:min(int64(len(p)), left)]
			break
		}
		select {
		case <-c.ctx.Done():
			return 0, c.ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// download is one stream download from the client namespace.
type download struct {
	l    *lab.Lab
	port int
	seed uint64
	cr   *countingReader
	err  error
	done chan struct{}
}

// startDownloads opens n stream downloads of size bytes from client ports
// the router sends to node target (-1: any), each checked as it arrives.
// With hold > 0 the client stops reading each at hold bytes: once
// waitProgress(hold) returned, release lets them all run on, every one
// still mid-transfer, just before the event under test.
func startDownloads(t *testing.T, ctx context.Context, l *lab.Lab, target, n, firstPort int, size uint64, hold int64) []*download {
	t.Helper()
	var ds []*download
	for _, port := range portsTo(t, l, streamPort, target, n, firstPort) {
		ds = append(ds, startDownload(t, ctx, l, l.Anycast4, port, size, hold))
	}
	return ds
}

// release lifts the read limit of every download.
func release(ds []*download) {
	for _, d := range ds {
		d.cr.limit.Store(0)
	}
}

// startDownload opens one stream download of size bytes from client port
// port to anycast (l.Anycast4 or l.Anycast6), checked as it arrives,
// reading at most limit bytes (0: no limit) until download.cr.limit is
// raised.
func startDownload(t *testing.T, ctx context.Context, l *lab.Lab, anycast netip.Addr, port int, size uint64, limit int64) *download {
	t.Helper()
	dst, network := netip.AddrPortFrom(anycast, streamPort), "tcp4"
	if anycast.Is6() {
		network = "tcp6"
	}
	c, err := l.Client.Dial(ctx, network, dst.String(), port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	d := &download{l: l, port: port, seed: uint64(port), cr: &countingReader{r: c, ctx: ctx}, done: make(chan struct{})}
	d.cr.limit.Store(limit)
	if _, err := io.WriteString(c, services.StreamRequest(size, d.seed)); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(d.done)
		h := sha256.New()
		got, ok, err := services.ReadStream(io.TeeReader(d.cr, h), size, d.seed)
		switch {
		case errors.Is(err, syscall.ECONNRESET):
			d.err = fmt.Errorf("port %d: connection reset by the server after %d bytes", port, got)
		case err != nil || !ok:
			d.err = fmt.Errorf("port %d: after %d bytes: %v", port, got, err)
		case [32]byte(h.Sum(nil)) != services.PatternSHA256(d.seed, 0, size):
			d.err = fmt.Errorf("port %d: SHA-256 differs", port)
		}
	}()
	return d
}

// waitProgress waits until every download received at least min bytes.
func waitProgress(t *testing.T, ctx context.Context, ds []*download, min int64) {
	t.Helper()
	if err := waitFor(ctx, 2*time.Minute, func() error {
		for _, d := range ds {
			select {
			case <-d.done:
				if d.err != nil {
					return nil // reported by finish
				}
			default:
			}
			if n := d.cr.n.Load(); n < min {
				return fmt.Errorf("port %d at %d bytes", d.port, n)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("downloads not progressing: %v", err)
	}
}

// finish waits (bounded) for every download and fails on any error.
func finish(t *testing.T, ds []*download) {
	t.Helper()
	deadline := time.After(5 * time.Minute)
	for _, d := range ds {
		select {
		case <-d.done:
		case <-deadline:
			stallReport(t, d.l, d.port)
			t.Fatalf("port %d: download did not finish (%d bytes)", d.port, d.cr.n.Load())
		}
		if d.err != nil {
			stallReport(t, d.l, d.port)
			t.Error(d.err)
		}
	}
}

// takeoverMetrics returns node i's baton_takeover_* metric lines (non-zero
// counters and the latency histogram's count and sum).
func takeoverMetrics(ctx context.Context, l *lab.Lab, i int) string {
	c, err := l.Node(i).Dial(ctx, "tcp4", "127.0.0.1:9470", 0)
	if err != nil {
		return "metrics: " + err.Error()
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "GET /metrics HTTP/1.0\r\n\r\n"); err != nil {
		return "metrics: " + err.Error()
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "metrics: " + err.Error()
	}
	defer resp.Body.Close()
	var out []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "baton_takeover_") || strings.HasSuffix(line, " 0") || strings.Contains(line, "_bucket") {
			continue
		}
		out = append(out, strings.TrimPrefix(line, "baton_takeover_"))
	}
	return strings.Join(out, "\n")
}

// TestTakeoverDrainAndKill: 200 MB downloads served by one node of a
// 3-node cluster (2 replicas) continue exactly, without a reset, when
// (1, scenario d) the router stops sending to that node (a planned drain:
// the node is alive, the others claim its five flows) and (2, scenario a)
// the node serving twenty of them is killed with SIGKILL and removed from
// the router (its flows' designated replicas restore them at once, from
// replicated state).
//
// The nodes run with -tun-offload: on the default (water) device, one
// packet per syscall, the 20 x 200 MB took 84 s on a shared 2-core
// machine, 19-40 s with offload. The other takeover scenarios (rehash,
// flap, forward, cannot-resume) run on the default device.
func TestTakeoverDrainAndKill(t *testing.T) {
	ctx := testCtx(t)
	c := startCluster(t, ctx, 3, "btk", 2, nil, "-tun-offload")
	l := c.Lab

	t.Run("drain", func(t *testing.T) {
		const target = 0
		resets := clientResets(t, l)
		ds := startDownloads(t, ctx, l, target, takeoverDownloads, 20000, takeoverSize, takeoverSize/5)
		waitProgress(t, ctx, ds, takeoverSize/5)
		release(ds)
		if err := l.SetNexthops([]int{1, 2}); err != nil {
			t.Fatal(err)
		}
		finish(t, ds)
		noResets(t, l, resets)
		c.logMetrics()
		c.noFailures()
		if got := c.total("total", `kind="pull-migrate"`); got < takeoverDownloads {
			t.Errorf("%v pull-migrate takeovers, want >= %d (one per drained flow)", got, takeoverDownloads)
		}
	})
	if t.Failed() {
		return
	}
	if err := l.SetNexthops([]int{0, 1, 2}); err != nil {
		t.Fatal(err)
	}

	t.Run("kill", func(t *testing.T) {
		const target, downloads = 1, 20
		resets := clientResets(t, l)
		ds := startDownloads(t, ctx, l, target, downloads, 21000, takeoverSize, takeoverSize/5)
		waitProgress(t, ctx, ds, takeoverSize/5)
		release(ds)
		if err := c.procs[target].Kill(); err != nil {
			t.Fatal(err)
		}
		if err := l.SetNexthops([]int{0, 2}); err != nil {
			t.Fatal(err)
		}
		finish(t, ds)
		noResets(t, l, resets)
		c.logMetrics()
		c.noFailures()
		if got := c.total("total", `kind="push"`) + c.total("total", `kind="pull-restore"`); got < downloads {
			t.Errorf("%v push or pull-restore takeovers, want >= %d (one per flow of the dead node)", got, downloads)
		}
	})
}

// noResets fails the test if a client connection was reset since the
// client namespace's EstabResets counter read before.
func noResets(t *testing.T, l *lab.Lab, before uint64) {
	t.Helper()
	if n := clientResets(t, l) - before; n != 0 {
		t.Errorf("%d client connections were reset", n)
	}
}
