// Command batonctl is Baton's admin CLI. It talks to one batond over the
// admin gRPC API (a unix socket by default) and prints human tables, or JSON
// with -o json for scripts.
//
// Usage:
//
//	batonctl [-admin unix:/run/baton/NODE.sock | -node NODE] [-o table|json] COMMAND
//
// Commands: flows, flow, peers, stats, health, drain, undrain.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/baton-anycast/baton/handoff"
	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

type command struct {
	name, help string
	run        func(ctx context.Context, c batonv1.AdminClient, args []string) (proto.Message, func(io.Writer, proto.Message), error)
}

var commands = []command{
	{"flows", "flows in the cluster with owner and replicas [-owner N] [-service S] [-phase P] [-local] [-limit N]", cmdFlows},
	{"flow", "one flow and every copy of its state: flow CLIENT:PORT->ANYCAST:PORT", cmdFlow},
	{"peers", "replication links: liveness, lag, flows and bytes", cmdPeers},
	{"stats", "device, link, service and refusal counters", cmdStats},
	{"health", "node state, health checks, announcements, BGP sessions", cmdHealth},
	{"drain", "withdraw the announcement: no new flows; drained once the node owns none", cmdDrain},
	{"undrain", "announce again (once the checks pass)", cmdUndrain},
}

func usage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprintln(w, "usage: batonctl [flags] COMMAND")
	fmt.Fprintln(w, "commands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.help)
	}
	fmt.Fprintln(w, "flags:")
	fs.SetOutput(w)
	fs.PrintDefaults()
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("batonctl", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	admin := fs.String("admin", "", "batond admin address: unix:/path or host:port (default unix:/run/baton/<node>.sock)")
	node := fs.String("node", "", "node name, for the default admin socket path")
	output := fs.String("o", "table", "output format: table or json")
	timeout := fs.Duration("timeout", 5*time.Second, "how long to wait for batond")
	tlsCA := fs.String("tls-ca", "", "cluster CA (PEM), for a TCP admin address")
	tlsCert := fs.String("tls-cert", "", "client certificate from the cluster CA (PEM), for a TCP admin address")
	tlsKey := fs.String("tls-key", "", "client key (PEM), for a TCP admin address")
	serverName := fs.String("tls-server-name", "", "node name the server certificate must carry (default: -node, else the admin host)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage(stdout, fs)
			return 0
		}
		fmt.Fprintf(stderr, "batonctl: %v\n", err)
		return 2
	}
	if *output != "table" && *output != "json" {
		fmt.Fprintf(stderr, "batonctl: -o: %q is not table or json\n", *output)
		return 2
	}
	if fs.NArg() == 0 {
		usage(stderr, fs)
		return 2
	}
	var cmd *command
	for i := range commands {
		if commands[i].name == fs.Arg(0) {
			cmd = &commands[i]
		}
	}
	if cmd == nil {
		fmt.Fprintf(stderr, "batonctl: unknown command %q (known: %s)\n", fs.Arg(0), commandNames())
		return 2
	}
	addr, err := adminAddr(*admin, *node)
	if err != nil {
		fmt.Fprintf(stderr, "batonctl: %v\n", err)
		return 2
	}
	creds := insecure.NewCredentials()
	if !strings.HasPrefix(addr, "unix:") {
		if *tlsCA == "" || *tlsCert == "" || *tlsKey == "" {
			fmt.Fprintf(stderr, "batonctl: admin address %s is TCP: give -tls-ca, -tls-cert and -tls-key (the admin API requires mutual TLS)\n", addr)
			return 2
		}
		m, err := handoff.LoadTLS(*tlsCA, *tlsCert, *tlsKey)
		if err != nil {
			fmt.Fprintf(stderr, "batonctl: %v\n", err)
			return 2
		}
		name := *serverName
		if name == "" {
			name = *node
		}
		if name == "" {
			name, _, _ = net.SplitHostPort(addr)
		}
		creds = credentials.NewTLS(m.Client(name))
	}
	conn, err := grpc.NewClient(dialTarget(addr), grpc.WithTransportCredentials(creds))
	if err != nil {
		fmt.Fprintf(stderr, "batonctl: admin address %s: %v\n", addr, err)
		return 2
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	msg, table, err := cmd.run(ctx, batonv1.NewAdminClient(conn), fs.Args()[1:])
	if err != nil {
		fmt.Fprintf(stderr, "batonctl: %s\n", describeErr(addr, err))
		return 1
	}
	if *output == "json" {
		b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(msg)
		if err != nil {
			fmt.Fprintf(stderr, "batonctl: %v\n", err)
			return 1
		}
		fmt.Fprintln(stdout, string(b))
		return 0
	}
	table(stdout, msg)
	return 0
}

func commandNames() string {
	names := make([]string, len(commands))
	for i, c := range commands {
		names[i] = c.name
	}
	return strings.Join(names, ", ")
}

func adminAddr(admin, node string) (string, error) {
	switch {
	case admin != "":
		return admin, nil
	case node != "":
		return "unix:/run/baton/" + node + ".sock", nil
	}
	// One node on this host: use its socket if there is exactly one.
	matches, _ := filepathGlob("/run/baton/*.sock")
	switch len(matches) {
	case 1:
		return "unix:" + matches[0], nil
	case 0:
		return "", errors.New("no batond admin socket in /run/baton: is batond running? (or give -admin)")
	}
	return "", fmt.Errorf("several admin sockets in /run/baton (%s): pick one with -node or -admin", strings.Join(matches, ", "))
}

// dialTarget turns an admin address into a gRPC target.
func dialTarget(addr string) string {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "unix://" + p
	}
	return "passthrough:///" + addr
}

// describeErr turns a gRPC error into one line an operator can act on.
func describeErr(addr string, err error) string {
	st, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	switch st.Code() {
	case codes.Unavailable:
		if m := st.Message(); strings.Contains(m, "tls:") || strings.Contains(m, "certificate") || strings.Contains(m, "handshake") {
			return fmt.Sprintf("batond at %s refused the connection: TLS: %s", addr, lastPart(m))
		}
		return fmt.Sprintf("cannot reach batond at %s: %s (is it running?)", addr, lastPart(st.Message()))
	case codes.DeadlineExceeded:
		return fmt.Sprintf("batond at %s did not answer in time", addr)
	case codes.PermissionDenied, codes.Unauthenticated:
		return fmt.Sprintf("batond at %s refused the request: %s", addr, st.Message())
	case codes.Unimplemented:
		return fmt.Sprintf("batond at %s does not support this command (older version?)", addr)
	}
	return fmt.Sprintf("batond at %s: %s: %s", addr, st.Code(), st.Message())
}

// lastPart is the innermost cause of a wrapped error message.
func lastPart(msg string) string {
	msg = strings.TrimRight(msg, "\"")
	if i := strings.LastIndex(msg, ": "); i >= 0 {
		msg = msg[i+2:]
	}
	return msg
}
