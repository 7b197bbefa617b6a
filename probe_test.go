package kaylewebhook

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
)

// testStorageModule is a storage module for the probe's tests, with the
// lock behaviours of real modules: "excludes" (a memStorage), "nolock"
// (Lock and Unlock return nil at once, as ss098/certmagic-s3 does),
// "trylock_lies" (Lock excludes, TryLock grants a held lock),
// "never_waits" (Lock of a held name fails at once), "ignores_ctx" (Lock waits for a held lock past its context's end, as
// techknowlogick/certmagic-s3's spins).
type testStorageModule struct {
	Behaviour string `json:"behaviour"`
}

func init() { caddy.RegisterModule(testStorageModule{}) }

func (testStorageModule) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.kayle_test_locks",
		New: func() caddy.Module { return new(testStorageModule) },
	}
}

// testStorages keeps one storage per behaviour, so a test can look at it.
var testStorages sync.Map

func (m testStorageModule) CertMagicStorage() (certmagic.Storage, error) {
	mem := newMemStorage()
	var st certmagic.Storage = mem
	switch m.Behaviour {
	case "nolock":
		st = noLockStorage{mem}
	case "trylock_lies":
		st = lyingTryLocker{mem}
	case "ignores_ctx":
		st = ctxIgnoringStorage{mem}
	case "never_waits":
		st = neverWaitingStorage{mem}
	}
	testStorages.Store(m.Behaviour, mem)
	return st, nil
}

type noLockStorage struct{ *memStorage }

func (noLockStorage) Lock(context.Context, string) error   { return nil }
func (noLockStorage) Unlock(context.Context, string) error { return nil }

type lyingTryLocker struct{ *memStorage }

// neverWaitingStorage's Lock of a held name fails at once, as
// yroc92/postgres-storage's does.
type neverWaitingStorage struct{ *memStorage }

func (s neverWaitingStorage) Lock(_ context.Context, name string) error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return s.memStorage.Lock(ctx, name)
}

// ctxIgnoringStorage's Lock of a held name does not return when its
// context ends (it returns when the lock is freed).
type ctxIgnoringStorage struct{ *memStorage }

func (s ctxIgnoringStorage) Lock(_ context.Context, name string) error {
	return s.memStorage.Lock(context.Background(), name)
}

func (lyingTryLocker) TryLock(context.Context, string) (bool, error) { return true, nil }

func testLocksJSON(behaviour string) json.RawMessage {
	return json.RawMessage(`{"module":"kayle_test_locks","behaviour":"` + behaviour + `"}`)
}

// A storage whose Lock does not exclude is refused at provisioning, with
// an error that names the module and what to do; one that excludes is
// used, and the probe's lock is released.
func TestProvisionProbesTheStorageLock(t *testing.T) {
	for _, c := range []struct{ behaviour, says string }{
		{"nolock", "does not exclude"},
		{"trylock_lies", "does not exclude"},
		{"ignores_ctx", "did not return when its context ended"},
		{"never_waits", "failed at once instead of waiting"},
	} {
		behaviour := c.behaviour
		t.Run(behaviour, func(t *testing.T) {
			h := &Handler{
				SigningSecrets: []string{demoSecret(t)},
				DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
				StorageRaw:     testLocksJSON(behaviour),
			}
			err := provisionTestHandler(t, h)
			if err == nil {
				t.Fatal("a storage whose lock does not exclude was accepted for dedupe")
			}
			for _, want := range []string{"caddy.storage.kayle_test_locks", c.says, "dedupe off"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
		})
	}
	t.Run("excludes", func(t *testing.T) {
		probedStorages.Clear() // a pass is remembered for reloads; probe afresh
		h := newTestHandler(t, func(h *Handler) { h.StorageRaw = testLocksJSON("excludes") })
		mem, _ := testStorages.Load("excludes")
		st := mem.(*memStorage)
		if st.callCount("Lock") < 2 {
			t.Errorf("%d Lock calls at provisioning; the probe takes its lock and tries it again", st.callCount("Lock"))
		}
		if held := st.heldLocks(); len(held) > 0 {
			t.Errorf("probe locks left held: %v", held)
		}
		// and dedupe works on it
		res := serve(h, makeDelivery(t, eventPayload("evt_probed"), time.Now()), &testBackend{})
		if res.Status != http.StatusOK {
			t.Errorf("delivery on a probed storage: status %d", res.Status)
		}
	})
}
