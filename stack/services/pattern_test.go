// This file tests and benchmarks the deterministic pattern (pattern.go).

package services

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"io"
	"math/rand/v2"
	"testing"
)

// refPattern generates the first n bytes of seed's pattern the slow,
// obvious way: the splitmix64 generator run from the start.
func refPattern(seed uint64, n int) []byte {
	out := make([]byte, 0, n+8)
	state := seed
	for len(out) < n {
		state += 0x9E3779B97F4A7C15
		z := state
		z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
		z = (z ^ (z >> 27)) * 0x94D049BB133111EB
		z ^= z >> 31
		out = binary.LittleEndian.AppendUint64(out, z)
	}
	return out[:n]
}

func TestPatternKnownAnswer(t *testing.T) {
	// The pattern is a wire contract: these bytes must never change.
	const seed1 = "c15c0289ec2d0a9167ec8e65a18debbe5e5532fbeea293f80bc942ee9086c171"
	got := pattern(1, 0, 32)
	if hex.EncodeToString(got) != seed1 {
		t.Fatalf("seed 1 pattern starts %x, want %s", got, seed1)
	}
	// The published splitmix64 test vector (seed 1234567).
	want := []uint64{6457827717110365317, 3203168211198807973, 9817491932198370423,
		4593380528125082431, 16408922859458223821}
	b := pattern(1234567, 0, 8*uint64(len(want)))
	for k, w := range want {
		if g := binary.LittleEndian.Uint64(b[8*k:]); g != w {
			t.Errorf("seed 1234567 word %d = %d, want %d", k, g, w)
		}
	}
	sum := PatternSHA256(1, 0, 1<<20)
	if h := hex.EncodeToString(sum[:]); h != patternSHA1MiB {
		t.Errorf("sha256 of the first MiB of seed 1 = %s, want %s", h, patternSHA1MiB)
	}
}

// patternSHA1MiB is the SHA-256 of the first MiB of seed 1's pattern.
const patternSHA1MiB = "85b66b3a5816d686deb42f2d2473d9a7121ceb75c822b838f958c76ca86ed8ea"

func TestFillPatternRandomRanges(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const total = 1 << 16
	for _, seed := range []uint64{0, 1, 42, ^uint64(0)} {
		whole := refPattern(seed, total)
		for i := 0; i < 2000; i++ {
			off := rng.IntN(total)
			n := rng.IntN(total - off + 1)
			if i%4 == 0 { // favour short ranges, where the edges matter
				n = min(rng.IntN(40), total-off)
			}
			got := make([]byte, n)
			FillPattern(seed, uint64(off), got)
			if !bytes.Equal(got, whole[off:off+n]) {
				t.Fatalf("seed %d: FillPattern(off %d, len %d) differs from the whole stream", seed, off, n)
			}
		}
	}
}

func TestFillPatternHighOffset(t *testing.T) {
	// Word k at a huge offset still equals the generator's word k.
	for _, off := range []uint64{1 << 40, 1<<40 + 3, 1<<63 - 5, ^uint64(0) - 16} {
		got := pattern(7, off, 16)
		for i := range got {
			o := off + uint64(i)
			var w [8]byte
			binary.LittleEndian.PutUint64(w[:], patternWord(7, o/8))
			if got[i] != w[o%8] {
				t.Fatalf("byte at offset %d = %#x, want %#x", o, got[i], w[o%8])
			}
		}
	}
}

func TestPatternSeedsDiffer(t *testing.T) {
	seen := map[string]uint64{}
	for seed := uint64(0); seed < 1000; seed++ {
		k := string(pattern(seed, 0, 16))
		if other, dup := seen[k]; dup {
			t.Fatalf("seeds %d and %d start with the same 16 bytes", other, seed)
		}
		seen[k] = seed
	}
	a, b := pattern(1, 0, 1<<12), pattern(2, 0, 1<<12)
	same := 0
	for i := range a {
		if a[i] == b[i] {
			same++
		}
	}
	if same > 64 { // about 16 expected
		t.Errorf("seeds 1 and 2 agree on %d of %d bytes", same, len(a))
	}
}

func TestPatternReader(t *testing.T) {
	for _, tc := range []struct{ off, n uint64 }{{0, 0}, {0, 1}, {3, 100}, {5, 3 * chunkSize}, {chunkSize - 1, chunkSize + 2}} {
		want := pattern(9, tc.off, tc.n)

		r := NewPatternReader(9, tc.off, tc.n)
		if r.Offset() != tc.off || r.Remaining() != tc.n {
			t.Fatalf("new reader at %d, %d left; want %d, %d", r.Offset(), r.Remaining(), tc.off, tc.n)
		}
		got, err := io.ReadAll(struct{ io.Reader }{r}) // plain Read calls
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("off %d n %d: ReadAll = %d bytes, %v", tc.off, tc.n, len(got), err)
		}

		var buf bytes.Buffer
		m, err := io.Copy(&buf, NewPatternReader(9, tc.off, tc.n)) // WriteTo
		if err != nil || uint64(m) != tc.n || !bytes.Equal(buf.Bytes(), want) {
			t.Fatalf("off %d n %d: io.Copy = %d, %v", tc.off, tc.n, m, err)
		}

		if got, want := PatternSHA256(9, tc.off, tc.n), sha256.Sum256(want); got != want {
			t.Fatalf("off %d n %d: PatternSHA256 = %x, want %x", tc.off, tc.n, got, want)
		}
	}
}

func TestPatternReaderOverflow(t *testing.T) {
	r := NewPatternReader(1, ^uint64(0)-4, 100)
	if r.Remaining() != 4 {
		t.Fatalf("remaining = %d, want 4 (clamped at 2^64-1)", r.Remaining())
	}
}

func TestFillPatternAllocs(t *testing.T) {
	buf := make([]byte, 4096)
	if n := testing.AllocsPerRun(100, func() { FillPattern(3, 5, buf) }); n != 0 {
		t.Errorf("FillPattern allocates %v times per call", n)
	}
}

func benchmarkFill(b *testing.B, off uint64, size int) {
	buf := make([]byte, size)
	b.SetBytes(int64(size))
	for b.Loop() {
		FillPattern(1, off, buf)
		off += uint64(size)
	}
}

func BenchmarkFillPattern64K(b *testing.B)          { benchmarkFill(b, 0, 64<<10) }
func BenchmarkFillPattern64KUnaligned(b *testing.B) { benchmarkFill(b, 3, 64<<10-5) }
func BenchmarkFillPattern1K(b *testing.B)           { benchmarkFill(b, 0, 1<<10) }
func BenchmarkFillPattern13(b *testing.B)           { benchmarkFill(b, 5, 13) }

func BenchmarkPatternSHA256(b *testing.B) {
	const n = 1 << 20
	b.SetBytes(n)
	for b.Loop() {
		PatternSHA256(1, 0, n)
	}
}

func BenchmarkReadStream(b *testing.B) {
	const n = 8 << 20
	b.SetBytes(n)
	for b.Loop() {
		if _, ok, err := ReadStream(NewPatternReader(1, 0, n), n, 1); !ok {
			b.Fatal(err)
		}
	}
}
