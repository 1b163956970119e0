// This file tests the echo service (echo.go).

package services

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
)

func TestEchoPipeRoundTrip(t *testing.T) {
	cli, done := servePipe(t, context.Background(), NewEcho())
	for _, msg := range []string{"hello\n", "x", string(pattern(1, 0, 100000))} {
		errc := make(chan error, 1)
		go func() { _, err := io.WriteString(cli, msg); errc <- err }()
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(cli, got); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		if string(got) != msg {
			t.Fatalf("echoed %d bytes differ", len(msg))
		}
	}
	cli.Close()
	if err := <-done; err != nil {
		t.Fatalf("ServeConn after client close: %v", err)
	}
}

func TestEchoHalfClose(t *testing.T) {
	lb := newLoopback(t, NewEcho())
	for _, size := range []uint64{0, 1, 4096, 3<<20 + 7} {
		c := lb.dial(t)
		want := pattern(size, 0, size)
		errc := make(chan error, 1)
		go func() {
			_, err := c.Write(want)
			if err == nil {
				err = c.CloseWrite()
			}
			errc <- err
		}()
		got, err := io.ReadAll(c) // EOF only after everything is echoed
		if err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("size %d: echoed %d bytes, differing", size, len(got))
		}
		if err := <-lb.errs; err != nil {
			t.Fatalf("ServeConn: %v", err)
		}
	}
}

func TestEchoFake(t *testing.T) {
	in := pattern(2, 0, 200000)
	out, closed, err := runFake(NewEcho(), in, 1000, 0)
	if err != nil || !closed || !bytes.Equal(out, in) {
		t.Fatalf("echo: %d bytes, half-closed %v, %v", len(out), closed, err)
	}
}

func TestEchoCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cli, done := servePipe(t, ctx, NewEcho())
	go io.WriteString(cli, "ping") // the server blocks echoing: nobody reads
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeConn = %v, want context.Canceled", err)
	}
}
