package main

// This file is the client side shared by the demos and the benchmark: a
// verified HTTP download on one TCP connection from a fixed source port
// (Download), a sampler that records every flow's progress once per tick
// (Timeline, for progress lines and, later, per-flow plots), and the
// time-bounded discard reader and connection loop of the benchmark.
//
// Everything dials from a lab namespace with NS.Dial, so the sockets are
// the client namespace's kernel sockets.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/stack/services"
)

// Download is one verified HTTP download on its own TCP connection: GET
// /whoami (which node serves the connection), then GET /bytes?n=Size&seed=
// Seed on the same keep-alive connection. Every body byte is checked
// against the pattern as it arrives (services.ReadStream, at most 128 KiB
// held) and the SHA-256 of what arrived is compared with the pattern's.
//
// Set the exported inputs, then call Run once. Received and Node may be
// called from other goroutines while Run runs; the results are valid after
// Run returns.
type Download struct {
	ID        int            // 1-based flow number, for tables
	Server    netip.AddrPort // the anycast address and the http port
	LocalPort int            // source port; fixes the flow's ECMP path
	Size      uint64         // body bytes to request
	Seed      uint64         // pattern seed
	Predicted int            // node index the router should pick, -1 if unknown
	Nodes     int            // nodes in the lab, to map whoami names to indexes

	received atomic.Int64 // body bytes received so far
	node     atomic.Int32 // served-by node index + 1; 0 until /whoami answered
	done     atomic.Bool  // Run has returned

	// Rec, if set, records when the body bytes arrive (the failover
	// demo's stalls and plot).
	Rec *flowRecorder

	// Results.
	ServedBy string // the /whoami answer, "" if it never came
	// BodyOffset is how many bytes the server sent before the body (the
	// /whoami response and the /bytes response header): the body's
	// offset in the connection's output stream.
	BodyOffset int64
	Start      time.Time // before the dial
	Connected  time.Time // after the TCP handshake
	BodyStart  time.Time // when the /bytes response header arrived
	End        time.Time // when the body ended (or failed)
	Verified   bool      // every byte matched, full length, digests equal
	Digest     [32]byte  // SHA-256 of the bytes received
	Err        error
}

// Done reports whether Run has returned (the results are then valid).
func (d *Download) Done() bool { return d.done.Load() }

// Received returns the body bytes received so far.
func (d *Download) Received() int64 { return d.received.Load() }

// Node returns the index of the node serving the flow, -1 until known or if
// its name is not a lab node name.
func (d *Download) Node() int { return int(d.node.Load()) - 1 }

// Elapsed is the body transfer time (response header to end of body).
func (d *Download) Elapsed() time.Duration {
	if d.BodyStart.IsZero() || d.End.IsZero() {
		return 0
	}
	return d.End.Sub(d.BodyStart)
}

// network returns "tcp4" or "tcp6" for the server address.
func (d *Download) network() string {
	if d.Server.Addr().Unmap().Is4() {
		return "tcp4"
	}
	return "tcp6"
}

// Run performs the download from ns (the client namespace). Cancelling ctx
// closes the connection. It records the outcome in d and returns d.Err.
func (d *Download) Run(ctx context.Context, ns *lab.NS) error {
	defer d.done.Store(true)
	d.Err = d.run(ctx, ns)
	if d.End.IsZero() {
		d.End = time.Now()
	}
	if d.Err != nil {
		d.Verified = false
		if ctx.Err() != nil {
			d.Err = fmt.Errorf("%w (%v)", ctx.Err(), d.Err)
		}
	}
	return d.Err
}

func (d *Download) run(ctx context.Context, ns *lab.NS) error {
	d.Start = time.Now()
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := ns.Dial(dctx, d.network(), d.Server.String(), d.LocalPort)
	cancel()
	if err != nil {
		return err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	d.Connected = time.Now()
	cr := &countingReader{r: conn}
	br := bufio.NewReaderSize(cr, 64<<10)

	// 1. Who serves this connection?
	body, err := httpGet(conn, br, d.Server, "/whoami", 4<<10)
	if err != nil {
		return fmt.Errorf("GET /whoami: %w", err)
	}
	d.ServedBy = strings.TrimSpace(string(body))
	d.node.Store(int32(nodeIndex(d.ServedBy, d.Nodes) + 1))

	// 2. The verified download, on the same connection.
	path := services.BytesPath(d.Size, d.Seed)
	if err := writeGet(conn, d.Server, path); err != nil {
		return fmt.Errorf("GET /bytes: %w", err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return fmt.Errorf("GET /bytes: reading the response header: %w", err)
	}
	// No resp.Body.Close: it would drain the rest of the body after a
	// failure. Closing the connection is enough.
	d.BodyStart = time.Now()
	d.BodyOffset = cr.n - int64(br.Buffered())
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	if resp.ContentLength != int64(d.Size) {
		return fmt.Errorf("GET %s: Content-Length %d, want %d", path, resp.ContentLength, d.Size)
	}
	h := sha256.New()
	tee := io.TeeReader(resp.Body, &progressHash{h: h, n: &d.received, rec: d.Rec})
	_, ok, err := services.ReadStream(tee, d.Size, d.Seed)
	d.End = time.Now()
	if err != nil {
		return err
	}
	h.Sum(d.Digest[:0])
	if want := services.PatternSHA256(d.Seed, 0, d.Size); want != d.Digest {
		return fmt.Errorf("SHA-256 %x, want %x", d.Digest[:8], want[:8])
	}
	d.Verified = ok
	return nil
}

// progressHash hashes what the download receives, counts it and records
// its arrival (rec may be nil).
type progressHash struct {
	h   hash.Hash
	n   *atomic.Int64
	rec *flowRecorder
}

func (p *progressHash) Write(b []byte) (int, error) {
	if p.rec != nil {
		p.rec.add(time.Now(), len(b))
	}
	p.h.Write(b)
	p.n.Add(int64(len(b)))
	return len(b), nil
}

// countingReader counts the bytes read through it (one goroutine).
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}

// writeGet sends one HTTP/1.1 keep-alive GET request.
func writeGet(w io.Writer, server netip.AddrPort, path string) error {
	host := server.Addr().String()
	if server.Addr().Is6() {
		host = "[" + host + "]"
	}
	_, err := io.WriteString(w, "GET "+path+" HTTP/1.1\r\nHost: "+host+"\r\nUser-Agent: batonlab\r\n\r\n")
	return err
}

// httpGet sends GET path on conn and returns the body of a 200 response
// (at most max bytes), leaving the connection ready for the next request.
func httpGet(conn net.Conn, br *bufio.Reader, server netip.AddrPort, path string, max int64) ([]byte, error) {
	if err := writeGet(conn, server, path); err != nil {
		return nil, err
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, max))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %q", resp.Status, strings.TrimSpace(string(body)))
	}
	if resp.Close {
		return nil, errors.New("server closes the connection after the response")
	}
	return body, nil
}

// nodeIndex maps a batond node name of the lab ("n1".."nN") to its index,
// -1 for anything else.
func nodeIndex(name string, nodes int) int {
	for i := 0; i < nodes; i++ {
		if name == lab.NodeName(i) {
			return i
		}
	}
	return -1
}

// runDownloads runs every download concurrently from ns and waits for all.
func runDownloads(ctx context.Context, ns *lab.NS, ds []*Download) {
	var wg sync.WaitGroup
	for _, d := range ds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.Run(ctx, ns) //nolint:errcheck // recorded in d.Err
		}()
	}
	wg.Wait()
}

// Sample is the state of every flow at one instant.
type Sample struct {
	At    time.Duration // since the timeline started
	Bytes []int64       // per flow: body bytes received so far
	Node  []int         // per flow: serving node index, -1 unknown
}

// Timeline records a Sample of a set of downloads on every call to Take.
// The failover demo plots it per flow; the demo prints rates from it.
type Timeline struct {
	start   time.Time
	flows   []*Download
	Samples []Sample
}

func newTimeline(flows []*Download) *Timeline {
	t := &Timeline{start: time.Now(), flows: flows}
	t.Take()
	return t
}

// Take records and returns a sample.
func (t *Timeline) Take() Sample {
	s := Sample{At: time.Since(t.start), Bytes: make([]int64, len(t.flows)), Node: make([]int, len(t.flows))}
	for i, d := range t.flows {
		s.Bytes[i] = d.Received()
		s.Node[i] = d.Node()
	}
	t.Samples = append(t.Samples, s)
	return s
}

// Rates returns the total and per-node rates in MB/s between the last two
// samples (nodes is the number of nodes; flows on an unknown node count in
// the total only).
func (t *Timeline) Rates(nodes int) (total float64, perNode []float64) {
	perNode = make([]float64, nodes)
	if len(t.Samples) < 2 {
		return 0, perNode
	}
	a, b := t.Samples[len(t.Samples)-2], t.Samples[len(t.Samples)-1]
	dt := b.At - a.At
	var sum int64
	for i := range b.Bytes {
		delta := b.Bytes[i] - a.Bytes[i]
		sum += delta
		if n := b.Node[i]; n >= 0 && n < nodes {
			perNode[n] += mbps(delta, dt)
		}
	}
	return mbps(sum, dt), perNode
}

// isTerminal reports whether f is a terminal (progress is then rewritten
// in place with \r).
func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// discardResult is one time-bounded stream download.
type discardResult struct {
	Bytes   int64
	Elapsed time.Duration // from the request to the last read
}

// discardStream connects from ns to the stream service at server, asks for
// an effectively endless stream (services.MaxStreamSize bytes of seed),
// reads and discards it with a 1 MiB buffer for dur, then closes. The
// clock starts when the request is written (after the handshake).
func discardStream(ctx context.Context, ns *lab.NS, server netip.AddrPort, seed uint64, dur time.Duration) (discardResult, error) {
	network := "tcp4"
	if server.Addr().Is6() {
		network = "tcp6"
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := ns.Dial(dctx, network, server.String(), 0)
	cancel()
	if err != nil {
		return discardResult{}, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	start := time.Now()
	deadline := start.Add(dur)
	if err := conn.SetReadDeadline(deadline); err != nil {
		return discardResult{}, err
	}
	if _, err := io.WriteString(conn, services.StreamRequest(services.MaxStreamSize, seed)); err != nil {
		return discardResult{}, err
	}
	buf := make([]byte, 1<<20)
	var res discardResult
	for {
		n, err := conn.Read(buf)
		res.Bytes += int64(n)
		if err != nil {
			res.Elapsed = time.Since(start)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				res.Elapsed = dur
				return res, nil
			}
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			return res, fmt.Errorf("stream from %s ended after %d bytes: %w", server, res.Bytes, err)
		}
	}
}

// connResult is the outcome of a connection-rate run.
type connResult struct {
	Conns    int64           // completed exchanges
	Failures int64           // failed exchanges
	Elapsed  time.Duration   // wall time of the run
	Latency  []time.Duration // per completed exchange, sorted
	Errors   []string        // the first few distinct errors
}

// PerSecond is completed exchanges per second.
func (r connResult) PerSecond() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Conns) / r.Elapsed.Seconds()
}

// connLoop runs workers goroutines for dur, each repeating: connect from
// ns to the stream service at server, send "1 1\n", read the 1-byte answer
// to EOF, close. An exchange that fails, or returns anything but the one
// expected byte, is a failure.
//
// With firstPort 0 the kernel picks each source port. Otherwise every
// connection binds the next port of firstPort..65535 in turn, so that no
// 4-tuple is reused before the range wraps (see twProbe for why that
// matters); lastPort tells the last port used.
//
// Each worker runs its whole loop inside ns.Do, on one OS thread that stays
// in the namespace: NS.Dial would start (and end) a thread per connection,
// and that cost, not the servers, would set the rate.
func connLoop(ctx context.Context, ns *lab.NS, server netip.AddrPort, workers int, dur time.Duration, firstPort int) (res connResult, lastPort int) {
	network := "tcp4"
	if server.Addr().Is6() {
		network = "tcp6"
	}
	req := services.StreamRequest(1, 1)
	var want [1]byte
	services.FillPattern(1, 0, want[:])

	var (
		mu      sync.Mutex
		seen    = map[string]bool{}
		counter atomic.Int64
		last    atomic.Int64
	)
	nextPort := func() int {
		if firstPort == 0 {
			return 0
		}
		p := firstPort + int((counter.Add(1)-1)%int64(65536-firstPort))
		last.Store(int64(p))
		return p
	}
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		res.Failures++
		msg := err.Error()
		if !seen[msg] && len(res.Errors) < 5 {
			seen[msg] = true
			res.Errors = append(res.Errors, msg)
		}
	}
	start := time.Now()
	end := start.Add(dur)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var lat []time.Duration
			var n int64
			buf := make([]byte, 64)
			err := ns.Do(func() error {
				for time.Now().Before(end) && ctx.Err() == nil {
					t0 := time.Now()
					err := exchangeOnce(ctx, network, server.String(), nextPort(), 5*time.Second, req, want[0], buf)
					if err != nil {
						if ctx.Err() == nil {
							fail(err)
						}
						continue
					}
					n++
					lat = append(lat, time.Since(t0))
				}
				return nil
			})
			if err != nil {
				fail(err)
			}
			mu.Lock()
			res.Conns += n
			res.Latency = append(res.Latency, lat...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.Elapsed = time.Since(start)
	slices.Sort(res.Latency)
	return res, int(last.Load())
}

// twProbe makes one more exchange with the stream service at server from
// source port port, which the caller used moments ago: the server holds
// that 4-tuple in TIME-WAIT (the server closes first, so TIME-WAIT is on
// its side). Linux accepts a new SYN for a TIME-WAIT 4-tuple when its
// sequence number or timestamp is newer (RFC 6191), so a client that
// reuses source ports quickly, e.g. behind a NAT, keeps connecting. It
// returns nil if the exchange succeeds within timeout.
//
// The client's own socket of the previous connection may linger in
// LAST-ACK for a moment (until the server's ACK of the client's FIN
// arrives); connect then fails with EADDRNOTAVAIL before any SYN is sent,
// which says nothing about the server, so the probe waits and tries again
// (for at most timeout).
func twProbe(ctx context.Context, ns *lab.NS, server netip.AddrPort, port int, timeout time.Duration) error {
	network := "tcp4"
	if server.Addr().Is6() {
		network = "tcp6"
	}
	var want [1]byte
	services.FillPattern(1, 0, want[:])
	deadline := time.Now().Add(timeout)
	return ns.Do(func() error {
		for {
			err := exchangeOnce(ctx, network, server.String(), port, time.Until(deadline), services.StreamRequest(1, 1), want[0], make([]byte, 64))
			if !errors.Is(err, unix.EADDRNOTAVAIL) || time.Until(deadline) < 100*time.Millisecond {
				if errors.Is(err, unix.EADDRNOTAVAIL) {
					err = fmt.Errorf("the client's previous socket on port %d still held the 4-tuple after %v: %w", port, timeout, err)
				}
				return err
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

// exchangeOnce is one connect (from localPort, or a kernel-chosen port if
// 0) + "1 1\n" + read to EOF + close, all within timeout. It must run on a
// thread inside the client namespace (see connLoop).
func exchangeOnce(ctx context.Context, network, addr string, localPort int, timeout time.Duration, req string, want byte, buf []byte) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	conn, err := portDialer(localPort).DialContext(ctx, network, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl) //nolint:errcheck
	}
	return exchange(conn, req, want, buf)
}

// portDialer dials from source port localPort (with SO_REUSEADDR), or from
// a port the kernel picks if 0.
func portDialer(localPort int) *net.Dialer {
	var d net.Dialer
	if localPort != 0 {
		d.LocalAddr = &net.TCPAddr{Port: localPort}
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	return &d
}

// exchange sends req on conn and reads the 1-byte answer want to EOF.
func exchange(conn net.Conn, req string, want byte, buf []byte) error {
	if _, err := io.WriteString(conn, req); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := 0
	for {
		n, err := conn.Read(buf)
		if n > 0 {
			if got+n > 1 || buf[0] != want {
				return fmt.Errorf("unexpected answer %s", strconv.Quote(string(buf[:n])))
			}
			got += n
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
	}
	if got != 1 {
		return fmt.Errorf("got %d bytes, want 1", got)
	}
	return nil
}
