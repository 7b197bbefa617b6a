// Package storagetest runs the kayle_webhook gateway's dedupe on real storage
// servers: two Caddy processes built from ./caddy share one storage (a
// file_system folder, or a storage module on the server it talks to), and
// every row of the matrix runs the same scenarios against them (matrix_test.go).
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
	"bytes"
	"crypto/rsa"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// The demo material, published with the plugin's source.
const (
	demoKeyRel    = "../testdata/demo/demo-key.pem"
	demoSecretRel = "../testdata/demo/demo-secret.txt"
	demoKID       = "demo"
)

var (
	demo struct {
		keyPath    string // absolute
		secretPath string // absolute
		secret     []byte // as Caddy's {file.…} reads it: one trailing newline dropped
		pub        *rsa.PublicKey
	}
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
	if err := loadDemo(); err != nil {
		fmt.Fprintln(os.Stderr, "loading the demo material:", err)
		return 1
	}
	return m.Run()
}

func loadDemo() error {
	var err error
	if demo.keyPath, err = filepath.Abs(demoKeyRel); err != nil {
		return err
	}
	if demo.secretPath, err = filepath.Abs(demoSecretRel); err != nil {
		return err
	}
	raw, err := os.ReadFile(demo.secretPath)
	if err != nil {
		return err
	}
	demo.secret = bytes.TrimSuffix(bytes.TrimSuffix(raw, []byte("\n")), []byte("\r"))
	demo.pub, _, err = kayle.LoadPublicKeyFile(demo.keyPath)
	return err
}

var (
	buildOnce   sync.Once
	caddyBinary string
	buildErr    error
)

// buildCaddy builds ./caddy once per test binary, with the race detector
// when the tests have it: a `go test -race` run after the plugin's own (as
// in CI) then finds Caddy's packages compiled already.
func buildCaddy(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		start := time.Now()
		bin := filepath.Join(scratch, "caddy")
		args := []string{"build", "-o", bin}
		if raceBuild {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, "./caddy")...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./caddy: %v\n%s", err, out)
			return
		}
		caddyBinary = bin
		t.Logf("built ./caddy (race detector: %v) in %s", raceBuild, time.Since(start).Round(time.Millisecond))
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return caddyBinary
}
