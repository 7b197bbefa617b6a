package kayletest

import (
	"bytes"
	"crypto/rsa"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// Demo is the demo material as a gateway process reads it.
type Demo struct {
	KeyPath    string // absolute
	SecretPath string // absolute
	Secret     []byte // as Caddy's {file.…} reads it: one trailing newline dropped
	Pub        *rsa.PublicKey
}

// LoadDemo reads the demo material.
func LoadDemo() (Demo, error) {
	d := Demo{KeyPath: DemoKeyFile, SecretPath: DemoSecretFile}
	raw, err := os.ReadFile(d.SecretPath)
	if err != nil {
		return d, err
	}
	d.Secret = bytes.TrimSuffix(bytes.TrimSuffix(raw, []byte("\n")), []byte("\r"))
	key, err := LoadDemoKey()
	if err != nil {
		return d, err
	}
	d.Pub = &key.PublicKey
	return d, nil
}

// CaddyBuild builds a Caddy main package once per test binary, with the race
// detector when the tests have it: a `go test -race` run after the plugin's
// own (as in CI) then finds Caddy's packages compiled already.
type CaddyBuild struct {
	once sync.Once
	bin  string
	err  error
}

// Binary builds pkg (a path relative to moduleDir, e.g. ./cmd/caddy) into
// out, the first time, and returns out.
func (b *CaddyBuild) Binary(t testing.TB, moduleDir, pkg, out string) string {
	t.Helper()
	b.once.Do(func() {
		start := time.Now()
		args := []string{"build", "-o", out}
		if Race {
			args = append(args, "-race")
		}
		cmd := exec.Command("go", append(args, pkg)...)
		cmd.Dir = moduleDir
		if output, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", pkg, err, output)
			return
		}
		b.bin = out
		t.Logf("built %s (race detector: %v) in %s", pkg, Race, time.Since(start).Round(time.Millisecond))
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.bin
}

// SyncBuffer collects a process's output; exec writes it from a goroutine.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Process is a Caddy run from a built binary, in a folder of its own.
type Process struct {
	Name    string
	Cmd     *exec.Cmd
	Out     *SyncBuffer
	Exited  chan struct{}
	WaitErr error // set before Exited is closed
}

// StartCaddy runs `bin run --config config` in dir, with Caddy's data and
// config folders below dir, never the user's; env is added to this
// process's. The process is killed when the test ends, and its output logged
// if the test failed.
func StartCaddy(t testing.TB, bin, name, dir, config string, env ...string) *Process {
	t.Helper()
	cmd := exec.Command(bin, "run", "--config", config, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(),
		"XDG_DATA_HOME="+filepath.Join(dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
	), env...)
	p := &Process{Name: name, Cmd: cmd, Out: new(SyncBuffer), Exited: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.Out, p.Out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.WaitErr = cmd.Wait()
		close(p.Exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-p.Exited
		if t.Failed() {
			t.Logf("----- output of Caddy %s (%v) -----\n%s", p.Name, p.WaitErr, p.Out.String())
		}
	})
	return p
}

// WaitReady polls until url (a kayle_webhook route) answers 405 to a GET,
// for at most a minute.
func (p *Process) WaitReady(t testing.TB, url string) {
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(time.Minute)
	for {
		select {
		case <-p.Exited:
			t.Fatalf("Caddy %s exited before it was ready: %v\n%s", p.Name, p.WaitErr, p.Out.String())
		default:
		}
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusMethodNotAllowed {
				return
			}
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
		if time.Now().After(deadline) {
			t.Fatalf("Caddy %s not ready after a minute (last: %v)", p.Name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
