package main

// This file is batond's memory limit: -memory-limit (memory_limit in the
// file) sets the Go runtime's memory limit with runtime/debug.SetMemoryLimit.
//
// The limit is SOFT. It tells the garbage collector to collect more often as
// the memory the Go runtime holds (heap, stacks, runtime structures) nears
// it, and to return freed memory to the kernel, instead of letting the heap
// grow to twice what is live between collections. It does not refuse
// allocations or kill anything: when the live memory itself is above the
// limit, the process uses more, and the runtime caps the collector at about
// half the CPU rather than collecting in a loop. The kernel's resident size
// also counts memory the runtime does not manage (the program's code, pages
// not yet returned). What bounds the live memory are the table bounds
// (flows.max, flows.max_handshake, flows.max_replicas); the limit keeps
// the garbage around them from adding up. Without -memory-limit the
// GOMEMLIMIT environment variable, if set, stays in effect.

import (
	"fmt"
	"log/slog"
	"runtime/debug"
	"strconv"
	"strings"
)

// minMemoryLimit is the smallest memory limit accepted: an idle batond
// holds about 30 MB, so a lower limit would have the collector run without
// pause from the start.
const minMemoryLimit = 32 << 20

// sizeUnits are the units parseSize accepts, as GOMEMLIMIT does.
var sizeUnits = []struct {
	suffix string
	shift  uint
}{{"KiB", 10}, {"MiB", 20}, {"GiB", 30}, {"TiB", 40}, {"B", 0}}

// parseSize parses a size written as GOMEMLIMIT takes it: a whole number
// of bytes with an optional unit B, KiB, MiB, GiB or TiB (256MiB,
// 1073741824).
func parseSize(s string) (int64, error) {
	num, shift := strings.TrimSpace(s), uint(0)
	for _, u := range sizeUnits {
		if n, ok := strings.CutSuffix(num, u.suffix); ok {
			num, shift = n, u.shift
			break
		}
	}
	bad := fmt.Errorf("%q is not a size (a whole number of bytes with an optional unit B, KiB, MiB, GiB or TiB, e.g. 256MiB)", s)
	if num == "" || strings.TrimLeft(num, "0123456789") != "" {
		return 0, bad
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v > (1<<63-1)>>shift {
		return 0, bad
	}
	return v << shift, nil
}

// formatSize writes n in the largest unit that divides it.
func formatSize(n int64) string {
	for i := len(sizeUnits) - 2; i >= 0; i-- { // TiB down to KiB
		if u := sizeUnits[i]; n != 0 && n%(1<<u.shift) == 0 {
			return strconv.FormatInt(n>>u.shift, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10) + "B"
}

// validateMemoryLimit parses c.MemoryLimit into c.memLimit (0: not set).
func (c *Config) validateMemoryLimit() error {
	c.memLimit = 0
	if strings.TrimSpace(c.MemoryLimit) == "" {
		return nil
	}
	n, err := parseSize(c.MemoryLimit)
	if err != nil {
		return fmt.Errorf("memory_limit: %v", err)
	}
	if n < minMemoryLimit {
		return fmt.Errorf("memory_limit: %s is below %s (an idle node holds about 30 MB)", formatSize(n), formatSize(minMemoryLimit))
	}
	c.memLimit = n
	return nil
}

// applyMemoryLimit sets the runtime's soft memory limit when one is
// configured.
func applyMemoryLimit(c *Config, log *slog.Logger) {
	if c.memLimit == 0 {
		return
	}
	debug.SetMemoryLimit(c.memLimit)
	log.Info("soft memory limit set (the garbage collector works harder near it; nothing is refused)", "limit", formatSize(c.memLimit))
}
