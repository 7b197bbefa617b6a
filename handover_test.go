package kaylewebhook

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"sync/atomic"
	"testing"
)

// closableStorage is one storage module instance over a shared memStorage:
// once closed (its module cleaned up, as Redis's closes its client), every
// call fails.
type closableStorage struct {
	*memStorage
	closed atomic.Bool
}

var errClientClosed = errors.New("client is closed")

func (c *closableStorage) Load(ctx context.Context, key string) ([]byte, error) {
	if c.closed.Load() {
		return nil, errClientClosed
	}
	return c.memStorage.Load(ctx, key)
}

func (c *closableStorage) Store(ctx context.Context, key string, value []byte) error {
	if c.closed.Load() {
		return errClientClosed
	}
	return c.memStorage.Store(ctx, key, value)
}

func (c *closableStorage) Unlock(ctx context.Context, name string) error {
	if c.closed.Load() {
		return errClientClosed
	}
	return c.memStorage.Unlock(ctx, name)
}

// A reload cleans up the old config's storage module while its forward is
// in flight: the forward's record is still written (through the new
// config's storage), so Kayle's next retry is answered as a duplicate.
func TestReloadMidForwardStillRemembersTheEvent(t *testing.T) {
	st := newMemStorage()
	oldStorage := &closableStorage{memStorage: st}
	old, _ := newLockTestDeduper(st)
	old.storage = oldStorage
	old.register()
	t.Cleanup(old.retire)
	var replacement *deduper
	const id = "evt_reloaded_mid_forward"
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		// the reload: the new config is provisioned, then the old one's
		// modules are cleaned up, in no fixed order
		replacement, _ = newLockTestDeduper(st)
		replacement.storage = &closableStorage{memStorage: st}
		replacement.register()
		oldStorage.closed.Store(true)
		old.retire()
		_, err := w.Write([]byte("ok"))
		return err
	}}
	assertForwardedOK(t, deliverEvent(old, id, backend))
	t.Cleanup(replacement.retire)
	if !remembered(replacement, id) {
		t.Fatal("the forward in flight during the reload left no record: Kayle's retry would be forwarded again")
	}
	assertDuplicate(t, deliverEvent(replacement, id, backend), id)
	if backend.Calls() != 1 {
		t.Errorf("backend called %d times, want 1", backend.Calls())
	}
}

// Without a newer config for the same records, a failing storage is not
// papered over: the failure is the answer.
func TestNoSuccessorWithoutANewerConfig(t *testing.T) {
	st := newMemStorage()
	a, _ := newLockTestDeduper(st)
	a.storage = &closableStorage{memStorage: st}
	a.register()
	t.Cleanup(a.retire)
	b, _ := newLockTestDeduper(st)
	b.storage = &closableStorage{memStorage: st}
	b.prefix = "another/endpoint" // other records
	b.register()
	t.Cleanup(b.retire)
	a.storage.(*closableStorage).closed.Store(true)
	if a.successor() != nil {
		t.Fatal("a deduper of other records was taken for a successor")
	}
	if err := a.store(context.Background(), "k", []byte("v")); !errors.Is(err, errClientClosed) {
		t.Errorf("store on a closed storage = %v, want its error", err)
	}
}

// Two handlers on two servers of one storage module (two Redis addresses)
// keep different records: a failure on one is never retried through the
// other, while the same config provisioned again (a reload) is a successor.
func TestNoSuccessorOnAnotherServerOfTheSameModule(t *testing.T) {
	st := newMemStorage()
	newOn := func(config string) *deduper {
		d, _ := newLockTestDeduper(st)
		d.storage = &closableStorage{memStorage: st}
		d.storageConfig = json.RawMessage(config)
		d.register()
		t.Cleanup(d.retire)
		return d
	}
	a := newOn(`{"module":"redis","address":"redis-a:6379"}`)
	newOn(`{"module":"redis","address":"redis-b:6379"}`)
	if a.successor() != nil {
		t.Fatal("a deduper on another server of the same module was taken for a successor")
	}
	reloaded := newOn(`{"module":"redis","address":"redis-a:6379"}`)
	if a.successor() != reloaded {
		t.Error("the same storage config provisioned again is not the successor")
	}
	if storageIdentity(a.storage, a.storageConfig, a.prefix) == storageIdentity(a.storage, nil, a.prefix) {
		t.Error("a handler's own storage and the global storage of the same type share an identity")
	}
}
