// fake_test.go: the in-memory Fake device.

package tun

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/netip"
	"testing"
)

// ipv4UDP is a minimal IPv4/UDP packet (checksums not needed by Fake).
func ipv4UDP(src, dst netip.AddrPort, payload string) []byte {
	b := make([]byte, 28+len(payload))
	b[0] = 0x45
	b[2], b[3] = byte(len(b)>>8), byte(len(b))
	b[8], b[9] = 64, 17
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	b[20], b[21] = byte(src.Port()>>8), byte(src.Port())
	b[22], b[23] = byte(dst.Port()>>8), byte(dst.Port())
	copy(b[28:], payload)
	return b
}

func TestFakeReadWrite(t *testing.T) {
	ctx := t.Context()
	f := NewFake("fake0", 1500, 1, 4)
	defer f.Close()
	if f.Name() != "fake0" || f.MTU() != 1500 || f.Queues() != 1 {
		t.Fatalf("Name/MTU/Queues = %s/%d/%d", f.Name(), f.MTU(), f.Queues())
	}

	in := ipv4UDP(netip.MustParseAddrPort("198.51.100.1:1000"), netip.MustParseAddrPort("192.0.2.1:53"), "query")
	if err := f.Deliver(ctx, in); err != nil {
		t.Fatal(err)
	}
	in[28] = 'X' // Deliver copied: the stack must not see this
	buf := make([]byte, 1500)
	n, err := f.Read(0, buf)
	if err != nil || n != len(in) || string(buf[28:n]) != "query" {
		t.Fatalf("Read = %d, %v, payload %q", n, err, buf[28:n])
	}

	// Write gathers the slices into one packet.
	if err := f.Write(0, [][]byte{[]byte("hea"), nil, []byte("der"), []byte("payload")}); err != nil {
		t.Fatal(err)
	}
	out, err := f.Receive(ctx)
	if err != nil || string(out) != "headerpayload" {
		t.Fatalf("Receive = %q, %v", out, err)
	}

	want := Stats{RxPackets: 1, RxBytes: uint64(len(in)), TxPackets: 1, TxBytes: 13}
	if got := f.Stats(); got != want {
		t.Fatalf("Stats = %+v, want %+v", got, want)
	}
}

func TestFakeErrors(t *testing.T) {
	ctx := t.Context()
	f := NewFake("fake0", 100, 2, 4)
	defer f.Close()
	tests := []struct {
		name string
		op   func() error
		want error // nil: any error
	}{
		{"read bad queue", func() error { _, err := f.Read(2, make([]byte, 10)); return err }, nil},
		{"read negative queue", func() error { _, err := f.Read(-1, make([]byte, 10)); return err }, nil},
		{"read empty buffer", func() error { _, err := f.Read(0, nil); return err }, io.ErrShortBuffer},
		{"write bad queue", func() error { return f.Write(5, [][]byte{{1}}) }, nil},
		{"write empty", func() error { return f.Write(0, [][]byte{{}, nil}) }, ErrPacketSize},
		{"write over MTU", func() error { return f.Write(1, [][]byte{make([]byte, 60), make([]byte, 41)}) }, ErrPacketSize},
		{"deliver over MTU", func() error { return f.Deliver(ctx, make([]byte, 101)) }, nil},
		{"deliver empty", func() error { return f.Deliver(ctx, nil) }, nil},
		{"deliver bad queue", func() error { return f.DeliverTo(ctx, 2, []byte{1}) }, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.op()
			if err == nil || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("got %v, want %v", err, tt.want)
			}
		})
	}
	// Only the two ErrPacketSize writes lost a packet at the device.
	if got, want := f.Stats(), (Stats{TxErrors: 2}); got != want {
		t.Fatalf("Stats = %+v, want %+v", got, want)
	}
}

func TestFakeTruncated(t *testing.T) {
	f := NewFake("fake0", 1500, 1, 1)
	defer f.Close()
	if err := f.Deliver(t.Context(), []byte("0123456789")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	n, err := f.Read(0, buf)
	if !errors.Is(err, ErrTruncated) || n != 4 || string(buf) != "0123" {
		t.Fatalf("Read = %d, %v, %q; want 4, ErrTruncated, \"0123\"", n, err, buf)
	}
	if got, want := f.Stats(), (Stats{RxErrors: 1}); got != want {
		t.Fatalf("Stats = %+v, want %+v", got, want)
	}
}

func TestFakeBackpressure(t *testing.T) {
	ctx := t.Context()
	const depth = 3
	f := NewFake("fake0", 1500, 1, depth)
	defer f.Close()

	// Kernel to Baton: depth packets fit, the next Deliver blocks until
	// its context ends; nothing is dropped.
	for i := range depth {
		if err := f.Deliver(ctx, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := f.Deliver(cctx, []byte{9}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Deliver to a full queue = %v, want context.Canceled", err)
	}
	blocked := make(chan error)
	go func() { blocked <- f.Deliver(ctx, []byte{depth}) }()
	buf := make([]byte, 16)
	for i := range depth + 1 {
		if n, err := f.Read(0, buf); err != nil || n != 1 || buf[0] != byte(i) {
			t.Fatalf("Read %d = %d, %v, %v", i, n, err, buf[:n])
		}
		if i == 0 {
			if err := <-blocked; err != nil {
				t.Fatal(err)
			}
		}
	}

	// Baton to kernel: depth writes fit, the next one blocks until the test
	// receives one.
	for i := range depth {
		if err := f.Write(0, [][]byte{{byte(i)}}); err != nil {
			t.Fatal(err)
		}
	}
	done := make(chan error)
	go func() { done <- f.Write(0, [][]byte{{depth}}) }()
	select {
	case err := <-done:
		t.Fatalf("Write to a full queue returned %v, want it to block", err)
	default:
	}
	for i := range depth + 1 {
		p, err := f.Receive(ctx)
		if err != nil || !bytes.Equal(p, []byte{byte(i)}) {
			t.Fatalf("Receive %d = %v, %v", i, p, err)
		}
		if i == 0 {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
	}
	if s := f.Stats(); s.RxPackets != depth+1 || s.TxPackets != depth+1 || s.RxErrors+s.TxErrors != 0 {
		t.Fatalf("Stats = %+v", s)
	}
}

func TestFakeClose(t *testing.T) {
	ctx := t.Context()
	f := NewFake("fake0", 1500, 2, 1)
	if err := f.Write(0, [][]byte{{1}}); err != nil { // fills the tx queue
		t.Fatal(err)
	}
	if err := f.DeliverTo(ctx, 1, []byte{1}); err != nil { // fills queue 1
		t.Fatal(err)
	}
	blocked := []func() error{
		func() error { _, err := f.Read(0, make([]byte, 10)); return err },
		func() error { return f.Write(1, [][]byte{{2}}) },
		func() error { return f.DeliverTo(ctx, 1, []byte{2}) },
	}
	errc := make(chan error, len(blocked))
	for _, op := range blocked {
		go func() { errc <- op() }()
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	for range blocked {
		if err := <-errc; !errors.Is(err, ErrClosed) {
			t.Fatalf("blocked call after Close = %v, want ErrClosed", err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
	after := []func() error{
		func() error { _, err := f.Read(1, make([]byte, 10)); return err },
		func() error { return f.Write(0, [][]byte{{1}}) },
		func() error { return f.Deliver(ctx, []byte{1}) },
		func() error { _, err := f.Receive(ctx); return err },
	}
	for i, op := range after {
		if err := op(); !errors.Is(err, ErrClosed) {
			t.Fatalf("call %d after Close = %v, want ErrClosed", i, err)
		}
	}
}

func TestFakeFlowQueue(t *testing.T) {
	f := NewFake("fake0", 1500, 4, 1)
	defer f.Close()
	a := netip.MustParseAddrPort("198.51.100.7:40000")
	b := netip.MustParseAddrPort("192.0.2.1:443")
	used := map[int]bool{}
	for port := uint16(40000); port < 40064; port++ {
		a := netip.AddrPortFrom(a.Addr(), port)
		fwd, rev := ipv4UDP(a, b, "x"), ipv4UDP(b, a, "y")
		q := f.FlowQueue(fwd)
		if f.FlowQueue(fwd) != q || f.FlowQueue(rev) != q {
			t.Fatalf("flow %v<->%v: queues %d, %d, %d; want stable and symmetric", a, b, q, f.FlowQueue(fwd), f.FlowQueue(rev))
		}
		used[q] = true
	}
	if len(used) != 4 {
		t.Fatalf("64 flows used queues %v, want all 4", used)
	}
	// Not IP: round robin.
	q1, q2 := f.FlowQueue([]byte{0}), f.FlowQueue([]byte{0})
	if q1 == q2 {
		t.Fatalf("non-IP packets went to queue %d twice, want round robin", q1)
	}
}

func TestFakeNoAllocs(t *testing.T) {
	ctx := context.Background()
	f := NewFake("fake0", 1500, 1, 1)
	defer f.Close()
	pkt := [][]byte{make([]byte, 40), make([]byte, 1000)}
	buf := make([]byte, 1500)
	in := make([]byte, 1040)
	// Measure Baton's side only: the test side (Deliver, Receive) copies.
	write := testing.AllocsPerRun(100, func() {
		if err := f.Write(0, pkt); err != nil {
			t.Fatal(err)
		}
		if _, err := f.Receive(ctx); err != nil {
			t.Fatal(err)
		}
	})
	read := testing.AllocsPerRun(100, func() {
		if err := f.Deliver(ctx, in); err != nil {
			t.Fatal(err)
		}
		if _, err := f.Read(0, buf); err != nil {
			t.Fatal(err)
		}
	})
	// Receive and Deliver copy once each (the test owns its packets).
	if write != 1 || read != 1 {
		t.Fatalf("allocations per Write+Receive = %v, per Deliver+Read = %v; want 1 each (the test side's copy)", write, read)
	}
	if n := testing.AllocsPerRun(100, func() { f.Stats() }); n != 0 {
		t.Fatalf("Stats allocates %v times", n)
	}
}

// BenchmarkFakeWriteReceive: Write itself does not allocate; the one
// allocation per op reported is Receive's copy for the test.
func BenchmarkFakeWriteReceive(b *testing.B) {
	ctx := context.Background()
	f := NewFake("fake0", 1500, 1, 64)
	defer f.Close()
	pkt := [][]byte{make([]byte, 40), make([]byte, 1400)}
	go func() {
		for {
			if _, err := f.Receive(ctx); err != nil {
				return
			}
		}
	}()
	b.SetBytes(1440)
	b.ReportAllocs()
	for b.Loop() {
		if err := f.Write(0, pkt); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFakeDeliverRead: Read itself does not allocate; the one
// allocation per op reported is Deliver's copy of the packet.
func BenchmarkFakeDeliverRead(b *testing.B) {
	ctx := context.Background()
	f := NewFake("fake0", 1500, 1, 64)
	defer f.Close()
	pkt := make([]byte, 1440)
	go func() {
		for f.Deliver(ctx, pkt) == nil {
		}
	}()
	buf := make([]byte, 1500)
	b.SetBytes(1440)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := f.Read(0, buf); err != nil {
			b.Fatal(err)
		}
	}
}
