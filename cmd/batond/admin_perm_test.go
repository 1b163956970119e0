package main

import (
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// adminDialEnv makes the test binary, run as another user by
// TestAdminSocketOtherUser, dial the socket it names and exit.
const adminDialEnv = "BATON_TEST_ADMIN_DIAL"

func init() {
	path := os.Getenv(adminDialEnv)
	if path == "" {
		return
	}
	c, err := net.Dial("unix", path)
	if err != nil {
		if errors.Is(err, syscall.EACCES) {
			os.Stdout.WriteString("EACCES\n")
			os.Exit(0)
		}
		os.Stdout.WriteString("error: " + err.Error() + "\n")
		os.Exit(0)
	}
	c.Close()
	os.Stdout.WriteString("CONNECTED\n")
	os.Exit(0)
}

// The admin unix socket is not usable by another user: a process running
// as nobody (uid 65534) in a directory it may enter cannot connect.
func TestAdminSocketOtherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (runs a process as another user)")
	}
	dir, err := os.MkdirTemp("", "baton-admin-perm-") // t.TempDir's parent is 0700
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "dialer")
	if err := copyFile(self, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "admin.sock")
	l, cleanup, err := listenAdmin("unix:" + sock)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	dial := func(uid uint32) string {
		cmd := exec.Command(bin, "-test.run", "^$")
		cmd.Env = []string{adminDialEnv + "=" + sock}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("dialer as uid %d: %v (%s)", uid, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if got := dial(65534); got != "EACCES" {
		t.Fatalf("another user dialing the admin socket: %s, want EACCES", got)
	}
	if got := dial(0); got != "CONNECTED" { // the test itself works
		t.Fatalf("root dialing the admin socket: %s", got)
	}
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
