package handoff

import (
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
)

// freezeProxy forwards TCP connections to a target; frozen, it stops
// moving bytes without closing anything (a black-holed path).
type freezeProxy struct {
	lis    net.Listener
	target string

	mu     sync.Mutex
	frozen bool
	thaw   chan struct{}
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newFreezeProxy(t *testing.T, target string) *freezeProxy {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezeProxy{lis: lis, target: target, thaw: make(chan struct{})}
	close(p.thaw)
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

func (p *freezeProxy) Addr() string { return p.lis.Addr().String() }

func (p *freezeProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		thaw := p.thaw
		p.mu.Unlock()
		<-thaw // no new connection gets through while frozen
		u, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, u)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, u)
		go p.pipe(u, c)
	}
}

func (p *freezeProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			frozen := p.frozen
			p.mu.Unlock()
			if frozen {
				io.Copy(io.Discard, src) // swallow until closed
				return
			}
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			dst.Close()
			return
		}
	}
}

func (p *freezeProxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.frozen = true
	p.thaw = make(chan struct{})
}

// Thaw lets new connections through (frozen ones stay dead).
func (p *freezeProxy) Thaw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.frozen = false
	close(p.thaw)
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func (p *freezeProxy) Close() {
	p.lis.Close()
	p.mu.Lock()
	if p.frozen {
		p.frozen = false
		close(p.thaw)
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// A peer behind a black-holed path is noticed by both mechanisms: the
// outbound stream's ack timeout and the server's keepalive on the inbound
// stream. When the path heals, the streams come back and resync.
func TestReplicationBlackholedPeer(t *testing.T) {
	t.Cleanup(leakCheck(t))
	// Reserve listeners, put a proxy in front of each node, and point each
	// node's peer address at the other's proxy.
	la, _ := net.Listen("tcp", "127.0.0.1:0")
	lb, _ := net.Listen("tcp", "127.0.0.1:0")
	pa := newFreezeProxy(t, la.Addr().String())
	pb := newFreezeProxy(t, lb.Addr().String())
	c := newClusterOn(t, map[string]net.Listener{"a": la, "b": lb}, map[string]string{"a": pa.Addr(), "b": pb.Addr()}, 1)
	c.waitLive("a", "b")
	c.nodes["a"].src.Open(keysRange(0, 50)...)
	c.waitPlaced("a", c.names)

	pa.Freeze()
	pb.Freeze()
	c.nodes["a"].src.Open(keysRange(50, 60)...) // stuck on the frozen path
	for _, n := range []string{"a", "b"} {
		r := c.nodes[n].r
		eventually(t, n+" to see its peer down", func() bool { return len(r.Members().Live()) == 1 })
	}
	if e := c.nodes["a"].r.Peers()[0].LastError; !strings.Contains(e, "no acknowledgement") {
		t.Errorf("a's link error %q, want the ack timeout", e)
	}

	pa.Thaw()
	pb.Thaw()
	c.waitLive("a", "b")
	c.waitPlaced("a", c.names)
}

// newClusterOn starts nodes on the given listeners with the given peer
// addresses (what the other nodes dial).
func newClusterOn(t *testing.T, lis map[string]net.Listener, addrs map[string]string, k int) *testCluster {
	c := &testCluster{t: t, pki: t.TempDir(), k: k, nodes: map[string]*testNode{}}
	for n := range lis {
		c.names = append(c.names, n)
	}
	sort.Strings(c.names)
	if err := GenerateLabPKI(c.pki, c.names); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.names {
		c.nodes[n] = &testNode{name: n, addr: addrs[n], src: newFakeSource(n)}
	}
	for _, n := range c.names {
		c.start(n, lis[n])
	}
	t.Cleanup(c.Close)
	return c
}
