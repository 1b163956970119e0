package handoff

import (
	"sync"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// trkCheckHandshakeBound checks the handshake bound's bookkeeping: the list
// holds exactly the table's flows in the handshake, each once and holding
// its own node, and their number is within MaxHandshaking and matches
// HandshakeStats. No other goroutine may use the tracker meanwhile.
func trkCheckHandshakeBound(tb testing.TB, tr *Tracker) {
	tb.Helper()
	tr.hsMu.Lock()
	var nodes []*trkHSNode
	var prev *trkHSNode
	for n := tr.hsHead; n != nil; n = n.next {
		if n.prev != prev {
			tr.hsMu.Unlock()
			tb.Fatalf("handshake list: node %d has a wrong prev link", len(nodes))
		}
		nodes, prev = append(nodes, n), n
	}
	if tr.hsTail != prev {
		tr.hsMu.Unlock()
		tb.Fatal("handshake list: wrong tail")
	}
	tr.hsMu.Unlock()
	listed := map[*trkFlow]bool{}
	for _, n := range nodes {
		sh := tr.shardFor(&n.hk)
		sh.mu.Lock()
		f := sh.flows[n.hk]
		ok := f == n.f && f.hs == n && f.st.phase == trkPhHandshake && !listed[f]
		sh.mu.Unlock()
		if !ok {
			tb.Fatalf("handshake list: node of %v is not its table entry's, or not in the handshake", n.f.st.key)
		}
		listed[f] = true
	}
	inHandshake := 0
	for i := range tr.shards {
		sh := &tr.shards[i]
		sh.mu.Lock()
		for _, f := range sh.flows {
			if f.st.phase == trkPhHandshake {
				inHandshake++
				if !listed[f] {
					sh.mu.Unlock()
					tb.Fatalf("%v is in the handshake but not in the list", f.st.key)
				}
			} else if f.hs != nil {
				sh.mu.Unlock()
				tb.Fatalf("%v in phase %v holds a handshake slot", f.st.key, f.st.phase)
			}
		}
		sh.mu.Unlock()
	}
	hs := tr.HandshakeStats()
	if inHandshake != len(nodes) || hs.Handshaking != len(nodes) {
		tb.Fatalf("%d flows in the handshake, %d listed, HandshakeStats says %d", inHandshake, len(nodes), hs.Handshaking)
	}
	if hs.Handshaking > hs.Max || hs.Max != tr.cfg.MaxHandshaking || hs.Max > tr.cfg.MaxFlows {
		tb.Fatalf("%d flows in the handshake, bound %d (config %d, MaxFlows %d)", hs.Handshaking, hs.Max, tr.cfg.MaxHandshaking, tr.cfg.MaxFlows)
	}
}

func TestTrackerHandshakeBound(t *testing.T) {
	flood := func(tr *Tracker, first, n int) {
		for i := range n {
			trkConn4(t, tr, uint16(first+i), uint32(i)*7919, 0).syn(trkNoOpts)
		}
	}
	cases := []struct {
		name          string
		maxFlows, max int // max 0: the default
		run           func(t *testing.T, tr *Tracker, clk *trkClock)
		// What must hold after run.
		tracked, handshaking int
		evicted, untrackedHS uint64
		untracked            uint64
	}{
		{
			name: "default is a quarter of MaxFlows", maxFlows: 40,
			run:     func(t *testing.T, tr *Tracker, _ *trkClock) { flood(tr, 50000, 30) },
			tracked: 10, handshaking: 10, evicted: 20,
		},
		{
			name: "flood keeps room for established flows", maxFlows: 8, max: 2,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				var est []*trkConn
				for i := range 3 {
					c := trkConn4(t, tr, uint16(40000+i), 1, 2)
					c.handshake(trkNoOpts, trkNoOpts)
					est = append(est, c)
				}
				flood(tr, 50000, 100)
				// A real connection during the flood: tracked.
				real := trkConn4(t, tr, 41000, 7, 8)
				real.handshake(trkNoOpts, trkNoOpts)
				flood(tr, 51000, 100)
				for _, c := range append(est, real) {
					if _, ok := tr.Lookup(c.key()); !ok {
						t.Errorf("established flow %v not tracked after the flood", c.key())
					}
				}
			},
			tracked: 6, handshaking: 2, evicted: 198,
		},
		{
			name: "the oldest is evicted", maxFlows: 8, max: 2,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				a, b, c := trkConn4(t, tr, 40001, 1, 2), trkConn4(t, tr, 40002, 1, 2), trkConn4(t, tr, 40003, 1, 2)
				a.syn(trkNoOpts)
				b.syn(trkNoOpts)
				c.syn(trkNoOpts)
				if tr.Has(a.key()) || !tr.Has(b.key()) || !tr.Has(c.key()) {
					t.Error("not the oldest handshake was evicted")
				}
				// The evicted client completes its handshake: served,
				// untracked; the others complete theirs.
				a.synAck(trkNoOpts)
				a.ack()
				b.synAck(trkNoOpts)
				b.ack()
				c.synAck(trkNoOpts)
				c.ack()
				if tr.Has(a.key()) || tr.Stats().Opened != 2 {
					t.Errorf("evicted flow tracked after its handshake; opened %d", tr.Stats().Opened)
				}
			},
			tracked: 2, handshaking: 0, evicted: 1,
		},
		{
			name: "completed handshake frees its slot", maxFlows: 8, max: 1,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				for i := range 5 {
					trkConn4(t, tr, uint16(40000+i), 1, 2).handshake(trkNoOpts, trkNoOpts)
				}
			},
			tracked: 5,
		},
		{
			name: "timeout frees its slot", maxFlows: 8, max: 1,
			run: func(t *testing.T, tr *Tracker, clk *trkClock) {
				trkConn4(t, tr, 40000, 1, 2).syn(trkNoOpts)
				clk.Advance(DefaultHandshakeTimeout)
				if tr.Sweep() != 1 {
					t.Error("handshake not swept")
				}
				trkConn4(t, tr, 40001, 1, 2).syn(trkNoOpts)
			},
			tracked: 1, handshaking: 1,
		},
		{
			name: "RST frees its slot", maxFlows: 8, max: 1,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				c := trkConn4(t, tr, 40000, 1, 2)
				c.syn(trkNoOpts)
				c.synAck(trkNoOpts)
				c.in(trkSeg{seq: c.cISN + 1, flags: header.TCPFlagRst})
				trkConn4(t, tr, 40001, 1, 2).syn(trkNoOpts)
			},
			tracked: 1, handshaking: 1,
		},
		{
			name: "Remove frees its slot", maxFlows: 8, max: 1,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				c := trkConn4(t, tr, 40000, 1, 2)
				c.syn(trkNoOpts)
				if !tr.Remove(c.key()) {
					t.Error("Remove: not tracked")
				}
				trkConn4(t, tr, 40001, 1, 2).syn(trkNoOpts)
			},
			tracked: 1, handshaking: 1,
		},
		{
			name: "Restore over a handshake frees its slot", maxFlows: 8, max: 1,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				other, _ := newTrkTracker(TrackerConfig{Node: "n2"})
				o := trkConn4(t, other, 40000, 1, 2)
				o.handshake(trkNoOpts, trkNoOpts)
				trkConn4(t, tr, 40000, 1, 2).syn(trkNoOpts)
				if err := tr.Restore(o.state(), HowPullRestore, 0); err != nil {
					t.Fatal(err)
				}
				trkConn4(t, tr, 40001, 1, 2).syn(trkNoOpts)
			},
			tracked: 2, handshaking: 1,
		},
		{
			name: "retransmitted and restarted SYNs keep their slot", maxFlows: 8, max: 1,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				c := trkConn4(t, tr, 40000, 1, 2)
				c.syn(trkNoOpts)
				c.syn(trkNoOpts) // retransmission
				c.cISN = 99
				c.syn(trkNoOpts) // restart before the SYN-ACK
				c.handshake(trkNoOpts, trkNoOpts)
			},
			tracked: 1,
		},
		{
			name: "replacing connection without a slot is untracked", maxFlows: 8, max: 1,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				a := trkConn4(t, tr, 40000, 1, 2)
				a.handshake(trkNoOpts, trkNoOpts)
				trkConn4(t, tr, 40001, 1, 2).syn(trkNoOpts) // holds the slot
				a2 := trkConn4(t, tr, 40000, 5000, 6000)
				a2.syn(trkNoOpts) // a new connection on a's 4-tuple: no eviction
				a2.synAck(trkNoOpts)
				if tr.Has(a.key()) || tr.Stats().Closed.Replaced != 1 {
					t.Errorf("replaced flow: tracked %v, stats %+v", tr.Has(a.key()), tr.Stats())
				}
			},
			tracked: 1, handshaking: 1, untrackedHS: 1,
		},
		{
			name: "full table of established flows refuses, evicts nothing", maxFlows: 2, max: 1,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				trkConn4(t, tr, 40000, 1, 2).handshake(trkNoOpts, trkNoOpts)
				trkConn4(t, tr, 40001, 1, 2).handshake(trkNoOpts, trkNoOpts)
				flood(tr, 50000, 3)
			},
			tracked: 2, untracked: 3,
		},
		{
			name: "eviction frees a table slot too", maxFlows: 2, max: 1,
			run: func(t *testing.T, tr *Tracker, _ *trkClock) {
				trkConn4(t, tr, 40000, 1, 2).handshake(trkNoOpts, trkNoOpts)
				flood(tr, 50000, 5)
			},
			tracked: 2, handshaking: 1, evicted: 4,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr, clk := newTrkTracker(TrackerConfig{MaxFlows: tc.maxFlows, MaxHandshaking: tc.max})
			tc.run(t, tr, clk)
			trkCheckInvariants(t, tr)
			trkCheckHandshakeBound(t, tr)
			hs, st := tr.HandshakeStats(), tr.Stats()
			if st.Tracked != tc.tracked || hs.Handshaking != tc.handshaking || hs.Evicted != tc.evicted ||
				hs.Untracked != tc.untrackedHS || st.Untracked != tc.untracked {
				t.Fatalf("tracked %d, handshaking %d, evicted %d, untracked %d (handshake) %d (table); want %d, %d, %d, %d, %d",
					st.Tracked, hs.Handshaking, hs.Evicted, hs.Untracked, st.Untracked,
					tc.tracked, tc.handshaking, tc.evicted, tc.untrackedHS, tc.untracked)
			}
			if st.Closed.Idle < hs.Evicted {
				t.Fatalf("closed idle %d, evicted %d: evictions are counted as idle", st.Closed.Idle, hs.Evicted)
			}
			if st.Created+st.Restored != st.Closed.Total()+uint64(st.Tracked) {
				t.Fatalf("created %d + restored %d != closed %d + tracked %d", st.Created, st.Restored, st.Closed.Total(), st.Tracked)
			}
		})
	}
}

func TestDefaultMaxHandshaking(t *testing.T) {
	for _, tc := range []struct{ maxFlows, want int }{
		{0, DefaultMaxFlows / 4}, {1, 1}, {3, 1}, {4, 1}, {1000, 250}, {DefaultMaxFlows, 16384},
	} {
		if got := DefaultMaxHandshaking(tc.maxFlows); got != tc.want {
			t.Errorf("DefaultMaxHandshaking(%d) = %d, want %d", tc.maxFlows, got, tc.want)
		}
	}
	// A bound above MaxFlows is capped.
	tr, _ := newTrkTracker(TrackerConfig{MaxFlows: 3, MaxHandshaking: 10})
	if hs := tr.HandshakeStats(); hs.Max != 3 {
		t.Fatalf("MaxHandshaking 10 with MaxFlows 3: bound %d", hs.Max)
	}
}

// TestTrackerHandshakeBoundConcurrent floods from several goroutines while
// others complete handshakes (run it with -race): the bound holds at every
// moment and the bookkeeping is consistent at the end.
func TestTrackerHandshakeBoundConcurrent(t *testing.T) {
	const maxHS, workers, perWorker = 16, 4, 400
	tr, _ := newTrkTracker(TrackerConfig{MaxFlows: 256, MaxHandshaking: maxHS})
	stop := make(chan struct{})
	var peak sync.WaitGroup
	peak.Add(1)
	over := 0
	go func() {
		defer peak.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if n := tr.HandshakeStats().Handshaking; n > maxHS {
				over = n
			}
		}
	}()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(2)
		go func() { // flood
			defer wg.Done()
			for i := range perWorker {
				trkConn4(t, tr, uint16(20000+w*perWorker+i), uint32(i), 0).syn(trkNoOpts)
			}
		}()
		go func() { // real connections, opened and closed
			defer wg.Done()
			for i := range perWorker / 4 {
				c := trkConn4(t, tr, uint16(40000+w*perWorker+i), 1, 2)
				c.handshake(trkNoOpts, trkNoOpts)
				c.out(trkSeg{seq: c.sNext, flags: header.TCPFlagRst})
			}
		}()
	}
	wg.Wait()
	close(stop)
	peak.Wait()
	if over != 0 {
		t.Fatalf("%d flows in the handshake, bound %d", over, maxHS)
	}
	trkCheckInvariants(t, tr)
	trkCheckHandshakeBound(t, tr)
	st, hs := tr.Stats(), tr.HandshakeStats()
	if st.Created != st.Closed.Total()+uint64(st.Tracked) {
		t.Fatalf("created %d, closed %d, tracked %d", st.Created, st.Closed.Total(), st.Tracked)
	}
	t.Logf("opened %d of %d real connections; evicted %d, untracked (handshake) %d", st.Opened, workers*perWorker/4, hs.Evicted, hs.Untracked)
}
