// tun_linux.go: the real Device, a Linux TUN opened with water (or, with
// Config.Offload, by offload_linux.go) and configured with netlink.

//go:build linux

package tun

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/songgao/water"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// device is a Linux TUN interface with one file descriptor per queue.
type device struct {
	name   string
	mtu    int
	vnet   bool // opened with IFF_VNET_HDR (Config.Offload): GSO() is true
	index  int  // kernel link index, cached for Stats
	queues []queue
	c      counters

	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error

	// The netlink handle was created by Open, so its socket belongs to the
	// network namespace the device lives in, whatever thread later calls
	// Stats. nlMu guards it and the last kernel counters seen.
	nlMu                 sync.Mutex
	h                    *netlink.Handle
	kTxDropped, kRxDrops uint64
}

type queue struct {
	// f is the *os.File water (or openVnetQueue) created: /dev/net/tun
	// opened O_NONBLOCK and wrapped with os.NewFile, so it is registered
	// with the Go poller:
	// a Read or Write that must wait parks its goroutine, not a thread, and
	// Close wakes it. All I/O goes through rc so that the waiting is the
	// poller's. Never call f.Fd(): it switches the descriptor to blocking.
	f  *os.File
	rc syscall.RawConn // f.SyscallConn(), cached: creating it allocates
}

var _ Device = (*device)(nil)

// Open creates the TUN interface described by cfg in the calling thread's
// network namespace, sets its MTU (and TxQueueLen when non-zero) and brings
// it up. The interface must not exist yet: a non-persistent TUN only exists
// while a process holds it open, so an existing link of that name belongs to
// someone else and Open returns an error wrapping ErrInUse.
//
// The interface (and every route through it) disappears when the device is
// closed or the process dies, even by SIGKILL.
func Open(cfg Config) (Device, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("tun: netlink: %w", err)
	}
	d := &device{name: cfg.Name, mtu: cfg.MTU, h: h, c: make(counters, cfg.Queues)}
	if err := d.open(cfg); err != nil {
		d.closeFiles()
		h.Close()
		return nil, err
	}
	return d, nil
}

func (d *device) open(cfg Config) error {
	// Check first: TUNSETIFF on an existing multiqueue TUN of the same name
	// does not fail, it silently attaches us as one more queue of another
	// process's device, which would then receive part of its traffic. (Two
	// Opens racing between this check and TUNSETIFF can still meet; the
	// loser gets EBUSY or EINVAL below.)
	if _, err := d.h.LinkByName(cfg.Name); err == nil {
		return inUseError(cfg.Name)
	} else if !errors.As(err, &netlink.LinkNotFoundError{}) {
		return fmt.Errorf("tun: look up %s: %w", cfg.Name, err)
	}

	for i := range cfg.Queues {
		openQueue := openWaterQueue
		if cfg.Offload {
			openQueue = openVnetQueue
		}
		f, err := openQueue(cfg.Name, cfg.Queues > 1)
		if err != nil {
			// Lost a race with another creator: EBUSY when both are
			// single-queue, EINVAL when the IFF_MULTI_QUEUE flags differ.
			if _, lerr := d.h.LinkByName(cfg.Name); i == 0 && lerr == nil {
				return inUseError(cfg.Name)
			}
			return fmt.Errorf("tun: open %s queue %d: %w", cfg.Name, i, err)
		}
		rc, err := f.SyscallConn()
		if err != nil {
			f.Close()
			return fmt.Errorf("tun: open %s queue %d: %w", cfg.Name, i, err)
		}
		d.queues = append(d.queues, queue{f: f, rc: rc})
		// water opens /dev/net/tun without O_CLOEXEC: a child process
		// (a routing daemon, a hook script) would inherit the queue and
		// keep the interface and its routes alive after we die. (A fork in
		// the instant before this can still inherit it: water cannot be
		// asked for O_CLOEXEC. The offload device is opened with it.)
		if err := rc.Control(func(fd uintptr) { unix.CloseOnExec(int(fd)) }); err != nil {
			return fmt.Errorf("tun: open %s queue %d: set close-on-exec: %w", cfg.Name, i, err)
		}
	}
	d.vnet = cfg.Offload

	link, err := d.h.LinkByName(cfg.Name)
	if err != nil {
		return fmt.Errorf("tun: look up %s after creating it: %w", cfg.Name, err)
	}
	d.index = link.Attrs().Index
	if err := d.h.LinkSetMTU(link, cfg.MTU); err != nil {
		return fmt.Errorf("tun: %s: set MTU %d: %w", cfg.Name, cfg.MTU, err)
	}
	if cfg.TxQueueLen > 0 {
		if err := d.h.LinkSetTxQLen(link, cfg.TxQueueLen); err != nil {
			return fmt.Errorf("tun: %s: set txqueuelen %d: %w", cfg.Name, cfg.TxQueueLen, err)
		}
	}
	// No IPv6 link-local address on the TUN: without one the kernel sends
	// no router solicitations or MLD reports into the device, so the stack
	// only ever sees traffic routed to the anycast prefixes. Kernels built
	// without IPv6 refuse the attribute; that is harmless.
	_ = d.h.LinkSetIP6AddrGenMode(link, addrGenModeNone)
	if err := d.h.LinkSetUp(link); err != nil {
		return fmt.Errorf("tun: %s: set up: %w", cfg.Name, err)
	}
	return nil
}

// openWaterQueue opens one queue of the default device with water. water
// opens /dev/net/tun O_NONBLOCK and wraps it with os.NewFile, so the file is
// registered with the Go poller.
func openWaterQueue(name string, multiQueue bool) (*os.File, error) {
	wcfg := water.Config{DeviceType: water.TUN}
	wcfg.Name = name
	wcfg.MultiQueue = multiQueue
	wcfg.Persist = false
	// (water leaks the descriptor when TUNSETIFF fails; the existence
	// check in open makes that the rare lost-race case.)
	ifce, err := water.New(wcfg)
	if err != nil {
		return nil, err
	}
	f, ok := ifce.ReadWriteCloser.(*os.File)
	if !ok { // cannot happen with water on Linux
		ifce.Close()
		return nil, fmt.Errorf("water returned %T, not *os.File", ifce.ReadWriteCloser)
	}
	return f, nil
}

// addrGenModeNone is IN6_ADDR_GEN_MODE_NONE from linux/if_link.h.
const addrGenModeNone = 1

// inUse is ErrInUse naming the interface.
type inUse struct{ name string }

func inUseError(name string) error { return &inUse{name} }

func (e *inUse) Error() string {
	return fmt.Sprintf("tun: interface %s already exists (in use by another process?)", e.name)
}

func (e *inUse) Is(target error) bool { return target == ErrInUse }

func (d *device) Name() string { return d.name }
func (d *device) MTU() int     { return d.mtu }
func (d *device) Queues() int  { return len(d.queues) }

// Read implements Device. On an offload device each read also carries the
// virtio_net_hdr, which Read strips after finishing the packet with it
// (finishRx, rxoffload.go): the kernel is offered checksum and TCP
// segmentation offload (offload_linux.go), so a packet may come with a
// partial checksum, which Read completes, and may be one TCP segment of up
// to 64 KiB (buf should then be MaxReadPacket bytes). A packet whose header
// does not describe it is dropped: Read counts an error and reads the next
// one.
func (d *device) Read(q int, buf []byte) (int, error) {
	if uint(q) >= uint(len(d.queues)) {
		return 0, badQueue(d.name, q, len(d.queues))
	}
	if len(buf) == 0 {
		return 0, io.ErrShortBuffer
	}
	c := &d.c[q].rx
	r := readers.Get().(*reader)
	defer func() {
		r.iov[1], r.err = nil, nil // do not pin the caller's buffer in the pool
		readers.Put(r)
	}()
	r.iov[1] = buf
	r.use = r.iov[1:]
	if d.vnet {
		r.use = r.iov[:]
	}
	for {
		err := d.queues[q].rc.Read(r.fn)
		n, rerr := r.n, r.err
		if err == nil {
			err = rerr
		}
		if err != nil {
			if d.closed.Load() || errors.Is(err, os.ErrClosed) || errors.Is(err, unix.EBADF) {
				return 0, ErrClosed
			}
			c.errors.Add(1)
			return 0, fmt.Errorf("tun: read %s queue %d: %w", d.name, q, err)
		}
		if d.vnet {
			if n < VirtioNetHdrLen {
				c.errors.Add(1)
				continue
			}
			n -= VirtioNetHdrLen
		}
		if n > len(buf) {
			c.errors.Add(1)
			return len(buf), ErrTruncated
		}
		if d.vnet && (r.hdr[0] != 0 || r.hdr[1] != 0) {
			gso, err := finishRx(decodeVirtioNetHdr(r.hdr[:]), buf[:n])
			if err != nil {
				c.errors.Add(1)
				continue
			}
			if gso {
				c.gso.Add(1)
			}
		}
		c.ok(n)
		return n, nil
	}
}

// reader carries one readv through RawConn.Read (pooled for the same reason
// as writer). A TUN read of a packet larger than the buffer silently copies
// what fits and returns len(buf), discarding the rest (measured on 6.18), so
// a plain read cannot tell a truncated packet from one that fits exactly.
// Reading into the caller's buffer plus a one-byte spill slice can: n >
// len(buf) means the packet did not fit. An offload device reads its
// virtio_net_hdr into hdr first.
type reader struct {
	hdr   [VirtioNetHdrLen]byte
	iov   [3][]byte // virtio header, caller's buffer, spill
	use   [][]byte  // iov[1:] (bare packets) or iov[:] (offload device)
	spill [1]byte
	n     int
	err   error
	fn    func(fd uintptr) bool
}

var readers = sync.Pool{New: func() any {
	r := new(reader)
	r.iov[0] = r.hdr[:]
	r.iov[2] = r.spill[:]
	r.fn = r.readv
	return r
}}

// readv returns false on EAGAIN so that RawConn.Read parks the goroutine in
// the poller until the queue has a packet (or the file is closed).
func (r *reader) readv(fd uintptr) bool {
	for {
		r.n, r.err = unix.Readv(int(fd), r.use)
		if r.err != unix.EINTR {
			return r.err != unix.EAGAIN
		}
	}
}

// writer carries one writev through RawConn.Write. RawConn.Write takes a
// func; a closure over the packet would escape and cost an allocation per
// packet, so the func is a method value bound once and the writers are
// pooled. On an offload device the iovecs are the encoded virtio_net_hdr
// followed by the packet's slices, gathered in vec.
type writer struct {
	hdr [VirtioNetHdrLen]byte
	vec [][]byte
	iov [][]byte
	n   int
	err error
	fn  func(fd uintptr) bool
}

var writers = sync.Pool{New: func() any {
	w := new(writer)
	w.fn = w.writev
	return w
}}

// writev gathers the packet's slices in one system call: a TUN write is one
// packet, so the slices must go in a single write, and writev avoids copying
// them into one buffer first. unix.Writev keeps up to 8 iovecs on the stack.
// Returning false on EAGAIN makes RawConn.Write wait in the poller and retry.
func (w *writer) writev(fd uintptr) bool {
	for {
		w.n, w.err = unix.Writev(int(fd), w.iov)
		if w.err != unix.EINTR {
			return w.err != unix.EAGAIN
		}
	}
}

// Write implements Device.
func (d *device) Write(q int, pkt [][]byte) error {
	return d.write(q, VirtioNetHdr{}, pkt)
}

// GSO implements Device: true for an offload device.
func (d *device) GSO() bool { return d.vnet }

// WriteGSO implements Device.
func (d *device) WriteGSO(q int, hdr VirtioNetHdr, pkt [][]byte) error {
	if !d.vnet && hdr != (VirtioNetHdr{}) {
		if uint(q) >= uint(len(d.queues)) {
			return badQueue(d.name, q, len(d.queues))
		}
		if d.closed.Load() {
			return ErrClosed
		}
		d.c[q].tx.errors.Add(1)
		return ErrNoGSO
	}
	return d.write(q, hdr, pkt)
}

// write writes pkt on queue q, behind hdr on an offload device (hdr is zero
// on the other).
func (d *device) write(q int, hdr VirtioNetHdr, pkt [][]byte) error {
	if uint(q) >= uint(len(d.queues)) {
		return badQueue(d.name, q, len(d.queues))
	}
	if d.closed.Load() {
		return ErrClosed
	}
	c := &d.c[q].tx
	total := 0
	for _, s := range pkt {
		total += len(s)
	}
	limit := d.mtu
	if hdr.gso() {
		limit = MaxGSOPacket
	}
	if total == 0 || total > limit {
		c.errors.Add(1)
		return ErrPacketSize
	}
	w := writers.Get().(*writer)
	want := total
	if d.vnet {
		hdr.encode(&w.hdr)
		w.vec = append(append(w.vec[:0], w.hdr[:]), pkt...)
		w.iov = w.vec
		want += VirtioNetHdrLen
	} else {
		w.iov = pkt
	}
	err := d.queues[q].rc.Write(w.fn)
	n, werr := w.n, w.err
	clear(w.vec) // do not pin the caller's buffers in the pool
	w.vec, w.iov, w.err = w.vec[:0], nil, nil
	writers.Put(w)
	if err == nil {
		err = werr
	}
	switch {
	case err == nil && n == want:
		c.ok(total)
		return nil
	case err == nil:
		c.errors.Add(1)
		return fmt.Errorf("tun: write %s queue %d: short write, %d of %d bytes", d.name, q, n, want)
	case d.closed.Load() || errors.Is(err, os.ErrClosed) || errors.Is(err, unix.EBADF):
		// RawConn.Write reports a closed file with an internal error
		// value, hence the flag.
		return ErrClosed
	default:
		c.errors.Add(1)
		return fmt.Errorf("tun: write %s queue %d: %w", d.name, q, err)
	}
}

// Stats implements Device. The kernel counters are read from the link
// statistics over netlink on every call (one request, cheap but not free:
// call it from a metrics scrape, not per packet); after Close they keep the
// last values seen.
func (d *device) Stats() Stats {
	s := d.c.snapshot()
	d.nlMu.Lock()
	d.refreshKernelLocked()
	s.KernelTxDropped, s.KernelRxDropped = d.kTxDropped, d.kRxDrops
	d.nlMu.Unlock()
	return s
}

// refreshKernelLocked reads the link statistics. From the TUN's point of view
// the kernel "transmits" into it what Baton reads, so tx_dropped counts
// packets lost because Baton did not read fast enough (the queue holds
// txqueuelen packets), and rx_dropped counts packets Baton wrote that the
// kernel then dropped.
func (d *device) refreshKernelLocked() {
	if d.h == nil {
		return
	}
	link, err := d.h.LinkByIndex(d.index)
	if err != nil || link.Attrs().Name != d.name || link.Attrs().Statistics == nil {
		return
	}
	st := link.Attrs().Statistics
	d.kTxDropped, d.kRxDrops = st.TxDropped, st.RxDropped
}

// Close implements Device. It is idempotent; blocked Reads and Writes return
// ErrClosed. Closing the last queue makes the kernel delete the interface
// and the routes through it.
func (d *device) Close() error {
	d.closeOnce.Do(func() {
		d.closed.Store(true)
		d.nlMu.Lock()
		d.refreshKernelLocked() // last chance: the link goes away below
		d.closeErr = d.closeFiles()
		d.h.Close()
		d.h = nil
		d.nlMu.Unlock()
	})
	return d.closeErr
}

func (d *device) closeFiles() error {
	var errs []error
	for _, q := range d.queues {
		if err := q.f.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("tun: close %s: %w", d.name, errors.Join(errs...))
	}
	return nil
}
