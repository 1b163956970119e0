// Package e2e holds Baton's end-to-end tests: real batond processes in
// network namespaces built by e2e/lab, a router with a kernel ECMP route, and
// a real Linux TCP client (kernel sockets created in the client namespace).
// They need root; CI runs them as root.
package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/stack/services"
)

// Binaries built once for the whole run.
var batond, batonctl string

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("e2e: skipped: needs root (network namespaces, TUN devices)")
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "baton-e2e-bin-")
	if err != nil {
		fmt.Println("e2e:", err)
		os.Exit(1)
	}
	// Readable by the unprivileged user of the no-CAP_NET_ADMIN test.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Println("e2e:", err)
		os.Exit(1)
	}
	for _, name := range []string{"batond", "batonctl"} {
		out, err := exec.Command("go", "build", "-o", filepath.Join(dir, name), "github.com/baton-anycast/baton/cmd/"+name).CombinedOutput()
		if err != nil {
			fmt.Printf("e2e: building %s: %v\n%s", name, err, out)
			os.Exit(1)
		}
	}
	batond, batonctl = filepath.Join(dir, "batond"), filepath.Join(dir, "batonctl")
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildLab builds a lab with n nodes (namespaces prefixed with prefix) and
// starts nothing; everything is torn down when the test ends, and the logs
// of every process it ran are printed if the test failed.
func buildLab(t *testing.T, ctx context.Context, n int, prefix string) *lab.Lab {
	t.Helper()
	l, err := lab.New(ctx, lab.Config{Nodes: n, Prefix: prefix, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, p := range l.Procs() {
				t.Logf("--- log of %s ---\n%s", p, p.Log())
			}
		}
		if err := l.Close(); err != nil {
			t.Errorf("lab teardown: %v", err)
		}
	})
	return l
}

// newLab builds a lab with n nodes and starts batond on each.
func newLab(t *testing.T, n int) (*lab.Lab, []*lab.Proc) {
	t.Helper()
	ctx := testCtx(t)
	l := buildLab(t, ctx, n, "bte")
	procs := make([]*lab.Proc, n)
	for i := range n {
		p, err := l.StartBatond(ctx, batond, i)
		if err != nil {
			t.Fatal(err)
		}
		procs[i] = p
	}
	return l, procs
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// hostPort joins an address and a port for net.Dial.
func hostPort(a interface{ String() string }, port int) string {
	return net.JoinHostPort(a.String(), strconv.Itoa(port))
}

// httpConn is a keep-alive HTTP/1.1 client connection.
type httpConn struct {
	net.Conn
	br *bufio.Reader
}

func dialHTTP(ctx context.Context, ns *lab.NS, network, addr string, localPort int) (*httpConn, error) {
	c, err := ns.Dial(ctx, network, addr, localPort)
	if err != nil {
		return nil, err
	}
	return &httpConn{Conn: c, br: bufio.NewReaderSize(c, 64<<10)}, nil
}

// get sends GET path and returns the status and a reader for exactly the
// body (Content-Length bytes).
func (h *httpConn) get(path string) (int, io.Reader, error) {
	if _, err := fmt.Fprintf(h, "GET %s HTTP/1.1\r\nHost: anycast\r\n\r\n", path); err != nil {
		return 0, nil, err
	}
	status, length := 0, int64(-1)
	for first := true; ; first = false {
		line, err := h.br.ReadString('\n')
		if err != nil {
			return 0, nil, fmt.Errorf("reading response header: %w", err)
		}
		line = strings.TrimRight(line, "\r\n")
		if first {
			f := strings.Fields(line)
			if len(f) < 2 {
				return 0, nil, fmt.Errorf("bad status line %q", line)
			}
			status, _ = strconv.Atoi(f[1])
			continue
		}
		if line == "" {
			break
		}
		if k, v, ok := strings.Cut(line, ":"); ok && strings.EqualFold(k, "Content-Length") {
			length, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	if length < 0 {
		return 0, nil, fmt.Errorf("response without Content-Length")
	}
	return status, io.LimitReader(h.br, length), nil
}

// getString is get for small bodies.
func (h *httpConn) getString(path string) (int, string, error) {
	status, body, err := h.get(path)
	if err != nil {
		return 0, "", err
	}
	b, err := io.ReadAll(body)
	return status, string(b), err
}

// verifyBytes checks that body is exactly n bytes of the pattern of seed.
func verifyBytes(body io.Reader, n, seed uint64) error {
	got, ok, err := services.ReadStream(body, n, seed)
	if err != nil || !ok {
		return fmt.Errorf("after %d of %d bytes: %v", got, n, err)
	}
	return nil
}

// runCtl runs batonctl with args and returns its stdout, stderr and exit code.
func runCtl(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(batonctl, args...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}
