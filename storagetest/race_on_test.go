//go:build race

package storagetest

// raceBuild: the test binary has the race detector, so Caddy is built with
// it too (see buildCaddy).
const raceBuild = true
