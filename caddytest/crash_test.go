package caddytest

import (
	"fmt"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// TestKilledInstanceDoesNotStrandTheEvent replays the adversarial run of
// issue 8 with two real Caddy processes on one file_system storage:
// instance A forwards event E and the backend answers 500; within 5 s
// instance B takes E's lock for Kayle's retry and is killed -9 while
// forwarding. certmagic's lock refresher, left running in A by its earlier
// lock, then keeps B's lock file fresh for as long as A runs, so a storage
// lock alone never goes stale. Kayle's later retries at A must still get E
// to the backend within the stale time, and no copy may wait without bound.
func TestKilledInstanceDoesNotStrandTheEvent(t *testing.T) {
	if testing.Short() {
		t.Skip("builds ./cmd/caddy and runs two Caddy processes; skipped with -short")
	}
	bin := buildCaddy(t)
	bForwarding := make(chan struct{})
	takenOver := make(chan time.Time, 1)
	be := newBackend(t)
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		switch n {
		case 1: // A's forward: the backend fails, Kayle will retry
			w.WriteHeader(http.StatusInternalServerError)
		case 2: // B's forward: hangs until B dies
			close(bForwarding)
			<-r.Context().Done()
		default:
			select {
			case takenOver <- time.Now():
			default:
			}
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(`{"received":true}`))
		}
	}
	storage := t.TempDir()
	newGateway := func() gateway {
		return gateway{adminPort: mustFreePort(t), port: mustFreePort(t), storage: storage, backend: be.hostPort()}
	}
	a := startCaddy(t, bin, "A", newGateway())
	b := startCaddy(t, bin, "B", newGateway())
	a.waitReady(t)
	b.waitReady(t)

	// Kayle waits a few seconds for an answer
	sender := &http.Client{Timeout: 5 * time.Second}
	defer sender.CloseIdleConnections()
	ev := newEvent(t, nil)

	resp, err := sender.Do(deliver(t, a.gw.url(), ev))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusInternalServerError {
		t.Fatalf("A's forward: status %d, want the backend's 500", resp.StatusCode)
	}
	firstDone := time.Now()

	go func() {
		if resp, err := sender.Do(deliver(t, b.gw.url(), ev)); err == nil {
			resp.Body.Close()
		}
	}()
	select {
	case <-bForwarding:
	case <-time.After(10 * time.Second):
		t.Fatal("B's copy did not reach the backend")
	}
	if took := time.Since(firstDone); took > 4*time.Second {
		t.Logf("B took E's lock %s after A's forward ended: the refresher in A may have stopped already", took)
	}
	if err := b.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-b.Exited
	killed := time.Now()

	// Kayle's retries at A, every 5 s (its schedule is 5 s, then minutes:
	// faster here, to keep the test short). The event must reach the
	// backend within the stale time, plus a poll and a retry.
	const takeoverBound = 25 * time.Second
	var statuses []string
	for be.count(ev.id) < 3 && time.Since(killed) < takeoverBound {
		began := time.Now()
		resp, err := sender.Do(deliver(t, a.gw.url(), ev))
		if err != nil {
			statuses = append(statuses, "no answer")
		} else {
			resp.Body.Close()
			statuses = append(statuses, fmt.Sprint(resp.StatusCode))
		}
		time.Sleep(5*time.Second - time.Since(began))
	}
	if n := be.count(ev.id); n != 3 {
		t.Fatalf("%s after B was killed the backend has had E %d times (A's 500, B's hung forward), want a third forward; Kayle's retries at A got %v",
			time.Since(killed).Round(time.Second), n, statuses)
	}
	t.Logf("E reached the backend again %s after B was killed; Kayle's retries at A got %v",
		(<-takenOver).Sub(killed).Round(100*time.Millisecond), statuses)
	if !strings.Contains(a.Out.String(), "taking over an event") {
		t.Error("A did not log the takeover of B's event")
	}

	// delivered now: a later retry, at either instance, is a duplicate
	resp, err = sender.Do(deliver(t, a.gw.url(), ev))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get(kayle.HeaderDuplicate) != "true" {
		t.Errorf("retry after the takeover: status %d, %s %q; want a 200 duplicate",
			resp.StatusCode, kayle.HeaderDuplicate, resp.Header.Get(kayle.HeaderDuplicate))
	}
	if n := be.count(ev.id); n != 3 {
		t.Errorf("backend has had E %d times, want 3", n)
	}
}
