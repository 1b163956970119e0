package handoff

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestGenerateLabPKIAndLoadTLS(t *testing.T) {
	dir := t.TempDir()
	if err := GenerateLabPKI(dir, []string{"n1", "n2"}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"ca.pem", "ca-key.pem", "n1.pem", "n1-key.pem", "n2.pem", "n2-key.pem"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(f, "-key.pem") && st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, st.Mode().Perm())
		}
	}
	m, err := LoadTLS(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "n1.pem"), filepath.Join(dir, "n1-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(m.Names, []string{"n1"}) || !m.HasName("n1") || m.HasName("n2") {
		t.Errorf("names %v", m.Names)
	}
	leaf := m.Leaf
	if leaf.Subject.CommonName != "n1" || !slices.Equal(leaf.DNSNames, []string{"n1"}) {
		t.Errorf("leaf CN %q SANs %v", leaf.Subject.CommonName, leaf.DNSNames)
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		t.Errorf("EKU %v", leaf.ExtKeyUsage)
	}
	if leaf.PublicKeyAlgorithm != x509.ECDSA {
		t.Errorf("key algorithm %v", leaf.PublicKeyAlgorithm)
	}
	if d := leaf.NotAfter.Sub(leaf.NotBefore); d < 24*time.Hour || d > 25*time.Hour {
		t.Errorf("validity %v", d)
	}
	if m.Server.MinVersion != tls.VersionTLS13 || m.Server.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Errorf("server config: min %x auth %v", m.Server.MinVersion, m.Server.ClientAuth)
	}
	if c := m.Client("n2"); c.ServerName != "n2" || c.MinVersion != tls.VersionTLS13 || c.RootCAs == nil {
		t.Errorf("client config %+v", c)
	}
}

func TestLoadTLSErrors(t *testing.T) {
	dir, other := t.TempDir(), t.TempDir()
	if err := GenerateLabPKI(dir, []string{"n1", "n2"}); err != nil {
		t.Fatal(err)
	}
	if err := GenerateLabPKI(other, []string{"n1"}); err != nil {
		t.Fatal(err)
	}
	p := func(d, f string) string { return filepath.Join(d, f) }
	garbage := p(dir, "garbage.pem")
	os.WriteFile(garbage, []byte("not a pem file\n"), 0o600)
	for _, c := range []struct {
		name           string
		ca, cert, key  string
		want, wantFile string
	}{
		{"missing CA", p(dir, "nope.pem"), p(dir, "n1.pem"), p(dir, "n1-key.pem"), "no such file", "nope.pem"},
		{"missing cert", p(dir, "ca.pem"), p(dir, "nope.pem"), p(dir, "n1-key.pem"), "no such file", "nope.pem"},
		{"missing key", p(dir, "ca.pem"), p(dir, "n1.pem"), p(dir, "nope.pem"), "no such file", "nope.pem"},
		{"garbage CA", garbage, p(dir, "n1.pem"), p(dir, "n1-key.pem"), "no PEM certificate", "garbage.pem"},
		{"garbage cert", p(dir, "ca.pem"), garbage, p(dir, "n1-key.pem"), "no PEM certificate", "garbage.pem"},
		{"garbage key", p(dir, "ca.pem"), p(dir, "n1.pem"), garbage, "no PEM private key", "garbage.pem"},
		{"key as cert", p(dir, "ca.pem"), p(dir, "n1-key.pem"), p(dir, "n1-key.pem"), "no PEM certificate", "n1-key.pem"},
		{"wrong key", p(dir, "ca.pem"), p(dir, "n1.pem"), p(dir, "n2-key.pem"), "does not match", "n2-key.pem"},
		{"other CA", p(other, "ca.pem"), p(dir, "n1.pem"), p(dir, "n1-key.pem"), "does not verify", "n1.pem"},
	} {
		_, err := LoadTLS(c.ca, c.cert, c.key)
		if err == nil {
			t.Errorf("%s: no error", c.name)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, c.want) || !strings.Contains(msg, c.wantFile) || strings.Contains(msg, "\n") {
			t.Errorf("%s: error %q, want one line with %q naming %s", c.name, msg, c.want, c.wantFile)
		}
	}
}

func TestGenerateLabPKIRejectsBadNames(t *testing.T) {
	for _, n := range []string{"", "ca", "a/b", ".."} {
		if err := GenerateLabPKI(t.TempDir(), []string{n}); err == nil {
			t.Errorf("node name %q accepted", n)
		}
	}
}
