// norace_test.go: see race_test.go.

//go:build !race

package tun

const raceEnabled = false
