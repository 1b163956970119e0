// This file defines the deterministic byte pattern the stream and http
// services send and clients verify. It is a wire contract between nodes and
// clients: changing it breaks takeovers and every deployed client.
//
// The pattern of seed s is the output of the splitmix64 generator seeded with
// s, each 64-bit output written little endian:
//
//	word k (bytes 8k..8k+7) = mix(s + (k+1)*0x9E3779B97F4A7C15)
//	mix(z): z = (z ^ z>>30) * 0xBF58476D1CE4E5B9
//	        z = (z ^ z>>27) * 0x94D049BB133111EB
//	        return z ^ z>>31
//
// (all arithmetic mod 2^64). Any byte can be computed without generating the
// bytes before it, so a node taking over a connection, or a client resuming
// a download, starts at any offset.

package services

import (
	"crypto/sha256"
	"encoding/binary"
	"io"
	"sync"
)

const (
	patternGamma = 0x9E3779B97F4A7C15
	patternMul1  = 0xBF58476D1CE4E5B9
	patternMul2  = 0x94D049BB133111EB

	// chunkSize is the size of the buffers services write and read with.
	// 60 KiB rather than 64: with segmentation offload gVisor sends at
	// most 65375 payload bytes per segment and does not merge writes, so a
	// 64 KiB write left a 161-byte runt segment (one extra TUN write) per
	// chunk; 60 KiB measured 0.67x/0.70x of the kernel against 0.60x/0.57x.
	chunkSize = 60 << 10
)

// patternMix is the splitmix64 output function.
func patternMix(z uint64) uint64 {
	z = (z ^ (z >> 30)) * patternMul1
	z = (z ^ (z >> 27)) * patternMul2
	return z ^ (z >> 31)
}

// patternWord returns word k of the pattern of seed.
func patternWord(seed, k uint64) uint64 {
	return patternMix(seed + (k+1)*patternGamma)
}

// FillPattern fills buf with bytes offset..offset+len(buf)-1 of the pattern of
// seed. offset and len(buf) need not be multiples of 8.
func FillPattern(seed, offset uint64, buf []byte) {
	if len(buf) == 0 {
		return
	}
	k := offset / 8
	if r := offset % 8; r != 0 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], patternWord(seed, k))
		n := copy(buf, w[r:])
		buf = buf[n:]
		k++
	}
	// state is the generator state just before word k: word k is
	// patternMix(state + gamma).
	state := seed + k*patternGamma
	for len(buf) >= 32 {
		b := buf[:32:32]
		s0 := state + patternGamma
		s1 := s0 + patternGamma
		s2 := s1 + patternGamma
		s3 := s2 + patternGamma
		state = s3
		binary.LittleEndian.PutUint64(b[0:8], patternMix(s0))
		binary.LittleEndian.PutUint64(b[8:16], patternMix(s1))
		binary.LittleEndian.PutUint64(b[16:24], patternMix(s2))
		binary.LittleEndian.PutUint64(b[24:32], patternMix(s3))
		buf = buf[32:]
	}
	for len(buf) >= 8 {
		state += patternGamma
		binary.LittleEndian.PutUint64(buf[:8], patternMix(state))
		buf = buf[8:]
	}
	if len(buf) > 0 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], patternMix(state+patternGamma))
		copy(buf, w[:])
	}
}

// bufPool holds chunkSize buffers shared by all services and helpers, so a
// connection costs no buffer allocation once the pool is warm.
var bufPool = sync.Pool{New: func() any {
	b := make([]byte, chunkSize)
	return &b
}}

func getBuf() *[]byte  { return bufPool.Get().(*[]byte) }
func putBuf(b *[]byte) { bufPool.Put(b) }

// PatternReader reads a range of the pattern of one seed. It implements
// io.WriterTo, so io.Copy writes it in large chunks without a copy.
type PatternReader struct {
	seed uint64
	off  uint64 // next byte to produce
	end  uint64 // one past the last byte
}

// NewPatternReader returns a reader of bytes offset..offset+n-1 of the
// pattern of seed. If offset+n overflows, the range ends at 2^64-1.
func NewPatternReader(seed, offset, n uint64) *PatternReader {
	end := offset + n
	if end < offset {
		end = ^uint64(0)
	}
	return &PatternReader{seed: seed, off: offset, end: end}
}

// Offset returns the pattern offset of the next byte Read would return.
func (r *PatternReader) Offset() uint64 { return r.off }

// Remaining returns how many bytes are left to read.
func (r *PatternReader) Remaining() uint64 { return r.end - r.off }

// Read fills p with the next bytes of the range; io.EOF after the last.
func (r *PatternReader) Read(p []byte) (int, error) {
	left := r.end - r.off
	if left == 0 {
		return 0, io.EOF
	}
	if uint64(len(p)) > left {
		p = p[:left]
	}
	FillPattern(r.seed, r.off, p)
	r.off += uint64(len(p))
	return len(p), nil
}

// WriteTo writes the rest of the range to w in 64 KiB chunks.
func (r *PatternReader) WriteTo(w io.Writer) (int64, error) {
	bp := getBuf()
	defer putBuf(bp)
	buf := *bp
	var total int64
	for r.off < r.end {
		chunk := buf
		if left := r.end - r.off; left < uint64(len(chunk)) {
			chunk = chunk[:left]
		}
		FillPattern(r.seed, r.off, chunk)
		n, err := w.Write(chunk)
		r.off += uint64(n)
		total += int64(n)
		if err != nil {
			return total, err
		}
		if n < len(chunk) {
			return total, io.ErrShortWrite
		}
	}
	return total, nil
}

// PatternSHA256 returns the SHA-256 of bytes offset..offset+n-1 of the
// pattern of seed, for checking received bytes against a digest.
func PatternSHA256(seed, offset, n uint64) [32]byte {
	h := sha256.New()
	_, _ = NewPatternReader(seed, offset, n).WriteTo(h)
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}
