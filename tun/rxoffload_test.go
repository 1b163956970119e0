package tun

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// rxCase is a packet as the kernel hands it to an offload device (hdr, pkt)
// and the complete packet Read must return (want).
func rxCase(v6, gso, partial bool, payload []byte) (hdr VirtioNetHdr, pkt, want []byte) {
	want = tcpSeg(v6, 1000, header.TCPFlagAck|header.TCPFlagPsh, tsOpts, payload, false)
	pkt = tcpSeg(v6, 1000, header.TCPFlagAck|header.TCPFlagPsh, tsOpts, payload, partial)
	l3 := uint16(20)
	if v6 {
		l3 = 40
	}
	if gso {
		hdr = gsoHdr(v6, pkt, 1448)
		if !partial {
			hdr.Flags, hdr.CsumStart, hdr.CsumOffset = 0, 0, 0
		}
	} else if partial {
		hdr = VirtioNetHdr{Flags: VirtioNetHdrFNeedsCsum, CsumStart: l3, CsumOffset: 16}
	} else {
		hdr = VirtioNetHdr{Flags: VirtioNetHdrFDataValid}
	}
	return hdr, pkt, want
}

func TestFinishRx(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, v6 := range []bool{false, true} {
		for _, gso := range []bool{false, true} {
			for _, partial := range []bool{false, true} {
				for _, n := range []int{0, 1, 999, 1448, 30001, 65535 - 40 - 32} {
					if !gso && n > 1448 {
						continue
					}
					if v6 && n > 65535-32 {
						continue
					}
					payload := make([]byte, n)
					for i := range payload {
						payload[i] = byte(rng.Uint32())
					}
					hdr, pkt, want := rxCase(v6, gso, partial, payload)
					got, err := finishRx(hdr, pkt)
					if err != nil || got != gso {
						t.Fatalf("v6 %v gso %v partial %v %d bytes: finishRx(%v) = %v, %v", v6, gso, partial, n, hdr, got, err)
					}
					if !bytes.Equal(pkt, want) {
						t.Fatalf("v6 %v gso %v partial %v %d bytes: not the complete packet", v6, gso, partial, n)
					}
					tcpValid(t, pkt)
				}
			}
		}
	}
}

func TestFinishRxRejects(t *testing.T) {
	good := func(v6 bool) (VirtioNetHdr, []byte) {
		h, p, _ := rxCase(v6, true, true, make([]byte, 5000))
		return h, p
	}
	for _, tc := range []struct {
		name string
		mod  func(h *VirtioNetHdr, p []byte) []byte
		v6   bool
	}{
		{"unknown flag", func(h *VirtioNetHdr, p []byte) []byte { h.Flags |= 4; return p }, false},
		{"UDP GSO", func(h *VirtioNetHdr, p []byte) []byte { h.GSOType = 5; return p }, false},
		{"ECN GSO", func(h *VirtioNetHdr, p []byte) []byte { h.GSOType |= VirtioNetHdrGSOECN; return p }, false},
		{"TCPv6 type on IPv4", func(h *VirtioNetHdr, p []byte) []byte { h.GSOType = VirtioNetHdrGSOTCPv6; return p }, false},
		{"TCPv4 type on IPv6", func(h *VirtioNetHdr, p []byte) []byte { h.GSOType = VirtioNetHdrGSOTCPv4; return p }, true},
		{"short IPv4 total length", func(h *VirtioNetHdr, p []byte) []byte { return p[:len(p)-1] }, false},
		{"short IPv6 payload length", func(h *VirtioNetHdr, p []byte) []byte { return p[:len(p)-1] }, true},
		{"IPv4 not TCP", func(h *VirtioNetHdr, p []byte) []byte { p[9] = 17; return p }, false},
		{"checksum in the IP header", func(h *VirtioNetHdr, p []byte) []byte { h.CsumStart = 10; return p }, false},
		{"checksum beyond the end", func(h *VirtioNetHdr, p []byte) []byte { h.CsumOffset = uint16(len(p)); return p }, false},
		{"GSO checksum not TCP's", func(h *VirtioNetHdr, p []byte) []byte { h.CsumOffset = 6; return p }, false},
		{"empty", func(h *VirtioNetHdr, p []byte) []byte { h.Flags = 0; return p[:0] }, false},
		{"IPv6 next header without checksum offset", func(h *VirtioNetHdr, p []byte) []byte {
			h.Flags, h.CsumStart, h.CsumOffset = 0, 0, 0
			p[6] = 0
			return p
		}, true},
	} {
		h, p := good(tc.v6)
		p = tc.mod(&h, p)
		orig := bytes.Clone(p)
		if _, err := finishRx(h, p); err == nil {
			t.Errorf("%s: finishRx(%v) accepted it", tc.name, h)
		} else if !bytes.Equal(p, orig) {
			t.Errorf("%s: a refused packet was modified", tc.name)
		}
	}
}

// TestCompleteChecksumZero: a sum that completes to 0 is written 0xffff,
// as the kernel's skb_checksum_help does (0 is "no checksum" for UDP).
func TestCompleteChecksumZero(t *testing.T) {
	// start at 0: the field at 2, the rest chosen so that the sum is 0xffff.
	pkt := []byte{0xff, 0x00, 0x00, 0x00, 0x00, 0xff}
	completeChecksum(pkt, 0, 2)
	if got := binary.BigEndian.Uint16(pkt[2:]); got != 0xffff {
		t.Fatalf("checksum field %#x, want 0xffff", got)
	}
}

// TestFakeReceiveOffload: the fake's Read finishes what DeliverGSO hands it
// as the real device does, and drops a header that does not fit.
func TestFakeReceiveOffload(t *testing.T) {
	ctx := context.Background()
	f := NewFakeGSO("fk0", 1500, 1, 8)
	defer f.Close()
	for _, v6 := range []bool{false, true} {
		hdr, pkt, want := rxCase(v6, true, true, bytes.Repeat([]byte{1, 2, 3}, 20000))
		if err := f.DeliverGSO(ctx, hdr, pkt); err != nil {
			t.Fatal(err)
		}
		bad := bytes.Clone(pkt)
		if err := f.DeliverGSO(ctx, VirtioNetHdr{GSOType: 5, GSOSize: 1000}, bad); err != nil {
			t.Fatal(err)
		}
		if err := f.Deliver(ctx, want[:0:0]); err == nil {
			t.Fatal("Deliver of an empty packet accepted")
		}
		buf := make([]byte, MaxReadPacket)
		n, err := f.Read(0, buf)
		if err != nil || !bytes.Equal(buf[:n], want) {
			t.Fatalf("v6 %v: Read = %d, %v (equal %v)", v6, n, err, bytes.Equal(buf[:n], want))
		}
		// The bad one is dropped; the next read returns the next packet.
		if err := f.DeliverGSO(ctx, hdr, pkt); err != nil {
			t.Fatal(err)
		}
		if n, err := f.Read(0, buf); err != nil || !bytes.Equal(buf[:n], want) {
			t.Fatalf("v6 %v: Read after the bad one = %d, %v", v6, n, err)
		}
		// A buffer of the MTU truncates it.
		if err := f.DeliverGSO(ctx, hdr, pkt); err != nil {
			t.Fatal(err)
		}
		if _, err := f.Read(0, buf[:1500]); !errors.Is(err, ErrTruncated) {
			t.Fatalf("Read into 1500 bytes = %v", err)
		}
	}
	if s := f.Stats(); s.RxPackets != 4 || s.RxGSO != 4 || s.RxErrors != 4 {
		t.Fatalf("Stats = %+v", s)
	}
	plain := NewFake("fk1", 1500, 1, 1)
	defer plain.Close()
	if err := plain.DeliverGSO(ctx, VirtioNetHdr{}, make([]byte, 100)); err == nil {
		t.Fatal("DeliverGSO on a device without GSO accepted")
	}
}

// FuzzFinishRx: whatever header and bytes the kernel could hand the device,
// finishRx does not panic, changes at most the two checksum bytes, and what
// it accepts as GSO has an IP header that describes the whole packet.
func FuzzFinishRx(f *testing.F) {
	for _, v6 := range []bool{false, true} {
		for _, gso := range []bool{false, true} {
			for _, partial := range []bool{false, true} {
				h, p, _ := rxCase(v6, gso, partial, make([]byte, 200))
				var b [VirtioNetHdrLen]byte
				h.encode(&b)
				f.Add(append(b[:], p...))
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < VirtioNetHdrLen {
			return
		}
		h := decodeVirtioNetHdr(data)
		pkt := bytes.Clone(data[VirtioNetHdrLen:])
		orig := bytes.Clone(pkt)
		gso, err := finishRx(h, pkt)
		if err != nil {
			if !bytes.Equal(pkt, orig) {
				t.Fatal("refused packet modified")
			}
			return
		}
		changed := 0
		for i := range pkt {
			if pkt[i] != orig[i] {
				changed++
				if i < 20 {
					t.Fatalf("byte %d of the IP header changed", i)
				}
			}
		}
		if changed > 2 {
			t.Fatalf("%d bytes changed", changed)
		}
		if gso {
			switch pkt[0] >> 4 {
			case 4:
				if int(binary.BigEndian.Uint16(pkt[2:])) != len(pkt) {
					t.Fatal("IPv4 total length")
				}
			case 6:
				if int(binary.BigEndian.Uint16(pkt[4:]))+40 != len(pkt) {
					t.Fatal("IPv6 payload length")
				}
			default:
				t.Fatal("GSO packet not IP")
			}
		}
		if gso && h.Flags == 0 && pkt[0]>>4 == 4 && pkt[0]&0xf == 5 {
			// Computed from scratch: the TCP checksum verifies.
			sum := onesSum(pkt[12:20], 0)
			sum = onesSum16(sum, uint16(len(pkt)-20))
			sum = onesSum16(sum, 6)
			if onesSum(pkt[20:], sum) != 0xffff {
				t.Fatal("TCP checksum computed from scratch does not verify")
			}
		}
	})
}

// onesSumRef is RFC 1071 word by word, the reference for onesSum.
func onesSumRef(b []byte, initial uint16) uint16 {
	s := uint32(initial)
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

// TestOnesSumWords: onesSum's 64-bit words against RFC 1071 word by word, at
// every alignment, on segment-sized buffers and on runs of 0xff (carries).
func TestOnesSumWords(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	buf := make([]byte, 70000)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	ff := bytes.Repeat([]byte{0xff}, 200)
	for i := range 3000 {
		off, n := rng.IntN(64), rng.IntN(300)
		if i%10 == 0 {
			n = rng.IntN(len(buf) - off)
		}
		init := uint16(rng.Uint32())
		b := buf[off : off+n]
		if i%7 == 0 {
			b = ff[:n%len(ff)] // carries everywhere
		}
		if got, want := onesSum(b, init), onesSumRef(b, init); got != want {
			t.Fatalf("onesSum(%d bytes at %d, %#x) = %#x, want %#x", len(b), off, init, got, want)
		}
	}
}

func BenchmarkOnesSum(b *testing.B) {
	buf := make([]byte, 65000)
	b.SetBytes(int64(len(buf)))
	for b.Loop() {
		onesSum(buf, 0)
	}
}
