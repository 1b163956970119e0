package handoff

// This file is the takeover's phase trace: an optional callback the engine
// calls at each step of a takeover (a handful of calls per takeover, never
// per packet), for the in-process latency benchmark. The claimer's own
// phases are also kept in the flow's entry, and a takeover slower than
// slowTakeover to its first byte is logged with them (Info), so that a
// loaded cluster shows where its takeovers spend their time.

import (
	"fmt"
	"strings"
	"time"
)

// slowTakeover: a takeover whose first data byte comes later than this is
// logged with its phases.
const slowTakeover = 10 * time.Millisecond

// TracePhase is a step of a takeover.
type TracePhase uint8

const (
	PhaseIntercepted   TracePhase = iota // first misrouted packet queued (the latency's start)
	PhaseDecide                          // the decision goroutine runs
	PhaseLocated                         // the flow's state and owner found
	PhaseRetry                           // a decision round failed (detail: why); the next one follows
	PhaseClaimSent                       // Claim RPC about to be sent (detail: to whom)
	PhaseClaimReceived                   // owner side: the Claim reached its handler (traced by the owner)
	PhaseHandedOver                      // owner side: fenced, snapshot, aborted (traced by the owner)
	PhaseClaimDone                       // Claim response received (detail: granted or the refusal)
	PhaseSynInjected                     // synthetic SYN injected
	PhaseSynAck                          // the stack's SYN-ACK captured
	PhaseAckInjected                     // completing ACK (and queued packets) injected
	PhaseAccepted                        // the accept loop took the restored connection
	PhaseFirstByte                       // first data byte out of the new owner
	tracePhases
)

var tracePhaseNames = [tracePhases]string{"intercepted", "decide", "located", "retry", "claim_sent",
	"claim_received", "handed_over", "claim_done", "syn_injected", "syn_ack", "ack_injected", "accepted", "first_byte"}

func (p TracePhase) String() string {
	if p < tracePhases {
		return tracePhaseNames[p]
	}
	return "phase?"
}

// Tracer receives the phases of every takeover this engine runs (or, for
// PhaseHandedOver, answers). It is called on the takeover's goroutines
// and on the packet path: it must be fast and must not block.
type Tracer func(k FlowKey, p TracePhase, at time.Time, detail string)

// SetTracer installs t (nil: none).
func (e *Engine) SetTracer(t Tracer) {
	if t == nil {
		e.tracer.Store(nil)
		return
	}
	e.tracer.Store(&t)
}

// trace reports phase p of k's takeover now.
func (e *Engine) trace(k FlowKey, p TracePhase, detail string) {
	e.traceAt(k, p, time.Now(), detail)
}

// traceAt reports phase p of k's takeover at a given time.
func (e *Engine) traceAt(k FlowKey, p TracePhase, at time.Time, detail string) {
	if t := e.tracer.Load(); t != nil {
		(*t)(k, p, at, detail)
	}
	switch p {
	case PhaseIntercepted, PhaseClaimReceived, PhaseHandedOver, PhaseFirstByte:
		return // the start, the owner's side, the end (traceFirstByte)
	}
	if f := e.lookup(k); f != nil {
		f.notePhase(p, at)
	}
}

// notePhase records the first time f's takeover reached p (PhaseRetry:
// counts the retries).
func (f *flowEntry) notePhase(p TracePhase, at time.Time) {
	if p == PhaseRetry {
		f.retries.Add(1)
		return
	}
	f.phaseAt[p].CompareAndSwap(0, at.UnixNano())
}

// resetPhases forgets the phases of f's previous takeover.
func (f *flowEntry) resetPhases() {
	for i := range f.phaseAt {
		f.phaseAt[i].Store(0)
	}
	f.retries.Store(0)
}

// traceFirstByte ends f's takeover: the tracer hears of it, and a slow one
// is logged with its phases.
func (e *Engine) traceFirstByte(f *flowEntry, lat time.Duration) {
	e.trace(f.key, PhaseFirstByte, f.how)
	if lat < slowTakeover {
		return
	}
	var sb strings.Builder
	start := time.Now().Add(-lat).UnixNano()
	for p := PhaseDecide; p < PhaseFirstByte; p++ {
		if at := f.phaseAt[p].Load(); at != 0 {
			fmt.Fprintf(&sb, "%s=%.2fms ", p, float64(at-start)/1e6)
		}
	}
	e.log.Info("takeover: slow", "flow", f.key.String(), "how", f.how, "latency_ms", float64(lat.Microseconds())/1000,
		"retries", f.retries.Load(), "phases", strings.TrimSpace(sb.String()))
}
