package handoff

// This file is the "forward" policy, GLB/Beamer's second chance: a node
// that receives packets of a flow a live peer owns, for a service that
// cannot move (or whose stream cannot be handed over exactly right now),
// tunnels them to the owner over the peer network (the Forward RPC). The
// owner passes each through its own hook chain (fence, flow tracker,
// translation) into its stack, as if its TUN had read it, and its replies
// go straight to the client. Nothing moves, so nothing can go wrong with
// the byte stream; the cost is a detour for client packets.
//
// One forwarder per peer: a bounded queue (a full queue drops, counted:
// TCP retransmits) and one goroutine streaming batches, reconnecting when
// the stream breaks. A peer going down stops its forwarder; its flows'
// next packets decide again (the owner is dead now).

import (
	"context"
	"errors"
	"io"
	"time"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack"
)

const (
	forwardQueue     = 4096
	forwardBatch     = 64
	forwardBackoff   = 100 * time.Millisecond
	maxForwardPacket = 65535
)

// forwarder tunnels packets to one peer.
type forwarder struct {
	e    *Engine
	peer string
	ch   chan fwdPacket
	stop chan struct{}
}

// fwdPacket is a packet to tunnel; late: a late packet of a flow just
// handed over to the peer (takeover_hook.go, forwardLate).
type fwdPacket struct {
	data []byte
	late bool
}

// startForward makes f a forwarded flow: its queued packets and every
// later one go to owner.
func (e *Engine) startForward(f *flowEntry, owner string, epoch uint64) {
	fw := e.forwarderFor(owner)
	f.mu.Lock()
	f.fwd, f.owner, f.epoch = fw, owner, epoch
	e.setStateLocked(f, esForward)
	q := e.takeQueueLocked(f)
	f.mu.Unlock()
	f.lastUsed.Store(time.Now().UnixNano())
	e.m.takeover(HowForward)
	if fw == nil {
		return
	}
	for _, pkt := range q {
		fw.send(pkt, false)
	}
	e.log.Debug("takeover: forwarding flow to its owner", "flow", f.key.String(), "owner", owner)
}

// forwarderFor returns the forwarder to peer, starting it if needed (nil
// when the engine is closed).
func (e *Engine) forwarderFor(peer string) *forwarder {
	e.fwdMu.Lock()
	defer e.fwdMu.Unlock()
	if fw := e.fwds[peer]; fw != nil {
		return fw
	}
	fw := &forwarder{e: e, peer: peer, ch: make(chan fwdPacket, forwardQueue), stop: make(chan struct{})}
	if !e.spawn(fw.run) {
		return nil
	}
	e.fwds[peer] = fw
	return fw
}

// stopForwarder stops the forwarder to a peer that went down and forgets
// the flows forwarded to it.
func (e *Engine) stopForwarder(peer string) {
	e.fwdMu.Lock()
	fw := e.fwds[peer]
	delete(e.fwds, peer)
	e.fwdMu.Unlock()
	if fw == nil {
		return
	}
	close(fw.stop)
	var gone []*flowEntry
	for i := range e.shards {
		sh := &e.shards[i]
		sh.mu.RLock()
		for _, f := range sh.m {
			if f.get() == esForward {
				f.mu.Lock()
				if f.fwd == fw {
					gone = append(gone, f)
				}
				f.mu.Unlock()
			}
		}
		sh.mu.RUnlock()
	}
	for _, f := range gone {
		e.drop(f)
	}
}

// send queues a copy of pkt (never blocks).
func (fw *forwarder) send(pkt []byte, late bool) {
	select {
	case fw.ch <- fwdPacket{data: append([]byte(nil), pkt...), late: late}:
		fw.e.m.packet(pktForwardOut)
	default:
		fw.e.m.packet(pktForwardDropped)
	}
}

// run streams queued packets to the peer until the engine or the
// forwarder stops.
func (fw *forwarder) run() {
	e := fw.e
	var (
		stream batonv1.Peer_ForwardClient
		cancel context.CancelFunc = func() {}
	)
	defer func() { cancel() }()
	var batch *batonv1.ForwardBatch
	add := func(p fwdPacket) {
		if p.late {
			batch.LatePackets = append(batch.LatePackets, p.data)
		} else {
			batch.Packets = append(batch.Packets, p.data)
		}
	}
	for {
		// A new message each time: gRPC may still hold the one sent.
		batch = &batonv1.ForwardBatch{Sender: e.self}
		select {
		case <-e.ctx.Done():
			return
		case <-fw.stop:
			return
		case p := <-fw.ch:
			add(p)
		}
	fill:
		for len(batch.Packets)+len(batch.LatePackets) < forwardBatch {
			select {
			case p := <-fw.ch:
				add(p)
			default:
				break fill
			}
		}
		n := len(batch.Packets) + len(batch.LatePackets)
		if stream == nil {
			c := e.r.peerClient(fw.peer)
			if c == nil {
				fw.dropped(n)
				if sleepCtx(e.ctx, forwardBackoff) != nil {
					return
				}
				continue
			}
			ctx, cf := context.WithCancel(e.ctx)
			s, err := c.Forward(ctx)
			if err != nil {
				cf()
				fw.dropped(n)
				continue
			}
			stream, cancel = s, cf
		}
		if err := stream.Send(batch); err != nil {
			if !errors.Is(err, io.EOF) {
				e.log.Debug("takeover: forward stream broke", "peer", fw.peer, "err", err)
			}
			cancel()
			stream, cancel = nil, func() {}
			fw.dropped(n)
		}
	}
}

func (fw *forwarder) dropped(n int) {
	for range n {
		fw.e.m.packet(pktForwardDropped)
	}
}

// forwardIn delivers a packet a peer tunnelled to this node: through the
// chain as if the TUN had read it (fence, tracker, translation), then into
// the stack. Packets of flows this node does not have are dropped. It
// reports whether the packet was delivered.
func (e *Engine) forwardIn(pkt []byte) (FlowKey, bool) {
	if len(pkt) > maxForwardPacket {
		e.m.packet(pktForwardDropped)
		return FlowKey{}, false
	}
	seg, res := parseTCPSegment(pkt, true, e.prefixes)
	if res != tcpOK {
		e.m.packet(pktForwardDropped)
		return FlowKey{}, false
	}
	p := stack.Packet{Dir: stack.Inbound, Data: pkt}
	if e.fence.Inbound(&p) != stack.Pass {
		return seg.key, false
	}
	e.tr.Inbound(&p)
	if e.hook.inbound(&p, &seg, false) != stack.Pass {
		return seg.key, false
	}
	if e.inj.InjectInbound(p.Data) != nil {
		return seg.key, false
	}
	e.m.packet(pktForwardIn)
	return seg.key, true
}
