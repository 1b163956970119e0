package main

// This file is the latency figure of `batonlab bench`'s kernel comparison:
// request/response round trips of 64 bytes on one kept-alive connection to
// the echo service (port 7), through Baton with each TUN device and through
// the kernel, in rounds (roundOrder). Each run sends a 64-byte message,
// waits for its 64 bytes back, and repeats for the run's length; the
// figure is the median over runs of each run's p50 and p99.

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
)

// pingSize is the request (and response) size of the latency figure.
const pingSize = 64

// Latency is the request/response figure.
type Latency struct {
	Family  string        `json:"family"`
	Size    int           `json:"message_bytes"`
	RunS    float64       `json:"run_s"`
	Method  string        `json:"method"`
	Baton   []LatencySide `json:"baton"` // one per TUN device
	Kernel  LatencySide   `json:"kernel"`
	KernelA string        `json:"kernel_addr"`
	BatonA  string        `json:"baton_addr"`
}

// LatencySide is one server's latency runs, in microseconds.
type LatencySide struct {
	TUN   string    `json:"tun,omitempty"`
	P50us []float64 `json:"p50_us"`
	P99us []float64 `json:"p99_us"`
	N     []int     `json:"round_trips"`
	P50   float64   `json:"median_p50_us"`
	P99   float64   `json:"median_p99_us"`
	// Ratio is P50 over the kernel's (higher is slower).
	Ratio jfloat `json:"p50_ratio,omitempty"`
}

// latencyRun is the length of each latency run.
func latencyRun(d time.Duration) time.Duration { return max(time.Second, d/3) }

// latency measures the request/response figure in o.runs rounds.
func (k *kernelBench) latency(ctx context.Context, p serverPair) (*Latency, error) {
	dur := latencyRun(k.o.duration)
	lt := &Latency{Family: p.family, Size: pingSize, RunS: dur.Seconds(), KernelA: p.kernel.String(), BatonA: p.baton.String(),
		Method: fmt.Sprintf("one connection to the echo service, %d-byte request, its %d-byte echo read back, repeated for %v; p50/p99 per run, median over runs", pingSize, pingSize, dur)}
	side := map[string]*LatencySide{"kernel": &lt.Kernel}
	for _, t := range k.o.tuns {
		lt.Baton = append(lt.Baton, LatencySide{TUN: t})
	}
	for i := range lt.Baton {
		side[lt.Baton[i].TUN] = &lt.Baton[i]
	}
	for r := 1; r <= k.o.runs; r, k.round = r+1, k.round+1 {
		for _, server := range roundOrder(k.o.tuns, k.round) {
			name, addr := "kernel", p.kernel
			if server != "kernel" {
				if err := k.nd.use(ctx, server); err != nil {
					return nil, err
				}
				name, addr = "baton/"+server, p.baton
			}
			rtts, err := pingPong(ctx, k.l.Client, addr, pingSize, dur)
			if err != nil {
				return nil, fmt.Errorf("latency %s run %d: %w", name, r, err)
			}
			s := side[server]
			s.P50us = append(s.P50us, us(percentile(rtts, 50)))
			s.P99us = append(s.P99us, us(percentile(rtts, 99)))
			s.N = append(s.N, len(rtts))
			fmt.Printf("latency %s run %d/%d %-14s %-24s p50 %7.1f µs, p99 %7.1f µs (%d round trips)\n",
				p.family, r, k.o.runs, name, addr, us(percentile(rtts, 50)), us(percentile(rtts, 99)), len(rtts))
			if err := settle(ctx); err != nil {
				return nil, err
			}
			if err := k.nd.check(ctx, "latency "+name, true); err != nil {
				return nil, err
			}
		}
	}
	for _, s := range side {
		s.P50, s.P99 = median(s.P50us), median(s.P99us)
	}
	for i := range lt.Baton {
		lt.Baton[i].Ratio = jfloat(ratio(lt.Baton[i].P50, lt.Kernel.P50))
	}
	return lt, nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// pingPong sends size-byte messages to the echo service at server on one
// connection and reads each echo back before the next, for dur, and
// returns the round trips, sorted.
func pingPong(ctx context.Context, ns *lab.NS, server netip.AddrPort, size int, dur time.Duration) ([]time.Duration, error) {
	network := "tcp4"
	if server.Addr().Is6() {
		network = "tcp6"
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	conn, err := ns.Dial(dctx, network, server.String(), 0)
	cancel()
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	msg := make([]byte, size)
	for i := range msg {
		msg[i] = byte('a' + i%26)
	}
	buf := make([]byte, size)
	end := time.Now().Add(dur)
	conn.SetDeadline(end.Add(5 * time.Second)) //nolint:errcheck
	rtts := make([]time.Duration, 0, 1<<16)
	for time.Now().Before(end) {
		t0 := time.Now()
		if _, err := conn.Write(msg); err != nil {
			return nil, fmt.Errorf("write: %w", err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			return nil, fmt.Errorf("read: %w", err)
		}
		rtts = append(rtts, time.Since(t0))
		if string(buf) != string(msg) {
			return nil, fmt.Errorf("echo differs after %d round trips", len(rtts))
		}
	}
	if len(rtts) == 0 {
		return nil, fmt.Errorf("no round trip within %v", dur)
	}
	slices.Sort(rtts)
	return rtts, nil
}
