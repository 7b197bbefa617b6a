package kaylewebhook

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// The sweep command deletes, at once, the records older than the handler's
// window and keeps the fresh ones: the expired event is forwarded again,
// the fresh one is still a duplicate.
func TestSweepCommandDeletesExpiredRecordsNow(t *testing.T) {
	root := t.TempDir()
	backend := &testBackend{}
	window := 10 * 24 * time.Hour
	clock := newTestClock(time.Now().Add(-window - time.Hour)) // the old event's delivery
	h := newTestHandler(t, func(h *Handler) {
		h.StorageRaw = fileStorageJSON(root)
		h.now = clock.Now
	})
	deliver := func(id string, at time.Time) served {
		return serve(h, makeDelivery(t, eventPayload(id), at), backend)
	}
	if res := deliver("evt_old", clock.Now()); res.Status != http.StatusOK {
		t.Fatalf("old event: %d", res.Status)
	}
	// the file of a record written then is as old as the record
	_, oldKey, _ := h.dedupe.eventKeys("evt_old")
	if err := os.Chtimes(filepath.Join(root, oldKey), clock.Now(), clock.Now()); err != nil {
		t.Fatal(err)
	}
	clock.Set(time.Now())
	if res := deliver("evt_new", clock.Now()); res.Status != http.StatusOK {
		t.Fatalf("new event: %d", res.Status)
	}

	config := fmt.Sprintf("http://127.0.0.1:9 {\n%s}\n", kayleBlock(t, fmt.Sprintf("\tstorage file_system %q\n\tdedupe_window 10d", root)))
	var b testIO
	if err := runSweep(context.Background(), sweepOptions{Config: writeConfig(t, config)}, b.io("")); err != nil {
		t.Fatal(err)
	}
	if out := b.out.String(); !strings.Contains(out, "deleted 1 of 2 records") || !strings.Contains(out, root) {
		t.Errorf("output:\n%s\nwant the storage and \"deleted 1 of 2 records\"", out)
	}
	calls := backend.Calls()
	if res := deliver("evt_old", clock.Now()); res.Rec.Header().Get(kayle.HeaderDuplicate) != "" || backend.Calls() != calls+1 {
		t.Error("the swept event was not forwarded again")
	}
	if res := deliver("evt_new", clock.Now()); res.Rec.Header().Get(kayle.HeaderDuplicate) != "true" {
		t.Error("the fresh event's record did not survive the sweep")
	}
}

// A config with dedupe off everywhere has no records to sweep.
func TestSweepCommandRefusesDedupeOff(t *testing.T) {
	config := fmt.Sprintf("http://127.0.0.1:9 {\n%s}\n", kayleBlock(t, "\tdedupe off"))
	var b testIO
	err := runSweep(context.Background(), sweepOptions{Config: writeConfig(t, config)}, b.io(""))
	if err == nil || !strings.Contains(err.Error(), "dedupe is off") {
		t.Errorf("got %v, want a refusal saying dedupe is off", err)
	}
}
