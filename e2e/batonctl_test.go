package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

// ctlIn runs batonctl inside a lab namespace (to reach a TCP admin
// address there) and returns its combined output and exit code.
func ctlIn(t *testing.T, ctx context.Context, ns *lab.NS, name string, args ...string) (string, int) {
	t.Helper()
	p, err := ns.Start(name, append([]string{batonctl}, args...), nil)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	st, err := p.Wait(wctx)
	if err != nil {
		t.Fatal(err)
	}
	return p.Log(), st.ExitCode()
}

// TestBatonctlCluster checks batonctl's cluster views (flows, flow, peers)
// on a 3-node cluster, and the admin API over TCP with mutual TLS: a
// client certificate from the cluster CA is served, one from another CA is
// refused with one line.
func TestBatonctlCluster(t *testing.T) {
	t.Parallel()
	ctx := testCtx(t)
	l := buildLab(t, ctx, 3, "btc")
	if err := l.EnableCluster(2); err != nil {
		t.Fatal(err)
	}
	pki := l.ClusterInfo().PKIDir
	tcpAdmin := fmt.Sprintf("%s:7401", l.Nodes[0].Addr4)
	for i := range 3 {
		var extra []string
		if i == 0 {
			extra = []string{"-admin", tcpAdmin}
		}
		if _, err := l.StartBatond(ctx, batond, i, extra...); err != nil {
			t.Fatal(err)
		}
	}
	// n1's admin is on TCP; n2 and n3 see every link of the cluster.
	admins := []batonv1.AdminClient{adminClient(t, l, 1), adminClient(t, l, 2)}
	if err := waitPeersUp(ctx, admins); err != nil {
		t.Fatal(err)
	}
	flows := openEchoFlows(t, ctx, l, 12, 32000, "hi", -1)
	admin := "unix:" + l.AdminSocket(1)

	// flows: every flow, cluster-wide, with its owner and two replicas.
	var listed struct {
		Flows []struct {
			State struct {
				Owner string `json:"owner"`
			} `json:"state"`
			Replicas []string `json:"replicas"`
		} `json:"flows"`
		Total int `json:"total"`
	}
	if err := waitFor(ctx, 20*time.Second, func() error {
		out, errOut, code := runCtl(t, "-admin", admin, "-o", "json", "flows", "-service", "echo")
		if code != 0 {
			return fmt.Errorf("flows: %d %s", code, errOut)
		}
		if err := json.Unmarshal([]byte(out), &listed); err != nil {
			return err
		}
		if listed.Total != len(flows) {
			return fmt.Errorf("flows lists %d, want %d", listed.Total, len(flows))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, f := range listed.Flows {
		if len(f.Replicas) != 2 {
			t.Fatalf("flow of %s has replicas %v", f.State.Owner, f.Replicas)
		}
	}
	out, _, code := runCtl(t, "-admin", admin, "flows")
	if code != 0 || !strings.Contains(out, "FLOW") || !strings.Contains(out, fmt.Sprintf("%d flows", len(flows))) {
		t.Fatalf("flows table:\n%s", out)
	}

	// flow KEY: the owner and both replicas hold a copy.
	key := flows[0].key.String()
	if err := waitFor(ctx, 10*time.Second, func() error {
		out, errOut, code := runCtl(t, "-admin", admin, "flow", key)
		if code != 0 || !strings.Contains(out, key) || strings.Count(out, "replica ") != 2 || !strings.Contains(out, "owner ") {
			return fmt.Errorf("flow %s: code %d\n%s%s", key, code, out, errOut)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	_, errOut, code := runCtl(t, "-admin", admin, "flow", "198.51.100.2:1->192.0.2.1:7")
	if code == 0 || !strings.Contains(errOut, "not known") || strings.Count(errOut, "\n") != 1 {
		t.Fatalf("unknown flow: code %d, %q", code, errOut)
	}
	_, errOut, code = runCtl(t, "-admin", admin, "flow", "not-a-key")
	if code == 0 || !strings.HasPrefix(errOut, "batonctl: flow key \"not-a-key\"") {
		t.Fatalf("bad key: code %d, %q", code, errOut)
	}

	// peers: both links up.
	out, _, code = runCtl(t, "-admin", admin, "peers")
	if code != 0 || strings.Count(out, " up ") != 2 {
		t.Fatalf("peers:\n%s", out)
	}

	// drain / undrain round trip.
	if out, _, code = runCtl(t, "-admin", admin, "drain"); code != 0 || !strings.Contains(out, "draining") {
		t.Fatalf("drain: %s", out)
	}
	if out, _, _ = runCtl(t, "-admin", admin, "health"); !strings.Contains(out, "draining") {
		t.Fatalf("health after drain:\n%s", out)
	}
	if out, _, code = runCtl(t, "-admin", admin, "undrain"); code != 0 || !strings.Contains(out, "serving") {
		t.Fatalf("undrain: %s", out)
	}

	// TCP admin with a certificate from the cluster CA.
	good := []string{"-admin", tcpAdmin, "-node", "n1",
		"-tls-ca", filepath.Join(pki, "ca.pem"), "-tls-cert", filepath.Join(pki, "n2.pem"), "-tls-key", filepath.Join(pki, "n2-key.pem")}
	out, code = ctlIn(t, ctx, l.Client, "ctl-good", append(good, "health")...)
	if code != 0 || !strings.Contains(out, "serving") {
		t.Fatalf("TCP admin with a cluster certificate: code %d\n%s", code, out)
	}
	// ... and one from another CA: refused, one line.
	foreign := filepath.Join(l.LogDir, "foreign-admin-pki")
	if err := handoff.GenerateLabPKI(foreign, []string{"n2"}); err != nil {
		t.Fatal(err)
	}
	bad := []string{"-admin", tcpAdmin, "-node", "n1",
		"-tls-ca", filepath.Join(foreign, "ca.pem"), "-tls-cert", filepath.Join(foreign, "n2.pem"), "-tls-key", filepath.Join(foreign, "n2-key.pem")}
	out, code = ctlIn(t, ctx, l.Client, "ctl-bad", append(bad, "health")...)
	if code == 0 || !strings.HasPrefix(out, "batonctl: batond at "+tcpAdmin+" refused") || strings.Count(out, "\n") != 1 {
		t.Fatalf("TCP admin with a foreign CA and certificate: code %d, %q", code, out)
	}
	// A client that trusts the cluster CA but presents a foreign
	// certificate is refused by batond itself.
	cert, err := tls.LoadX509KeyPair(filepath.Join(foreign, "n2.pem"), filepath.Join(foreign, "n2-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(pki, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	conn, err := grpc.NewClient(tcpAdmin,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: "n1", Certificates: []tls.Certificate{cert}})),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return l.Client.Dial(ctx, "tcp4", addr, 0)
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := batonv1.NewAdminClient(conn).Health(hctx, &batonv1.HealthRequest{}); err == nil {
		t.Fatal("batond served an admin client whose certificate is not from the cluster CA")
	}
	// A certificate that does not match the CA given is caught before
	// dialing, in one line naming the files.
	mixed := []string{"-admin", tcpAdmin, "-node", "n1",
		"-tls-ca", filepath.Join(pki, "ca.pem"), "-tls-cert", filepath.Join(foreign, "n2.pem"), "-tls-key", filepath.Join(foreign, "n2-key.pem")}
	out, code = ctlIn(t, ctx, l.Client, "ctl-mixed", append(mixed, "health")...)
	if code != 2 || !strings.Contains(out, "does not verify against CA") || strings.Count(out, "\n") != 1 {
		t.Fatalf("TCP admin with a certificate from another CA: code %d, %q", code, out)
	}
	// ... and no certificate at all: a usage error before dialing.
	out, code = ctlIn(t, ctx, l.Client, "ctl-none", "-admin", tcpAdmin, "health")
	if code != 2 || !strings.Contains(out, "give -tls-ca, -tls-cert and -tls-key") {
		t.Fatalf("TCP admin without TLS flags: code %d, %q", code, out)
	}
}
