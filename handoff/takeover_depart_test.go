package handoff

// The departure handover, in process: a node the client no longer reaches
// still owns idle flows (echo sessions between messages, downloads whose
// reader paused); Depart hands each over to its successor exactly, the
// node then dies, and every flow continues exactly when its client wakes
// up, without a reset.

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/baton-anycast/baton/stack/services"
)

func TestDepartHandsIdleFlowsOver(t *testing.T) {
	t.Run("echo", func(t *testing.T) {
		l := newTkLab(t, tkConfig{nodes: 3, service: func() services.TCPService { return services.NewEcho() }})
		ctx := testCtx(t)
		const n = 6
		conns := make([]net.Conn, n)
		exchange := func(i int, msg []byte) {
			t.Helper()
			c := conns[i]
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("conn %d: write: %v", i, err)
			}
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("conn %d: read: %v", i, err)
			}
			if !bytes.Equal(got, msg) {
				t.Fatalf("conn %d: echo differs", i)
			}
		}
		for i := range conns {
			c, err := l.client.DialTCP(ctx, tkDst4)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			conns[i] = c
			exchange(i, bytes.Repeat([]byte{byte('a' + i)}, 5000+i))
		}
		eventually(t, "n1 to replicate its flows", func() bool { return l.nodes[1].r.Store().Count("n1") == n })
		// The router no longer sends to n1; its flows are idle, so
		// nothing moves them. n1 hands them over and goes away.
		l.route.Store(1)
		res := l.nodes[0].e.Depart(ctx)
		if res.Flows != n || res.Handed != n || res.Left != 0 || l.nodes[0].tr.Len() != 0 {
			l.logStats()
			t.Fatalf("depart: %+v, n1 still tracks %d flows", res, l.nodes[0].tr.Len())
		}
		owned := 0
		for _, i := range []int{1, 2} {
			owned += l.nodes[i].tr.Len()
		}
		if owned != n {
			t.Fatalf("n2 and n3 own %d flows, want %d", owned, n)
		}
		l.kill(0)
		for round := range 3 {
			for i := range conns {
				exchange(i, []byte(fmt.Sprintf("round %d conn %d %s", round, i, bytes.Repeat([]byte{'x'}, 100*round))))
			}
		}
		l.logStats()
		if r := l.resets(); r != 0 {
			t.Fatalf("client got %d resets", r)
		}
	})

	t.Run("stream", func(t *testing.T) {
		l := newTkLab(t, tkConfig{nodes: 3})
		l.enableClientSACK()
		ctx := testCtx(t)
		const size = 8 << 20
		var ds []*pausedDownload
		for i := range 4 {
			// The reader pauses: the client's window fills, n1 holds
			// unacknowledged output and the flow goes quiet.
			ds = append(ds, l.startDownloadPaused(ctx, size, uint64(100+i)))
		}
		for _, d := range ds {
			d.waitBytes(t, 64<<10)
		}
		time.Sleep(300 * time.Millisecond) // let the windows fill
		l.route.Store(2)
		res := l.nodes[0].e.Depart(ctx)
		t.Logf("depart: %+v", res)
		if res.Handed != len(ds) || res.Left != 0 || l.nodes[0].tr.Len() != 0 {
			l.logStats()
			t.Fatalf("depart: %+v, n1 still tracks %d flows", res, l.nodes[0].tr.Len())
		}
		if got := l.nodes[0].e.Stats().Takeovers[HowDepart]; got == 0 {
			t.Fatalf("no flow was handed over by the departure (all pulled): the test did not test it")
		}
		l.kill(0)
		for _, d := range ds {
			close(d.resume)
		}
		for i, d := range ds {
			if err := d.wait(t); err != nil {
				l.logStats()
				t.Fatalf("download %d: %v", i, err)
			}
		}
		l.logStats()
		if r := l.resets(); r != 0 {
			t.Fatalf("client got %d resets", r)
		}
	})
}

// pausedDownload is a download whose reader stops after 64 KiB until
// resume is closed.
type pausedDownload struct {
	*tkDownload
	resume chan struct{}
}

// startDownloadPaused starts a download from the lab's client whose
// reader pauses after 64 KiB until the returned resume channel closes.
func (l *tkLab) startDownloadPaused(ctx context.Context, size, seed uint64) *pausedDownload {
	l.t.Helper()
	c, err := l.client.DialTCP(ctx, tkDst4)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { c.Close() })
	d := &pausedDownload{
		tkDownload: &tkDownload{conn: &progressConn{Conn: c}, done: make(chan error, 1), size: size},
		resume:     make(chan struct{}),
	}
	if _, err := io.WriteString(c, services.StreamRequest(size, seed)); err != nil {
		l.t.Fatal(err)
	}
	go func() {
		_, ok, err := services.ReadStream(&pausingReader{r: d.conn, after: 64 << 10, resume: d.resume}, size, seed)
		if err == nil && !ok {
			err = fmt.Errorf("stream not ok")
		}
		d.done <- err
	}()
	return d
}

// pausingReader stops reading after `after` bytes until resume closes.
type pausingReader struct {
	r      io.Reader
	after  int64
	n      int64
	resume chan struct{}
}

func (p *pausingReader) Read(b []byte) (int, error) {
	if p.n >= p.after {
		<-p.resume
	} else if int64(len(b)) > p.after-p.n {
		b = b[:p.after-p.n]
	}
	n, err := p.r.Read(b)
	p.n += int64(n)
	return n, err
}
