package lab

// This file turns the lab's nodes into a cluster: a throwaway PKI (cluster
// CA and one certificate per node, made with crypto/x509) and the peer
// network flags for batond. Peers talk over the nodes' eth0 addresses,
// routed by the router.

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/baton-anycast/baton/handoff"
)

// PeerPort is the peer gRPC port of every lab node.
const PeerPort = 7400

// Cluster describes the lab's peer network once EnableCluster ran.
type Cluster struct {
	// PKIDir holds ca.pem and <node>.pem / <node>-key.pem.
	PKIDir   string
	Replicas int
}

// EnableCluster generates the lab PKI and makes BatondArgs include the
// peer network flags: every node peers with every other node, with
// replicas copies of each flow.
func (l *Lab) EnableCluster(replicas int) error {
	names := make([]string, len(l.Nodes))
	for i := range l.Nodes {
		names[i] = NodeName(i)
	}
	dir := filepath.Join(l.LogDir, "pki")
	if err := handoff.GenerateLabPKI(dir, names); err != nil {
		return err
	}
	l.cluster = &Cluster{PKIDir: dir, Replicas: replicas}
	return nil
}

// ClusterInfo returns the cluster settings, or nil before EnableCluster.
func (l *Lab) ClusterInfo() *Cluster { return l.cluster }

// PeerAddr is node index i's peer address.
func (l *Lab) PeerAddr(i int) netip.AddrPort {
	return netip.AddrPortFrom(l.Nodes[i].Addr4, PeerPort)
}

// clusterArgs are the peer network flags of node index i.
func (l *Lab) clusterArgs(i int) []string {
	c := l.cluster
	var peers []string
	for j := range l.Nodes {
		if j != i {
			peers = append(peers, NodeName(j)+"="+l.PeerAddr(j).String())
		}
	}
	name := NodeName(i)
	return []string{
		"-peer-listen", l.PeerAddr(i).String(),
		"-peers", strings.Join(peers, ","),
		"-replicas", strconv.Itoa(c.Replicas),
		"-tls-ca", filepath.Join(c.PKIDir, "ca.pem"),
		"-tls-cert", filepath.Join(c.PKIDir, name+".pem"),
		"-tls-key", filepath.Join(c.PKIDir, name+"-key.pem"),
	}
}

// String is for logs.
func (c *Cluster) String() string {
	return fmt.Sprintf("cluster{pki %s, %d replicas}", c.PKIDir, c.Replicas)
}
