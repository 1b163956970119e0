package handoff

// Mutual TLS between peers. Every node has a certificate from the cluster
// CA whose CommonName (or a DNS SAN) is its node name; a node accepts a
// connection only from a certificate of that CA, and a client checks that
// the server's certificate names the peer it meant to reach. TLS 1.3 only.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// TLSMaterial is a node's mutual TLS setup: its certificate and the
// cluster CA.
type TLSMaterial struct {
	// Names are the node names the certificate carries: its CommonName and
	// DNS SANs.
	Names []string
	// Leaf is the node's certificate.
	Leaf *x509.Certificate
	// Server is the configuration for the peer (and TCP admin) listener:
	// client certificates from the CA required.
	Server *tls.Config

	cert tls.Certificate
	pool *x509.CertPool
}

// Client returns the configuration to dial the peer called serverName:
// the server's certificate must come from the CA and carry that name.
func (m *TLSMaterial) Client(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{m.cert},
		RootCAs:      m.pool,
		ServerName:   serverName,
	}
}

// HasName reports whether the certificate carries the node name.
func (m *TLSMaterial) HasName(name string) bool { return slices.Contains(m.Names, name) }

// certNames returns a certificate's CommonName and DNS SANs, deduplicated.
func certNames(c *x509.Certificate) []string {
	var out []string
	if c.Subject.CommonName != "" {
		out = append(out, c.Subject.CommonName)
	}
	for _, d := range c.DNSNames {
		if !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	return out
}

// fileErr makes a one-line error naming the file.
func fileErr(what, path string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	return fmt.Errorf("tls: %s %s: %v", what, path, err)
}

// LoadTLS reads the cluster CA, the node's certificate and its key (PEM)
// and builds the server and client configurations. It checks that the key
// matches the certificate, that the certificate is currently valid, and
// that the CA signed it for both server and client authentication.
func LoadTLS(caFile, certFile, keyFile string) (*TLSMaterial, error) {
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fileErr("CA", caFile, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fileErr("CA", caFile, errors.New("no PEM certificate found"))
	}
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		return nil, fileErr("certificate", certFile, err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, fileErr("key", keyFile, err)
	}
	if b, _ := pem.Decode(certPEM); b == nil || b.Type != "CERTIFICATE" {
		return nil, fileErr("certificate", certFile, errors.New("no PEM certificate found"))
	}
	if b, _ := pem.Decode(keyPEM); b == nil || !strings.HasSuffix(b.Type, "PRIVATE KEY") {
		return nil, fileErr("key", keyFile, errors.New("no PEM private key found"))
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("tls: certificate %s with key %s: %v", certFile, keyFile, err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return nil, fileErr("certificate", certFile, err)
		}
	}
	now := time.Now()
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return nil, fileErr("certificate", certFile, fmt.Errorf("not valid now (valid %s to %s)",
			leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339)))
	}
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	for _, use := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		opts := x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{use}}
		if _, err := leaf.Verify(opts); err != nil {
			return nil, fmt.Errorf("tls: certificate %s does not verify against CA %s: %v", certFile, caFile, err)
		}
	}
	names := certNames(leaf)
	if len(names) == 0 {
		return nil, fileErr("certificate", certFile, errors.New("carries no node name (CommonName or DNS SAN)"))
	}
	return &TLSMaterial{
		Names: names,
		Leaf:  leaf,
		Server: &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{cert},
			ClientCAs:    pool,
			ClientAuth:   tls.RequireAndVerifyClientCert,
		},
		cert: cert,
		pool: pool,
	}, nil
}

// GenerateLabPKI writes a throwaway cluster CA (ca.pem, ca-key.pem) and a
// certificate and key for every node (<node>.pem, <node>-key.pem) into dir:
// ECDSA P-256, CommonName and DNS SAN the node name, valid 24 hours, for
// server and client authentication. For labs and tests only.
func GenerateLabPKI(dir string, nodes []string) error {
	for _, n := range nodes {
		if n == "" || n == "ca" || strings.ContainsAny(n, `/\`) || n == "." || n == ".." {
			return fmt.Errorf("tls: lab PKI: %q is not a usable node name", n)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("tls: lab PKI: %v", err)
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("tls: lab PKI: %v", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "baton lab CA", Organization: []string{"baton"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("tls: lab PKI: CA: %v", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("tls: lab PKI: CA: %v", err)
	}
	if err := writePEM(dir, "ca", caDER, caKey); err != nil {
		return err
	}
	for _, n := range nodes {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return fmt.Errorf("tls: lab PKI: %v", err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{CommonName: n, Organization: []string{"baton"}},
			DNSNames:     []string{n},
			NotBefore:    now.Add(-time.Minute),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return fmt.Errorf("tls: lab PKI: %s: %v", n, err)
		}
		if err := writePEM(dir, n, der, key); err != nil {
			return err
		}
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

func writePEM(dir, name string, der []byte, key *ecdsa.PrivateKey) error {
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("tls: lab PKI: %s: %v", name, err)
	}
	certPath := filepath.Join(dir, name+".pem")
	if err := os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return fileErr("write", certPath, err)
	}
	keyPath := filepath.Join(dir, name+"-key.pem")
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return fileErr("write", keyPath, err)
	}
	return nil
}
