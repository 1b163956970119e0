package services

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// published is one checkpoint and the output offset it was taken at.
type published struct {
	data []byte
	at   uint64
}

// countedConn counts output written, for checkpoint offsets.
type countedConn struct {
	net.Conn
	mu      sync.Mutex
	written uint64
}

func (c *countedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.mu.Lock()
	c.written += uint64(n)
	c.mu.Unlock()
	return n, err
}

// session runs serve on a pipe, sends input (concurrently, so pipelined
// requests cannot deadlock the synchronous pipe) and reads the output to
// EOF. It returns the output and the checkpoints with their output offsets.
func session(t *testing.T, serve func(ctx context.Context, c net.Conn, sink CheckpointFunc) error, input []byte, startOut uint64) ([]byte, []published) {
	t.Helper()
	cli, srv := net.Pipe()
	cc := &countedConn{Conn: srv, written: startOut}
	var mu sync.Mutex
	var cps []published
	sink := func(data []byte) {
		cc.mu.Lock()
		at := cc.written
		cc.mu.Unlock()
		mu.Lock()
		cps = append(cps, published{data, at})
		mu.Unlock()
	}
	go func() {
		serve(context.Background(), cc, sink)
		srv.Close()
	}()
	cli.SetDeadline(time.Now().Add(20 * time.Second))
	if len(input) > 0 {
		go cli.Write(input)
	}
	out, err := io.ReadAll(cli)
	if err != nil {
		t.Fatalf("reading output: %v", err)
	}
	cli.Close()
	mu.Lock()
	defer mu.Unlock()
	return out, cps
}

func httpReq(path string) []byte {
	return []byte("GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n")
}

// httpResponseEnds returns the output offset where each response ends.
func httpResponseEnds(t *testing.T, out []byte) []int {
	var ends []int
	pos := 0
	for pos < len(out) {
		i := bytes.Index(out[pos:], []byte("\r\n\r\n"))
		if i < 0 {
			t.Fatalf("no header end at %d", pos)
		}
		hdr := string(out[pos : pos+i])
		var n int
		for _, l := range bytes.Split([]byte(hdr), []byte("\r\n")) {
			fmt.Sscanf(string(l), "Content-Length: %d", &n)
		}
		pos += i + 4 + n
		ends = append(ends, pos)
	}
	return ends
}

// TestResumeAtEveryCut runs a whole session, then for many cut points
// (output offset O) resumes a second session from the latest checkpoint at
// or before O, with the input a sequential client had sent by then, and
// checks the resumed output is exactly the rest of the original.
func TestResumeAtEveryCut(t *testing.T) {
	h := NewHTTP("n1")
	h.Linger = 0
	st := NewStream()
	st.Linger = 0
	reqs := [][]byte{httpReq("/whoami"), httpReq("/bytes?n=70000&seed=3"), httpReq("/healthz"),
		[]byte("GET /bytes?n=1000&seed=9 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")}
	cases := []struct {
		name   string
		svc    Resumable
		inputs [][]byte
	}{
		{"stream", st, [][]byte{[]byte(StreamRequest(200000, 5))}},
		{"stream-offset", st, [][]byte{[]byte(StreamRequestAt(100000, 5, 333))}},
		{"http", h, reqs},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			serve := func(ctx context.Context, c net.Conn, sink CheckpointFunc) error {
				return tc.svc.ServeConn(WithCheckpoint(ctx, sink), c)
			}
			full, cps := session(t, serve, bytes.Join(tc.inputs, nil), 0)
			ends := []int{len(full)}
			if tc.name == "http" {
				ends = httpResponseEnds(t, full)
			}
			if len(ends) != len(tc.inputs) {
				t.Fatalf("%d responses for %d requests", len(ends), len(tc.inputs))
			}
			for _, cut := range []int{0, 1, 17, 100, 150, 300, 4096, 65536, 70100, 70200, len(full) - 5, len(full) - 1} {
				if cut < 0 || cut >= len(full) {
					continue
				}
				k := 0 // the response the cut falls in
				for k < len(ends) && ends[k] <= cut {
					k++
				}
				sent := len(bytes.Join(tc.inputs[:k+1], nil))
				r := Resume{OutputOffset: uint64(cut), InputOffset: uint64(sent)}
				for _, cp := range cps {
					if cp.at <= uint64(cut) {
						r.Checkpoint, r.CheckpointOffset = cp.data, cp.at
					}
				}
				if err := tc.svc.CanResume(r); err != nil {
					t.Fatalf("cut %d: CanResume: %v", cut, err)
				}
				resume := func(ctx context.Context, c net.Conn, sink CheckpointFunc) error {
					return tc.svc.ResumeConn(WithCheckpoint(ctx, sink), c, r)
				}
				got, _ := session(t, resume, bytes.Join(tc.inputs[k+1:], nil), uint64(cut))
				if !bytes.Equal(got, full[cut:]) {
					t.Fatalf("cut %d of %d: resumed output differs (%d bytes, want %d)", cut, len(full), len(got), len(full)-cut)
				}
			}
		})
	}
}

func TestCannotResume(t *testing.T) {
	h := NewHTTP("n1")
	cp := (&httpCheckpoint{respStart: 100, reqEnd: 50, kind: 't', header: []byte("HTTP/1.1 200 OK\r\n\r\n"), body: []byte("ok\n")}).encode()
	cases := []struct {
		name string
		svc  Resumable
		r    Resume
	}{
		{"stream acked without checkpoint", NewStream(), Resume{InputOffset: 8}},
		{"stream bad checkpoint", NewStream(), Resume{Checkpoint: []byte("x y\n"), InputOffset: 4}},
		{"stream past the end", NewStream(), Resume{Checkpoint: []byte("10 1\n"), InputOffset: 5, OutputOffset: 11}},
		{"http acked without checkpoint", h, Resume{InputOffset: 30}},
		{"http input lost", h, Resume{Checkpoint: cp, InputOffset: 60, OutputOffset: 100}},
		{"http earlier response missing", h, Resume{Checkpoint: cp, InputOffset: 50, OutputOffset: 90}},
		{"http past the end", h, Resume{Checkpoint: cp, InputOffset: 50, OutputOffset: 1000}},
		{"http garbage checkpoint", h, Resume{Checkpoint: []byte("http1 1 2\n"), InputOffset: 2}},
		{"echo owed without pending", NewEcho(), Resume{InputOffset: 10, OutputOffset: 4}},
		{"echo output past input", NewEcho(), Resume{InputOffset: 4, OutputOffset: 10}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.svc.CanResume(tc.r); err == nil {
				t.Fatal("CanResume accepted it")
			} else if !errorsIs(err, ErrCannotResume) {
				t.Fatalf("error %v does not wrap ErrCannotResume", err)
			}
		})
	}
}

func TestEchoResumesWithPending(t *testing.T) {
	e := NewEcho()
	r := Resume{InputOffset: 10, OutputOffset: 4, Pending: []byte("456789"), Live: true}
	cli, srv := net.Pipe()
	defer cli.Close()
	go func() { e.ResumeConn(context.Background(), srv, r); srv.Close() }()
	cli.SetDeadline(time.Now().Add(20 * time.Second))
	go cli.Write([]byte("abc"))
	got := make([]byte, 9)
	if _, err := io.ReadFull(cli, got); err != nil || string(got) != "456789abc" {
		t.Fatalf("resumed echo output %q, %v", got, err)
	}
}

func errorsIs(err, target error) bool { return fmt.Sprint(err) != "" && isWrapped(err, target) }

func isWrapped(err, target error) bool {
	for err != nil {
		if err == target {
			return true
		}
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return false
		}
		err = u.Unwrap()
	}
	return false
}

// FuzzResumeCheckpoint feeds arbitrary checkpoints and offsets (they come
// from peers) to every service's CanResume: never a panic, and an accepted
// http checkpoint round-trips through its encoding.
func FuzzResumeCheckpoint(f *testing.F) {
	f.Add((&httpCheckpoint{respStart: 5, reqEnd: 9, kind: 'p', seed: 1, n: 10, header: []byte("H\r\n\r\n")}).encode(), uint64(5), uint64(9))
	f.Add([]byte("100 7 0\n"), uint64(3), uint64(8))
	f.Add([]byte("http1 0 0 0 t 0 0 1 0\nx"), uint64(0), uint64(0))
	svcs := []Resumable{NewHTTP("n"), NewStream(), NewEcho()}
	f.Fuzz(func(t *testing.T, cp []byte, out, in uint64) {
		for _, s := range svcs {
			_ = s.CanResume(Resume{Checkpoint: cp, OutputOffset: out, InputOffset: in})
		}
		if c, err := decodeHTTPCheckpoint(cp); err == nil {
			c2, err := decodeHTTPCheckpoint(c.encode())
			if err != nil || !bytes.Equal(c2.encode(), c.encode()) {
				t.Fatalf("checkpoint does not round-trip: %q (%v)", cp, err)
			}
		}
	})
}
