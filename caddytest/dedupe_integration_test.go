package caddytest

import (
	"encoding/json"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// expectDuplicate sends req and checks the gateway acknowledged it as an
// event already delivered.
func (h *harness) expectDuplicate(req *http.Request, eventID string) {
	h.t.Helper()
	resp, body := h.expect(req, http.StatusOK)
	if got := resp.Header.Get(kayle.HeaderDuplicate); got != "true" {
		h.t.Errorf("%s: %q, want \"true\"", kayle.HeaderDuplicate, got)
	}
	if got := resp.Header.Get(kayle.HeaderEventID); got != eventID {
		h.t.Errorf("duplicate answer %s: %q, want %q", kayle.HeaderEventID, got, eventID)
	}
	var answer struct {
		Status  string `json:"status"`
		EventID string `json:"event_id"`
	}
	if err := json.Unmarshal(body, &answer); err != nil || answer.Status != "duplicate" || answer.EventID != eventID {
		h.t.Errorf("duplicate answer body %q (%v)", body, err)
	}
}

// expectForwarded sends req and checks the backend's 200 came back as is.
func (h *harness) expectForwarded(req *http.Request) {
	h.t.Helper()
	resp, body := h.expect(req, http.StatusOK)
	if got := resp.Header.Get(kayle.HeaderDuplicate); got != "" {
		h.t.Errorf("forwarded delivery answered with %s: %q", kayle.HeaderDuplicate, got)
	}
	if string(body) != `{"received":true}` {
		h.t.Errorf("Kayle got %q, want the backend's answer", body)
	}
}

// An event is forwarded once: a later copy (re-signed, re-encrypted, as a
// manual retry or a replay is) is acknowledged without reaching the backend,
// also after Caddy restarts on the same storage.
func TestDedupeAcrossRetriesAndRestart(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	config := gw.caddyfile()
	h.load(config)

	ev := newEvent(t, nil)
	first := deliveryRequest(t, gw.url(), encrypt(t, ev.payload), demo.Secret, time.Now().Add(-2*time.Minute), ev.typ)
	h.expectForwarded(first)
	h.expectDuplicate(deliver(t, gw.url(), ev), ev.id)
	if n := be.count(ev.id); n != 1 {
		t.Fatalf("backend got the event %d times, want 1", n)
	}

	// stop every site (the handler's Cleanup runs), check it is down, and
	// start the same config again on the same storage folder
	h.stop()
	if _, err := h.tc.Client.Do(deliver(t, gw.url(), ev)); err == nil {
		t.Fatal("the gateway still answers after it was stopped")
	}
	h.load(config)
	h.expectDuplicate(deliver(t, gw.url(), ev), ev.id)
	if n := be.count(ev.id); n != 1 {
		t.Fatalf("after the restart the backend got the event %d times, want 1", n)
	}

	// an event never seen before is still forwarded after the restart
	other := newEvent(t, nil)
	h.expectForwarded(deliver(t, gw.url(), other))
	if n := be.count(other.id); n != 1 {
		t.Fatalf("backend got a new event %d times after the restart, want 1", n)
	}
}

// An event whose forward failed is not remembered: the failure goes back to
// Kayle, the next copy is forwarded, and the copy after that is a duplicate.
func TestFailedForwardIsNotRemembered(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())

	failures := []struct {
		name       string
		fail       func(w http.ResponseWriter) // the backend's first answer
		wantStatus int                         // what Kayle gets for it
	}{
		{"backend answers 500", func(w http.ResponseWriter) {
			http.Error(w, "database unavailable", http.StatusInternalServerError)
		}, http.StatusInternalServerError},
		{"backend drops the connection", func(w http.ResponseWriter) {
			if conn, _, err := http.NewResponseController(w).Hijack(); err == nil {
				conn.Close() // no answer at all
			}
		}, http.StatusBadGateway},
	}
	for _, f := range failures {
		t.Run(f.name, func(t *testing.T) {
			h := h.sub(t)
			ev := newEvent(t, nil)
			be.mu.Lock()
			be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
				if r.Header.Get(kayle.HeaderEventID) == ev.id && n == 1 {
					f.fail(w)
					return
				}
				w.Header().Set("Content-Type", "application/json")
				_, _ = w.Write([]byte(`{"received":true}`))
			}
			be.mu.Unlock()

			h.expect(deliver(t, gw.url(), ev), f.wantStatus)
			h.expectForwarded(deliver(t, gw.url(), ev))
			h.expectDuplicate(deliver(t, gw.url(), ev), ev.id)
			if n := be.count(ev.id); n != 2 {
				t.Errorf("backend got the event %d times, want 2 (the failed forward and the retry)", n)
			}
		})
	}
}

// Copies of one event arriving at once at one Caddy reach the backend once;
// every copy is answered 200.
func TestConcurrentCopiesInOneCaddy(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())

	ev := newEvent(t, nil)
	const copies = 10
	reqs := make([]*http.Request, copies)
	for i := range reqs {
		reqs[i] = deliver(t, gw.url(), ev)
	}
	statuses := make([]int, copies)
	duplicates := make([]bool, copies)
	errs := make([]error, copies)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range reqs {
		wg.Go(func() {
			<-start
			resp, err := h.tc.Client.Do(reqs[i])
			if err != nil {
				errs[i] = err
				return
			}
			resp.Body.Close()
			statuses[i] = resp.StatusCode
			duplicates[i] = resp.Header.Get(kayle.HeaderDuplicate) == "true"
		})
	}
	close(start)
	wg.Wait()

	forwarded := 0
	for i := range reqs {
		if errs[i] != nil {
			t.Errorf("copy %d: %v", i, errs[i])
			continue
		}
		if statuses[i] != http.StatusOK {
			t.Errorf("copy %d: status %d, want 200", i, statuses[i])
		}
		if !duplicates[i] {
			forwarded++
		}
	}
	if forwarded != 1 {
		t.Errorf("%d copies were answered as forwarded, want 1", forwarded)
	}
	if n := be.count(ev.id); n != 1 {
		t.Errorf("backend got the event %d times, want 1", n)
	}
}
