// This file holds the fuzz targets: arbitrary request bytes must never make
// a service panic, and the answer must follow the protocol and depend only
// on the bytes, never on how they were split into reads.

package services

import (
	"bufio"
	"bytes"
	"net/http"
	"strings"
	"testing"
)

// fuzzOutputMax caps what a fuzzed service may write: bigger answers are
// cut off (the service then returns the write error).
const fuzzOutputMax = 1 << 20

func FuzzStreamRequest(f *testing.F) {
	for _, s := range []string{"", "\n", "10 1\n", "0 0\n", "100 7 3\r\n", "10 1", "5 6 7\n", "x y\n",
		"1099511627776 1\n", "1099511627777 1\n", "18446744073709551616 1\n", strings.Repeat("1", 300),
		" 3\t4 \n", "70000 1 3\nextra"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		out, _, err := runFake(NewStream(), in, 0, fuzzOutputMax)
		for _, chunk := range []int{1, 7} {
			out2, _, err2 := runFake(NewStream(), in, chunk, fuzzOutputMax)
			if !bytes.Equal(out, out2) || (err == nil) != (err2 == nil) {
				t.Fatalf("answer depends on read sizes: %d bytes, %v vs %d bytes (chunk %d), %v",
					len(out), err, len(out2), chunk, err2)
			}
		}
		if len(in) == 0 {
			if len(out) != 0 || err != nil {
				t.Fatalf("empty input: %q, %v", out, err)
			}
			return
		}
		// The line the server sees: up to the first newline, if that comes
		// within 256 bytes.
		line := in
		if i := bytes.IndexByte(in, '\n'); i >= 0 {
			line = in[:i+1]
		}
		if len(line) > maxStreamLine || (line[len(line)-1] != '\n' && len(line) >= maxStreamLine) {
			if string(out) != "ERR request line too long\n" {
				t.Fatalf("long line: got %.60q", out)
			}
			return
		}
		size, seed, offset, perr := ParseStreamRequest(string(line))
		if perr != nil {
			if string(out) != "ERR "+perr.Error()+"\n" || err == nil {
				t.Fatalf("bad request %q: got %q, %v", line, out, err)
			}
			return
		}
		if offset > size || size > MaxStreamSize {
			t.Fatalf("ParseStreamRequest(%q) accepted %d %d %d", line, size, seed, offset)
		}
		want := min(size-offset, fuzzOutputMax)
		if uint64(len(out)) != want || !bytes.Equal(out, pattern(seed, offset, want)) {
			t.Fatalf("request %q: %d bytes, want %d of the pattern", line, len(out), want)
		}
		if (err == nil) != (size-offset <= fuzzOutputMax) {
			t.Fatalf("request %q: ServeConn = %v", line, err)
		}
	})
}

func FuzzHTTPRequest(f *testing.F) {
	for _, s := range []string{
		"",
		"GET /healthz HTTP/1.1\r\n\r\n",
		"GET /bytes?n=100&seed=3 HTTP/1.1\r\nHost: x\r\n\r\nGET /whoami HTTP/1.1\r\n\r\n",
		"HEAD /bytes?n=5000000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n",
		"POST /bytes HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n",
		"GET /bytes?n=1;x HTTP/1.1\r\n\r\n",
		"GET / HTTP/9.9\r\n\r\n",
		"GARBAGE\n\n",
		"GET /healthz HTTP/1.1\nHost: a\n\n",
		"GET /bytes?n=99999999999 HTTP/1.1\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		h := NewHTTP("fuzz-node")
		h.MaxHeaderBytes = 4096
		out, _, err := runFake(h, in, 0, fuzzOutputMax)
		for _, chunk := range []int{1, 7} {
			out2, _, err2 := runFake(h, in, chunk, fuzzOutputMax)
			if !bytes.Equal(out, out2) || (err == nil) != (err2 == nil) {
				t.Fatalf("answer depends on read sizes: %d bytes, %v vs %d bytes (chunk %d), %v",
					len(out), err, len(out2), chunk, err2)
			}
		}
		if len(out) == 0 {
			return
		}
		if !bytes.HasPrefix(out, []byte("HTTP/1.1 ")) {
			t.Fatalf("answer does not start with a status line: %.60q", out)
		}
		// The first response must parse; its body may be cut off by the cap.
		resp, rerr := http.ReadResponse(bufio.NewReader(bytes.NewReader(out)), &http.Request{Method: "GET"})
		if rerr != nil {
			t.Fatalf("first response does not parse: %v\n%.200q", rerr, out)
		}
		resp.Body.Close()
		switch resp.StatusCode {
		case 200, 400, 404, 405, 431, 505:
		default:
			t.Fatalf("unexpected status %s", resp.Status)
		}
	})
}
