package main

// This file is a long verified stream download for the takeover figures:
// one TCP connection from a fixed source port to the stream service, asking
// for an endless stream (services.MaxStreamSize bytes), every byte compared
// with the pattern as it arrives and its arrival recorded (flowRecorder).
// A reset or a wrong byte ends the flow with an error; stop ends it on
// purpose.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/baton-anycast/baton/e2e/lab"
	"github.com/baton-anycast/baton/stack/services"
)

type streamFlow struct {
	Port int
	Seed uint64
	Rec  *flowRecorder

	conn     net.Conn
	stopping atomic.Bool
	err      error
	done     chan struct{}
}

// openStream dials server from ns, source port port, and starts reading.
func openStream(ctx context.Context, ns *lab.NS, server netip.AddrPort, port int, rec *flowRecorder) (*streamFlow, error) {
	network := "tcp4"
	if server.Addr().Is6() {
		network = "tcp6"
	}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	c, err := ns.Dial(dctx, network, server.String(), port)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("port %d: %w", port, err)
	}
	f := &streamFlow{Port: port, Seed: uint64(port), Rec: rec, conn: c, done: make(chan struct{})}
	if _, err := io.WriteString(c, services.StreamRequest(services.MaxStreamSize, f.Seed)); err != nil {
		c.Close()
		return nil, fmt.Errorf("port %d: request: %w", port, err)
	}
	go f.read()
	return f, nil
}

func (f *streamFlow) read() {
	defer close(f.done)
	buf := make([]byte, 256<<10)
	want := make([]byte, len(buf))
	var off uint64
	for {
		n, err := f.conn.Read(buf)
		if n > 0 {
			now := time.Now()
			services.FillPattern(f.Seed, off, want[:n])
			if !bytes.Equal(buf[:n], want[:n]) {
				i := 0
				for i < n && buf[i] == want[i] {
					i++
				}
				f.err = fmt.Errorf("port %d: wrong byte at offset %d", f.Port, off+uint64(i))
				f.conn.Close()
				return
			}
			off += uint64(n)
			f.Rec.add(now, n)
		}
		if err != nil {
			if f.stopping.Load() {
				return
			}
			switch {
			case errors.Is(err, syscall.ECONNRESET):
				f.err = fmt.Errorf("port %d: reset by the server after %d bytes", f.Port, off)
			case errors.Is(err, io.EOF):
				f.err = fmt.Errorf("port %d: the server closed after %d bytes", f.Port, off)
			default:
				f.err = fmt.Errorf("port %d: after %d bytes: %v", f.Port, off, err)
			}
			return
		}
	}
}

// failed reports whether the flow ended on its own (an error).
func (f *streamFlow) failed() bool {
	select {
	case <-f.done:
		return f.err != nil
	default:
		return false
	}
}

// stop closes the connection and returns the flow's error, if it had one
// before.
func (f *streamFlow) stop() error {
	f.stopping.Store(true)
	f.conn.Close()
	<-f.done
	return f.err
}
