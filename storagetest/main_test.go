// Package storagetest runs the kayle_webhook gateway's dedupe and queue on
// real storage servers: two Caddy processes built from ./caddy share one
// storage (a file_system folder, or a storage module on the server it talks
// to), and every row of the matrix runs the same scenarios against them
// (matrix_test.go, queue_test.go).
//
// The servers are the Debian binaries, started by the tests on free loopback
// ports in temporary folders, so that a test can stop, restart and freeze
// (SIGSTOP) them. A missing binary fails the test: .ci/storage-servers
// installs them.
//
// It is a module of its own so that the plugin's go.mod takes on none of the
// storage modules' dependencies.
package storagetest

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
)

// The demo material, published with the plugin's source.
const (
	demoKID = kayletest.DemoKID
)

var (
	demo kayletest.Demo
	// scratch is removed when the test binary ends (the caddy binary lives there).
	scratch string
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	var err error
	if scratch, err = os.MkdirTemp("", "kayle-storagetest-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(scratch)
	if demo, err = kayletest.LoadDemo(); err != nil {
		fmt.Fprintln(os.Stderr, "loading the demo material:", err)
		return 1
	}
	return m.Run()
}

// caddyBuild builds ./caddy once per test binary (kayletest.CaddyBuild).
var caddyBuild kayletest.CaddyBuild

func buildCaddy(t *testing.T) string {
	return caddyBuild.Binary(t, ".", "./caddy", filepath.Join(scratch, "caddy"))
}
