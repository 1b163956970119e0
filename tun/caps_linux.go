// caps_linux.go: start-up checks for what the kernel side needs: the
// CAP_NET_ADMIN capability and IP forwarding.

//go:build linux

package tun

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

const capNetAdmin = 12 // CAP_NET_ADMIN in linux/capability.h

// CheckNetAdmin returns a one-line error when the process lacks
// CAP_NET_ADMIN in its effective set, which creating the TUN and installing
// routes both need. Checking up front gives a clear message instead of an
// EPERM from deep inside Open.
func CheckNetAdmin() error {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return fmt.Errorf("tun: check CAP_NET_ADMIN: %w", err)
	}
	defer f.Close()
	eff, err := capEff(f)
	if err != nil {
		return err
	}
	if eff&(1<<capNetAdmin) == 0 {
		return errors.New("no CAP_NET_ADMIN: run batond as root or grant it cap_net_admin")
	}
	return nil
}

// capEff extracts the CapEff bit mask from a /proc/PID/status text.
func capEff(status io.Reader) (uint64, error) {
	sc := bufio.NewScanner(status)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "CapEff:")
		if !ok {
			continue
		}
		eff, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err != nil {
			return 0, fmt.Errorf("tun: check CAP_NET_ADMIN: bad CapEff line %q", sc.Text())
		}
		return eff, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("tun: check CAP_NET_ADMIN: %w", err)
	}
	return 0, errors.New("tun: check CAP_NET_ADMIN: no CapEff line in /proc/self/status")
}

// Forwarding reports whether IPv4 and IPv6 forwarding are on in the network
// namespace of the calling thread. The anycast address is routed into the
// TUN, not assigned locally, so packets arriving on the uplink reach Baton
// only if the kernel forwards them; the daemon warns when this is off. IPv6
// reads as off, without error, when the kernel has IPv6 disabled.
func Forwarding() (v4, v6 bool, err error) {
	if v4, err = sysctlBool("/proc/sys/net/ipv4/ip_forward"); err != nil {
		return false, false, err
	}
	v6, err = sysctlBool("/proc/sys/net/ipv6/conf/all/forwarding")
	if errors.Is(err, os.ErrNotExist) {
		return v4, false, nil
	}
	return v4, v6, err
}

func sysctlBool(path string) (bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return false, fmt.Errorf("tun: read %s: %w", path, err)
	}
	n, err := strconv.Atoi(string(bytes.TrimSpace(b)))
	if err != nil {
		return false, fmt.Errorf("tun: read %s: unexpected %q", path, bytes.TrimSpace(b))
	}
	return n != 0, nil
}
