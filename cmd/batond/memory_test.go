package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64 // -1: an error
	}{
		{"0", 0}, {"1073741824", 1 << 30}, {"512B", 512}, {"64KiB", 64 << 10}, {"256MiB", 256 << 20},
		{"2GiB", 2 << 30}, {"1TiB", 1 << 40}, {" 128MiB ", 128 << 20}, {"8388607TiB", 8388607 << 40},
		{"", -1}, {"MiB", -1}, {"256MB", -1}, {"256mib", -1}, {"1.5GiB", -1}, {"-1", -1}, {"+1", -1},
		{"256 MiB", -1}, {"8388608TiB", -1}, {"99999999999999999999", -1}, {"1KiBB", -1},
	} {
		got, err := parseSize(tc.in)
		if tc.want < 0 {
			if err == nil {
				t.Errorf("parseSize(%q) = %d, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
	for _, tc := range []struct {
		in   int64
		want string
	}{{256 << 20, "256MiB"}, {1 << 30, "1GiB"}, {1536 << 20, "1536MiB"}, {1000, "1000B"}, {0, "0B"}, {3 << 40, "3TiB"}} {
		if got := formatSize(tc.in); got != tc.want {
			t.Errorf("formatSize(%d) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestFlowAndMemoryBounds: the handshake bound's default follows
// flows.max, the file sets both bounds and the memory limit, flags win.
func TestFlowAndMemoryBounds(t *testing.T) {
	base := []string{"-node", "n1", "-anycast", "192.0.2.1/32"}
	p := filepath.Join(t.TempDir(), "baton.yaml")
	if err := os.WriteFile(p, []byte("flows: {max: 1000, max_handshake: 300}\nmemory_limit: 256MiB\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name          string
		args          []string
		max, maxHS    int
		memLimit      int64
		memLimitInput string
	}{
		{"defaults", nil, 65536, 16384, 0, ""},
		{"quarter of max-flows", []string{"-max-flows", "1000"}, 1000, 250, 0, ""},
		{"tiny table", []string{"-max-flows", "3"}, 3, 1, 0, ""},
		{"flags", []string{"-max-flows", "1000", "-max-handshake-flows", "1000", "-memory-limit", "128MiB"}, 1000, 1000, 128 << 20, "128MiB"},
		{"file", []string{"-config", p}, 1000, 300, 256 << 20, "256MiB"},
		{"flags win over the file", []string{"-config", p, "-max-handshake-flows", "100", "-memory-limit", "1GiB"}, 1000, 100, 1 << 30, "1GiB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := loadConfig(append(append([]string(nil), base...), tc.args...), &bytes.Buffer{})
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Flows.Max != tc.max || cfg.Flows.MaxHandshake != tc.maxHS || cfg.memLimit != tc.memLimit || cfg.MemoryLimit != tc.memLimitInput {
				t.Fatalf("flows %d/%d, memory limit %q = %d; want %d/%d, %q = %d",
					cfg.Flows.Max, cfg.Flows.MaxHandshake, cfg.MemoryLimit, cfg.memLimit, tc.max, tc.maxHS, tc.memLimitInput, tc.memLimit)
			}
		})
	}
}
