// Package health decides whether this node should receive traffic, and
// tells the network.
//
// Role:
//
//   - Checks (check.go, probes.go): each check probes one thing on an
//     interval with a timeout, and rise/fall thresholds turn its results
//     into a verdict (up after Rise consecutive passes, down after Fall
//     consecutive failures), as HAProxy's rise/fall and IP SLA tracking's
//     delay up/down do. Service checks go through the node's own data
//     path: a kernel socket in the node's network namespace connects to
//     the anycast address, the kernel routes it into the TUN, and the
//     packets cross the device, the hook chain, the gVisor stack, the
//     listener and the service, and back (see probes.go for why not a dial
//     inside gVisor). Node checks look at the TUN (reader alive, link up
//     with carrier) and, when a cluster is configured, the peer links.
//   - The node state machine (node.go): starting -> serving (healthy) ->
//     unhealthy | draining -> drained, plus stopping and failed. Only a
//     serving node announces its prefixes.
//   - Announcers (announcer.go, bgp.go): a small interface with two
//     implementations, "bgp" (an embedded GoBGP speaker that announces
//     every anycast prefix with the node's address as next hop) and "none"
//     (routes are managed outside Baton).
//
// This package must not touch the packet path (no hooks, no packet
// parsing, no injection), install or remove kernel routes (tun/ does),
// or know about flow state beyond a count (FlowCounter): draining waits for
// that count to reach zero, the takeover engine is what moves flows away.
// Probes run on their own goroutines with timeouts; nothing here blocks
// the packet path or the admin API on the network.
package health
