package kaylewebhook

import (
	"io/fs"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/certmagic"
)

// An unreadable record (a torn write from another storage, a future format)
// counts as absent: forwarding again beats refusing the event for 32 hours.
func TestDedupeStorageUnreadableRecord(t *testing.T) {
	st := newMemStorage()
	d := newTestDeduper(st, newTestClock(testEpoch))
	_, key, _ := d.eventKeys("evt_garbled")
	st.put(key, []byte("{not json"), testEpoch)
	backend := &testBackend{}
	assertForwardedOK(t, deliverEvent(d, "evt_garbled", backend))
	assertDuplicate(t, deliverEvent(d, "evt_garbled", backend), "evt_garbled")
}

func TestDedupeExpiredRecordIgnored(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			clock := newTestClock(testEpoch)
			d := newTestDeduper(sc.new(t), clock)
			backend := &testBackend{}
			const id = "evt_expiry"

			assertForwardedOK(t, deliverEvent(d, id, backend))
			clock.Set(testEpoch.Add(defaultDedupeWindow))
			assertDuplicate(t, deliverEvent(d, id, backend), id) // the window's last instant

			clock.Set(testEpoch.Add(defaultDedupeWindow + time.Second))
			assertForwardedOK(t, deliverEvent(d, id, backend))
			if backend.Calls() != 2 {
				t.Fatalf("backend called %d times, want 2", backend.Calls())
			}
			// the new forward is remembered from its own time
			if rec := loadRecord(t, d, id); !rec.DeliveredAt.Equal(clock.Now()) {
				t.Errorf("record delivered_at = %s, want %s", rec.DeliveredAt, clock.Now())
			}
			assertDuplicate(t, deliverEvent(d, id, backend), id)
		})
	}
}

func TestDedupeEventIDHashed(t *testing.T) {
	root := t.TempDir()
	h := newTestHandler(t, func(h *Handler) { h.StorageRaw = fileStorageJSON(root) })
	backend := &testBackend{}
	ids := []string{"../../../../etc/evt", "A/B", "a/b", "ab", "AB", "evt_AB", "evt_ab", "evt-ab", "evt.ab", "evt ab"}

	for round := range 2 {
		for _, id := range ids {
			res := serve(h, makeDelivery(t, eventPayload(id), time.Now()), backend)
			if res.Status != http.StatusOK {
				t.Fatalf("%q: status %d (%v)", id, res.Status, res.Err)
			}
			if dup := res.Rec.Header().Get(kayle.HeaderDuplicate) == "true"; dup != (round == 1) {
				t.Errorf("round %d, %q: duplicate = %v", round, id, dup)
			}
		}
	}
	if backend.Calls() != len(ids) {
		t.Errorf("backend got %d events, want %d: ids differing in case or punctuation are different events", backend.Calls(), len(ids))
	}

	// every file is under <root>/<prefix>/ or <root>/locks/, and no file
	// holds an id in clear
	records := 0
	err := filepath.WalkDir(root, func(p string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		rel = filepath.ToSlash(rel)
		switch {
		case strings.HasPrefix(rel, defaultDedupePrefix+"/"):
			if isRecordName(path.Base(rel)) {
				records++
			}
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			for _, id := range ids {
				// (the short ids could occur in hex by chance)
				if strings.Contains(id, "evt") && (strings.Contains(string(data), id) || strings.Contains(rel, id)) {
					t.Errorf("%s holds event id %q", rel, id)
				}
			}
		case strings.HasPrefix(rel, "locks/"):
		default:
			t.Errorf("storage file outside the prefix and locks: %s", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if records != len(ids) {
		t.Errorf("%d records for %d events", records, len(ids))
	}

	// distinct records and distinct locks, also after certmagic folds lock
	// names with Safe()
	recordKeys, lockFiles := map[string]string{}, map[string]string{}
	for _, id := range ids {
		_, key, lock := h.dedupe.eventKeys(id)
		if prev, dup := recordKeys[key]; dup {
			t.Errorf("%q and %q share a record", prev, id)
		}
		recordKeys[key] = id
		safe := certmagic.StorageKeys.Safe(lock)
		if safe != lock {
			t.Errorf("lock name %q is altered by certmagic's Safe: %q", lock, safe)
		}
		if prev, dup := lockFiles[safe]; dup {
			t.Errorf("%q and %q share a lock", prev, id)
		}
		lockFiles[safe] = id
		if !strings.HasPrefix(key, defaultDedupePrefix+"/") || strings.Contains(key, "..") {
			t.Errorf("record key %q of %q is not below the prefix", key, id)
		}
	}
}
