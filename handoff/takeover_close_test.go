package handoff

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// Close waits for every goroutine the engine started, including those
// started while it was closing (hooks and RPC handlers start takeovers and
// forwarders at any time): none runs after Close returned, and none starts
// after it.
func TestEngineCloseWaitsForSpawned(t *testing.T) {
	l := newTkLab(t, tkConfig{nodes: 2})
	e := l.nodes[0].e
	var closed atomic.Bool
	var after, ran atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				e.spawn(func() {
					ran.Add(1)
					if closed.Load() {
						after.Add(1)
					}
				})
				runtime.Gosched()
			}
		}()
	}
	eventually(t, "spawned goroutines to run", func() bool { return ran.Load() > 100 })
	e.Close()
	closed.Store(true)
	close(stop)
	wg.Wait()
	if n := after.Load(); n != 0 {
		t.Fatalf("%d goroutines ran after Close returned", n)
	}
	if e.spawn(func() {}) {
		t.Fatal("spawn started a goroutine after Close")
	}
}
