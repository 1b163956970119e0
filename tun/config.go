// config.go: validation of Config, shared by Open and by callers that want
// to check a configuration file before touching the kernel (no build tag).

package tun

import (
	"fmt"
	"strings"
)

// Limits enforced by Config.Validate.
const (
	MinMTU        = 576     // smallest MTU an IPv4 host must accept (RFC 791)
	MaxMTU        = 65535   // largest IP packet a TUN can carry
	MaxQueues     = 16      // more queues than this buys nothing for a userspace stack
	MaxTxQueueLen = 1 << 20 // sanity bound; the kernel allocates a ring of this many slots per queue
	maxNameLen    = 15      // IFNAMSIZ (16) minus the terminating NUL
)

// Validate checks c and returns a one-line error naming the offending field
// (as it is spelled in the configuration file, e.g. "tun.mtu"), or nil.
func (c Config) Validate() error {
	if err := validName(c.Name); err != nil {
		return err
	}
	if c.MTU < MinMTU || c.MTU > MaxMTU {
		return fmt.Errorf("tun.mtu: %d out of range %d..%d", c.MTU, MinMTU, MaxMTU)
	}
	if c.Queues < 1 || c.Queues > MaxQueues {
		return fmt.Errorf("tun.queues: %d must be 1..%d", c.Queues, MaxQueues)
	}
	if c.TxQueueLen < 0 || c.TxQueueLen > MaxTxQueueLen {
		return fmt.Errorf("tun.txqueuelen: %d must be 0 (kernel default) or 1..%d", c.TxQueueLen, MaxTxQueueLen)
	}
	return nil
}

// validName applies the kernel's dev_valid_name rules, plus a ban on '%':
// the kernel would treat "any%d" as a template and pick a free name itself,
// which defeats the "must not exist yet" check Open relies on.
func validName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("tun.name: must not be empty")
	case len(name) > maxNameLen:
		return fmt.Errorf("tun.name: %q is longer than %d bytes", name, maxNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("tun.name: %q is not a valid interface name", name)
	case strings.ContainsAny(name, "/:% \t\n\v\f\r"):
		return fmt.Errorf("tun.name: %q must not contain '/', ':', '%%' or whitespace", name)
	}
	return nil
}
