// config_test.go: Config.Validate error messages.

package tun

import (
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	ok := Config{Name: "any0", MTU: 1500, Queues: 1}
	with := func(f func(*Config)) Config { c := ok; f(&c); return c }
	tests := []struct {
		name string
		cfg  Config
		want string // exact error, "" for valid
	}{
		{"valid", ok, ""},
		{"valid limits", Config{Name: "abcdefghijklmno", MTU: 65535, Queues: 16, TxQueueLen: MaxTxQueueLen}, ""},
		{"valid minimum", Config{Name: "a", MTU: 576, Queues: 1, TxQueueLen: 0}, ""},
		{"empty name", with(func(c *Config) { c.Name = "" }), `tun.name: must not be empty`},
		{"long name", with(func(c *Config) { c.Name = "abcdefghijklmnop" }), `tun.name: "abcdefghijklmnop" is longer than 15 bytes`},
		{"dot", with(func(c *Config) { c.Name = "." }), `tun.name: "." is not a valid interface name`},
		{"dotdot", with(func(c *Config) { c.Name = ".." }), `tun.name: ".." is not a valid interface name`},
		{"slash", with(func(c *Config) { c.Name = "a/b" }), `tun.name: "a/b" must not contain '/', ':', '%' or whitespace`},
		{"colon", with(func(c *Config) { c.Name = "eth0:1" }), `tun.name: "eth0:1" must not contain '/', ':', '%' or whitespace`},
		{"template", with(func(c *Config) { c.Name = "any%d" }), `tun.name: "any%d" must not contain '/', ':', '%' or whitespace`},
		{"space", with(func(c *Config) { c.Name = "any 0" }), `tun.name: "any 0" must not contain '/', ':', '%' or whitespace`},
		{"mtu low", with(func(c *Config) { c.MTU = 575 }), `tun.mtu: 575 out of range 576..65535`},
		{"mtu zero", with(func(c *Config) { c.MTU = 0 }), `tun.mtu: 0 out of range 576..65535`},
		{"mtu high", with(func(c *Config) { c.MTU = 70000 }), `tun.mtu: 70000 out of range 576..65535`},
		{"queues zero", with(func(c *Config) { c.Queues = 0 }), `tun.queues: 0 must be 1..16`},
		{"queues high", with(func(c *Config) { c.Queues = 17 }), `tun.queues: 17 must be 1..16`},
		{"txqueuelen negative", with(func(c *Config) { c.TxQueueLen = -1 }), `tun.txqueuelen: -1 must be 0 (kernel default) or 1..1048576`},
		{"txqueuelen high", with(func(c *Config) { c.TxQueueLen = MaxTxQueueLen + 1 }), `tun.txqueuelen: 1048577 must be 0 (kernel default) or 1..1048576`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Validate() = %v, want nil", err)
			case tt.want != "" && (err == nil || err.Error() != tt.want):
				t.Fatalf("Validate() = %v, want %s", err, tt.want)
			case err != nil && strings.Contains(err.Error(), "\n"):
				t.Fatalf("error is not one line: %q", err)
			}
		})
	}
}
