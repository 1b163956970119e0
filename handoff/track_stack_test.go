package handoff

// The tracker on a real gVisor stack: a client stack and a Baton stack over a
// fake TUN (stack/stacktest), real connections, and an independent recorder
// hook that notes what the SYN and SYN-ACK carried.

import (
	"context"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
	"github.com/baton-anycast/baton/stack/services"
	"github.com/baton-anycast/baton/stack/stacktest"
	"github.com/baton-anycast/baton/tun"
)

// trkRecorder is a hook that records, per client address and port, the
// sequence number of the client's SYN and the stack's SYN-ACK and the
// SYN-ACK's options.
type trkRecorder struct {
	mu     sync.Mutex
	syn    map[netip.AddrPort]uint32
	synAck map[netip.AddrPort]header.TCPSynOptions
	sISN   map[netip.AddrPort]uint32
}

func (*trkRecorder) Name() string { return "test-recorder" }

func (r *trkRecorder) see(p *stack.Packet, inbound bool) stack.Verdict {
	src, dst, ok := p.Addrs()
	if !ok {
		return stack.Pass
	}
	var l4 header.TCP
	if p.Version() == 4 {
		ip := header.IPv4(p.Data)
		if ip.Protocol() != uint8(header.TCPProtocolNumber) {
			return stack.Pass
		}
		l4 = header.TCP(ip.Payload())
	} else {
		ip := header.IPv6(p.Data)
		if ip.NextHeader() != uint8(header.TCPProtocolNumber) {
			return stack.Pass
		}
		l4 = header.TCP(ip.Payload())
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case inbound && l4.Flags() == header.TCPFlagSyn:
		r.syn[netip.AddrPortFrom(src, l4.SourcePort())] = l4.SequenceNumber()
	case !inbound && l4.Flags().Contains(header.TCPFlagSyn|header.TCPFlagAck):
		k := netip.AddrPortFrom(dst, l4.DestinationPort())
		r.synAck[k] = header.ParseSynOptions(l4.Options(), true)
		r.sISN[k] = l4.SequenceNumber()
	}
	return stack.Pass
}

func (r *trkRecorder) Inbound(p *stack.Packet) stack.Verdict  { return r.see(p, true) }
func (r *trkRecorder) Outbound(p *stack.Packet) stack.Verdict { return r.see(p, false) }

// trkCkptService writes 1000 bytes, publishes a checkpoint, writes 500 more
// and half-closes.
type trkCkptService struct{}

func (trkCkptService) Name() string { return "ckpt" }

func (trkCkptService) ServeConn(ctx context.Context, conn net.Conn) error {
	if _, err := conn.Write(make([]byte, 1000)); err != nil {
		return err
	}
	services.Checkpoint(ctx, []byte("after-1000"))
	if _, err := conn.Write(make([]byte, 500)); err != nil {
		return err
	}
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	_, _ = io.Copy(io.Discard, conn)
	return nil
}

// trkEventually polls cond every millisecond until it holds or 20 s pass.
func trkEventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestTrackerOverStack(t *testing.T) {
	dev := tun.NewFake("any0", 1500, 1, 256)
	st, err := stack.New(dev, stack.Config{NodeName: "n1", Prefixes: stacktest.AnycastNets})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	stream, err := services.Builtin().NewTCP("stream", "n1")
	if err != nil {
		t.Fatal(err)
	}
	if err := st.ServeTCP(9000, stream); err != nil {
		t.Fatal(err)
	}
	if err := st.ServeTCP(9100, trkCkptService{}); err != nil {
		t.Fatal(err)
	}
	tr := NewTracker(TrackerConfig{Node: "n1", Prefixes: st.Prefixes(), ServiceFor: st.TCPServiceName})
	rec := &trkRecorder{syn: map[netip.AddrPort]uint32{}, synAck: map[netip.AddrPort]header.TCPSynOptions{}, sISN: map[netip.AddrPort]uint32{}}
	st.Endpoint().AddHook(tr)
	st.Endpoint().AddHook(rec)
	st.SetCheckpointSink(tr.CheckpointSink())

	client, err := stacktest.NewClient(1500)
	if err != nil {
		t.Fatal(err)
	}
	sw := stacktest.NewSwitch(client, dev)
	t.Cleanup(func() { sw.Close(); client.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Changes are taken continuously, as replication would.
	var (
		evMu   sync.Mutex
		events = map[FlowKey][]Change{}
	)
	takeCtx, stopTaking := context.WithCancel(ctx)
	takerDone := make(chan struct{})
	go func() {
		defer close(takerDone)
		for {
			select {
			case <-takeCtx.Done():
				return
			case <-tr.Changes():
			}
			for _, ch := range tr.TakeChanges(nil) {
				k, err := ValidateState(ch.State, stacktest.AnycastNets)
				if err != nil {
					t.Errorf("snapshot does not validate: %v", err)
					continue
				}
				evMu.Lock()
				events[k] = append(events[k], ch)
				evMu.Unlock()
			}
		}
	}()
	eventsOf := func(k FlowKey) []Change {
		evMu.Lock()
		defer evMu.Unlock()
		return append([]Change(nil), events[k]...)
	}

	for _, anycast := range []netip.Addr{stacktest.Anycast4, stacktest.Anycast6} {
		t.Run("stream/"+anycast.String(), func(t *testing.T) {
			conn, err := client.DialTCP(ctx, netip.AddrPortFrom(anycast, 9000))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			local := netip.MustParseAddrPort(conn.LocalAddr().String())
			k := FlowKey{Client: netip.AddrPortFrom(local.Addr().Unmap(), local.Port()), Anycast: netip.AddrPortFrom(anycast, 9000)}
			const size, seed = 1<<20 + 12345, 7
			req := services.StreamRequest(size, seed)
			if _, err := io.WriteString(conn, req); err != nil {
				t.Fatal(err)
			}
			if n, ok, err := services.ReadStream(conn, size, seed); err != nil || !ok || n != size {
				t.Fatalf("stream: %d bytes, ok %v, err %v", n, ok, err)
			}
			// The client acks everything the server sent, FIN included.
			var s *batonv1.FlowState
			trkEventually(t, "client_ack == server_next_seq", func() bool {
				var ok bool
				s, ok = tr.Lookup(k)
				return ok && s.ServerFin && s.ClientAck == s.ServerNextSeq
			})
			rec.mu.Lock()
			cISN, sISN, synAck := rec.syn[k.Client], rec.sISN[k.Client], rec.synAck[k.Client]
			rec.mu.Unlock()
			if s.ClientIsn != cISN || s.ServerIsn != sISN {
				t.Fatalf("ISNs %#x/%#x, recorder saw %#x/%#x", s.ClientIsn, s.ServerIsn, cISN, sISN)
			}
			if got := s.ServerNextSeq - s.ServerIsn - 1; got != size+1 {
				t.Fatalf("server sent %d sequence numbers after the SYN, want %d (data + FIN)", got, size+1)
			}
			if got := s.ServerAck - s.ClientIsn - 1; got != uint32(len(req)) {
				t.Fatalf("server acked %d bytes, want %d", got, len(req))
			}
			if s.Phase != batonv1.FlowPhase_FLOW_PHASE_CLOSING || s.Service != "stream" || s.Owner != "n1" {
				t.Fatalf("phase/service/owner %v/%q/%q", s.Phase, s.Service, s.Owner)
			}
			if int(s.ServerMss) != int(synAck.MSS) || int(s.ServerWindowScale) != synAck.WS && s.ServerWindowScale != -1 {
				t.Fatalf("server options: mss %d ws %d, SYN-ACK had %+v", s.ServerMss, s.ServerWindowScale, synAck)
			}
			t.Logf("gVisor SYN-ACK options: %+v; flow: client SYN %+v, ws %d/%d, sack %v, ts %v",
				synAck, s.ClientSyn, s.ClientWindowScale, s.ServerWindowScale, s.Sack, s.Timestamps)

			conn.Close()
			trkEventually(t, "flow removed after close", func() bool {
				_, ok := tr.Lookup(k)
				ev := eventsOf(k)
				return !ok && len(ev) > 0 && ev[len(ev)-1].Kind == batonv1.FlowEvent_KIND_CLOSE
			})
			ev := eventsOf(k)
			if ev[0].Kind != batonv1.FlowEvent_KIND_OPEN || ev[0].State.ClientIsn != cISN {
				t.Fatalf("first event %v", ev[0])
			}
		})
	}

	t.Run("checkpoint", func(t *testing.T) {
		conn, err := client.DialTCP(ctx, netip.AddrPortFrom(stacktest.Anycast4, 9100))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		local := netip.MustParseAddrPort(conn.LocalAddr().String())
		k := FlowKey{Client: local, Anycast: netip.AddrPortFrom(stacktest.Anycast4, 9100)}
		b, err := io.ReadAll(conn)
		if err != nil || len(b) != 1500 {
			t.Fatalf("read %d bytes: %v", len(b), err)
		}
		s, ok := tr.Lookup(k)
		if !ok {
			t.Fatal("flow not tracked")
		}
		if string(s.Checkpoint) != "after-1000" || s.CheckpointSeq != s.ServerIsn+1+1000 || s.Service != "ckpt" {
			t.Fatalf("checkpoint %q at %#x (server ISN %#x), service %q", s.Checkpoint, s.CheckpointSeq, s.ServerIsn, s.Service)
		}
	})

	trkEventually(t, "every flow removed", func() bool { return tr.Len() == 0 })
	stopTaking()
	<-takerDone
	st2 := tr.Stats()
	if st2.Opened != 3 || st2.Closed.FIN != 3 || st2.Malformed != 0 || st2.BadChecksum != 0 || st2.Untracked != 0 {
		t.Fatalf("stats %+v", st2)
	}
}
