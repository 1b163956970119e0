package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where named network namespaces are bind-mounted, as iproute2
// does (`ip netns list` shows them).
const netnsDir = "/run/netns"

// NS is one named network namespace of a lab.
//
// Its methods may be called from any goroutine. Code that must run inside
// the namespace (sockets, child processes, /proc/sys writes) goes through
// Do, which runs it on a dedicated OS thread that is never handed back to
// the Go scheduler.
type NS struct {
	// Name is the namespace name, e.g. "bt1a2b3c-r"; /run/netns/<Name>.
	Name string

	lab    *Lab
	mu     sync.Mutex
	handle netns.NsHandle  // open fd on the namespace, -1 after close
	nl     *netlink.Handle // netlink sockets living in the namespace
	closed bool
}

// Path is the bind-mount path of the namespace (/run/netns/<Name>), usable
// with `ip netns exec`, setns(2) or nsenter --net=.
func (ns *NS) Path() string { return filepath.Join(netnsDir, ns.Name) }

// Netlink returns a netlink handle whose sockets live in the namespace. It is
// closed by Lab.Close; do not close it yourself.
func (ns *NS) Netlink() *netlink.Handle { return ns.nl }

// Handle returns the open namespace fd, e.g. for netlink.NsFd. It stays valid
// until Lab.Close.
func (ns *NS) Handle() netns.NsHandle {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	return ns.handle
}

// Do runs fn on an OS thread that is inside the namespace and returns its
// error. Sockets created by fn belong to the namespace and keep working from
// any goroutine afterwards; processes forked by fn start in the namespace.
//
// The thread is locked for the whole call and is never unlocked: the Go
// runtime destroys it when the goroutine ends, so no other goroutine can
// ever run in the lab namespace by accident. Before that, Do moves the
// thread back to the original namespace (in case the runtime has to keep
// it, as it does for the main thread) so the thread does not pin the lab
// namespace.
func (ns *NS) Do(fn func() error) error {
	h := ns.Handle()
	if h == -1 {
		return fmt.Errorf("lab: namespace %s is closed", ns.Name)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Deliberately no UnlockOSThread: see the doc comment.
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("lab: get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(h); err != nil {
			errc <- fmt.Errorf("lab: enter netns %s: %w", ns.Name, err)
			return
		}
		defer netns.Set(orig) //nolint:errcheck // best effort, thread is discarded anyway
		errc <- fn()
	}()
	return <-errc
}

// SetSysctl writes value to the sysctl key (dotted, e.g.
// "net.ipv4.ip_forward", or a path under /proc/sys) inside the namespace.
func (ns *NS) SetSysctl(key, value string) error {
	return ns.Do(func() error { return writeSysctl(key, value) })
}

// Sysctl reads the sysctl key inside the namespace.
func (ns *NS) Sysctl(key string) (string, error) {
	var v string
	err := ns.Do(func() error {
		b, err := os.ReadFile(sysctlPath(key))
		v = strings.TrimSpace(string(b))
		return err
	})
	return v, err
}

func sysctlPath(key string) string {
	if strings.HasPrefix(key, "/proc/sys/") {
		return key
	}
	return "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
}

// writeSysctl must run on a thread inside the target namespace: /proc/sys/net
// resolves to the namespace of the thread that opens it.
func writeSysctl(key, value string) error {
	p := sysctlPath(key)
	f, err := os.OpenFile(p, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("lab: sysctl %s: %w", key, err)
	}
	_, werr := f.WriteString(value)
	cerr := f.Close()
	if werr != nil {
		return fmt.Errorf("lab: sysctl %s=%s: %w", key, value, werr)
	}
	if cerr != nil {
		return fmt.Errorf("lab: sysctl %s=%s: %w", key, value, cerr)
	}
	return nil
}

// newNamedNS creates a fresh network namespace and bind-mounts it at
// /run/netns/<name>. The creating thread is discarded; the caller's thread
// is never moved.
func newNamedNS(name string) (*NS, error) {
	if len(name) > 64 || strings.ContainsAny(name, "/\x00") || name == "" {
		return nil, fmt.Errorf("lab: bad namespace name %q", name)
	}
	if err := prepareNetnsDir(); err != nil {
		return nil, err
	}
	path := filepath.Join(netnsDir, name)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: after unshare this thread is in the new
		// namespace and must die with the goroutine.
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
		if err != nil {
			errc <- err
			return
		}
		f.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			os.Remove(path)
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		defer netns.Set(orig) //nolint:errcheck // thread is discarded anyway
		src := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		if err := unix.Mount(src, path, "none", unix.MS_BIND, ""); err != nil {
			os.Remove(path)
			errc <- fmt.Errorf("bind mount %s: %w", path, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		return nil, fmt.Errorf("lab: create netns %s: %w", name, err)
	}
	ns := &NS{Name: name, handle: -1}
	h, err := netns.GetFromPath(path)
	if err != nil {
		deleteNamedNS(name)
		return nil, fmt.Errorf("lab: open netns %s: %w", name, err)
	}
	ns.handle = h
	nlh, err := netlink.NewHandleAt(h)
	if err != nil {
		ns.close()
		return nil, fmt.Errorf("lab: netlink in %s: %w", name, err)
	}
	ns.nl = nlh
	return ns, nil
}

var netnsDirMu sync.Mutex

// prepareNetnsDir makes /run/netns a mount point with shared propagation,
// exactly as `ip netns add` does. This matters: if our namespace mounts sat
// on files of a plain directory and a later `ip netns add` (by anyone)
// bind-mounted /run/netns over itself, our mounts would be covered, could
// no longer be unmounted by path, and their files could not be removed
// (EBUSY).
func prepareNetnsDir() error {
	netnsDirMu.Lock()
	defer netnsDirMu.Unlock()
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	for bound := false; ; bound = true {
		err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EINVAL) || bound {
			return fmt.Errorf("lab: make %s a shared mount: %w", netnsDir, err)
		}
		// Not a mount point yet: upgrade it, then retry.
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("lab: bind %s: %w", netnsDir, err)
		}
	}
}

// close releases the fds held on the namespace and removes its name. The
// kernel frees the namespace (and the veths and TUNs in it) once nothing
// refers to it any more: no process, thread, socket or open fd.
func (ns *NS) close() error {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	if ns.closed {
		return nil
	}
	ns.closed = true
	if ns.nl != nil {
		ns.nl.Close()
		ns.nl = nil
	}
	if ns.handle != -1 {
		ns.handle.Close()
		ns.handle = -1
	}
	return deleteNamedNS(ns.Name)
}

func deleteNamedNS(name string) error {
	path := filepath.Join(netnsDir, name)
	var errs []error
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("lab: unmount %s: %w", path, err))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("lab: remove %s: %w", path, err))
	}
	return errors.Join(errs...)
}

// inode returns the namespace inode number, used to find processes that are
// still inside the namespace.
func (ns *NS) inode() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(ns.Path(), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}
