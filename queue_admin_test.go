package kaylewebhook

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"path"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// adminQueue is a gateway in queue mode on a storage, the way Provision sets
// one up (the handler's checks, enqueue, the running queue) but with a test
// clock, short polls, and a backend the test answers for; and beside it an
// operator's view of the same storage, as caddy kayle queue makes it.
type adminQueue struct {
	h       *Handler
	q       *queueRunner
	admin   *queueStore
	clock   *testClock
	storage *countingExists
	backend *testBackend
	status  atomic.Int32 // what the backend answers
	next    *testBackend // the rest of the route: queue mode never calls it
}

// countingExists counts Exists calls: each poll of the queue makes one (the
// pause flag), so a test can wait for polls to have happened.
type countingExists struct {
	certmagic.Storage
	calls atomic.Int64
}

func (c *countingExists) Exists(ctx context.Context, key string) bool {
	c.calls.Add(1)
	return c.Storage.Exists(ctx, key)
}

func newAdminQueue(t *testing.T, storage certmagic.Storage) *adminQueue {
	t.Helper()
	return newAdminQueueOn(t, storage, newTestClock(testEpoch))
}

// newAdminQueueOn is newAdminQueue on a given clock; each configure func may
// change the handler before it is provisioned. Two of them on one storage
// and clock are two instances of a cluster.
func newAdminQueueOn(t *testing.T, storage certmagic.Storage, clock *testClock, configure ...func(*Handler)) *adminQueue {
	t.Helper()
	qt := &adminQueue{clock: clock, storage: &countingExists{Storage: storage}, next: &testBackend{}}
	qt.status.Store(http.StatusServiceUnavailable)
	qt.backend = &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(int(qt.status.Load()))
		return nil
	}}
	// the secrets and keys provisioned as usual; the deduper and the queue
	// on the given storage, set up before the poll loop starts
	h := newTestHandler(t, append(configure, func(h *Handler) { h.DedupeDisabled, h.StorageRaw, h.now = true, nil, qt.clock.Now })...)
	h.setLogger(zap.NewNop())
	d := newDeduper(qt.storage, testPrefix, defaultDedupeWindow, zap.NewNop(), qt.clock.Now)
	d.timing = fastLockTiming
	h.dedupe, h.DedupeDisabled = d, false
	h.Queue = &Queue{Horizon: caddy.Duration(time.Hour), MaxBackoff: caddy.Duration(time.Minute)}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if err := h.provisionQueue(ctx); err != nil {
		t.Fatal(err)
	}
	qt.h, qt.q = h, h.queue
	qt.q.forward = qt.backend
	qt.q.pollEvery, qt.q.statsEvery = 10*time.Millisecond, time.Hour
	qt.q.start()
	t.Cleanup(func() {
		qt.q.stopQueue(false)
		qt.q.active.Wait()
		cancel()
		if n := qt.next.Calls(); n > 0 {
			t.Errorf("queue mode called the rest of the route %d times", n)
		}
	})
	admin := newQueueStore(qt.newOperatorDeduper(), zap.NewNop())
	qt.admin = &admin
	return qt
}

// newOperatorDeduper is a deduper of its own on the gateway's storage, as
// the command makes one, on the gateway's clock.
func (qt *adminQueue) newOperatorDeduper() *deduper {
	d := newDeduper(qt.storage.Storage, testPrefix, defaultDedupeWindow, zap.NewNop(), qt.clock.Now)
	d.timing = fastLockTiming
	return d
}

// queuePayload is a genuine event of type typ whose claims hold a value
// that must never be shown.
const secretClaim = "Zebulon-Quintessa-1907"

func queuePayload(t *testing.T, eventID, typ string) []byte {
	t.Helper()
	var p map[string]any
	if err := json.Unmarshal(eventPayload(eventID), &p); err != nil {
		t.Fatal(err)
	}
	p["type"] = typ
	p["data"] = map[string]any{"claims": map[string]any{"given_name": secretClaim}, "selected_field_keys": []string{"given_name"}}
	data, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// deliver sends one signed copy of an event, as Kayle does, now.
func (qt *adminQueue) deliver(t *testing.T, eventID, typ string) served {
	t.Helper()
	return serve(qt.h, makeDelivery(t, queuePayload(t, eventID, typ), qt.clock.Now()), qt.next)
}

// enqueue delivers a new event and checks it was queued.
func (qt *adminQueue) enqueue(t *testing.T, eventID, typ string) {
	t.Helper()
	res := qt.deliver(t, eventID, typ)
	if res.Status != http.StatusAccepted || res.Rec.Header().Get(kayle.HeaderQueued) != "true" {
		t.Fatalf("%s: %d %q (%v), want 202 queued", eventID, res.Status, res.Rec.Body, res.Err)
	}
}

// record is the event's record as stored. (A queued record holds the
// event id, so loadRecord's check that none does is not made.)
func (qt *adminQueue) record(t *testing.T, eventID string) record {
	t.Helper()
	_, key, _ := qt.admin.d.eventKeys(eventID)
	data, err := qt.storage.Load(context.Background(), key)
	if err != nil {
		t.Fatalf("record of %s: %v", eventID, err)
	}
	var rec record
	if err := json.Unmarshal(data, &rec); err != nil {
		t.Fatalf("record of %s: %v", eventID, err)
	}
	return rec
}

// item is the event's record's queue item as stored; nil when the record is
// not a queued one.
func (qt *adminQueue) item(t *testing.T, eventID string) *queueItem {
	t.Helper()
	rec := qt.record(t, eventID)
	if !rec.isQueued() {
		return nil
	}
	return rec.Queue
}

// backendGot counts the requests the backend got for eventID from the i-th on.
func (qt *adminQueue) backendGot(eventID string, from int) int {
	n := 0
	for i := from; i < qt.backend.Calls(); i++ {
		if strings.Contains(string(qt.backend.Request(i).Body), `"`+eventID+`"`) {
			n++
		}
	}
	return n
}

func (qt *adminQueue) paused() bool {
	qt.q.mu.Lock()
	defer qt.q.mu.Unlock()
	return qt.q.paused
}

// waitUntil polls cond until it holds, failing after testWaitBound.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testWaitBound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// makeDeadAndQueued brings the queue to two dead events and one queued
// one, the way a failing backend does: dead, its first try failed (503);
// deadUntried, never tried (the queue was backing off); both past the
// horizon; queued, received after, its first try failed.
func (qt *adminQueue) makeDeadAndQueued(t *testing.T, dead, deadUntried, queued string) {
	t.Helper()
	qt.enqueue(t, dead, "verification.session.succeeded")
	waitUntil(t, "the first try of "+dead, func() bool {
		it := qt.item(t, dead)
		return it != nil && it.Attempts == 1
	})
	qt.clock.Advance(500 * time.Millisecond) // before the queue's 1 s wait ends
	qt.enqueue(t, deadUntried, "verification.session.failed")
	qt.clock.Advance(2 * time.Hour) // past the horizon: the next probes bury them
	waitUntil(t, "both events to die", func() bool {
		listing, err := qt.admin.listQueue(context.Background(), true)
		return err == nil && len(listing.Entries) == 2
	})
	qt.enqueue(t, queued, "verification.session.succeeded")
	waitUntil(t, "the first try of "+queued, func() bool {
		it := qt.item(t, queued)
		return it != nil && it.Attempts == 1
	})
	if got := qt.backend.Calls(); got != 2 {
		t.Fatalf("the backend got %d requests, want 2 (the first tries of %s and %s)", got, dead, queued)
	}
}

// failingLoad is a storage whose Load of one key fails.
type failingLoad struct {
	certmagic.Storage
	key string
}

func (f failingLoad) Load(ctx context.Context, key string) ([]byte, error) {
	if key == f.key {
		return nil, errInjected
	}
	return f.Storage.Load(ctx, key)
}

func ids(entries []queueEntry) []string {
	out := make([]string, len(entries))
	for i, e := range entries {
		out[i] = e.EventID
	}
	return out
}

// List, retry and drop, on every storage, against events queued and buried
// by a running gateway.
func TestQueueAdminListRetryDrop(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			ctx := context.Background()
			qt := newAdminQueue(t, sc.new(t))
			const a, b, c = "evt_qa_dead", "evt_qa_untried", "evt_qa_queued"
			qt.makeDeadAndQueued(t, a, b, c)
			start := testEpoch

			// list: the live ones; --dead: the dead ones, oldest first
			listing, err := qt.admin.listQueue(ctx, false)
			if err != nil {
				t.Fatal(err)
			}
			if got := ids(listing.Entries); !slices.Equal(got, []string{c}) || listing.Stale != 0 || listing.Unreadable != 0 {
				t.Fatalf("queued: %v (stale %d, unreadable %d), want [%s]", got, listing.Stale, listing.Unreadable, c)
			}
			e := listing.Entries[0]
			now := qt.clock.Now()
			if e.EventType != "verification.session.succeeded" || e.KID != demoKID || !e.ReceivedAt.Equal(now) ||
				e.Attempts != 1 || e.LastStatus != http.StatusServiceUnavailable || !e.NextTry.After(now) || e.Dead {
				t.Errorf("queued entry: %+v", e)
			}
			deadList, err := qt.admin.listQueue(ctx, true)
			if err != nil {
				t.Fatal(err)
			}
			if got := ids(deadList.Entries); !slices.Equal(got, []string{a, b}) {
				t.Fatalf("dead: %v, want [%s %s]", got, a, b)
			}
			da, db := deadList.Entries[0], deadList.Entries[1]
			if !da.Dead || da.Attempts != 1 || da.LastStatus != 503 || !da.ReceivedAt.Equal(start) || !da.NextTry.IsZero() {
				t.Errorf("dead entry %s: %+v", a, da)
			}
			if !db.Dead || db.Attempts != 0 || db.LastStatus != 0 || db.EventType != "verification.session.failed" {
				t.Errorf("dead entry %s: %+v", b, db)
			}
			if n, err := qt.admin.countDead(ctx); n != 2 || err != nil {
				t.Errorf("countDead = %d, %v", n, err)
			}

			// retry of a queued event: due now, its count kept
			change, err := qt.admin.retryEvent(ctx, c)
			if err != nil || change.Action != actionDue || change.Attempts != 1 {
				t.Fatalf("retry %s: %+v, %v", c, change, err)
			}
			if it := qt.item(t, c); it == nil || !it.NextTry.Equal(now) || it.Attempts != 1 || it.Dead ||
				!strings.HasPrefix(it.Marker, qt.admin.bucketKey(bucketOf(now))+"/") {
				t.Errorf("%s after retry: %+v", c, it)
			}

			// drop of a queued and of a dead event: out of the queue, and a
			// later copy is a duplicate
			for _, id := range []string{c, b} {
				old := qt.item(t, id).Marker
				change, err := qt.admin.dropEvent(ctx, id)
				if err != nil || change.Action != actionDropped || change.WasDead != (id == b) {
					t.Fatalf("drop %s: %+v, %v", id, change, err)
				}
				rec := qt.record(t, id)
				if rec.Queue != nil || !rec.Dropped || !rec.DeliveredAt.Equal(now) {
					t.Errorf("%s's record after drop: %+v", id, rec)
				}
				if _, err := qt.storage.Stat(ctx, old); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%s's marker %s is still there (%v)", id, old, err)
				}
				assertDuplicate(t, qt.deliver(t, id, "verification.session.succeeded"), id)
				if change, err := qt.admin.dropEvent(ctx, id); err != nil || change.Action != actionNotQueued || !change.Dropped {
					t.Errorf("drop %s again: %+v, %v", id, change, err)
				}
			}
			if listing, _ := qt.admin.listQueue(ctx, false); len(listing.Entries) != 0 || listing.Stale != 0 {
				t.Errorf("after the drops, queued: %v, stale markers %d", ids(listing.Entries), listing.Stale)
			}
			// forget deletes a dropped event's record: a copy is queued anew
			if found, err := qt.admin.d.forget(ctx, b); !found || err != nil {
				t.Errorf("forget of dropped %s: %v, %v", b, found, err)
			}
			if hasRecord(qt.admin.d, b) {
				t.Errorf("the record of %s is still there after forget", b)
			}
			qt.enqueue(t, b, "verification.session.failed")

			// unknown events are not queued, and nothing is written for them
			for _, op := range []func(context.Context, string) (queueChange, error){qt.admin.retryEvent, qt.admin.dropEvent} {
				change, err := op(ctx, "evt_qa_never")
				if err != nil || change.Action != actionNotQueued || !change.Delivered.IsZero() {
					t.Errorf("an unknown event: %+v, %v", change, err)
				}
			}
			if hasRecord(qt.admin.d, "evt_qa_never") {
				t.Error("a record was written for an unknown event")
			}

			// retry of a dead event: alive, counted anew, and the running
			// queue delivers it once the backend answers
			qt.status.Store(http.StatusOK)
			switched := qt.backend.Calls()
			change, err = qt.admin.retryEvent(ctx, a)
			if err != nil || change.Action != actionRevived || change.Attempts != 1 {
				t.Fatalf("retry %s: %+v, %v", a, change, err)
			}
			it := qt.item(t, a)
			if it == nil || it.Dead || it.Attempts != 0 || it.LastError != "" || !it.RetriedAt.Equal(now) || !it.NextTry.Equal(now) ||
				it.LastStatus != 503 || !strings.HasPrefix(it.Marker, qt.admin.bucketKey(bucketOf(now))+"/") {
				t.Fatalf("%s after retry: %+v", a, it)
			}
			if deadList, _ := qt.admin.listQueue(ctx, true); len(deadList.Entries) != 0 || deadList.Stale != 0 {
				t.Errorf("dead after the retry: %v (stale %d)", ids(deadList.Entries), deadList.Stale)
			}
			// (b, forgotten, came back as a new event)
			if listing, _ := qt.admin.listQueue(ctx, false); !slices.Equal(ids(listing.Entries), []string{a, b}) || !listing.Entries[0].NextTry.Equal(now) {
				t.Errorf("queued after the retry: %+v", listing.Entries)
			}
			qt.clock.Advance(3 * time.Second) // the queue's wait after c's failure
			waitUntil(t, "the retried event to be delivered", func() bool { return remembered(qt.admin.d, a) && remembered(qt.admin.d, b) })
			for _, id := range []string{a, b} {
				if got := qt.backendGot(id, switched); got != 1 {
					t.Errorf("after the retry the backend got %s %d times, want once", id, got)
				}
			}
			if change, err := qt.admin.retryEvent(ctx, a); err != nil || change.Action != actionNotQueued || change.Delivered.IsZero() || change.Dropped {
				t.Errorf("retry of delivered %s: %+v, %v", a, change, err)
			}
			waitUntil(t, "the delivered event's marker to go", func() bool {
				listing, err := qt.admin.listQueue(ctx, false)
				return err == nil && len(listing.Entries) == 0 && listing.Stale == 0
			})
			qt.admin.d.mu.Lock()
			if len(qt.admin.d.held) > 0 {
				t.Errorf("the operator's deduper still holds %v", qt.admin.d.held)
			}
			qt.admin.d.mu.Unlock()
		})
	}
}

// retry --dead revives every dead event, and only those.
func TestQueueAdminRetryDead(t *testing.T) {
	ctx := context.Background()
	qt := newAdminQueue(t, newMemStorage())
	const a, b, c = "evt_qd_dead", "evt_qd_untried", "evt_qd_queued"
	qt.makeDeadAndQueued(t, a, b, c)
	// a dead marker left behind by a failed delete: c's record names its
	// due marker
	if err := qt.admin.storeMarker(ctx, qt.admin.deadMarkerKey(hashHex(c))); err != nil {
		t.Fatal(err)
	}
	deadList, err := qt.admin.listQueue(ctx, true)
	if err != nil || !slices.Equal(ids(deadList.Entries), []string{a, b}) || deadList.Stale != 1 {
		t.Fatalf("dead, with a stale marker: %v, stale %d, %v", ids(deadList.Entries), deadList.Stale, err)
	}
	// a record the storage fails to read is counted, not skipped silently
	_, aKey, _ := qt.admin.d.eventKeys(a)
	failing := newQueueStore(newDeduper(failingLoad{qt.storage.Storage, aKey}, testPrefix, defaultDedupeWindow, zap.NewNop(), qt.clock.Now), zap.NewNop())
	deadList, err = failing.listQueue(ctx, true)
	if err != nil || !slices.Equal(ids(deadList.Entries), []string{b}) || deadList.Unreadable != 1 || !errors.Is(deadList.ReadErr, errInjected) {
		t.Fatalf("dead, with a record unreadable: %v, unreadable %d (%v), %v", ids(deadList.Entries), deadList.Unreadable, deadList.ReadErr, err)
	}

	var got []queueChange
	if err := qt.admin.retryDead(ctx, func(change queueChange, err error) {
		if err != nil {
			t.Errorf("%s: %v", change.EventID, err)
		}
		got = append(got, change)
	}); err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(got, func(x, y queueChange) int { return strings.Compare(x.EventID, y.EventID) })
	if len(got) != 3 || got[0].EventID != a || got[2].EventID != b || got[0].Action != actionRevived || got[2].Action != actionRevived ||
		got[1].EventID != c || got[1].Action != actionNotDead {
		t.Fatalf("retry --dead: %+v, want %s and %s revived, %s not dead", got, a, b, c)
	}
	if n, err := qt.admin.countDead(ctx); n != 0 || err != nil {
		t.Errorf("dead markers left: %d, %v", n, err)
	}
	listing, err := qt.admin.listQueue(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	if got := ids(listing.Entries); !slices.Equal(got, []string{a, b, c}) {
		t.Errorf("queued after retry --dead: %v", got)
	}
	if it := qt.item(t, c); it == nil || it.Attempts != 1 || !it.RetriedAt.IsZero() {
		t.Errorf("the queued event was changed: %+v", it)
	}
	// none left: nothing to do
	n := 0
	if err := qt.admin.retryDead(ctx, func(queueChange, error) { n++ }); err != nil || n != 0 {
		t.Errorf("retry --dead of an empty dead list: %d, %v", n, err)
	}
}

// A retry waits for a forward in flight, under the event's lock, and then
// finds it delivered: it never makes a delivered event due again.
func TestQueueAdminRetryWaitsForAForward(t *testing.T) {
	ctx := context.Background()
	qt := newAdminQueue(t, newMemStorage())
	inBackend, release := make(chan struct{}), make(chan struct{})
	qt.backend.Respond = func(_ int, w http.ResponseWriter, _ *http.Request) error {
		close(inBackend)
		<-release
		w.WriteHeader(http.StatusOK)
		return nil
	}
	qt.enqueue(t, "evt_qw", "verification.session.succeeded")
	waitFor(t, inBackend, "the first try")
	done := make(chan queueChange, 1)
	go func() {
		change, err := qt.admin.retryEvent(ctx, "evt_qw")
		if err != nil {
			t.Error(err)
		}
		done <- change
	}()
	select {
	case change := <-done:
		t.Fatalf("the retry ended (%+v) while the event was being forwarded", change)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if change := waitFor(t, done, "the retry"); change.Action != actionNotQueued || change.Delivered.IsZero() {
		t.Errorf("retry of an event delivered meanwhile: %+v", change)
	}
	if got := qt.backend.Calls(); got != 1 {
		t.Errorf("the backend got %d requests, want 1", got)
	}
}

// pause writes the flag every instance reads: while it stands a running
// queue forwards nothing (deliveries are still queued), and after resume
// it forwards what was queued.
func TestQueuePauseStopsForwards(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			ctx := context.Background()
			qt := newAdminQueue(t, sc.new(t))
			qt.status.Store(http.StatusOK)
			if changed, err := qt.admin.setPaused(ctx, true, "paused by the test"); !changed || err != nil {
				t.Fatalf("pause: %v, %v", changed, err)
			}
			data, err := qt.storage.Load(ctx, path.Join(testPrefix, "queue", "paused"))
			if err != nil || !strings.Contains(string(data), "paused by the test") {
				t.Fatalf("the pause flag: %q, %v", data, err)
			}
			if paused, note, err := qt.admin.pauseState(ctx); !paused || note != "paused by the test" || err != nil {
				t.Errorf("pauseState: %v %q %v", paused, note, err)
			}
			if changed, err := qt.admin.setPaused(ctx, true, "again"); changed || err != nil {
				t.Errorf("pause when paused: %v, %v", changed, err)
			}
			if _, note, _ := qt.admin.pauseState(ctx); note != "paused by the test" {
				t.Errorf("a second pause replaced the note: %q", note)
			}
			waitUntil(t, "the queue to read the flag", qt.paused)

			qt.enqueue(t, "evt_qp", "verification.session.succeeded")
			polls := qt.storage.calls.Load()
			waitUntil(t, "three polls", func() bool { return qt.storage.calls.Load() >= polls+3 })
			if n := qt.backend.Calls(); n != 0 {
				t.Fatalf("a paused queue forwarded %d events", n)
			}
			if it := qt.item(t, "evt_qp"); it == nil || it.Attempts != 0 {
				t.Fatalf("while paused: %+v", it)
			}

			if changed, err := qt.admin.setPaused(ctx, false, ""); !changed || err != nil {
				t.Fatalf("resume: %v, %v", changed, err)
			}
			if qt.storage.Exists(ctx, path.Join(testPrefix, "queue", "paused")) {
				t.Error("resume left the pause flag")
			}
			waitUntil(t, "the queued event to be delivered", func() bool { return remembered(qt.admin.d, "evt_qp") })
			if n := qt.backend.Calls(); n != 1 {
				t.Errorf("after resume the backend got %d requests, want 1", n)
			}
			if qt.paused() {
				t.Error("the queue still reads itself paused")
			}
			if changed, err := qt.admin.setPaused(ctx, false, ""); changed || err != nil {
				t.Errorf("resume when running: %v, %v", changed, err)
			}
		})
	}
}
