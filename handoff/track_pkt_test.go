package handoff

// Packet builder and connection driver for the flow tracker's tests.

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
)

var (
	trkAnycast4  = netip.MustParseAddrPort("192.0.2.1:9000")
	trkAnycast6  = netip.MustParseAddrPort("[2001:db8:a::1]:9000")
	trkPrefixes  = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8:a::/64")}
	trkClient4   = netip.MustParseAddr("198.51.100.2")
	trkClient6   = netip.MustParseAddr("2001:db8:100::2")
	trkTestEpoch = time.Unix(1_700_000_000, 0)
)

// trkOpts are the TCP options of a built segment (the zero value: none).
type trkOpts struct {
	mss         uint16
	hasWS       bool
	ws          int
	sackPerm    bool
	ts          bool
	tsval, tsec uint32
	sack        []header.SACKBlock
}

// trkNoOpts is a segment without options.
var trkNoOpts = trkOpts{}

// trkSeg is one TCP segment to build.
type trkSeg struct {
	src, dst netip.AddrPort
	seq, ack uint32
	flags    header.TCPFlags
	wnd      uint16
	opts     trkOpts
	payload  []byte
}

func (o *trkOpts) encode() []byte {
	var b [header.TCPOptionsMaximumSize]byte
	n := 0
	if o.mss != 0 {
		n += header.EncodeMSSOption(uint32(o.mss), b[n:])
	}
	if o.hasWS {
		n += header.EncodeNOP(b[n:])
		n += header.EncodeWSOption(o.ws, b[n:])
	}
	if o.sackPerm {
		n += header.EncodeNOP(b[n:])
		n += header.EncodeNOP(b[n:])
		n += header.EncodeSACKPermittedOption(b[n:])
	}
	if o.ts {
		n += header.EncodeNOP(b[n:])
		n += header.EncodeNOP(b[n:])
		n += header.EncodeTSOption(o.tsval, o.tsec, b[n:])
	}
	if len(o.sack) > 0 {
		n += header.EncodeNOP(b[n:])
		n += header.EncodeNOP(b[n:])
		n += header.EncodeSACKBlocks(o.sack, b[n:])
	}
	n += header.AddTCPOptionPadding(b[:], n)
	return append([]byte(nil), b[:n]...)
}

// bytes builds the IP packet with correct checksums (synth.go's builder).
func (s trkSeg) bytes() []byte {
	wnd := s.wnd
	if wnd == 0 {
		wnd = 65535
	}
	p := tcpPacket{src: s.src, dst: s.dst, seq: s.seq, ack: s.ack, flags: s.flags, window: wnd, opts: s.opts.encode(), payload: s.payload}
	return p.build()
}

// trkFixChecksum recomputes the TCP checksum of an IPv4 or IPv6 packet
// without extension headers (it does nothing to anything else).
func trkFixChecksum(pkt []byte) {
	var l4 header.TCP
	var src, dst tcpip.Address
	switch {
	case len(pkt) >= header.IPv4MinimumSize && pkt[0]>>4 == 4:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.Protocol() != uint8(header.TCPProtocolNumber) {
			return
		}
		l4 = header.TCP(pkt[ip.HeaderLength():ip.TotalLength()])
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
	case len(pkt) >= header.IPv6MinimumSize && pkt[0]>>4 == 6:
		ip := header.IPv6(pkt)
		end := header.IPv6MinimumSize + int(ip.PayloadLength())
		if end > len(pkt) || ip.NextHeader() != uint8(header.TCPProtocolNumber) {
			return
		}
		l4 = header.TCP(pkt[header.IPv6MinimumSize:end])
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
	default:
		return
	}
	if len(l4) < header.TCPMinimumSize {
		return
	}
	l4.SetChecksum(0)
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(l4)))
	l4.SetChecksum(^checksum.Checksum(l4, xsum))
}

// trkClock is an injectable clock.
type trkClock struct {
	mu sync.Mutex
	t  time.Time
}

func newTrkClock() *trkClock { return &trkClock{t: trkTestEpoch} }

func (c *trkClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *trkClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// newTrkTracker returns a tracker over trkPrefixes with an injected clock.
func newTrkTracker(cfg TrackerConfig) (*Tracker, *trkClock) {
	clk := newTrkClock()
	if cfg.Node == "" {
		cfg.Node = "n1"
	}
	if cfg.Prefixes == nil {
		cfg.Prefixes = trkPrefixes
	}
	if cfg.Now == nil {
		cfg.Now = clk.Now
	}
	if cfg.ServiceFor == nil {
		cfg.ServiceFor = func(port uint16) string {
			if port == 9000 {
				return "stream"
			}
			return ""
		}
	}
	return NewTracker(cfg), clk
}

// trkConn drives one connection through a tracker, keeping both sides'
// sequence numbers.
type trkConn struct {
	tb              testing.TB
	tr              *Tracker
	client, anycast netip.AddrPort
	cISN, sISN      uint32
	cNext, sNext    uint32 // next sequence number each side sends
	ts              bool   // send timestamps after the handshake
	cTS, sTS        uint32
}

func newTrkConn(tb testing.TB, tr *Tracker, client, anycast netip.AddrPort, cISN, sISN uint32) *trkConn {
	return &trkConn{tb: tb, tr: tr, client: client, anycast: anycast, cISN: cISN, sISN: sISN,
		cNext: cISN, sNext: sISN, cTS: 1000, sTS: 5000}
}

// trkConn4 is a connection from port on the IPv4 client to trkAnycast4.
func trkConn4(tb testing.TB, tr *Tracker, port uint16, cISN, sISN uint32) *trkConn {
	return newTrkConn(tb, tr, netip.AddrPortFrom(trkClient4, port), trkAnycast4, cISN, sISN)
}

func (c *trkConn) key() FlowKey { return FlowKey{Client: c.client, Anycast: c.anycast} }

// in feeds a client -> anycast segment; the tracker must pass it.
func (c *trkConn) in(s trkSeg) {
	c.tb.Helper()
	s.src, s.dst = c.client, c.anycast
	p := stack.Packet{Dir: stack.Inbound, Data: s.bytes()}
	if v := c.tr.Inbound(&p); v != stack.Pass {
		c.tb.Fatalf("inbound verdict %v, want Pass", v)
	}
}

// out feeds an anycast -> client segment.
func (c *trkConn) out(s trkSeg) {
	c.tb.Helper()
	s.src, s.dst = c.anycast, c.client
	p := stack.Packet{Dir: stack.Outbound, Data: s.bytes()}
	if v := c.tr.Outbound(&p); v != stack.Pass {
		c.tb.Fatalf("outbound verdict %v, want Pass", v)
	}
}

func (c *trkConn) tsOpts(val, ecr uint32) trkOpts {
	if !c.ts {
		return trkNoOpts
	}
	return trkOpts{ts: true, tsval: val, tsec: ecr}
}

func (c *trkConn) syn(o trkOpts) {
	c.tb.Helper()
	c.in(trkSeg{seq: c.cISN, flags: header.TCPFlagSyn, opts: o})
	c.cNext = c.cISN + 1
}

func (c *trkConn) synAck(o trkOpts) {
	c.tb.Helper()
	c.out(trkSeg{seq: c.sISN, ack: c.cISN + 1, flags: header.TCPFlagSyn | header.TCPFlagAck, opts: o})
	c.sNext = c.sISN + 1
}

// ack sends the client's ACK of everything the server sent.
func (c *trkConn) ack() {
	c.tb.Helper()
	c.cTS++
	c.in(trkSeg{seq: c.cNext, ack: c.sNext, flags: header.TCPFlagAck, opts: c.tsOpts(c.cTS, c.sTS)})
}

// serverAck sends the server's ACK of everything the client sent.
func (c *trkConn) serverAck() {
	c.tb.Helper()
	c.sTS++
	c.out(trkSeg{seq: c.sNext, ack: c.cNext, flags: header.TCPFlagAck, opts: c.tsOpts(c.sTS, c.cTS)})
}

// handshake runs SYN, SYN-ACK, ACK with the given options.
func (c *trkConn) handshake(cOpts, sOpts trkOpts) {
	c.tb.Helper()
	c.ts = cOpts.ts && sOpts.ts
	c.syn(cOpts)
	c.synAck(sOpts)
	c.ack()
}

// clientData sends n bytes from the client (acking what the server sent).
func (c *trkConn) clientData(n int) {
	c.tb.Helper()
	c.cTS++
	c.in(trkSeg{seq: c.cNext, ack: c.sNext, flags: header.TCPFlagAck | header.TCPFlagPsh,
		payload: make([]byte, n), opts: c.tsOpts(c.cTS, c.sTS)})
	c.cNext += uint32(n)
}

// serverData sends n bytes from the server.
func (c *trkConn) serverData(n int) {
	c.tb.Helper()
	c.sTS++
	c.out(trkSeg{seq: c.sNext, ack: c.cNext, flags: header.TCPFlagAck | header.TCPFlagPsh,
		payload: make([]byte, n), opts: c.tsOpts(c.sTS, c.cTS)})
	c.sNext += uint32(n)
}

func (c *trkConn) clientFin() {
	c.tb.Helper()
	c.cTS++
	c.in(trkSeg{seq: c.cNext, ack: c.sNext, flags: header.TCPFlagAck | header.TCPFlagFin, opts: c.tsOpts(c.cTS, c.sTS)})
	c.cNext++
}

func (c *trkConn) serverFin() {
	c.tb.Helper()
	c.sTS++
	c.out(trkSeg{seq: c.sNext, ack: c.cNext, flags: header.TCPFlagAck | header.TCPFlagFin, opts: c.tsOpts(c.sTS, c.cTS)})
	c.sNext++
}

// state returns the tracker's snapshot of the flow (fatal if not owned).
func (c *trkConn) state() *batonv1.FlowState {
	c.tb.Helper()
	s, ok := c.tr.Lookup(c.key())
	if !ok {
		c.tb.Fatalf("flow %v not owned", c.key())
	}
	return s
}

// trkTake returns TakeChanges as a map by flow key string, failing on a
// flow reported twice.
func trkTake(tb testing.TB, tr *Tracker) map[string]Change {
	tb.Helper()
	out := map[string]Change{}
	for _, ch := range tr.TakeChanges(nil) {
		k, err := KeyFromProto(ch.State.Key)
		if err != nil {
			tb.Fatalf("change with bad key: %v", err)
		}
		if _, dup := out[k.String()]; dup {
			tb.Fatalf("flow %v reported twice in one TakeChanges", k)
		}
		if _, err := ValidateState(ch.State, trkPrefixes); err != nil {
			tb.Fatalf("change %v %v does not validate: %v", ch.Kind, k, err)
		}
		out[k.String()] = ch
	}
	return out
}

// trkCheckInvariants checks the table's internal consistency.
func trkCheckInvariants(tb testing.TB, tr *Tracker) {
	tb.Helper()
	total := 0
	for i := range tr.shards {
		sh := &tr.shards[i]
		sh.mu.Lock()
		total += len(sh.flows)
		seen := map[*trkFlow]bool{}
		for _, f := range sh.dirty {
			if !f.dirty || seen[f] {
				sh.mu.Unlock()
				tb.Fatalf("trkShard %d: dirty list holds %v twice or not marked", i, f.st.key)
			}
			seen[f] = true
		}
		for k, f := range sh.flows {
			if trkKeyOf(f.st.key) != k || f.hk != k || f.closed || tr.shardFor(&k) != sh {
				sh.mu.Unlock()
				tb.Fatalf("trkShard %d: bad entry %v", i, k)
			}
			if f.dirty && !seen[f] {
				sh.mu.Unlock()
				tb.Fatalf("trkShard %d: %v marked dirty but not listed", i, k)
			}
		}
		sh.mu.Unlock()
	}
	if total != tr.Len() {
		tb.Fatalf("table holds %d flows, Len says %d", total, tr.Len())
	}
	if tr.Len() > tr.cfg.MaxFlows {
		tb.Fatalf("Len %d over MaxFlows %d", tr.Len(), tr.cfg.MaxFlows)
	}
}
