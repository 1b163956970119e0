package main

// This file is the throughput part of `batonlab bench`'s kernel comparison:
// single-flow download and upload, parallel downloads, the same at a large
// MTU, each figure taken in rounds of Baton with each TUN device and the
// kernel (roundOrder), with the median of each server and its ratio to the
// kernel's.
//
//   - download: the stream service (port 9000), one connection asking for
//     an endless stream, read and discarded (discardStream);
//   - upload: the http service (port 80), one kept-alive connection
//     pipelining POST requests with 256 KiB bodies, which the service reads
//     and discards (answering 405, a ~100-byte response); the figure counts
//     the bodies whose response came back within the run, so every byte
//     counted reached the service (uploadHTTP);
//   - parallel: n downloads at once, the sum of their bytes over the run.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
)

const (
	echoPort = 7
	// uploadBody is the body of each upload request: the largest the http
	// service reads and discards while keeping the connection.
	uploadBody = 256 << 10
	// targetBigMTU is the single-flow target with a large MTU.
	targetBigMTU = 0.8
)

// The kinds of throughput figure.
const (
	kindDownload = "download"
	kindUpload   = "upload"
)

// kernelBench is the state of the kernel comparison: the lab, batond on its
// node (with the current TUN device) and the round counter, which runs on
// across figures so that each starts with the device the previous one
// ended with.
type kernelBench struct {
	o     benchOpts
	l     *lab.Lab
	nd    *nodeDaemon
	round int
}

// server is one endpoint pair: Baton's anycast address and the kernel's
// node address, same port.
type serverPair struct {
	family        string
	baton, kernel netip.AddrPort
}

// measureFn takes one run against addr and returns its Gb/s and a short
// description of what it moved.
type measureFn func(ctx context.Context, addr netip.AddrPort, run int) (float64, string, error)

// throughput measures one figure in runs rounds.
func (k *kernelBench) throughput(ctx context.Context, sf SingleFlow, p serverPair, runs int, fn measureFn) (SingleFlow, error) {
	sf.BatonAddr, sf.KernelAddr = p.baton.String(), p.kernel.String()
	byTUN := map[string]*[]float64{}
	for _, t := range k.o.tuns {
		sf.Baton = append(sf.Baton, BatonFlow{TUN: t})
	}
	for i := range sf.Baton {
		byTUN[sf.Baton[i].TUN] = &sf.Baton[i].Gbps
	}
	label := flowLabel(sf)
	for r := 1; r <= runs; r, k.round = r+1, k.round+1 {
		for _, server := range roundOrder(k.o.tuns, k.round) {
			name, addr, out := "kernel", p.kernel, &sf.KernelGbps
			if server != "kernel" {
				if err := k.nd.use(ctx, server); err != nil {
					return sf, err
				}
				name, addr, out = "baton/"+server, p.baton, byTUN[server]
			}
			g, what, err := fn(ctx, addr, r)
			if err != nil {
				return sf, fmt.Errorf("%s %s run %d: %w", label, name, r, err)
			}
			*out = append(*out, g)
			fmt.Printf("%s run %d/%d %-14s %-24s %6.2f Gb/s (%s)\n", label, r, runs, name, addr, g, what)
			if err := settle(ctx); err != nil {
				return sf, err
			}
			if err := k.nd.check(ctx, fmt.Sprintf("%s %s run %d", label, name, r), true); err != nil {
				return sf, err
			}
		}
	}
	sf.KernelMedian = median(sf.KernelGbps)
	for i := range sf.Baton {
		b := &sf.Baton[i]
		b.Median = median(b.Gbps)
		b.Ratio = jfloat(ratio(b.Median, sf.KernelMedian))
		b.MeetsTarget = sf.Target > 0 && float64(b.Ratio) >= sf.Target
	}
	return sf, nil
}

// flowLabel names a throughput figure: "single flow IPv4", "upload IPv4",
// "8 flows IPv4", with " MTU 65000" when the MTU is not 1500.
func flowLabel(sf SingleFlow) string {
	s := "single flow " + sf.Family
	switch {
	case sf.Kind == kindUpload:
		s = "upload " + sf.Family
	case sf.Streams > 1:
		s = strconv.Itoa(sf.Streams) + " flows " + sf.Family
	}
	if sf.MTU != 0 && sf.MTU != 1500 {
		s += " MTU " + strconv.Itoa(sf.MTU)
	}
	return s
}

// downloadFn is a single-flow download run.
func (k *kernelBench) downloadFn() measureFn {
	return func(ctx context.Context, addr netip.AddrPort, r int) (float64, string, error) {
		dr, err := discardStream(ctx, k.l.Client, addr, uint64(r), k.o.duration)
		if err != nil {
			return 0, "", err
		}
		return gbps(dr.Bytes, dr.Elapsed), fmt.Sprintf("%s in %.1fs", formatSize(uint64(dr.Bytes)), dr.Elapsed.Seconds()), nil
	}
}

// parallelFn is a run of n downloads at once.
func (k *kernelBench) parallelFn(n int) measureFn {
	return func(ctx context.Context, addr netip.AddrPort, r int) (float64, string, error) {
		var (
			wg    sync.WaitGroup
			mu    sync.Mutex
			total int64
			first error
		)
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				dr, err := discardStream(ctx, k.l.Client, addr, uint64(r*1000+i), k.o.duration)
				mu.Lock()
				defer mu.Unlock()
				total += dr.Bytes
				if err != nil && first == nil {
					first = err
				}
			}()
		}
		wg.Wait()
		if first != nil {
			return 0, "", first
		}
		return gbps(total, k.o.duration), fmt.Sprintf("%s in %d flows", formatSize(uint64(total)), n), nil
	}
}

// uploadFn is a single-flow upload run.
func (k *kernelBench) uploadFn() measureFn {
	return func(ctx context.Context, addr netip.AddrPort, _ int) (float64, string, error) {
		b, err := uploadHTTP(ctx, k.l.Client, addr, k.o.duration)
		if err != nil {
			return 0, "", err
		}
		return gbps(b, k.o.duration), formatSize(uint64(b)) + " acknowledged by the service", nil
	}
}

// uploadRequest is the header of one upload request.
func uploadRequest(server netip.AddrPort, body int) string {
	return "POST /healthz HTTP/1.1\r\nHost: " + server.String() + "\r\nContent-Length: " + strconv.Itoa(body) + "\r\n\r\n"
}

// uploadHTTP sends POST requests with uploadBody-byte bodies back to back on
// one connection to the http service at server for dur, and returns the
// body bytes of the requests answered within dur.
func uploadHTTP(ctx context.Context, ns *lab.NS, server netip.AddrPort, dur time.Duration) (int64, error) {
	network := "tcp4"
	if server.Addr().Is6() {
		network = "tcp6"
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := ns.Dial(dctx, network, server.String(), 0)
	cancel()
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	req := append([]byte(uploadRequest(server, uploadBody)), make([]byte, uploadBody)...)
	end := time.Now().Add(dur)
	conn.SetDeadline(end) //nolint:errcheck
	go func() {
		for {
			if _, err := conn.Write(req); err != nil {
				return
			}
		}
	}()
	br := bufio.NewReaderSize(conn, 64<<10)
	var answered int64
	for {
		resp, err := http.ReadResponse(br, nil)
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err == nil && resp.StatusCode != http.StatusMethodNotAllowed {
				err = fmt.Errorf("upload answered %s", resp.Status)
			}
		}
		if err != nil {
			if time.Now().After(end) || isTimeout(err) {
				return answered * uploadBody, ctx.Err()
			}
			return answered * uploadBody, err
		}
		answered++
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// bigMTUFigures sets the lab's links and batond's TUN to mtu and measures
// the IPv4 single-flow download and upload again.
func (k *kernelBench) bigMTUFigures(ctx context.Context, up, down serverPair, mtu int, res *Results) error {
	if err := setLabMTU(k.l, mtu); err != nil {
		return err
	}
	i := slices.Index(k.nd.base, "-mtu")
	k.nd.base[i+1] = strconv.Itoa(mtu)
	if err := k.nd.proc.Stop(); err != nil { // restarted with the new MTU by use
		return fmt.Errorf("stopping batond: %w", err)
	}
	for _, kind := range []string{kindDownload, kindUpload} {
		fn, p := k.downloadFn(), down
		if kind == kindUpload {
			fn, p = k.uploadFn(), up
		}
		sf, err := k.throughput(ctx, SingleFlow{Family: p.family, Kind: kind, Streams: 1, MTU: mtu, Target: targetBigMTU}, p, k.o.runs, fn)
		if err != nil {
			return err
		}
		res.Flows = append(res.Flows, sf)
	}
	return nil
}

// flowFigures measures everything at the lab's base MTU after the
// single-flow downloads: the IPv4 upload and the parallel downloads.
func (k *kernelBench) flowFigures(ctx context.Context, up, down serverPair, res *Results) error {
	sf, err := k.throughput(ctx, SingleFlow{Family: up.family, Kind: kindUpload, Streams: 1, MTU: k.o.mtu, Target: targetSingleFlow}, up, k.o.runs, k.uploadFn())
	if err != nil {
		return err
	}
	res.Flows = append(res.Flows, sf)
	for _, n := range k.o.parallel {
		sf, err := k.throughput(ctx, SingleFlow{Family: down.family, Kind: kindDownload, Streams: n, MTU: k.o.mtu}, down, k.o.runs, k.parallelFn(n))
		if err != nil {
			return err
		}
		res.Flows = append(res.Flows, sf)
	}
	return nil
}

// parseIntList parses "8,64" into integers in 1..hi.
func parseIntList(s string, hi int) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > hi {
			return nil, fmt.Errorf("%q is not a number in 1..%d", f, hi)
		}
		out = append(out, n)
	}
	return out, nil
}
