package kaylewebhook

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	dto "github.com/prometheus/client_model/go"
)

// decryptions is how many JWEs the handlers have opened so far.
func decryptions(t *testing.T) uint64 {
	t.Helper()
	var m dto.Metric
	if err := phaseSeconds.WithLabelValues(phaseDecrypt).(interface{ Write(*dto.Metric) error }).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

func TestQueuedDeliveryIsAnswered202ThenForwardedOnce(t *testing.T) {
	backend := &testBackend{}
	qt := newQueueTest(t, backend)
	next := &testBackend{}
	before := decryptions(t)

	res := serve(qt.h, makeDelivery(t, eventPayload("evt_q1"), time.Now()), next)
	if res.Status != http.StatusAccepted || res.Err != nil {
		t.Fatalf("got %d (%v), want 202", res.Status, res.Err)
	}
	if got := res.Rec.Header().Get(kayle.HeaderQueued); got != "true" {
		t.Errorf("X-Kayle-Queued = %q, want true", got)
	}
	var body struct {
		Status  string `json:"status"`
		EventID string `json:"event_id"`
	}
	if err := json.Unmarshal(res.Rec.Body.Bytes(), &body); err != nil || body.Status != "queued" || body.EventID != "evt_q1" {
		t.Errorf("body %q, want {\"status\":\"queued\",\"event_id\":\"evt_q1\"}", res.Rec.Body.String())
	}
	eventually(t, "the backend has the event", func() bool { return backend.Calls() == 1 })
	eventually(t, "the event is recorded as delivered", func() bool {
		rec, ok := qt.record(t, "evt_q1")
		return ok && !rec.DeliveredAt.IsZero()
	})
	if next.Calls() != 0 {
		t.Errorf("the rest of the route was called %d times; in queue mode only the forward routes are", next.Calls())
	}
	got := backend.Request(0)
	if !bytes.Equal(got.Body, eventPayload("evt_q1")) {
		t.Errorf("the backend got body %q, want the plaintext", got.Body)
	}
	for name, want := range map[string]string{kayle.HeaderEventID: "evt_q1", kayle.HeaderVerified: "true", kayle.HeaderKeyID: demoKID, "Content-Type": "application/json", kayle.HeaderDeliveryID: "whd_test"} {
		if v := got.Header.Get(name); v != want {
			t.Errorf("forwarded %s = %q, want %q", name, v, want)
		}
	}
	// the first try used the plaintext in hand: one RSA decryption in all
	if n := decryptions(t) - before; n != 1 {
		t.Errorf("%d decryptions for one queued delivery forwarded at its first try, want 1", n)
	}
	rec, _ := qt.record(t, "evt_q1")
	if rec.Queue != nil {
		t.Error("the delivered record still holds the queued delivery")
	}
	eventually(t, "no marker is left", func() bool { return len(qt.markers(t)) == 0 })

	// a copy now is a duplicate, and not forwarded again
	res = qt.deliver(t, "evt_q1")
	assertDuplicate(t, res, "evt_q1")
	time.Sleep(100 * time.Millisecond) // a few polls
	if backend.Calls() != 1 {
		t.Errorf("backend got %d requests, want 1", backend.Calls())
	}
}

func TestCopyOfQueuedEventIsDuplicate(t *testing.T) {
	release := make(chan struct{})
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		<-release
		return nil
	}}
	qt := newQueueTest(t, backend)
	defer close(release)
	if res := qt.deliver(t, "evt_copy"); res.Status != http.StatusAccepted {
		t.Fatalf("first copy: %d", res.Status)
	}
	eventually(t, "the first try is at the backend", func() bool { return backend.Calls() == 1 })
	// the first try holds the event; a copy is answered at once
	start := time.Now()
	res := qt.deliver(t, "evt_copy")
	assertDuplicate(t, res, "evt_copy")
	if waited := time.Since(start); waited > 5*time.Second {
		t.Errorf("the copy waited %s for the forward in flight", waited)
	}
}

func TestQueueKeepsOnlyCiphertextAtRest(t *testing.T) {
	backend := &testBackend{Respond: respondStatus(http.StatusServiceUnavailable)}
	qt := newQueueTest(t, backend)
	payload := eventPayload("evt_rest")
	body, sig := signDelivery(t, payload, time.Now())
	if res := serve(qt.h, deliveryRequest(body, sig), &testBackend{}); res.Status != http.StatusAccepted {
		t.Fatalf("got %d", res.Status)
	}
	qt.waitTried(t, "evt_rest")
	rec, _ := qt.record(t, "evt_rest")
	if rec.Queue.JWE != string(body) || rec.Queue.Signature != sig {
		t.Error("the record does not hold the delivery exactly as it arrived")
	}
	// no byte of the payload beyond its ids anywhere in the storage
	secrets := []string{"vs_test", "age_over_18", "claims", "selected_field_keys"}
	_ = filepath.Walk(qt.root, func(p string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return nil
		}
		data, _ := os.ReadFile(p)
		for _, s := range secrets {
			if bytes.Contains(data, []byte(s)) {
				t.Errorf("%s holds %q from the plaintext", p, s)
			}
		}
		return nil
	})
}

func TestQueueRefusesWhatSyncRefuses(t *testing.T) {
	backend := &testBackend{}
	qt := newQueueTest(t, backend)
	body, sig := signDelivery(t, eventPayload("evt_forged"), time.Now())
	forged := bytes.Clone(body)
	forged[len(forged)-3] ^= 1
	res := serve(qt.h, deliveryRequest(forged, sig), &testBackend{})
	if res.Status != http.StatusBadRequest {
		t.Errorf("forged delivery: %d, want 400", res.Status)
	}
	stale := makeDelivery(t, eventPayload("evt_stale"), time.Now().Add(-time.Hour))
	if res := serve(qt.h, stale, &testBackend{}); res.Status != http.StatusBadRequest {
		t.Errorf("stale delivery: %d, want 400", res.Status)
	}
	time.Sleep(100 * time.Millisecond)
	if m := qt.markers(t); len(m) != 0 || backend.Calls() != 0 {
		t.Errorf("a refused delivery was queued: markers %v, %d forwards", m, backend.Calls())
	}
}

func TestQueueStorageFailureIs503AndNothingQueued(t *testing.T) {
	backend := &testBackend{}
	h := newTestHandler(t, func(h *Handler) {
		h.StorageRaw = json.RawMessage(`{"module":"kayle_test_locks","behaviour":"queue_store_fails"}`)
		h.Queue = &Queue{Forward: forwardTo(t, backend)}
		timing := queueTestTiming
		h.timing = &timing
	})
	st, _ := testStorages.Load("queue_store_fails")
	mem := st.(*memStorage)
	mem.fail("Store", errors.New("disk full"))
	res := serve(h, makeDelivery(t, eventPayload("evt_full"), time.Now()), &testBackend{})
	if res.Status != http.StatusServiceUnavailable {
		t.Fatalf("got %d, want 503", res.Status)
	}
	if got := res.Rec.Header().Get(kayle.HeaderRefused); got != "storage_unavailable" {
		t.Errorf("X-Kayle-Refused %q", got)
	}
	time.Sleep(100 * time.Millisecond)
	if backend.Calls() != 0 {
		t.Error("an event whose queueing failed was forwarded")
	}
	mem.fail("Store", nil)
	mem.mu.Lock()
	defer mem.mu.Unlock()
	for key := range mem.files {
		if strings.Contains(key, "/queue/") {
			t.Errorf("left in storage after a failed enqueue: %s", key)
		}
	}
}

func TestQueueBurstIsNotDecryptedTwice(t *testing.T) {
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		time.Sleep(30 * time.Millisecond)
		_, err := w.Write([]byte("ok"))
		return err
	}}
	qt := newQueueTest(t, backend, func(h *Handler) { h.Queue.Concurrency = 1 })
	before := decryptions(t)
	const events = 6
	for i := range events {
		// faster than the one slot forwards: most wait for a poll
		if res := qt.deliver(t, fmt.Sprintf("evt_burst%d", i)); res.Status != http.StatusAccepted {
			t.Fatalf("%d", res.Status)
		}
	}
	eventually(t, "every event delivered", func() bool {
		for i := range events {
			if !remembered(qt.h.dedupe, fmt.Sprintf("evt_burst%d", i)) {
				return false
			}
		}
		return true
	})
	if backend.Calls() != events {
		t.Errorf("%d forwards for %d events", backend.Calls(), events)
	}
	// one RSA decryption per event, at its arrival: those that waited for
	// the slot were not opened again out of the storage
	if n := decryptions(t) - before; n != events {
		t.Errorf("%d decryptions for %d events", n, events)
	}
}
