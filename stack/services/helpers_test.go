// This file holds the test doubles and plumbing the services' tests share:
// an in-memory scripted connection, net.Pipe and loopback TCP harnesses.

package services

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

var errWriteLimit = errors.New("fakeConn: write limit reached")

// fakeConn is a net.Conn whose input is a fixed byte string, returned at
// most chunk bytes per Read (0: all at once), followed by EOF; its output
// goes to a buffer that refuses writes beyond max bytes (0: no limit).
// Deadlines are ignored. It can half-close.
type fakeConn struct {
	in     []byte
	chunk  int
	max    int
	out    bytes.Buffer
	closed bool // CloseWrite called
}

func (c *fakeConn) Read(p []byte) (int, error) {
	if len(c.in) == 0 {
		return 0, io.EOF
	}
	if c.chunk > 0 && len(p) > c.chunk {
		p = p[:c.chunk]
	}
	n := copy(p, c.in)
	c.in = c.in[n:]
	return n, nil
}

func (c *fakeConn) Write(p []byte) (int, error) {
	if c.closed {
		return 0, errors.New("fakeConn: write after CloseWrite")
	}
	if c.max > 0 && c.out.Len()+len(p) > c.max {
		n := c.max - c.out.Len()
		c.out.Write(p[:n])
		return n, errWriteLimit
	}
	return c.out.Write(p)
}

func (c *fakeConn) CloseWrite() error                { c.closed = true; return nil }
func (c *fakeConn) Close() error                     { return nil }
func (c *fakeConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *fakeConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *fakeConn) SetDeadline(time.Time) error      { return nil }
func (c *fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fakeConn) SetWriteDeadline(time.Time) error { return nil }

// runFake serves in through svc on a fakeConn and returns what it wrote.
func runFake(svc TCPService, in []byte, chunk, max int) ([]byte, bool, error) {
	c := &fakeConn{in: in, chunk: chunk, max: max}
	err := svc.ServeConn(context.Background(), c)
	return c.out.Bytes(), c.closed, err
}

// servePipe serves one end of a net.Pipe with svc and returns the other.
// The server end is closed when ServeConn returns; its error arrives on
// the channel.
func servePipe(t *testing.T, ctx context.Context, svc TCPService) (net.Conn, <-chan error) {
	t.Helper()
	cli, srv := net.Pipe()
	done := make(chan error, 1)
	go func() {
		err := svc.ServeConn(ctx, srv)
		srv.Close()
		done <- err
	}()
	t.Cleanup(func() { cli.Close() })
	return cli, done
}

// loopback serves svc on a loopback TCP listener, closing each connection
// when ServeConn returns. ServeConn's results arrive on errs.
type loopback struct {
	ln   net.Listener
	errs chan error
	wg   sync.WaitGroup
}

func newLoopback(t *testing.T, svc TCPService) *loopback {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Skipf("no loopback TCP: %v", err)
	}
	l := &loopback{ln: ln, errs: make(chan error, 100)}
	ctx, cancel := context.WithCancel(context.Background())
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				err := svc.ServeConn(ctx, c)
				c.Close()
				l.errs <- err
			}()
		}
	}()
	t.Cleanup(func() {
		cancel()
		ln.Close()
		l.wg.Wait()
	})
	return l
}

func (l *loopback) dial(t *testing.T) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", l.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// pattern returns bytes off..off+n-1 of seed's pattern.
func pattern(seed, off, n uint64) []byte {
	b := make([]byte, n)
	FillPattern(seed, off, b)
	return b
}
