// fake_gso_test.go: the Fake playing an offload device (NewFakeGSO).

package tun

import (
	"bytes"
	"errors"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func TestFakeGSO(t *testing.T) {
	ctx := t.Context()
	f := NewFakeGSO("fake0", 1500, 1, 4)
	defer f.Close()
	if !f.GSO() || NewFake("x", 1500, 1, 1).GSO() {
		t.Fatal("GSO() must be true for NewFakeGSO only")
	}
	payload := bytes.Repeat([]byte("0123456789abcdef"), 1000) // 16000 bytes: 12 segments
	pkt := tcpSeg(false, 5, header.TCPFlagAck|header.TCPFlagPsh, tsOpts, payload, true)
	h := gsoHdr(false, pkt, 1448)
	// Written in two slices, as the endpoint's header and payload could be.
	if err := f.WriteGSO(0, h, [][]byte{pkt[:52], pkt[52:]}); err != nil {
		t.Fatal(err)
	}
	// A plain write after it comes out after all of its segments.
	small := tcpSeg(false, 1, header.TCPFlagAck, nil, []byte("x"), false)
	if err := f.Write(0, [][]byte{small}); err != nil {
		t.Fatal(err)
	}
	var got []byte
	for i := range 12 {
		s, err := f.Receive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		tcp, p := tcpValid(t, s)
		if tcp.SequenceNumber() != 5+uint32(len(got)) {
			t.Fatalf("segment %d: seq %d", i, tcp.SequenceNumber())
		}
		got = append(got, p...)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("segments do not add up to the payload")
	}
	if s, err := f.Receive(ctx); err != nil || !bytes.Equal(s, small) {
		t.Fatalf("Receive after the segments = %x, %v; want the plain packet", s, err)
	}

	// ReceiveGSO: the packet as written, with its header.
	if err := f.WriteGSO(0, h, [][]byte{pkt}); err != nil {
		t.Fatal(err)
	}
	gh, gp, err := f.ReceiveGSO(ctx)
	if err != nil || gh != h || !bytes.Equal(gp, pkt) {
		t.Fatalf("ReceiveGSO = %v, %d bytes, %v; want %v and the packet", gh, len(gp), err, h)
	}
	want := Stats{TxPackets: 3, TxBytes: uint64(2*len(pkt) + len(small))}
	if got := f.Stats(); got != want {
		t.Fatalf("Stats = %+v, want %+v", got, want)
	}
}

func TestFakeGSOErrors(t *testing.T) {
	pkt := tcpSeg(true, 5, header.TCPFlagAck, tsOpts, make([]byte, 5000), true)
	h := gsoHdr(true, pkt, 1428)

	plain := NewFake("fake0", 1500, 1, 4)
	defer plain.Close()
	if err := plain.WriteGSO(0, h, [][]byte{pkt}); !errors.Is(err, ErrNoGSO) {
		t.Fatalf("WriteGSO on a Fake without GSO = %v, want ErrNoGSO", err)
	}
	// The zero header is a plain Write.
	if err := plain.WriteGSO(0, VirtioNetHdr{}, [][]byte{pkt[:100]}); err != nil {
		t.Fatal(err)
	}
	if got, want := plain.Stats(), (Stats{TxPackets: 1, TxBytes: 100, TxErrors: 1}); got != want {
		t.Fatalf("Stats = %+v, want %+v", got, want)
	}

	f := NewFakeGSO("fake0", 1500, 1, 1)
	defer f.Close()
	bad := h
	bad.GSOSize = 1429 // 40 + 32 + 1429 > 1500
	if err := f.WriteGSO(0, bad, [][]byte{pkt}); !errors.Is(err, ErrPacketSize) {
		t.Fatalf("oversize segments = %v, want ErrPacketSize", err)
	}
	bad = h
	bad.GSOType = VirtioNetHdrGSOTCPv4
	if err := f.WriteGSO(0, bad, [][]byte{pkt}); err == nil {
		t.Fatal("TCPv4 GSO on an IPv6 packet was accepted")
	}
	if err := f.Write(0, [][]byte{pkt}); !errors.Is(err, ErrPacketSize) {
		t.Fatalf("Write of a packet over the MTU = %v, want ErrPacketSize", err)
	}
	// The buffer of a refused write went back: depth 1 still takes one.
	if err := f.WriteGSO(0, h, [][]byte{pkt}); err != nil {
		t.Fatal(err)
	}
	if got, want := f.Stats(), (Stats{TxPackets: 1, TxBytes: uint64(len(pkt)), TxErrors: 3}); got != want {
		t.Fatalf("Stats = %+v, want %+v", got, want)
	}
}
