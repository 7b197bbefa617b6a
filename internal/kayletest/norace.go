//go:build !race

package kayletest

// Race: see race.go.
const Race = false
