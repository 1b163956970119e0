package health

// This file holds the probes.
//
// Service probes are kernel sockets in the node's own network namespace
// connecting to the anycast address. The kernel routes the anycast
// prefixes into the TUN (batond installs those routes before the checks
// start), and picks the node's uplink address as the source, so a probe's
// packets take the same way as a client's from the TUN inward: the TUN
// device and its reader, the hook chain (anycast filter: destination
// anycast in, source anycast out, both true), gVisor, the service's
// listener, the service, and back out through the TUN, where the kernel
// delivers the answer to the probe's socket.
//
// Why not dial inside gVisor (gonet.DialContextTCP on the node's stack)?
// Measured on this gVisor version: Baton's stack does not set
// stack.Options.HandleLocal, so a connection from an anycast address to
// itself is not looped back inside gVisor: its SYN (source = destination =
// the anycast address) leaves through the link endpoint to the TUN, and
// the dial only completes if the kernel forwards it back into the TUN.
// That hairpin needs ip_forward and crosses the TUN twice per packet, and
// the flow tracker sees both ends of the same connection as anycast
// flows. With HandleLocal the SYN would never reach the link endpoint,
// the hooks or the TUN at all, so a dead reader or a dropping hook would
// go unnoticed. A kernel socket is an ordinary client and exercises the
// path that clients use.
//
// The cost: probe connections are ordinary flows, tracked (and replicated)
// like any other while they last (a few hundred microseconds; they close
// with FIN). Their client address is the node's own uplink address.

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Dialer opens probe connections; *net.Dialer (the node's kernel) in
// production.
type Dialer interface {
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
}

// each runs probe on every target and joins the failures.
func each(ctx context.Context, targets []netip.AddrPort, probe func(context.Context, netip.AddrPort) error) error {
	if len(targets) == 0 {
		return errors.New("no target")
	}
	var errs []string
	for _, t := range targets {
		if err := probe(ctx, t); err != nil {
			errs = append(errs, t.String()+": "+err.Error())
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

func dialTCP(ctx context.Context, d Dialer, t netip.AddrPort) (net.Conn, error) {
	c, err := d.DialContext(ctx, "tcp", t.String())
	if err != nil {
		return nil, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	return c, nil
}

// TCPConnect passes when a TCP connection to every target is established.
// The connection is closed at once, with FIN.
func TCPConnect(d Dialer, targets []netip.AddrPort) Probe {
	return func(ctx context.Context) error {
		return each(ctx, targets, func(ctx context.Context, t netip.AddrPort) error {
			c, err := dialTCP(ctx, d, t)
			if err != nil {
				return err
			}
			return c.Close()
		})
	}
}

// HTTPGet passes when `GET path` on every target answers 200. It sends
// one HTTP/1.1 request with Connection: close and reads the status line.
func HTTPGet(d Dialer, targets []netip.AddrPort, path string) Probe {
	return func(ctx context.Context) error {
		return each(ctx, targets, func(ctx context.Context, t netip.AddrPort) error {
			c, err := dialTCP(ctx, d, t)
			if err != nil {
				return err
			}
			defer c.Close()
			host := t.Addr().String()
			if t.Addr().Is6() {
				host = "[" + host + "]"
			}
			if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: baton-health\r\nConnection: close\r\n\r\n", path, host); err != nil {
				return err
			}
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				return fmt.Errorf("reading the status line: %w", err)
			}
			f := strings.Fields(line)
			if len(f) < 2 || !strings.HasPrefix(f[0], "HTTP/1.") {
				return fmt.Errorf("bad status line %q", strings.TrimSpace(line))
			}
			if f[1] != "200" {
				return fmt.Errorf("GET %s: %s", path, strings.TrimSpace(strings.Join(f[1:], " ")))
			}
			return nil
		})
	}
}

// UDPQuery passes when every target answers a datagram; when want is not
// empty the answer must be exactly want.
func UDPQuery(d Dialer, targets []netip.AddrPort, query []byte, want string) Probe {
	return func(ctx context.Context) error {
		return each(ctx, targets, func(ctx context.Context, t netip.AddrPort) error {
			c, err := d.DialContext(ctx, "udp", t.String())
			if err != nil {
				return err
			}
			defer c.Close()
			if dl, ok := ctx.Deadline(); ok {
				_ = c.SetDeadline(dl)
			}
			if _, err := c.Write(query); err != nil {
				return err
			}
			buf := make([]byte, 2048)
			n, err := c.Read(buf)
			if err != nil {
				return err
			}
			if want != "" && string(buf[:n]) != want {
				return fmt.Errorf("answered %q, want %q", buf[:n], want)
			}
			return nil
		})
	}
}

// TUNProbe passes while the TUN device's readers run (readErr returns
// nil) and the link is administratively up with carrier (a process has it
// open), as netlink reports it in the caller's network namespace.
func TUNProbe(name string, readErr func() error) Probe {
	return func(context.Context) error {
		if err := readErr(); err != nil {
			return fmt.Errorf("reader stopped: %w", err)
		}
		link, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("link %s: %w", name, err)
		}
		flags := link.Attrs().RawFlags
		if flags&unix.IFF_UP == 0 {
			return fmt.Errorf("link %s is down", name)
		}
		if flags&unix.IFF_LOWER_UP == 0 {
			return fmt.Errorf("link %s has no carrier", name)
		}
		return nil
	}
}

// OverrideFile returns an override source reading path at every attempt
// (TESTING AID, batond -check-override-file). Each line is "CHECK fail" or
// "CHECK pass"; blank lines and lines starting with # are ignored. A
// missing file means no override.
func OverrideFile(path string) func(string) Override {
	return func(check string) Override {
		b, err := os.ReadFile(path)
		if err != nil {
			return OverrideNone
		}
		for _, line := range bytes.Split(b, []byte("\n")) {
			f := strings.Fields(string(line))
			if len(f) != 2 || strings.HasPrefix(f[0], "#") || f[0] != check {
				continue
			}
			switch f[1] {
			case "fail":
				return OverrideFail
			case "pass":
				return OverridePass
			}
		}
		return OverrideNone
	}
}

// KernelDialer is the dialer service probes use: the node's kernel, with
// no keep-alive probes (connections last microseconds).
func KernelDialer() Dialer {
	return &net.Dialer{KeepAlive: -1, Timeout: time.Minute}
}
