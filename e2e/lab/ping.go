package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"time"
)

const (
	icmp4EchoRequest = 8
	icmp4EchoReply   = 0
	icmp6EchoRequest = 128
	icmp6EchoReply   = 129
)

// Ping sends ICMP echo requests to dst from a raw ICMP socket created in
// namespace from, until one matching echo reply from dst arrives (nil) or
// ctx is done (its error). A request is re-sent every 100 ms, so the first
// one lost to neighbour resolution does not matter. It fails at once if the
// namespace's own stack cannot send (e.g. no route to dst).
func (l *Lab) Ping(ctx context.Context, from *NS, dst netip.Addr) error {
	dst = dst.Unmap()
	network, reqType, repType := "ip4:icmp", byte(icmp4EchoRequest), byte(icmp4EchoReply)
	if dst.Is6() {
		network, reqType, repType = "ip6:ipv6-icmp", icmp6EchoRequest, icmp6EchoReply
	}
	pc, err := from.ListenPacket(ctx, network, "")
	if err != nil {
		return err
	}
	defer pc.Close()
	stop := context.AfterFunc(ctx, func() { pc.SetReadDeadline(time.Unix(1, 0)) }) //nolint:errcheck
	defer stop()

	var rnd [18]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return err
	}
	id := binary.BigEndian.Uint16(rnd[:2])
	payload := rnd[2:]
	to := &net.IPAddr{IP: dst.AsSlice()}

	send := func(seq uint16) error {
		pkt := make([]byte, 8+len(payload))
		pkt[0] = reqType
		binary.BigEndian.PutUint16(pkt[4:], id)
		binary.BigEndian.PutUint16(pkt[6:], seq)
		copy(pkt[8:], payload)
		if dst.Is4() {
			// ICMPv6 checksums are filled in by the kernel (raw ICMPv6
			// sockets always checksum); ICMPv4 ones are ours.
			binary.BigEndian.PutUint16(pkt[2:], inetChecksum(pkt))
		}
		_, err := pc.WriteTo(pkt, to)
		return err
	}

	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 1500)
		for {
			n, src, err := pc.ReadFrom(buf)
			if err != nil {
				done <- err
				return
			}
			ip, ok := src.(*net.IPAddr)
			if !ok || n < 8 {
				continue
			}
			a, _ := netip.AddrFromSlice(ip.IP)
			b := buf[:n]
			if a.Unmap() == dst && b[0] == repType && binary.BigEndian.Uint16(b[4:]) == id && bytes.Equal(b[8:], payload) {
				done <- nil
				return
			}
		}
	}()

	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for seq := uint16(1); ; seq++ {
		if err := send(seq); err != nil {
			// The sender's own stack refused (e.g. no route): final.
			return fmt.Errorf("lab: ping %s from %s: %w", dst, from.Name, err)
		}
		select {
		case err := <-done:
			if err != nil {
				if ctx.Err() != nil {
					return fmt.Errorf("lab: ping %s from %s: %w", dst, from.Name, ctx.Err())
				}
				return fmt.Errorf("lab: ping %s from %s: %w", dst, from.Name, err)
			}
			return nil
		case <-ctx.Done():
			<-done // the read deadline ends the reader
			return fmt.Errorf("lab: ping %s from %s: %w", dst, from.Name, ctx.Err())
		case <-tick.C:
		}
	}
}

// inetChecksum is the RFC 1071 Internet checksum.
func inetChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
