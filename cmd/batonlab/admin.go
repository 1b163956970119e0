package main

// This file talks to the lab's batond processes from the host: their admin
// API over gRPC on the unix sockets in the lab's log directory (path-based
// unix sockets work across network namespaces), their Prometheus metrics
// on the node namespace's loopback, and their CPU time in /proc.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/baton-anycast/baton/e2e/lab"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// adminConn is a gRPC connection to one node's admin socket.
type adminConn struct {
	batonv1.AdminClient
	node string // batond node name, "n1"...
	conn *grpc.ClientConn
}

// dialAdmin connects to node index i's admin socket. The connection is
// lazy; a batond restarted on the same socket is reached again within
// 100 ms (short reconnect backoff).
func dialAdmin(l *lab.Lab, i int) (*adminConn, error) {
	conn, err := grpc.NewClient("unix://"+l.AdminSocket(i),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 100 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	if err != nil {
		return nil, fmt.Errorf("admin socket of %s: %w", lab.NodeName(i), err)
	}
	return &adminConn{AdminClient: batonv1.NewAdminClient(conn), node: lab.NodeName(i), conn: conn}, nil
}

func (a *adminConn) Close() error { return a.conn.Close() }

// dialAdmins connects to every node's admin socket.
func dialAdmins(l *lab.Lab) ([]*adminConn, error) {
	as := make([]*adminConn, len(l.Nodes))
	for i := range l.Nodes {
		a, err := dialAdmin(l, i)
		if err != nil {
			closeAdmins(as)
			return nil, err
		}
		as[i] = a
	}
	return as, nil
}

func closeAdmins(as []*adminConn) {
	for _, a := range as {
		if a != nil {
			a.Close()
		}
	}
}

// waitPeersUp waits until every node reports every peer up (a replication
// stream to or from it is live), for at most timeout.
func waitPeersUp(ctx context.Context, as []*adminConn, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		err := peersUp(ctx, as)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("peer links not up after %v: %w", timeout, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func peersUp(ctx context.Context, as []*adminConn) error {
	for _, a := range as {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		resp, err := a.ListPeers(rctx, &batonv1.ListPeersRequest{})
		cancel()
		if err != nil {
			return fmt.Errorf("%s: ListPeers: %w", a.node, err)
		}
		if len(resp.Peers) != len(as)-1 {
			return fmt.Errorf("%s has %d peers, want %d", a.node, len(resp.Peers), len(as)-1)
		}
		for _, p := range resp.Peers {
			if !p.Up {
				why := ""
				if p.LastError != "" {
					why = " (" + p.LastError + ")"
				}
				return fmt.Errorf("%s sees %s down%s", a.node, p.Name, why)
			}
		}
	}
	return nil
}

// listFlows returns every flow of a ListFlows request, all pages.
func listFlows(ctx context.Context, a *adminConn, req *batonv1.ListFlowsRequest) (flows []*batonv1.FlowEntry, unreachable []string, err error) {
	req.PageSize = 1000
	req.PageToken = ""
	for {
		resp, err := a.ListFlows(ctx, req)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: ListFlows: %w", a.node, err)
		}
		flows = append(flows, resp.Flows...)
		unreachable = append(unreachable, resp.UnreachablePeers...)
		if resp.NextPageToken == "" {
			return flows, unreachable, nil
		}
		req.PageToken = resp.NextPageToken
	}
}

// maxLagP99 is the largest lag_p99 over a node's peers.
func maxLagP99(resp *batonv1.ListPeersResponse) time.Duration {
	var d int64
	for _, p := range resp.GetPeers() {
		d = max(d, p.LagP99Nano)
	}
	return time.Duration(d)
}

// peerByName returns the PeerInfo of name in resp, nil if absent.
func peerByName(resp *batonv1.ListPeersResponse, name string) *batonv1.PeerInfo {
	for _, p := range resp.GetPeers() {
		if p.Name == name {
			return p
		}
	}
	return nil
}

// metricSample is one line of the Prometheus text format.
type metricSample struct {
	name   string
	labels map[string]string
	value  float64
}

// metricSet is a scrape of /metrics.
type metricSet []metricSample

// sum adds the samples named name whose labels include every pair of
// match ("key", "value", ...).
func (m metricSet) sum(name string, match ...string) float64 {
	var s float64
	for _, x := range m {
		if x.name != name {
			continue
		}
		ok := true
		for i := 0; i+1 < len(match); i += 2 {
			if x.labels[match[i]] != match[i+1] {
				ok = false
				break
			}
		}
		if ok {
			s += x.value
		}
	}
	return s
}

// parseMetrics parses the Prometheus text exposition format (comments
// skipped; label values may hold escaped quotes).
func parseMetrics(r io.Reader) (metricSet, error) {
	var out metricSet
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		s := metricSample{labels: map[string]string{}}
		rest := line
		if i := strings.IndexAny(line, "{ "); i < 0 {
			return nil, fmt.Errorf("metrics: bad line %q", line)
		} else {
			s.name, rest = line[:i], line[i:]
		}
		if strings.HasPrefix(rest, "{") {
			rest = rest[1:]
			for {
				rest = strings.TrimLeft(rest, " ,")
				if strings.HasPrefix(rest, "}") {
					rest = rest[1:]
					break
				}
				eq := strings.Index(rest, "=\"")
				if eq < 0 {
					return nil, fmt.Errorf("metrics: bad labels in %q", line)
				}
				key := rest[:eq]
				rest = rest[eq+2:]
				var val strings.Builder
				closed := false
				for i := 0; i < len(rest); i++ {
					c := rest[i]
					if c == '\\' && i+1 < len(rest) {
						i++
						switch rest[i] {
						case 'n':
							val.WriteByte('\n')
						default:
							val.WriteByte(rest[i])
						}
						continue
					}
					if c == '"' {
						rest = rest[i+1:]
						closed = true
						break
					}
					val.WriteByte(c)
				}
				if !closed {
					return nil, fmt.Errorf("metrics: unterminated label value in %q", line)
				}
				s.labels[key] = val.String()
			}
		}
		f := strings.Fields(rest)
		if len(f) < 1 {
			return nil, fmt.Errorf("metrics: no value in %q", line)
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics: value in %q: %w", line, err)
		}
		s.value = v
		out = append(out, s)
	}
	return out, sc.Err()
}

// scrapeMetrics fetches batond's /metrics from the node namespace's
// loopback.
func scrapeMetrics(ctx context.Context, node *lab.Node) (metricSet, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return node.Dial(ctx, "tcp", addr, 0)
		},
		DisableKeepAlives: true,
	}, Timeout: 5 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+metricsAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s: metrics: %w", node.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: metrics: %s", node.Name, resp.Status)
	}
	return parseMetrics(resp.Body)
}

// userHZ is the unit of the CPU times in /proc/PID/stat (USER_HZ, 100 on
// every Linux architecture Baton runs on).
const userHZ = 100

// procCPU returns the user + system CPU time of process pid so far.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	return parseProcStatCPU(string(b))
}

// parseProcStatCPU reads utime + stime (fields 14 and 15) from the text of
// /proc/PID/stat. The command name (field 2) is in parentheses and may
// hold spaces, so fields are counted after its closing parenthesis.
func parseProcStatCPU(stat string) (time.Duration, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("/proc/PID/stat: no command name")
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state): utime is field 14, f[11].
	if len(f) < 13 {
		return 0, errors.New("/proc/PID/stat: too few fields")
	}
	var ticks uint64
	for _, s := range f[11:13] {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/PID/stat: %w", err)
		}
		ticks += v
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}
