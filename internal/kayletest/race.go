//go:build race

package kayletest

// Race: this binary has the race detector, so the Caddy processes the tests
// start are built with it too (CaddyBuild).
const Race = true
