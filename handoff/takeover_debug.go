package handoff

// A debug view of one flow on this node, for an operator (batond serves it
// on the metrics listener at /debug/flow?key=CLIENT->ANYCAST) and for the
// end-to-end tests' stall reports: the takeover engine's entry, the
// tracker's state and the gVisor endpoint's counters. Reading it takes the
// entry's and the tracker's locks briefly; it never changes anything.

import (
	"fmt"
	"strings"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// DebugFlow describes flow k on this node in a few lines of text.
func (e *Engine) DebugFlow(k FlowKey) string {
	var b strings.Builder
	fmt.Fprintf(&b, "node %s flow %s\n", e.self, k)
	if f := e.lookup(k); f != nil {
		f.mu.Lock()
		fmt.Fprintf(&b, "engine: state %s how %q owner %q epoch %d queued %d reason %q haveAck %v lastAck %d lastWnd %d\n",
			f.get(), f.how, f.owner, f.epoch, len(f.queue), f.reason, f.haveAck, f.lastAck, f.lastWnd)
		f.mu.Unlock()
		fmt.Fprintf(&b, "engine: maxSent %d tsFloor %d (set %v) firstByte %v ahead-watch %v\n",
			f.maxSent.Load(), f.tsFloor.Load(), f.haveFloor.Load(), f.firstByte.Load(), f.ahead.Load() != nil)
		if tr := f.tr.Load(); tr != nil {
			fmt.Fprintf(&b, "translator: %+v\n", *tr)
		}
	} else {
		b.WriteString("engine: no entry (a flow opened here, or not known)\n")
	}
	if st, ok := e.tr.Lookup(k); ok {
		fmt.Fprintf(&b, "tracker: phase %s epoch %d sent %d client-acked %d server-acked %d serverNext %d clientAck %d serverAck %d tsval server %d client %d updated %s ago\n",
			st.Phase, st.Epoch, st.ServerSentBytes, st.ClientAckedBytes, st.ServerAckedBytes, st.ServerNextSeq, st.ClientAck, st.ServerAck,
			st.ServerTsval, st.ClientTsval, time.Since(time.Unix(0, st.UpdatedUnixNano)).Round(time.Millisecond))
	} else {
		b.WriteString("tracker: not tracked\n")
	}
	ep := e.findEndpoint(k)
	if ep == nil {
		b.WriteString("endpoint: none\n")
		return b.String()
	}
	tep, ok := ep.(tcpip.Endpoint)
	if !ok {
		b.WriteString("endpoint: not a TCP endpoint\n")
		return b.String()
	}
	var info tcpip.TCPInfoOption
	if err := tep.GetSockOpt(&info); err == nil {
		fmt.Fprintf(&b, "endpoint: state %v rtt %s rto %s cwnd %d ssthresh %d cc %v reorder %v\n",
			tcp.EndpointState(info.State), info.RTT, info.RTO, info.SndCwnd, info.SndSsthresh, info.CcState, info.ReorderSeen)
	}
	if s, ok := tep.Stats().(*tcp.Stats); ok {
		fmt.Fprintf(&b, "endpoint: segments in %d out %d retransmits %d fast-retransmits %d timeouts %d send-failed %d checksum-errors %d zero-window %d\n",
			s.SegmentsReceived.Value(), s.SegmentsSent.Value(), s.SendErrors.Retransmits.Value(), s.SendErrors.FastRetransmit.Value(),
			s.SendErrors.Timeouts.Value(), s.SendErrors.SegmentSendToNetworkFailed.Value(), s.ReceiveErrors.ChecksumErrors.Value(),
			s.ReceiveErrors.ZeroRcvWindowState.Value())
	}
	return b.String()
}
