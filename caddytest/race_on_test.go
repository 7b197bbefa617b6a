//go:build race

package caddytest

// raceBuild: the test binary has the race detector, so the Caddy processes
// are built with it too. That reuses the packages `go test -race` compiled
// (a cold CI run builds Caddy once, not twice) and checks them for races.
const raceBuild = true
