// caps_linux_test.go: CAP_NET_ADMIN and forwarding checks.

//go:build linux

package tun

import (
	"os"
	"strings"
	"testing"
)

func TestCapEff(t *testing.T) {
	tests := []struct {
		name   string
		status string
		want   uint64
		err    bool
	}{
		{"root", "Name:\tbatond\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n", 0x1ffffffffff, false},
		{"net_admin only", "CapEff:\t0000000000001000\n", 1 << capNetAdmin, false},
		{"none", "CapEff:\t0000000000000000\n", 0, false},
		{"missing", "Name:\tbatond\n", 0, true},
		{"garbage", "CapEff:\tzz\n", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := capEff(strings.NewReader(tt.status))
			if (err != nil) != tt.err || got != tt.want {
				t.Fatalf("capEff = %#x, %v; want %#x, error %v", got, err, tt.want, tt.err)
			}
		})
	}
}

func TestCheckNetAdmin(t *testing.T) {
	err := CheckNetAdmin()
	if os.Geteuid() == 0 {
		if err != nil {
			t.Fatalf("as root: %v", err)
		}
		return
	}
	// Not root: a plain user has an empty effective set (unless granted).
	if err != nil && err.Error() != "no CAP_NET_ADMIN: run batond as root or grant it cap_net_admin" {
		t.Fatalf("CheckNetAdmin = %v", err)
	}
}

func TestForwarding(t *testing.T) {
	ns := newTestNS(t)
	for _, v := range []struct{ v4, v6 string }{{"0", "0"}, {"1", "0"}, {"0", "1"}, {"1", "1"}} {
		ns.sysctl(t, "net/ipv4/ip_forward", v.v4)
		ns.sysctl(t, "net/ipv6/conf/all/forwarding", v.v6)
		var v4, v6 bool
		ns.must(t, func() (err error) { v4, v6, err = Forwarding(); return err })
		if v4 != (v.v4 == "1") || v6 != (v.v6 == "1") {
			t.Fatalf("after ip_forward=%s forwarding6=%s: Forwarding() = %v, %v", v.v4, v.v6, v4, v6)
		}
	}
}
