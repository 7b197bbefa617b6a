package caddytest

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
)

// caddyBuild builds ./cmd/caddy once per test binary (~1.5 min cold).
var caddyBuild kayletest.CaddyBuild

func buildCaddy(t *testing.T) string {
	return caddyBuild.Binary(t, "..", "./cmd/caddy", filepath.Join(scratch, "caddy"))
}

// caddyProcess is one Caddy run from the built binary, serving gw.
type caddyProcess struct {
	*kayletest.Process
	gw gateway
}

// startCaddy runs the Caddy binary with gw's Caddyfile in a process of its
// own (see kayletest.StartCaddy).
func startCaddy(t *testing.T, bin, name string, gw gateway) *caddyProcess {
	t.Helper()
	dir := t.TempDir()
	config := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(gw.caddyfile()), 0o600); err != nil {
		t.Fatal(err)
	}
	return &caddyProcess{Process: kayletest.StartCaddy(t, bin, name, dir, config), gw: gw}
}

// waitReady polls until the gateway's kayle_webhook route answers.
func (p *caddyProcess) waitReady(t *testing.T) { p.WaitReady(t, p.gw.url()) }

// Two Caddy processes on one file_system storage forward each event once
// between them, with copies of it arriving at both at the same moment.
func TestTwoCaddyProcessesShareDedupe(t *testing.T) {
	if testing.Short() {
		t.Skip("builds ./cmd/caddy and runs two Caddy processes; skipped with -short")
	}
	bin := buildCaddy(t)
	be := newBackend(t)
	// a backend that takes a moment, as a real one does: the copies at the
	// other instance then arrive while the first forward is still running
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		time.Sleep(100 * time.Millisecond)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"received":true}`))
	}
	storage := t.TempDir()
	gateways := make([]gateway, 2)
	for i := range gateways {
		gateways[i] = gateway{
			adminPort: mustFreePort(t),
			port:      mustFreePort(t),
			storage:   storage,
			backend:   be.hostPort(),
		}
	}
	procs := make([]*caddyProcess, len(gateways))
	for i, gw := range gateways {
		procs[i] = startCaddy(t, bin, fmt.Sprintf("#%d", i+1), gw)
	}
	for _, p := range procs {
		p.waitReady(t)
	}

	const events, copies = 4, 10 // copies per event per instance
	evs := make([]event, events)
	type shot struct {
		event int
		req   *http.Request
	}
	var shots []shot
	for e := range evs {
		evs[e] = newEvent(t, nil)
		for _, gw := range gateways {
			for range copies {
				// each copy freshly encrypted and signed, as separate retries are
				shots = append(shots, shot{e, deliver(t, gw.url(), evs[e])})
			}
		}
	}

	client := &http.Client{
		Timeout:   60 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: len(shots)},
	}
	defer client.CloseIdleConnections()
	type result struct {
		status    int
		duplicate bool
		err       error
	}
	results := make([]result, len(shots))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, s := range shots {
		wg.Go(func() {
			<-start
			resp, err := client.Do(s.req)
			if err != nil {
				results[i].err = err
				return
			}
			resp.Body.Close()
			results[i] = result{status: resp.StatusCode, duplicate: resp.Header.Get(kayle.HeaderDuplicate) == "true"}
		})
	}
	began := time.Now()
	close(start)
	wg.Wait()
	t.Logf("%d copies of %d events answered in %s", len(shots), events, time.Since(began).Round(time.Millisecond))

	forwarded := make([]int, events)
	for i, r := range results {
		switch {
		case r.err != nil:
			if errors.Is(r.err, context.DeadlineExceeded) {
				t.Errorf("copy %d: timed out", i)
			} else {
				t.Errorf("copy %d: %v", i, r.err)
			}
		case r.status != http.StatusOK:
			t.Errorf("copy %d of event %d: status %d, want 200", i, shots[i].event, r.status)
		case !r.duplicate:
			forwarded[shots[i].event]++
		}
	}
	for e, ev := range evs {
		if n := be.count(ev.id); n != 1 {
			t.Errorf("backend got event %d %d times, want exactly 1", e, n)
		}
		if forwarded[e] != 1 {
			t.Errorf("event %d: %d copies answered as forwarded, want 1", e, forwarded[e])
		}
	}
	if n := be.total(); n != events {
		t.Errorf("backend got %d requests, want %d", n, events)
	}
}
