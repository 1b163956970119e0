// This file is the TCP "http" service: HTTP/1.1 with keep-alive and
// pipelining, driven by hand so that its output is a deterministic function
// of the request bytes. net/http's Server would add a Date header and
// buffer on its own; here every response is a fixed, ordered header set
//
//	HTTP/1.1 <code> <reason>\r\n
//	Content-Type: <type>\r\n
//	Content-Length: <n>\r\n
//	Allow: GET, HEAD\r\n            (405 only)
//	Connection: close\r\n           (when the server closes after it)
//	Connection: keep-alive\r\n      (HTTP/1.0 clients that asked for it)
//	\r\n
//
// followed by the body, so a node taking over a connection can regenerate
// any response and resume in the middle of it (BytesResponseHeader gives the
// header of a /bytes response, whose body is the pattern from offset 0).
//
// Routes (GET, and HEAD for the same header without the body):
//
//	/bytes?n=N&seed=S  200, application/octet-stream, bytes 0..N-1 of the
//	                   pattern of S (pattern.go); N <= 1<<40, S defaults to 0
//	/whoami            200, text/plain, the node name and "\n"
//	/healthz           200, text/plain, "ok\n"
//
// Anything else: 404 for an unknown path, 405 for another method on a known
// path, 400 with a one-line reason for a bad /bytes query (the connection is
// kept). A request that cannot be parsed gets 400 "malformed request", a
// header block over MaxHeaderBytes 431, a version other than HTTP/1.x 505,
// and the server closes after those. Bodies are fixed strings, never error
// texts from the Go library, so they cannot change with the Go release.
//
// Requests are parsed with net/http's ReadRequest. Whether a header block
// fits in MaxHeaderBytes is decided on its bytes alone (never on how they
// were split into reads), and a request body is read and discarded when it
// is at most 256 KiB (otherwise, or with "Expect: 100-continue", the response
// says Connection: close and the server closes after it).

package services

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

const (
	// DefaultMaxHeaderBytes is the default limit on a request's header block
	// (request line and header lines, blank line included).
	DefaultMaxHeaderBytes = 16 << 10
	// maxDiscardBody is the largest request body read and discarded to keep
	// the connection.
	maxDiscardBody = 256 << 10
	// minHeaderBuf is the smallest header buffer, whatever MaxHeaderBytes says.
	minHeaderBuf = 1 << 10

	contentTypeOctet = "application/octet-stream"
	contentTypeText  = "text/plain; charset=utf-8"
)

// ConnMode is what a response says about its connection.
type ConnMode uint8

const (
	// ConnKeepAlive: no Connection header; an HTTP/1.1 connection stays open.
	ConnKeepAlive ConnMode = iota
	// ConnKeepAliveHTTP10: "Connection: keep-alive", the answer to an
	// HTTP/1.0 request that asked to keep the connection.
	ConnKeepAliveHTTP10
	// ConnClose: "Connection: close"; the server closes after the response.
	ConnClose
)

// HTTP is the http service. Set its fields before serving.
type HTTP struct {
	node string

	// IdleTimeout bounds the wait for the next request on a kept-alive
	// connection and each read or write within one; <= 0 means no limit.
	// NewHTTP sets DefaultIdleTimeout.
	IdleTimeout time.Duration
	// MaxHeaderBytes limits a request's header block; each connection
	// buffers that much. NewHTTP sets DefaultMaxHeaderBytes.
	MaxHeaderBytes int
	// Linger bounds the wait for the client's EOF after the last response
	// (see DefaultLinger); <= 0 means half-close and return at once.
	Linger time.Duration
}

// NewHTTP returns the http service of the node called nodeName.
func NewHTTP(nodeName string) *HTTP {
	return &HTTP{
		node:           nodeName,
		IdleTimeout:    DefaultIdleTimeout,
		MaxHeaderBytes: DefaultMaxHeaderBytes,
		Linger:         DefaultLinger,
	}
}

// Name returns "http".
func (h *HTTP) Name() string { return "http" }

// BytesResponseHeader returns the exact header bytes of the response to
// GET or HEAD /bytes?n=N (any seed), blank line included: a GET response's
// body starts right after them.
func BytesResponseHeader(n uint64, mode ConnMode) []byte {
	return appendHeader(nil, http.StatusOK, contentTypeOctet, n, false, mode)
}

// BytesPath returns the request target for n bytes of seed's pattern.
func BytesPath(n, seed uint64) string {
	return "/bytes?n=" + strconv.FormatUint(n, 10) + "&seed=" + strconv.FormatUint(seed, 10)
}

// statusLines holds the status lines the service sends. They are spelled
// out rather than taken from http.StatusText so that they cannot change
// under a takeover between nodes built with different Go releases.
var statusLines = map[int]string{
	http.StatusOK:                          "HTTP/1.1 200 OK\r\n",
	http.StatusBadRequest:                  "HTTP/1.1 400 Bad Request\r\n",
	http.StatusNotFound:                    "HTTP/1.1 404 Not Found\r\n",
	http.StatusMethodNotAllowed:            "HTTP/1.1 405 Method Not Allowed\r\n",
	http.StatusRequestHeaderFieldsTooLarge: "HTTP/1.1 431 Request Header Fields Too Large\r\n",
	http.StatusHTTPVersionNotSupported:     "HTTP/1.1 505 HTTP Version Not Supported\r\n",
}

// appendHeader appends a response header block (see the file comment).
func appendHeader(dst []byte, status int, contentType string, length uint64, allow bool, mode ConnMode) []byte {
	dst = append(dst, statusLines[status]...)
	dst = append(dst, "Content-Type: "...)
	dst = append(dst, contentType...)
	dst = append(dst, "\r\nContent-Length: "...)
	dst = strconv.AppendUint(dst, length, 10)
	dst = append(dst, "\r\n"...)
	if allow {
		dst = append(dst, "Allow: GET, HEAD\r\n"...)
	}
	switch mode {
	case ConnClose:
		dst = append(dst, "Connection: close\r\n"...)
	case ConnKeepAliveHTTP10:
		dst = append(dst, "Connection: keep-alive\r\n"...)
	}
	return append(dst, "\r\n"...)
}

// reply is one planned response.
type reply struct {
	status  int
	ctype   string
	body    string // static body, unless pattern
	pattern bool   // body is bytes 0..n-1 of seed's pattern
	n, seed uint64
	allow   bool // add the Allow header (405)
	close   bool // the server must close after this response
	err     error
}

func textReply(status int, body string) reply {
	return reply{status: status, ctype: contentTypeText, body: body}
}

// badRequest is the reply to a request ReadRequest cannot parse, or one
// that does not fit the protocol: answered, then the connection ends.
func badRequest(status int, body string, err error) reply {
	r := textReply(status, body)
	r.close = true
	r.err = err
	return r
}

// ServeConn serves requests on conn until the client closes, a response
// says Connection: close, the idle timeout, an error or ctx's end.
func (h *HTTP) ServeConn(ctx context.Context, conn net.Conn) error {
	return h.serve(ctx, conn, httpPos{}, nil)
}

// httpPos is where a connection stands: output bytes written and input
// bytes consumed since the connection started (on any node).
type httpPos struct{ out, in uint64 }

// serve runs the request loop from pos; a resumed connection first skips
// input the client sends again and finishes the response in progress.
func (h *HTTP) serve(ctx context.Context, conn net.Conn, pos httpPos, rs *httpResume) error {
	g := newGuard(ctx, conn)
	defer g.release()

	maxHeader := h.MaxHeaderBytes
	if maxHeader < minHeaderBuf {
		maxHeader = minHeaderBuf
	}
	cr := &countingReader{r: conn}
	br := bufio.NewReaderSize(cr, maxHeader)
	consumed := func() uint64 { return pos.in + cr.n - uint64(br.Buffered()) }
	bp := getBuf()
	defer putBuf(bp)
	buf := *bp

	if rs != nil {
		done, err := h.finishResumed(g, br, buf, rs)
		if err != nil || done {
			return err
		}
		// The connection's first input byte is input byte reqEnd-skipIn
		// of the whole connection.
		pos = httpPos{out: rs.respEnd(), in: rs.cp.reqEnd - rs.skipIn}
	}

	for {
		if err := g.readDeadline(h.IdleTimeout); err != nil {
			return err
		}
		if _, err := br.Peek(1); err != nil {
			if errors.Is(err, io.EOF) || isTimeout(err) {
				return g.err(nil) // closed or idle between requests
			}
			return fmt.Errorf("http: waiting for a request: %w", g.err(err))
		}

		var rp reply
		var req *http.Request
		switch complete, err := headerComplete(br, maxHeader); {
		case err != nil:
			if errors.Is(err, io.EOF) {
				return g.err(nil) // closed in the middle of a request
			}
			return fmt.Errorf("http: reading a request: %w", g.err(err))
		case !complete:
			rp = badRequest(http.StatusRequestHeaderFieldsTooLarge, "request header too large\n",
				fmt.Errorf("http: request header over %d bytes", maxHeader))
		default:
			if req, err = http.ReadRequest(br); err != nil {
				rp = badRequest(http.StatusBadRequest, "malformed request\n",
					fmt.Errorf("http: malformed request: %w", err))
			} else {
				rp = h.route(req)
			}
		}

		mode := ConnKeepAlive
		if req != nil {
			if req.Close {
				rp.close = true
			}
			if !h.discardBody(g, req) {
				rp.close = true
			}
			if err := g.err(nil); err != nil {
				return err
			}
			if !rp.close && req.ProtoMajor == 1 && req.ProtoMinor == 0 {
				mode = ConnKeepAliveHTTP10
			}
		}
		if rp.close {
			mode = ConnClose
		}
		head := req != nil && req.Method == http.MethodHead

		length := uint64(len(rp.body))
		if rp.pattern {
			length = rp.n
		}
		out := appendHeader(buf[:0], rp.status, rp.ctype, length, rp.allow, mode)
		// Publish where this response starts and what it is, so another
		// node can finish it or continue after it.
		cp := httpCheckpoint{respStart: pos.out, reqEnd: consumed(), close: rp.close, header: out}
		switch {
		case head:
			cp.kind = 'h'
		case rp.pattern:
			cp.kind, cp.seed, cp.n = 'p', rp.seed, rp.n
		default:
			cp.kind, cp.body = 't', []byte(rp.body)
		}
		Checkpoint(g.ctx, cp.encode())
		pos.out += cp.respLen()
		var err error
		switch {
		case head:
			err = g.write(out, h.IdleTimeout)
		case rp.pattern:
			err = g.writePattern(buf, out, rp.seed, 0, rp.n, h.IdleTimeout)
		default:
			err = g.write(append(out, rp.body...), h.IdleTimeout)
		}
		if err != nil {
			return fmt.Errorf("http: writing a %d response: %w", rp.status, err)
		}
		if rp.close {
			g.finish(br, h.Linger)
			if err := g.err(nil); err != nil {
				return err
			}
			return rp.err
		}
	}
}

// headerComplete waits until br holds a whole request header block (up to
// and including its blank line) and reports true, or false if none ends in
// the first max bytes. It decides on the bytes alone: the answer does not
// depend on how they arrived. err is io.EOF if the client closed first.
func headerComplete(br *bufio.Reader, max int) (bool, error) {
	scanned := 0 // bytes searched so far for the end of the block
	for {
		avail := br.Buffered()
		if avail > max {
			avail = max
		}
		b, _ := br.Peek(avail)
		from := scanned - 2
		if from < 0 {
			from = 0
		}
		for i := from; i < len(b); i++ {
			if b[i] != '\n' {
				continue
			}
			if i+1 < len(b) && b[i+1] == '\n' {
				return true, nil
			}
			if i+2 < len(b) && b[i+1] == '\r' && b[i+2] == '\n' {
				return true, nil
			}
		}
		scanned = len(b)
		if scanned >= max {
			return false, nil
		}
		if _, err := br.Peek(scanned + 1); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				err = io.EOF
			}
			return false, err
		}
	}
}

// discardBody reads and drops req's body so the next request can be read,
// and reports whether the connection can be kept.
func (h *HTTP) discardBody(g *guard, req *http.Request) bool {
	if req.Body == nil || req.Body == http.NoBody {
		return true
	}
	if strings.EqualFold(req.Header.Get("Expect"), "100-continue") {
		return false // the client waits for a 100 before sending it
	}
	if g.readDeadline(h.IdleTimeout) != nil {
		return false
	}
	_, err := io.CopyN(io.Discard, req.Body, maxDiscardBody+1)
	return errors.Is(err, io.EOF)
}

// route plans the response to a parsed request.
func (h *HTTP) route(req *http.Request) reply {
	if req.ProtoMajor != 1 {
		return badRequest(http.StatusHTTPVersionNotSupported, "unsupported HTTP version\n",
			fmt.Errorf("http: unsupported version %q", req.Proto))
	}
	path := req.URL.Path
	switch path {
	case "/bytes", "/whoami", "/healthz":
	default:
		return textReply(http.StatusNotFound, "not found\n")
	}
	if req.Method != http.MethodGet && req.Method != http.MethodHead {
		r := textReply(http.StatusMethodNotAllowed, "method not allowed\n")
		r.allow = true
		return r
	}
	switch path {
	case "/whoami":
		return textReply(http.StatusOK, h.node+"\n")
	case "/healthz":
		return textReply(http.StatusOK, "ok\n")
	}
	n, seed, reason := parseBytesQuery(req.URL.RawQuery)
	if reason != "" {
		return textReply(http.StatusBadRequest, reason+"\n")
	}
	return reply{status: http.StatusOK, ctype: contentTypeOctet, pattern: true, n: n, seed: seed}
}

// parseBytesQuery parses /bytes' query; reason is non-empty if it is bad.
// The first value of a repeated parameter counts; others are ignored.
func parseBytesQuery(raw string) (n, seed uint64, reason string) {
	q, err := url.ParseQuery(raw)
	if err != nil {
		return 0, 0, "bad query string"
	}
	ns, ok := q["n"]
	if !ok {
		return 0, 0, "missing n"
	}
	if n, err = parseDecimal(ns[0]); err != nil {
		return 0, 0, "bad n: want a decimal integer"
	}
	if n > MaxStreamSize {
		return 0, 0, "bad n: over " + strconv.Itoa(MaxStreamSize)
	}
	if ss, ok := q["seed"]; ok {
		if seed, err = parseDecimal(ss[0]); err != nil {
			return 0, 0, "bad seed: want a decimal uint64"
		}
	}
	return n, seed, ""
}
