package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// termGrace is how long Close (and Proc.Stop) waits after SIGTERM before it
// sends SIGKILL. It bounds teardown, it is not a test assertion.
const termGrace = 3 * time.Second

// logTail is how many bytes of a process log Proc.Log returns.
const logTail = 32 << 10

// Proc is a process started by NS.Start. Its stdout and stderr go to
// LogPath(). Lab.Close kills it if it is still running.
type Proc struct {
	Name string // the name given to Start
	NS   *NS    // the namespace it runs in

	cmd     *exec.Cmd
	logPath string
	done    chan struct{} // closed once the process has been reaped
	state   *os.ProcessState
	waitErr error
}

// Start starts argv in the namespace with stdout and stderr appended to
// <LogDir>/<lab>-<name>.log. env, if non-nil, replaces the environment
// (nil inherits the test's environment).
//
// The process is forked from a locked OS thread inside the namespace, so it
// starts there (as with `ip netns exec`, the PID is the program's own). That
// thread stays alive, waiting for the process, until it exits; the process
// gets SIGKILL if that thread dies first (PR_SET_PDEATHSIG), i.e. if the
// test binary dies without running Close. It runs in its own process group.
func (ns *NS) Start(name string, argv []string, env []string) (*Proc, error) {
	return ns.start(name, argv, env, nil)
}

// StartAs is Start with the process running as user and group uid, with no
// capabilities (to test what an unprivileged user can do).
func (ns *NS) StartAs(name string, argv []string, env []string, uid uint32) (*Proc, error) {
	return ns.start(name, argv, env, &syscall.Credential{Uid: uid, Gid: uid})
}

func (ns *NS) start(name string, argv []string, env []string, cred *syscall.Credential) (*Proc, error) {
	l := ns.lab
	if l == nil {
		return nil, errors.New("lab: namespace has no lab")
	}
	if len(argv) == 0 {
		return nil, errors.New("lab: Start: empty argv")
	}
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return nil, fmt.Errorf("lab: Start: bad name %q", name)
	}
	h := ns.Handle()
	if h == -1 {
		return nil, fmt.Errorf("lab: namespace %s is closed", ns.Name)
	}
	logPath := filepath.Join(l.LogDir, l.Name+"-"+name+".log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lab: Start %s: %w", name, err)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:    true,
		Pdeathsig:  syscall.SIGKILL,
		Credential: cred,
	}
	p := &Proc{Name: name, NS: ns, cmd: cmd, logPath: logPath, done: make(chan struct{})}

	// Register before starting so that a concurrent Close either refuses
	// the start or sees (and kills) the process.
	if err := l.addProc(p); err != nil {
		logf.Close()
		return nil, err
	}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: this thread is in the lab namespace, and it must
		// outlive the child for Pdeathsig to be meaningful.
		defer close(p.done)
		defer logf.Close()
		orig, err := netns.Get()
		if err == nil {
			defer orig.Close()
			err = netns.Set(h)
		}
		if err == nil {
			err = cmd.Start()
		}
		if err != nil {
			p.waitErr = fmt.Errorf("lab: start %s in %s: %w", name, ns.Name, err)
			started <- p.waitErr
			return
		}
		started <- nil
		err = cmd.Wait()
		p.state = cmd.ProcessState
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			p.waitErr = err
		}
		netns.Set(orig) //nolint:errcheck // thread is discarded anyway
	}()
	if err := <-started; err != nil {
		l.removeProc(p)
		return nil, err
	}
	return p, nil
}

// PID is the process id.
func (p *Proc) PID() int { return p.cmd.Process.Pid }

// LogPath is the file that receives the process's stdout and stderr.
func (p *Proc) LogPath() string { return p.logPath }

// Log returns the last 32 KiB of the process log (for test failure output).
func (p *Proc) Log() string {
	f, err := os.Open(p.logPath)
	if err != nil {
		return fmt.Sprintf("<%v>", err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Size() > logTail {
		f.Seek(st.Size()-logTail, io.SeekStart) //nolint:errcheck
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// Done is closed when the process has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited (and been reaped).
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Signal sends sig to the process (by PID). Signalling a process that has
// already exited is not an error.
func (p *Proc) Signal(sig os.Signal) error {
	if p.Exited() {
		return nil
	}
	err := p.cmd.Process.Signal(sig)
	if errors.Is(err, os.ErrProcessDone) {
		return nil
	}
	return err
}

// Kill sends SIGKILL and waits for the process to be reaped.
func (p *Proc) Kill() error {
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	<-p.done
	return nil
}

// Stop sends SIGTERM, waits up to a few seconds, then SIGKILL; it returns
// once the process has been reaped.
func (p *Proc) Stop() error {
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	t := time.NewTimer(termGrace)
	defer t.Stop()
	select {
	case <-p.done:
		return nil
	case <-t.C:
	}
	return p.Kill()
}

// Wait waits until the process exits or ctx is done. A process that exited
// with a non-zero status or by a signal is not an error: inspect the
// returned state (ExitCode() is -1 when killed by a signal). The error is
// ctx.Err() if ctx ended first.
func (p *Proc) Wait(ctx context.Context) (*os.ProcessState, error) {
	select {
	case <-p.done:
		return p.state, p.waitErr
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// String is "name[pid]".
func (p *Proc) String() string { return p.Name + "[" + strconv.Itoa(p.PID()) + "]" }

// pidsInNS lists the processes (other than this one) whose network namespace
// has inode ino: leftovers such as children of a killed daemon.
func pidsInNS(ino uint64) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		var st unix.Stat_t
		if unix.Stat("/proc/"+e.Name()+"/ns/net", &st) != nil {
			continue
		}
		if st.Ino == ino {
			pids = append(pids, pid)
		}
	}
	return pids
}
