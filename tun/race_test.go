// race_test.go: tells allocation tests that the race detector is on
// (sync.Pool deliberately drops items under -race, so pooled paths allocate).

//go:build race

package tun

const raceEnabled = true
