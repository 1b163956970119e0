package handoff

// The client-ahead rule (takeover_ahead.go): the watch's verdict on
// segment sequences, the corrected input offset, which restores are
// watched, the stack's ack dropping the watch, and the janitor's decision
// by service (reset for echo, continue for a checkpointed stream).

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	batonv1 "github.com/baton-anycast/baton/proto/baton/v1"
	"github.com/baton-anycast/baton/stack/services"
)

// aheadSeg is one client segment at an offset from rin, at a time from
// the first segment.
type aheadSeg struct {
	at    time.Duration
	off   int32 // seq - rin
	len   uint32
	flags header.TCPFlags
}

const (
	aA  = header.TCPFlagAck
	aAP = header.TCPFlagAck | header.TCPFlagPsh
)

func TestAheadWatchVerdict(t *testing.T) {
	const wait = time.Second // state age 0
	rto := func(at time.Duration) aheadSeg { return aheadSeg{at, 9000, 1460, aAP} }
	cases := []struct {
		name string
		segs []aheadSeg
		at   time.Duration // verdict time, from the first segment
		want bool
		minD uint32 // corrected input offset - restored one (when > 0)
	}{
		{"stale: new data then RTO retransmissions, at wait", []aheadSeg{
			{0, 9000, 1460, aAP}, {0, 10460, 1460, aAP}, rto(200 * time.Millisecond), rto(600 * time.Millisecond),
		}, wait, true, 9000},
		{"stale: retransmissions, before wait", []aheadSeg{
			{0, 9000, 1460, aAP}, rto(200 * time.Millisecond), rto(600 * time.Millisecond),
		}, wait - time.Millisecond, false, 9000},
		{"one repeat (tail loss probe) only, at wait", []aheadSeg{
			{0, 9000, 1460, aAP}, {0, 10460, 1460, aAP}, {10 * time.Millisecond, 10460, 1460, aAP},
		}, wait, false, 9000},
		{"one repeat, weak evidence after 3 waits", []aheadSeg{
			{0, 9000, 1460, aAP}, {0, 10460, 1460, aAP}, {10 * time.Millisecond, 10460, 1460, aAP},
		}, aheadWeakFactor * wait, true, 9000},
		{"reordered pair counts one repeat", []aheadSeg{
			{0, 10460, 1460, aAP}, {0, 9000, 1460, aAP},
		}, 2 * wait, false, 9000},
		{"pure acks beyond (client has unacked input), before 3 waits", []aheadSeg{
			{0, 500, 0, aA}, {10 * time.Millisecond, 500, 0, aA}, {20 * time.Millisecond, 500, 0, aA}, {30 * time.Millisecond, 500, 0, aA},
		}, aheadWeakFactor*wait - time.Millisecond, false, 499},
		{"pure acks beyond with no fill for 3 waits", []aheadSeg{
			{0, 500, 0, aA}, {10 * time.Millisecond, 500, 0, aA}, {20 * time.Millisecond, 500, 0, aA},
		}, aheadWeakFactor * wait, true, 499},
		{"pure acks one past rin: an acknowledged FIN, not input", []aheadSeg{
			{0, 1, 0, aA}, {10 * time.Millisecond, 1, 0, aA}, {20 * time.Millisecond, 1, 0, aA},
		}, aheadWeakFactor * wait, true, 0},
		{"FIN retransmitted beyond rin: the bytes before it are input", []aheadSeg{
			{0, 700, 1, aA | header.TCPFlagFin}, {300 * time.Millisecond, 700, 1, aA | header.TCPFlagFin}, {900 * time.Millisecond, 700, 1, aA | header.TCPFlagFin},
		}, wait, true, 700},
		{"client at rin: retransmissions there are never beyond", []aheadSeg{
			{0, 0, 1460, aAP}, {200 * time.Millisecond, 0, 1460, aAP}, {600 * time.Millisecond, 0, 1460, aAP}, {time.Second, 1460, 0, aA},
		}, 10 * wait, false, 0},
		{"client behind rin (lost the owner's last ack)", []aheadSeg{
			{0, -1460, 1460, aAP}, {200 * time.Millisecond, -1460, 1460, aAP}, {600 * time.Millisecond, -1460, 2920, aAP},
		}, 10 * wait, false, 0},
		{"data at rin then beyond: the beyond part is new, not repeated", []aheadSeg{
			{0, 0, 1460, aAP}, {0, 1460, 1460, aAP}, {0, 2920, 1460, aAP},
		}, 2 * wait, false, 1460},
		{"resets are ignored", []aheadSeg{
			{0, 9000, 0, header.TCPFlagRst}, {10 * time.Millisecond, 9000, 0, header.TCPFlagRst}, {20 * time.Millisecond, 9000, 0, header.TCPFlagRst},
		}, 10 * wait, false, 0},
	}
	for _, rin := range []uint32{1000, 0xffffff00} { // and across the wrap
		for _, tc := range cases {
			t.Run(fmt.Sprintf("rin=%#x/%s", rin, tc.name), func(t *testing.T) {
				now := time.Now()
				s := &batonv1.FlowState{UpdatedUnixNano: now.UnixNano(), ServerAckedBytes: 3000}
				w := newAheadWatch(s, services.Resume{InputOffset: 3000, OutputOffset: 3000}, rin, now)
				if w.wait != int64(wait) {
					t.Fatalf("wait %v, want %v", time.Duration(w.wait), wait)
				}
				t0 := now.UnixNano()
				for i, sg := range tc.segs {
					w.note(rin+uint32(sg.off), 77+uint32(i), sg.flags, sg.len, t0+int64(sg.at))
				}
				if got := w.verdict(t0 + int64(tc.at)); got != tc.want {
					t.Fatalf("verdict %v, want %v (beyond %d, repeats %d)", got, tc.want, w.beyond.Load(), w.repeats.Load())
				}
				if tc.want {
					if got := w.corrected().InputOffset; got != 3000+uint64(tc.minD) {
						t.Fatalf("corrected input offset %d, want %d", got, 3000+tc.minD)
					}
				}
			})
		}
	}
}

func TestAheadWatchWaitGrowsWithStateAge(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		age, want time.Duration
	}{
		{0, aheadWait},
		{-time.Second, aheadWait}, // clock skew between nodes
		{500 * time.Millisecond, aheadWait + time.Second},
		{time.Hour, aheadWait + 2*aheadMaxAge},
	} {
		s := &batonv1.FlowState{UpdatedUnixNano: now.Add(-tc.age).UnixNano()}
		if w := newAheadWatch(s, services.Resume{}, 1, now); w.wait != int64(tc.want) {
			t.Errorf("age %v: wait %v, want %v", tc.age, time.Duration(w.wait), tc.want)
		}
	}
}

func TestNeedsAhead(t *testing.T) {
	hist := func(hows ...string) *batonv1.FlowState {
		s := &batonv1.FlowState{}
		for _, h := range hows {
			s.History = append(s.History, &batonv1.OwnershipChange{How: h})
		}
		return s
	}
	for _, tc := range []struct {
		s    *batonv1.FlowState
		live bool
		want bool
	}{
		{hist("open"), false, true},
		{hist("open", HowPullMigrate), false, true},
		{hist("open"), true, false},
		{hist("open", HowPullMigrate, HowPullMigrate), true, false},
		{hist("open", HowPush), true, true},
		{hist("open", HowPullRestore, HowPullMigrate), true, true},
	} {
		if got := needsAhead(tc.s, tc.live); got != tc.want {
			t.Errorf("history %v live %v: %v, want %v", tc.s.History, tc.live, got, tc.want)
		}
	}
}

func TestAheadOutboundDropsWatch(t *testing.T) {
	const rin = 5000
	for _, tc := range []struct {
		ack   uint32
		flags header.TCPFlags
		keep  bool
	}{
		{rin, aA, true},      // the stack still waits at rin
		{rin - 10, aA, true}, // (never: below what it acked)
		{rin + 1, 0, true},   // no ACK flag: the ack field means nothing
		{rin + 1, aA, false}, // the client sent byte rin again
		{rin + 3000, aA, false},
	} {
		f := &flowEntry{}
		w := newAheadWatch(&batonv1.FlowState{}, services.Resume{}, rin, time.Now())
		f.ahead.Store(w)
		aheadOutbound(f, &tcpSegment{ack: tc.ack, flags: tc.flags})
		if got := f.ahead.Load() != nil; got != tc.keep {
			t.Errorf("stack ack %d flags %v: watch kept %v, want %v", tc.ack, tc.flags, got, tc.keep)
		}
	}
}

// TestCheckAheadByService: a flow found ahead is reset when its service
// cannot continue at the client's input position (echo), counted as
// client_ahead, and left alone when it can (a stream whose request is
// checkpointed).
func TestCheckAheadByService(t *testing.T) {
	req := services.StreamRequest(1<<20, 3)
	for _, tc := range []struct {
		name    string
		svc     func() services.TCPService
		r       services.Resume
		reset   bool
		verdict bool
		finOnly bool // pure acks one past rin instead of retransmissions
	}{
		{"echo ahead: reset", echoService, services.Resume{InputOffset: 3000, OutputOffset: 3000}, true, true, false},
		{"stream ahead, checkpointed: continues", nil,
			services.Resume{InputOffset: uint64(len(req)), OutputOffset: 4000, Checkpoint: []byte(req)}, false, true, false},
		{"stream ahead, request not checkpointed: reset", nil, services.Resume{}, true, true, false},
		{"echo, not enough evidence yet: nothing", echoService, services.Resume{InputOffset: 3000, OutputOffset: 3000}, false, false, false},
		{"echo, only an acknowledged FIN ahead: continues", echoService, services.Resume{InputOffset: 3000, OutputOffset: 3000}, false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTkLab(t, tkConfig{nodes: 1, service: tc.svc})
			e := l.nodes[0].e
			k := FlowKey{Client: netip.MustParseAddrPort("198.51.100.2:40000"), Anycast: tkDst4}
			f, _ := e.entry(k, esActive)
			now := time.Now()
			s := &batonv1.FlowState{Key: k.Proto(), UpdatedUnixNano: now.UnixNano(), ClientIsn: 100,
				ServerAckedBytes: tc.r.InputOffset, ClientAckedBytes: tc.r.OutputOffset}
			rin := uint32(101 + tc.r.InputOffset)
			w := newAheadWatch(s, tc.r, rin, now)
			f.ahead.Store(w)
			t0 := now.Add(-2 * aheadWait).UnixNano()
			switch {
			case tc.finOnly:
				for range 3 {
					w.note(rin+1, 4343, aA, 0, t0-int64(aheadWeakFactor*aheadWait))
				}
			default:
				w.note(rin+9000, 4242, aAP, 1460, t0)
				w.note(rin+9000, 4242, aAP, 1460, t0)
				if tc.verdict {
					w.note(rin+9000, 4343, aAP, 1460, t0)
				}
			}
			e.checkAhead(f, now)
			ahead := e.Stats().Failures[reasonClientAhead]
			if tc.reset {
				if f.get() != esReset || ahead != 1 || e.Stats().RSTs[reasonClientAhead] != 1 {
					t.Fatalf("state %v, client_ahead failures %d, resets %d: want a counted reset", f.get(), ahead, e.Stats().RSTs[reasonClientAhead])
				}
				f.mu.Lock()
				lastAck := f.lastAck
				f.mu.Unlock()
				if lastAck != 4343 {
					t.Fatalf("reset placed at ack %d, want the client's latest 4343", lastAck)
				}
				return
			}
			if f.get() != esActive || ahead != 0 {
				t.Fatalf("state %v, client_ahead failures %d: want the flow left active", f.get(), ahead)
			}
			// The watch stays (a later episode is judged again), its
			// evidence forgotten after a verdict.
			w2 := f.ahead.Load()
			if w2 != w || (w.first.Load() == 0) != tc.verdict {
				t.Fatalf("watch %p (was %p), first %d after a verdict %v", w2, w, w.first.Load(), tc.verdict)
			}
		})
	}
}
