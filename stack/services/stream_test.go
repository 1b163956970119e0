// This file tests the stream service and its client helpers (stream.go).

package services

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

var streamCases = []struct {
	size, seed, offset uint64
}{
	{0, 1, 0},
	{1, 1, 0},
	{7, 2, 0},
	{8, 3, 0},
	{13, 4, 5},
	{4095, 5, 0},
	{chunkSize, 6, 0},
	{chunkSize + 1, 7, 0},
	{1<<20 + 3, 8, 0},
	{1<<20 + 3, 8, 12345},
	{1000, 9, 1000},
	{3*chunkSize + 17, ^uint64(0), chunkSize - 3},
}

func streamLine(size, seed, offset uint64) string {
	if offset == 0 {
		return StreamRequest(size, seed)
	}
	return StreamRequestAt(size, seed, offset)
}

func TestStreamPipeHash(t *testing.T) {
	for _, tc := range streamCases {
		cli, done := servePipe(t, context.Background(), NewStream())
		if _, err := io.WriteString(cli, streamLine(tc.size, tc.seed, tc.offset)); err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		n, err := io.Copy(h, cli)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("%+v: ServeConn: %v", tc, err)
		}
		if uint64(n) != tc.size-tc.offset {
			t.Fatalf("%+v: got %d bytes, want %d", tc, n, tc.size-tc.offset)
		}
		if got, want := [32]byte(h.Sum(nil)), PatternSHA256(tc.seed, tc.offset, tc.size-tc.offset); got != want {
			t.Fatalf("%+v: sha256 %x, want %x", tc, got, want)
		}
	}
}

func TestStreamLoopbackReadStream(t *testing.T) {
	lb := newLoopback(t, NewStream())
	for _, tc := range streamCases {
		c := lb.dial(t)
		if _, err := io.WriteString(c, streamLine(tc.size, tc.seed, tc.offset)); err != nil {
			t.Fatal(err)
		}
		// The client keeps its side open: EOF must come from the server's
		// half-close, before the server closes.
		n, ok, err := ReadStreamAt(c, tc.size, tc.seed, tc.offset)
		if !ok || err != nil || uint64(n) != tc.size-tc.offset {
			t.Fatalf("%+v: ReadStreamAt = %d, %v, %v", tc, n, ok, err)
		}
		c.Close()
		if err := <-lb.errs; err != nil {
			t.Fatalf("%+v: ServeConn: %v", tc, err)
		}
	}
}

func TestStreamIgnoresDataAfterLine(t *testing.T) {
	lb := newLoopback(t, NewStream())
	c := lb.dial(t)
	junk := strings.Repeat("more bytes the server must not answer\n", 2000)
	if _, err := io.WriteString(c, StreamRequest(1<<20, 3)+junk); err != nil {
		t.Fatal(err)
	}
	if n, ok, err := ReadStream(c, 1<<20, 3); !ok {
		t.Fatalf("ReadStream = %d, %v", n, err)
	}
	c.CloseWrite()
	if err := <-lb.errs; err != nil {
		t.Fatal(err)
	}
}

func TestStreamRequestForms(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []byte
	}{
		{"", nil},                           // no request, no answer
		{"10 1\n", pattern(1, 0, 10)},       // plain
		{"10 1", pattern(1, 0, 10)},         // ended by EOF
		{"10 1\r\n", pattern(1, 0, 10)},     // telnet-style
		{" 10\t 1  4 \n", pattern(1, 4, 6)}, // spacing
		{"10 1 10\n", nil},                  // offset == size: nothing
		{"0 0\n", nil},
		{"0010 01\n", pattern(1, 0, 10)},
		{"5 2\nanything", pattern(2, 0, 5)},
	} {
		out, closed, err := runFake(NewStream(), []byte(tc.in), 0, 0)
		if err != nil || !bytes.Equal(out, tc.want) {
			t.Errorf("%q: got %q, %v; want %q", tc.in, out, err, tc.want)
		}
		if tc.in != "" && !closed {
			t.Errorf("%q: no half-close", tc.in)
		}
	}
}

func TestStreamMalformed(t *testing.T) {
	long := strings.Repeat("1", 300) + " 1\n"
	for _, tc := range []struct{ in, want string }{
		{"\n", "want <size> <seed> [<offset>]"},
		{"10\n", "want <size> <seed> [<offset>]"},
		{"1 2 3 4\n", "want <size> <seed> [<offset>]"},
		{"x 1\n", "bad size"},
		{"-1 1\n", "bad size"},
		{"+1 1\n", "bad size"},
		{"0x10 1\n", "bad size"},
		{"18446744073709551616 1\n", "bad size"},
		{"1099511627777 1\n", "size exceeds 1099511627776"},
		{"10 -1\n", "bad seed"},
		{"10 18446744073709551616\n", "bad seed"},
		{"10 1 x\n", "bad offset"},
		{"10 1 11\n", "offset exceeds size"},
		{long, "request line too long"},
		{strings.Repeat(" ", 256), "request line too long"},
		{"10 1" + strings.Repeat(" ", 252) + "\n", "request line too long"},
	} {
		want := "ERR " + tc.want + "\n"
		for _, chunk := range []int{0, 1} {
			out, closed, err := runFake(NewStream(), []byte(tc.in), chunk, 0)
			if string(out) != want {
				t.Errorf("%.40q (chunk %d): got %q, want %q", tc.in, chunk, out, want)
			}
			if err == nil || !closed {
				t.Errorf("%.40q: err %v, half-closed %v; want an error and a half-close", tc.in, err, closed)
			}
		}
	}
	// 255 bytes and the newline is the longest line accepted.
	in := "10 1" + strings.Repeat(" ", 251) + "\n"
	if len(in) != 256 {
		t.Fatal(len(in))
	}
	if out, _, err := runFake(NewStream(), []byte(in), 0, 0); err != nil || !bytes.Equal(out, pattern(1, 0, 10)) {
		t.Errorf("256-byte line: %q, %v", out, err)
	}
}

func TestStreamMalformedLoopback(t *testing.T) {
	lb := newLoopback(t, NewStream())
	c := lb.dial(t)
	// A long line followed by more: the ERR line must still arrive intact.
	if _, err := io.WriteString(c, strings.Repeat("9", 100000)); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "ERR request line too long\n" {
		t.Fatalf("got %q, %v", got, err)
	}
	c.Close()
	if err := <-lb.errs; err == nil {
		t.Error("ServeConn returned nil for a refused request")
	}
}

func TestStreamCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cli, done := servePipe(t, ctx, NewStream())
	io.WriteString(cli, StreamRequest(MaxStreamSize, 1))
	buf := make([]byte, 1000)
	if _, err := io.ReadFull(cli, buf); err != nil {
		t.Fatal(err)
	}
	cancel() // the server is blocked writing to a client that stopped reading
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeConn = %v, want context.Canceled", err)
	}
}

func TestStreamCancelWhileWaiting(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	_, done := servePipe(t, ctx, NewStream())
	cancel() // the server is blocked reading the request line
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeConn = %v, want context.Canceled", err)
	}
}

func TestParseStreamRequest(t *testing.T) {
	for _, tc := range []struct {
		line               string
		size, seed, offset uint64
		err                bool
	}{
		{line: "1 2", size: 1, seed: 2},
		{line: "1099511627776 18446744073709551615 1099511627776\n", size: 1 << 40, seed: ^uint64(0), offset: 1 << 40},
		{line: "5 6 0\r\n", size: 5, seed: 6},
		{line: "5 6 7", err: true},
		{line: "5,6", err: true},
		{line: "5 6\n\n", err: true},
		{line: "5\x006", err: true},
	} {
		size, seed, offset, err := ParseStreamRequest(tc.line)
		if (err != nil) != tc.err || size != tc.size || seed != tc.seed || offset != tc.offset {
			t.Errorf("%q: %d %d %d %v", tc.line, size, seed, offset, err)
		}
	}
	if got := StreamRequestAt(10, 2, 3); got != "10 2 3\n" {
		t.Errorf("StreamRequestAt = %q", got)
	}
}

func TestReadStreamErrors(t *testing.T) {
	good := pattern(4, 0, 1000)
	bad := append([]byte(nil), good...)
	bad[777] ^= 1
	for _, tc := range []struct {
		name string
		in   []byte
		n    int64
		msg  string
	}{
		{"mismatch", bad, 777, "mismatch at byte 777"},
		{"short", good[:999], 999, "EOF after 999 of 1000 bytes"},
		{"long", append(append([]byte(nil), good...), 0), 1000, "data after the expected 1000 bytes"},
		{"refused", []byte("ERR bad seed\n"), 0, "server refused: bad seed"},
		{"garbage", []byte("hello"), 0, "mismatch at byte 0"},
	} {
		for _, chunk := range []int{0, 1, 3} {
			r := &fakeConn{in: tc.in, chunk: chunk}
			n, ok, err := ReadStream(r, 1000, 4)
			if ok || err == nil || n != tc.n || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("%s (chunk %d): %d, %v, %v; want %d and %q", tc.name, chunk, n, ok, err, tc.n, tc.msg)
			}
		}
	}
	if n, ok, err := ReadStreamAt(&fakeConn{in: good[10:], chunk: 7}, 1000, 4, 10); !ok || n != 990 {
		t.Errorf("ReadStreamAt: %d, %v, %v", n, ok, err)
	}
}

func TestStreamLinger(t *testing.T) {
	for _, linger := range []time.Duration{0, time.Millisecond} {
		s := NewStream()
		s.Linger = linger
		lb := newLoopback(t, s)
		c := lb.dial(t)
		io.WriteString(c, StreamRequest(1000, 1))
		if n, ok, err := ReadStream(c, 1000, 1); !ok {
			t.Fatalf("linger %v: %d, %v", linger, n, err)
		}
		// The client keeps its side open: the server stops lingering on its own.
		if err := <-lb.errs; err != nil {
			t.Fatalf("linger %v: ServeConn: %v", linger, err)
		}
	}
}

// discardConn is a net.Conn that reads a fixed request and discards writes.
type discardConn struct{ fakeConn }

func (c *discardConn) Write(p []byte) (int, error) { return len(p), nil }

func TestStreamNoPerChunkAllocs(t *testing.T) {
	allocs := func(size uint64) float64 {
		req := []byte(StreamRequest(size, 1))
		return testing.AllocsPerRun(20, func() {
			c := &discardConn{fakeConn{in: req}}
			if err := NewStream().ServeConn(context.Background(), c); err != nil {
				t.Fatal(err)
			}
		})
	}
	// sync.Pool may miss now and then (always under -race), costing a
	// buffer; allocating per chunk would cost 63 more.
	small, big := allocs(chunkSize), allocs(64*chunkSize)
	if big > small+8 {
		t.Errorf("64 chunks cost %v allocations, 1 chunk %v: allocating per chunk", big, small)
	}
}
