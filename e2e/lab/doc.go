// Package lab builds throw-away network-namespace labs for Baton's
// end-to-end tests: one client, one ECMP router and N anycast nodes, each in
// its own network namespace, wired with veth pairs. It needs root.
//
// # Topology
//
// Namespace names are <Name>-c, <Name>-r and <Name>-n1..<Name>-nN, where
// Name (Lab.Name) is Config.Prefix (default "bt") plus 6 random hex digits.
// Node I below is node index I-1 in the API (Lab.Nodes, SetNexthops,
// PredictNode).
//
//	 <Name>-c (client)              <Name>-r (router)                <Name>-nI (node I, I=1..N)
//	+-------------------+          +------------------------+       +------------------------------+
//	| eth0              |  veth    | to-c                   |       |                              |
//	|  198.51.100.2/30  |----------|  198.51.100.1/30       |       |                              |
//	| 2001:db8:100::2/64|          |  2001:db8:100::1/64    | veth  | eth0                         |
//	|                   |          | to-nI                  |-------|  203.0.113.(4(I-1)+2)/30     |
//	| default via       |          | 203.0.113.(4(I-1)+1)/30|       |  2001:db8:200:I::2/64        |
//	|  198.51.100.1,    |          |  2001:db8:200:I::1/64  |       | default via router (v4, v6)  |
//	|  2001:db8:100::1  |          |                        |       |                              |
//	+-------------------+          | 192.0.2.1/32 and       |       | any0 (TUN, made by batond):  |
//	                               | 2001:db8:a::1/128      |       |  192.0.2.1/32 dev any0       |
//	                               |  multipath via the     |       |  2001:db8:a::1/128 dev any0  |
//	                               |  nodes' eth0 addresses |       | batond's BGP speaker :179    |
//	                               | BIRD (bgp mode)        |       +------------------------------+
//	                               +------------------------+
//
// # Routing: BGP (default) or static
//
// Config.Routing "bgp" (the default): BIRD 2 runs in the router namespace
// (bird -f with -c/-s/-P files in LogDir; Lab.Birdc queries it from the
// router namespace) with one iBGP session per node, AS BGPASN on both
// sides, IPv6 routes over the same IPv4 session (multiprotocol BGP). BIRD
// dials every node each second (the nodes' batond are passive) and
// installs the anycast routes as one kernel multipath route (merge paths)
// over the nodes that announce. A node announces only while its health
// checks pass, so the router's nexthops are the healthy nodes. BatondArgs
// adds the announcer's flags; StartBatond waits until the router routes
// to the node (StartBatondUnannounced does not); Lab.WaitNexthops and
// Lab.WaitAnnounced wait for the FIB, woken by route notifications.
// SetNexthops filters which nodes' announcements BIRD uses.
//
// Config.Routing "static": a static kernel multipath route over every
// node, whatever runs there (a node's kernel can answer), as before BGP.
//
// Every veth is created from a netlink socket inside the router namespace,
// its peer placed directly into the client or node namespace with
// IFLA_NET_NS_FD: nothing is ever created in, or connected to, the host
// namespace, and the only host-visible traces are the /run/netns entries,
// the process logs, and the processes started with NS.Start. Both ends are
// born in fresh private namespaces, so they get their final names (eth0,
// to-c, to-nI) directly; no temporary name or rename is needed. Like `ip
// netns add`, the lab makes /run/netns a shared bind mount first, so the
// entries stay removable whatever iproute2 does to /run/netns later.
//
// Sysctls (written from a thread inside each namespace):
//   - all namespaces: rp_filter=0 (all, default); with IPv6, accept_dad=0
//     (IPv6 addresses are also added with IFA_F_NODAD).
//   - router and nodes: net.ipv4.ip_forward=1, net.ipv6.conf.all.forwarding=1.
//     A node forwards what arrives on eth0 for the anycast address into the
//     TUN, which Baton's userspace stack terminates.
//   - router: fib_multipath_hash_policy=3 with fib_multipath_hash_fields=0x37
//     (src/dst address, protocol, src/dst port; no flow label) for IPv4 and
//     IPv6, and fib_multipath_hash_seed=Lab.HashSeed. Policy 1 is not
//     stable over veth (the socket's random skb hash leaks through).
//
// The IPv6 parts are skipped when Config.DisableIPv6 is set.
//
// # Running things inside a namespace
//
// NS.Do runs a function on a locked OS thread that has entered the
// namespace; the thread is never returned to the scheduler. Sockets made
// there stay in the namespace (NS.Dial, NS.Listen, NS.ListenPacket and
// friends wrap this), and NS.Start forks processes from such a thread, so
// they start in the namespace; their output goes to
// <LogDir>/<Name>-<name>.log.
//
// Lab.WaitRoute is the readiness check for a node daemon: the TUN is up
// with carrier and the node's anycast routes point into it. Lab.SetNexthops
// changes the router's ECMP set (in BGP mode: whose announcements count). With hash-threshold multipath, removing
// one nexthop also moves flows between the remaining ones: do not assume
// only the removed node's flows move.
//
// # ECMP prediction
//
// Lab.PredictNode tells which node a TCP 4-tuple from the client reaches.
// For IPv4 it asks the router's kernel: an RTM_GETROUTE with RTA_IIF
// (to-c), RTA_IP_PROTO, RTA_SPORT and RTA_DPORT, which the kernel answers by
// routing a synthetic packet exactly like a forwarded one. For IPv6 the
// kernel's RTM_GETROUTE answer is NOT where forwarded packets go: with hash
// policy 3 the forwarding path hashes jhash_2words(flowhash, 0, 0) while
// the route query hashes flowhash alone (`ip -6 route get ... sport ...`
// disagreed with real connections for about 2 flows in 3). So the lab
// models the kernel's hash (siphash of struct flow_keys keyed by the hash
// seed, see ecmp6.go), checks the model against the kernel's RTM_GETROUTE
// at New and on every call, and applies the jhash step. This is why every
// lab sets a known fib_multipath_hash_seed (random if Config.HashSeed is 0).
//
// # Teardown guarantees
//
// New undoes everything it did when it fails. Lab.Close is idempotent and
// safe on a half-built lab. It sends SIGTERM to every process started with
// NS.Start, SIGKILL after a few seconds, and reaps them, always by PID; then
// any other process still in a lab namespace is killed by PID and reported
// as an error; then every /run/netns/<Name>-* entry is unmounted and
// removed, which lets the kernel destroy the namespaces with their veths
// and TUNs once the test has also closed the sockets it opened in them.
// Close never signals a process by name and never touches a namespace or
// process of another lab.
//
// If the test binary dies without Close (e.g. a panic or `go test`
// timeout), the processes it started still die (PR_SET_PDEATHSIG on the
// forking thread), but the named namespaces stay: `ip netns list | grep
// '^bt'` shows them, and `ip netns del NAME` removes them.
package lab
