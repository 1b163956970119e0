// This file tests the http service (http.go).

package services

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

const textHeader = "Content-Type: text/plain; charset=utf-8\r\n"

// get returns a minimal HTTP/1.1 request for target.
func get(target string, extra ...string) string {
	return "GET " + target + " HTTP/1.1\r\nHost: baton\r\n" + strings.Join(extra, "") + "\r\n"
}

// textResp returns the exact bytes of a text response.
func textResp(status, body, extra string) string {
	return "HTTP/1.1 " + status + "\r\n" + textHeader +
		fmt.Sprintf("Content-Length: %d\r\n", len(body)) + extra + "\r\n" + body
}

// TestHTTPExactBytes pins whole outputs: the service's bytes must be a
// function of the request bytes alone, however they arrive.
func TestHTTPExactBytes(t *testing.T) {
	bytesResp := func(n, seed uint64, mode ConnMode) string {
		return string(BytesResponseHeader(n, mode)) + string(pattern(seed, 0, n))
	}
	for _, tc := range []struct {
		name, in, want string
		wantErr        bool
	}{
		{"healthz", get("/healthz"), textResp("200 OK", "ok\n", ""), false},
		{"whoami", get("/whoami"), textResp("200 OK", "node-a\n", ""), false},
		{"bytes", get("/bytes?n=1000&seed=7"), bytesResp(1000, 7, ConnKeepAlive), false},
		{"bytes default seed", get("/bytes?n=9"), bytesResp(9, 0, ConnKeepAlive), false},
		{"bytes zero", get("/bytes?n=0&seed=1"), bytesResp(0, 1, ConnKeepAlive), false},
		{"bytes big", get("/bytes?n=200003&seed=2"), bytesResp(200003, 2, ConnKeepAlive), false},
		{"bytes close", get("/bytes?n=5&seed=1", "Connection: close\r\n"), bytesResp(5, 1, ConnClose), false},
		{"head bytes", "HEAD /bytes?n=1000&seed=7 HTTP/1.1\r\n\r\n", string(BytesResponseHeader(1000, ConnKeepAlive)), false},
		{"head whoami", "HEAD /whoami HTTP/1.1\r\n\r\n", strings.TrimSuffix(textResp("200 OK", "node-a\n", ""), "node-a\n"), false},
		{"not found", get("/nope"), textResp("404 Not Found", "not found\n", ""), false},
		{"not found post", "POST /nope HTTP/1.1\r\n\r\n", textResp("404 Not Found", "not found\n", ""), false},
		{"method", "DELETE /bytes?n=1 HTTP/1.1\r\n\r\n", textResp("405 Method Not Allowed", "method not allowed\n", "Allow: GET, HEAD\r\n"), false},
		{"missing n", get("/bytes?seed=1"), textResp("400 Bad Request", "missing n\n", ""), false},
		{"bad n", get("/bytes?n=x"), textResp("400 Bad Request", "bad n: want a decimal integer\n", ""), false},
		{"negative n", get("/bytes?n=-1"), textResp("400 Bad Request", "bad n: want a decimal integer\n", ""), false},
		{"huge n", get("/bytes?n=1099511627777"), textResp("400 Bad Request", "bad n: over 1099511627776\n", ""), false},
		{"bad seed", get("/bytes?n=1&seed=-2"), textResp("400 Bad Request", "bad seed: want a decimal uint64\n", ""), false},
		{"bad query", get("/bytes?n=1;seed=2"), textResp("400 Bad Request", "bad query string\n", ""), false},
		{"http10", "GET /healthz HTTP/1.0\r\n\r\n", textResp("200 OK", "ok\n", "Connection: close\r\n"), false},
		{"http10 keep-alive", "GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", textResp("200 OK", "ok\n", "Connection: keep-alive\r\n"), false},
		{"malformed", "GARBAGE\r\n\r\n", textResp("400 Bad Request", "malformed request\n", "Connection: close\r\n"), true},
		{"bad version", "GET / HTTP/2.0\r\n\r\n", textResp("505 HTTP Version Not Supported", "unsupported HTTP version\n", "Connection: close\r\n"), true},
		{"header too large", get("/healthz", "X: "+strings.Repeat("a", DefaultMaxHeaderBytes)+"\r\n"),
			textResp("431 Request Header Fields Too Large", "request header too large\n", "Connection: close\r\n"), true},
		{"no request", "", "", false},
		{"partial request", "GET /healthz HTTP/1.1\r\nHost:", "", false},
		{"pipelined", get("/healthz") + get("/whoami") + get("/bytes?n=3&seed=3"),
			textResp("200 OK", "ok\n", "") + textResp("200 OK", "node-a\n", "") + bytesResp(3, 3, ConnKeepAlive), false},
		{"stop after close", get("/healthz", "Connection: close\r\n") + get("/whoami"),
			textResp("200 OK", "ok\n", "Connection: close\r\n"), false},
		{"body discarded", "POST /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello" + get("/healthz"),
			textResp("405 Method Not Allowed", "method not allowed\n", "Allow: GET, HEAD\r\n") + textResp("200 OK", "ok\n", ""), false},
		{"chunked body discarded", "PUT /whoami HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + get("/healthz"),
			textResp("405 Method Not Allowed", "method not allowed\n", "Allow: GET, HEAD\r\n") + textResp("200 OK", "ok\n", ""), false},
		{"expect continue", "POST /healthz HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
			textResp("405 Method Not Allowed", "method not allowed\n", "Allow: GET, HEAD\r\nConnection: close\r\n"), false},
		{"body too big", "POST /healthz HTTP/1.1\r\nContent-Length: 300000\r\n\r\n" + strings.Repeat("b", 300000),
			textResp("405 Method Not Allowed", "method not allowed\n", "Allow: GET, HEAD\r\nConnection: close\r\n"), false},
		{"escaped path", get("/who%61mi"), textResp("200 OK", "node-a\n", ""), false},
		{"absolute form", get("http://example/healthz"), textResp("200 OK", "ok\n", ""), false},
	} {
		for _, chunk := range []int{0, 1, 5} {
			out, _, err := runFake(NewHTTP("node-a"), []byte(tc.in), chunk, 0)
			if string(out) != tc.want {
				t.Errorf("%s (chunk %d):\n got %.300q\nwant %.300q", tc.name, chunk, out, tc.want)
			}
			if (err != nil) != tc.wantErr {
				t.Errorf("%s (chunk %d): ServeConn = %v", tc.name, chunk, err)
			}
		}
	}
}

func TestBytesResponseHeader(t *testing.T) {
	for _, tc := range []struct {
		mode ConnMode
		conn string
	}{{ConnKeepAlive, ""}, {ConnClose, "Connection: close\r\n"}, {ConnKeepAliveHTTP10, "Connection: keep-alive\r\n"}} {
		want := "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1099511627776\r\n" + tc.conn + "\r\n"
		if got := string(BytesResponseHeader(1<<40, tc.mode)); got != want {
			t.Errorf("mode %d: %q, want %q", tc.mode, got, want)
		}
	}
	if p := BytesPath(10, 3); p != "/bytes?n=10&seed=3" {
		t.Errorf("BytesPath = %q", p)
	}
}

// readResp reads one response to a request with method from br.
func readResp(t *testing.T, br *bufio.Reader, method string) (*http.Response, []byte) {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

func TestHTTPKeepAliveLoopback(t *testing.T) {
	lb := newLoopback(t, NewHTTP("node-b"))
	c := lb.dial(t)
	br := bufio.NewReader(c)
	for i, n := range []uint64{10, 100000, 0} {
		if _, err := io.WriteString(c, get(BytesPath(n, uint64(i)))); err != nil {
			t.Fatal(err)
		}
		resp, body := readResp(t, br, "GET")
		if resp.StatusCode != 200 || resp.Close || !bytes.Equal(body, pattern(uint64(i), 0, n)) {
			t.Fatalf("request %d: %s, close %v, %d bytes", i, resp.Status, resp.Close, len(body))
		}
	}
	// Pipelined: three requests in one write, three responses in order.
	io.WriteString(c, get("/whoami")+"HEAD /bytes?n=77 HTTP/1.1\r\n\r\n"+get("/healthz", "Connection: close\r\n"))
	if resp, body := readResp(t, br, "GET"); string(body) != "node-b\n" {
		t.Fatalf("whoami: %s %q", resp.Status, body)
	}
	if resp, body := readResp(t, br, "HEAD"); resp.ContentLength != 77 || len(body) != 0 {
		t.Fatalf("head: %s, length %d, %d body bytes", resp.Status, resp.ContentLength, len(body))
	}
	if resp, body := readResp(t, br, "GET"); string(body) != "ok\n" || !resp.Close {
		t.Fatalf("healthz: %s %q close %v", resp.Status, body, resp.Close)
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after Connection: close: %q, %v", rest, err)
	}
	c.Close() // else the server lingers, waiting for our EOF
	if err := <-lb.errs; err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
}

func TestHTTPClientInterop(t *testing.T) {
	lb := newLoopback(t, NewHTTP("node-c"))
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", lb.ln.Addr().String())
	}}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	for _, tc := range []struct {
		path   string
		status int
		body   []byte
	}{
		{BytesPath(123457, 42), 200, pattern(42, 0, 123457)},
		{"/whoami", 200, []byte("node-c\n")},
		{"/healthz", 200, []byte("ok\n")},
		{"/x", 404, []byte("not found\n")},
		{"/bytes?n=q", 400, []byte("bad n: want a decimal integer\n")},
	} {
		resp, err := client.Get("http://baton" + tc.path)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != tc.status || !bytes.Equal(body, tc.body) {
			t.Fatalf("%s: %s, %d bytes, %v", tc.path, resp.Status, len(body), err)
		}
	}
}

func TestHTTPIdleTimeout(t *testing.T) {
	h := NewHTTP("n")
	// Long enough for the request and its answer to cross the pipe
	// (each write waits for the reader; CI saw 1 ms run out first under
	// -race), short enough to keep the test quick.
	h.IdleTimeout = 500 * time.Millisecond
	cli, done := servePipe(t, context.Background(), h)
	// One request, then silence: the server must give up on its own.
	errc := make(chan error, 1)
	go func() { _, err := io.WriteString(cli, get("/healthz")); errc <- err }()
	if resp, body := readResp(t, bufio.NewReader(cli), "GET"); string(body) != "ok\n" {
		t.Fatalf("%s %q", resp.Status, body)
	}
	<-errc
	if err := <-done; err != nil {
		t.Fatalf("ServeConn after idle timeout: %v", err)
	}
}

func TestHTTPCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cli, done := servePipe(t, ctx, NewHTTP("n"))
	io.WriteString(cli, get(BytesPath(MaxStreamSize, 1)))
	if _, err := io.ReadFull(cli, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeConn = %v, want context.Canceled", err)
	}
}

func TestHTTPMaxHeaderBytes(t *testing.T) {
	h := NewHTTP("n")
	h.MaxHeaderBytes = 2000
	fits := get("/healthz", "X: "+strings.Repeat("a", 1900)+"\r\n")
	tooBig := get("/healthz", "X: "+strings.Repeat("a", 2000)+"\r\n")
	for _, chunk := range []int{0, 1, 999} {
		if out, _, err := runFake(h, []byte(fits), chunk, 0); err != nil || !bytes.HasPrefix(out, []byte("HTTP/1.1 200 OK\r\n")) {
			t.Errorf("fitting header (chunk %d): %.40q, %v", chunk, out, err)
		}
		if out, _, _ := runFake(h, []byte(tooBig), chunk, 0); !bytes.HasPrefix(out, []byte("HTTP/1.1 431 ")) {
			t.Errorf("oversized header (chunk %d): %.40q", chunk, out)
		}
	}
}
