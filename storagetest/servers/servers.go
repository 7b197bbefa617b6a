// Package servers starts the storage servers the storage tests run against:
// the Debian binaries of PostgreSQL 15 and nats-server, each in a process
// group of its own on a free loopback port and in a temporary folder, so
// that a test can stop, restart, freeze (SIGSTOP) and thaw (SIGCONT) it.
// Every server is killed, and its folder removed, when its test ends.
//
// A missing binary fails the test, naming .ci/storage-servers, which
// installs them: a storage row that cannot run is a failure, never a skip.
package servers

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
)

const (
	// StartLimit bounds a server's start (or restart) until it answers.
	StartLimit = 30 * time.Second
	// stopLimit bounds a graceful stop before the server is killed.
	stopLimit = 15 * time.Second
	// startAttempts: a free port can be taken by another test between
	// being found and being bound; a first start retries on a new one.
	startAttempts = 3
)

// Find returns the path of a server binary: name in PATH, or the first of
// paths that exists. It fails the test, naming the install script, if
// there is none.
func Find(t testing.TB, name string, paths ...string) string {
	t.Helper()
	for _, p := range paths {
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p
		}
	}
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	t.Fatalf("%s is not installed (looked in %v and PATH): run .ci/storage-servers as root, which installs the storage servers these tests run", name, paths)
	return ""
}

// FreePort asks the kernel for a free loopback TCP port and releases it.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Proc is a server in a process group of its own.
type Proc struct {
	// Name is what the test logs call it.
	Name string

	argv  []string
	dir   string
	cred  *syscall.Credential // run as this user (nil: the test's)
	ready func(ctx context.Context) error
	// stopSignal is what its service manager stops it with.
	stopSignal syscall.Signal
	// quitSignal ends it at the end of the test, quickly but letting it
	// clean up (PostgreSQL's shared memory); 0: SIGKILL at once.
	quitSignal syscall.Signal
	out        kayletest.SyncBuffer

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error // set before exited is closed
	paused  bool
}

// errExited reports a server that ended while it was starting.
var errExited = errors.New("exited while starting")

// launch starts the process and waits until ready succeeds, the process
// exits (errExited), or StartLimit passes.
func (p *Proc) launch() error {
	cmd := exec.Command(p.argv[0], p.argv[1:]...)
	cmd.Dir = p.dir
	cmd.Stdout, cmd.Stderr = &p.out, &p.out
	// A group of its own: signals must reach every process of a server
	// that has several (PostgreSQL's backends).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: p.cred}
	fmt.Fprintf(&p.out, "----- %s: starting %s\n", time.Now().Format(time.TimeOnly), strings.Join(p.argv, " "))
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	p.mu.Lock()
	p.cmd, p.exited, p.paused = cmd, exited, false
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.waitErr = err
		p.mu.Unlock()
		close(exited)
	}()

	ctx, cancel := context.WithTimeout(context.Background(), StartLimit)
	defer cancel()
	for {
		err := p.ready(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			p.mu.Lock()
			defer p.mu.Unlock()
			return fmt.Errorf("%w (%v)", errExited, p.waitErr)
		case <-ctx.Done():
			p.kill()
			return fmt.Errorf("not ready after %s: %v", StartLimit, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Start starts the server again after Stop, on the same port with the same
// data, and waits until it answers.
func (p *Proc) Start(t testing.TB) {
	t.Helper()
	if err := p.launch(); err != nil {
		t.Fatalf("starting %s: %v\n%s", p.Name, err, p.out.String())
	}
}

// Stop ends the server as its service manager does (PostgreSQL: fast
// shutdown; nats-server: SIGINT), killing it if it has not exited within
// 15 s. A frozen server is thawed first, or it could not act on the signal.
func (p *Proc) Stop(t testing.TB) {
	t.Helper()
	p.mu.Lock()
	cmd, exited, paused := p.cmd, p.exited, p.paused
	p.mu.Unlock()
	select {
	case <-exited:
		t.Fatalf("stopping %s: it is not running", p.Name)
	default:
	}
	fmt.Fprintf(&p.out, "----- %s: stopping (%v)\n", time.Now().Format(time.TimeOnly), p.stopSignal)
	_ = syscall.Kill(-cmd.Process.Pid, p.stopSignal)
	if paused {
		p.Resume(t)
	}
	select {
	case <-exited:
	case <-time.After(stopLimit):
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		t.Errorf("%s did not stop within %s of %v; killed", p.Name, stopLimit, p.stopSignal)
	}
}

// Restart is Stop then Start.
func (p *Proc) Restart(t testing.TB) {
	t.Helper()
	p.Stop(t)
	p.Start(t)
}

// Pause freezes every process of the server: it keeps its connections and
// answers nothing, as a server in a long pause, a frozen VM or behind a
// partition does.
func (p *Proc) Pause(t testing.TB) {
	t.Helper()
	p.signal(t, syscall.SIGSTOP)
	p.mu.Lock()
	p.paused = true
	p.mu.Unlock()
}

// Resume thaws a paused server.
func (p *Proc) Resume(t testing.TB) {
	t.Helper()
	p.signal(t, syscall.SIGCONT)
	p.mu.Lock()
	p.paused = false
	p.mu.Unlock()
}

func (p *Proc) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	p.mu.Lock()
	cmd := p.cmd
	p.mu.Unlock()
	fmt.Fprintf(&p.out, "----- %s: %v\n", time.Now().Format(time.TimeOnly), sig)
	if err := syscall.Kill(-cmd.Process.Pid, sig); err != nil {
		t.Fatalf("%v to %s: %v", sig, p.Name, err)
	}
}

// Output is what the server has written so far, with the starts, stops and
// signals the test gave it.
func (p *Proc) Output() string { return p.out.String() }

// kill ends the server for good, frozen or not, within about 5 s.
func (p *Proc) kill() {
	p.mu.Lock()
	cmd, exited, paused := p.cmd, p.exited, p.paused
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-exited:
		return // ended already: its group id may be another's by now
	default:
	}
	pgid := -cmd.Process.Pid
	if p.quitSignal != 0 {
		_ = syscall.Kill(pgid, p.quitSignal)
		if paused {
			_ = syscall.Kill(pgid, syscall.SIGCONT)
		}
		select {
		case <-exited:
			return
		case <-time.After(5 * time.Second):
		}
	}
	_ = syscall.Kill(pgid, syscall.SIGKILL)
	if paused {
		_ = syscall.Kill(pgid, syscall.SIGCONT)
	}
	<-exited
}

// start runs a new server: build makes a Proc for a port; its first start
// is retried on another port when the server exits at once (a port taken
// meanwhile). The server is killed, and then cleanup run, at the test's
// end; its output is logged if the test failed.
func start(t testing.TB, cleanup func(), build func(port int) *Proc) (*Proc, int) {
	t.Helper()
	var p *Proc
	var port int
	var err error
	var tried []string
	for range startAttempts {
		port = FreePort(t)
		p = build(port)
		if err = p.launch(); err == nil || !errors.Is(err, errExited) {
			break
		}
		tried = append(tried, p.out.String())
	}
	if err != nil {
		// the earlier tries' output too: a port clash shows there
		cleanup()
		t.Fatalf("starting %s: %v\n%s%s", p.Name, err, strings.Join(tried, ""), p.out.String())
	}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("----- output of %s -----\n%s", p.Name, p.out.String())
		}
		cleanup()
	})
	return p, port
}
