package kaylewebhook

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"path"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// fastLockTiming keeps the lock tests short while leaving the heartbeat a
// wide margin under the stale time (20 beats) on a loaded machine, where a
// goroutine can wait a long time for a core.
var fastLockTiming = lockTiming{
	staleAfter: 2 * time.Second,
	firstBeat:  100 * time.Millisecond,
	beatEvery:  100 * time.Millisecond,
	pollEvery:  50 * time.Millisecond,
	waitLimit:  10 * time.Second,
}

// newLockTestDeduper is a deduper on the real clock with fastLockTiming,
// and the log entries it writes.
func newLockTestDeduper(st *memStorage) (*deduper, *observer.ObservedLogs) {
	core, logs := observer.New(zapcore.InfoLevel)
	d := newDeduper(st, testPrefix, defaultDedupeWindow, zap.New(core), time.Now)
	d.timing = fastLockTiming
	return d, logs
}

func takeovers(logs *observer.ObservedLogs) int {
	return logs.FilterMessageSnippet("taking over an event").Len()
}

// writeLeaseAt writes the lease a holder would have written at `at`.
func writeLeaseAt(t *testing.T, st *memStorage, key, holder string, at time.Time) {
	t.Helper()
	data, err := json.Marshal(record{Version: recordVersion, Holder: holder, HeartbeatAt: at})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Store(context.Background(), key, data); err != nil {
		t.Fatal(err)
	}
}

// A holder that died (its lock kept alive by nobody's fault but the
// storage's, as certmagic's refresher does) is taken over once it has been
// silent for the stale time, whether it died before its first lease or
// after writing some.
func TestLockTakeOverFromDeadHolder(t *testing.T) {
	for _, tc := range []struct {
		name      string
		leaseAge  time.Duration // 0: no lease written
		wantDelay time.Duration // the least time the copy must wait
	}{
		{"died before its first lease", 0, fastLockTiming.staleAfter},
		// the lease's own time is not trusted (another clock): the copy
		// watches it unchanged for the stale time
		{"lease gone stale", 3 * fastLockTiming.staleAfter, fastLockTiming.staleAfter},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newMemStorage()
			d, logs := newLockTestDeduper(st)
			const id = "evt_dead_holder"
			_, key, lockName := d.eventKeys(id)
			if err := st.Lock(context.Background(), lockName); err != nil { // the dead instance's
				t.Fatal(err)
			}
			if tc.leaseAge > 0 {
				writeLeaseAt(t, st, key, "dead", time.Now().Add(-tc.leaseAge))
			}
			backend := &testBackend{}
			began := time.Now()
			assertForwardedOK(t, deliverEvent(d, id, backend))
			if waited := time.Since(began); waited < tc.wantDelay {
				t.Errorf("took the lock over after %s; a holder silent for less than %s is not dead", waited, tc.wantDelay)
			}
			if backend.Calls() != 1 || !remembered(d, id) {
				t.Errorf("backend calls %d, remembered %v; want 1 and true", backend.Calls(), remembered(d, id))
			}
			if takeovers(logs) != 1 {
				t.Errorf("%d takeovers logged, want 1", takeovers(logs))
			}
			assertLocksLeft(t, d, lockName) // the dead instance's: not ours to release
			assertDuplicate(t, deliverEvent(d, id, backend), id)
		})
	}
}

// A holder that keeps its lease fresh is never taken over, however long it
// forwards; the waiting copy then finds the event delivered. Silence is
// measured on the waiter's own clock, so this holds too when the waiter's
// clock runs ahead of the holder's by more than the stale time.
func TestLockLiveHolderIsNotTakenOver(t *testing.T) {
	for _, tc := range []struct {
		name        string
		waiterAhead time.Duration
	}{
		{"one clock", 0},
		{"waiter's clock ahead", 3 * fastLockTiming.staleAfter},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newMemStorage()
			here, logs := newLockTestDeduper(st)
			here.now = func() time.Time { return time.Now().Add(tc.waiterAhead) }
			there, _ := newLockTestDeduper(st)
			const id = "evt_live_holder"
			_, key, lockName := there.eventKeys(id)

			// the other instance holds the event and forwards it slowly
			held, _, err := there.acquire(context.Background(), lockName, key, id)
			if err != nil {
				t.Fatal(err)
			}
			held.heartbeat(there.timing.firstBeat)
			backend := &testBackend{}
			done := make(chan served)
			go func() { done <- deliverEvent(here, id, backend) }()
			time.Sleep(2 * fastLockTiming.staleAfter)
			if takeovers(logs) != 0 || backend.Calls() != 0 {
				t.Fatalf("a live holder was taken over (takeovers %d, forwards %d)", takeovers(logs), backend.Calls())
			}
			held.settle()
			there.remember(context.Background(), held, id, http.StatusOK)
			held.release()
			assertDuplicate(t, waitFor(t, done, "the waiting copy"), id)
			if backend.Calls() != 0 {
				t.Errorf("backend called %d times, want 0", backend.Calls())
			}
			assertNoLocks(t, here)
		})
	}
}

// A copy does not wait without bound behind a live holder: it answers 503
// (Kayle retries), and the holder keeps its lock.
func TestLockWaitIsBounded(t *testing.T) {
	st := newMemStorage()
	here, _ := newLockTestDeduper(st)
	here.timing.waitLimit = 2 * fastLockTiming.staleAfter
	there, _ := newLockTestDeduper(st)
	const id = "evt_slow_holder"
	_, key, lockName := there.eventKeys(id)
	held, _, err := there.acquire(context.Background(), lockName, key, id)
	if err != nil {
		t.Fatal(err)
	}
	held.heartbeat(there.timing.firstBeat)
	defer func() { held.settle(); held.release() }()
	busy := counterValue(t, requestsTotal.WithLabelValues("lock_busy"))

	backend := &testBackend{}
	res := deliverEvent(here, id, backend)
	if res.Status != http.StatusServiceUnavailable || backend.Calls() != 0 {
		t.Errorf("copy behind a live holder: status %d, %d forwards; want 503 and none", res.Status, backend.Calls())
	}
	if got := counterValue(t, requestsTotal.WithLabelValues("lock_busy")); got != busy+1 {
		t.Errorf("lock_busy counted %v times, want 1", got-busy)
	}
	if held := st.heldLocks(); !slices.Equal(held, []string{lockName}) {
		t.Errorf("held locks = %v, want the live holder's %s", held, lockName)
	}
}

// A holder that stalled past the stale time and was taken over must not,
// when it wakes, release the lock of the instance that took over: storage
// Unlock checks no owner. Its own lease proves whose the lock is.
func TestLockStalledHolderKeepsOffTheNewHoldersLock(t *testing.T) {
	st := newMemStorage()
	here, _ := newLockTestDeduper(st)
	stalled, stalledLogs := newLockTestDeduper(st)
	const id = "evt_stalled_holder"
	_, key, lockName := stalled.eventKeys(id)
	old, _, err := stalled.acquire(context.Background(), lockName, key, id)
	if err != nil {
		t.Fatal(err)
	}
	// no heartbeat: the holder is stuck (a long pause, a hung storage call)

	inBackend, finish := make(chan struct{}), make(chan struct{})
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		close(inBackend)
		<-finish
		_, err := w.Write([]byte("ok"))
		return err
	}}
	done := make(chan served)
	go func() { done <- deliverEvent(here, id, backend) }()
	waitFor(t, inBackend, "the copy to take over and forward")
	waitForLease(t, st, key) // the new holder's

	old.settle() // the stalled holder wakes up and finishes
	old.release()
	if !old.lost.Load() {
		t.Error("the stalled holder did not notice it lost the lock")
	}
	// the new holder's takeover lock, and the stalled holder's own lock,
	// which it leaves: a lock of its that lapsed may be another's by now
	takeoverLock := takeoverLockName(lockName, nil)
	if held := st.heldLocks(); !slices.Equal(held, []string{lockName, takeoverLock}) {
		close(finish)
		t.Fatalf("after the stalled holder released: held locks = %v, want %s and the new holder's %s", held, lockName, takeoverLock)
	}
	if stalledLogs.Len() != 0 {
		t.Logf("stalled holder logged: %v", stalledLogs.All())
	}
	close(finish)
	assertForwardedOK(t, waitFor(t, done, "the new holder"))
	assertLocksLeft(t, here, lockName)
	assertLocksLeft(t, stalled, lockName)
}

// A holder that finds its lease replaced while it forwards stops renewing
// it and leaves the lock to the new holder.
func TestLockHeartbeatNoticesATakeover(t *testing.T) {
	st := newMemStorage()
	d, logs := newLockTestDeduper(st)
	const id = "evt_heartbeat_lost"
	_, key, lockName := d.eventKeys(id)
	held, _, err := d.acquire(context.Background(), lockName, key, id)
	if err != nil {
		t.Fatal(err)
	}
	held.heartbeat(d.timing.firstBeat)
	waitForLease(t, st, key)
	writeLeaseAt(t, st, key, "someone_else", time.Now())
	deadline := time.Now().Add(testWaitBound)
	for !held.lost.Load() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	held.settle()
	held.release()
	if !held.lost.Load() || logs.FilterMessageSnippet("another instance took over").Len() != 1 {
		t.Fatalf("lost = %v; the loss was not noticed and logged", held.lost.Load())
	}
	if got := st.heldLocks(); !slices.Equal(got, []string{lockName}) {
		t.Errorf("held locks = %v; the lock was released from under the new holder", got)
	}
	var rec record
	data, _ := st.Load(context.Background(), key)
	if err := json.Unmarshal(data, &rec); err != nil || rec.Holder != "someone_else" {
		t.Errorf("lease = %s (%v); the old holder overwrote the new holder's lease", data, err)
	}
}

// A copy that waits behind a holder which already wrote the delivered record
// answers as a duplicate without waiting for the lock.
func TestLockWaiterSeesDeliveredRecord(t *testing.T) {
	st := newMemStorage()
	d, _ := newLockTestDeduper(st)
	d.timing.waitLimit = time.Minute
	const id = "evt_delivered_while_held"
	hash, key, lockName := d.eventKeys(id)
	if err := st.Lock(context.Background(), lockName); err != nil {
		t.Fatal(err)
	}
	defer st.Unlock(context.Background(), lockName)
	if err := d.commit(context.Background(), key, record{EventSHA256: hash}, http.StatusOK); err != nil {
		t.Fatal(err)
	}
	backend := &testBackend{}
	assertDuplicate(t, deliverEvent(d, id, backend), id)
	if backend.Calls() != 0 {
		t.Errorf("backend called %d times, want 0", backend.Calls())
	}
}

// waitForLease waits until a holder's lease is written at key.
func waitForLease(t *testing.T, st *memStorage, key string) {
	t.Helper()
	for deadline := time.Now().Add(testWaitBound); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		var rec record
		if data, err := st.Load(context.Background(), key); err == nil && json.Unmarshal(data, &rec) == nil && rec.Holder != "" {
			return
		}
	}
	t.Fatal("no lease written")
}

// A failed forward leaves a sign of life, not a delivered record: copies
// waiting then measure silence from it, and the next holder forwards.
func TestLockFailedForwardLeavesALease(t *testing.T) {
	st := newMemStorage()
	d, _ := newLockTestDeduper(st)
	const id = "evt_failed_lease"
	_, key, _ := d.eventKeys(id)
	res := deliverEvent(d, id, &testBackend{Respond: respondStatus(http.StatusBadGateway)})
	if res.Status != http.StatusBadGateway {
		t.Fatalf("status %d, want the backend's 502", res.Status)
	}
	var rec record
	data, err := st.Load(context.Background(), key)
	if err != nil || json.Unmarshal(data, &rec) != nil {
		t.Fatalf("no lease after a failed forward: %v", err)
	}
	if !rec.DeliveredAt.IsZero() || rec.Holder == "" || rec.HeartbeatAt.IsZero() || !rec.Released {
		t.Errorf("record after a failed forward = %+v; want a released lease, not a delivery", rec)
	}
	assertNoLocks(t, d)
	// the holder let go: the next copy does not wait for its lease's silence
	began := time.Now()
	assertForwardedOK(t, deliverEvent(d, id, &testBackend{}))
	if waited := time.Since(began); waited >= fastLockTiming.staleAfter {
		t.Errorf("the next copy waited %s after a released lease", waited)
	}
}

// The sweep lock is covered too: a sweeper that died holding it is taken
// over and the sweep runs.
func TestSweepTakesOverADeadSweepersLock(t *testing.T) {
	st := newMemStorage()
	now := time.Now()
	d, logs := newLockTestDeduper(st)
	fixture := newSweepFixture(t, st, now)
	lockName := "kayle_webhook_sweep_" + hashHex(d.prefix)[:32]
	if err := st.Lock(context.Background(), lockName); err != nil {
		t.Fatal(err)
	}
	writeLeaseAt(t, st, path.Join(testPrefix, sweepLeaseName), "dead", now.Add(-time.Hour))
	if err := d.sweep(context.Background()); err != nil {
		t.Fatal(err)
	}
	if takeovers(logs) != 1 {
		t.Errorf("%d takeovers logged, want 1", takeovers(logs))
	}
	fixture.assertSwept(t, d)
	if held := st.heldLocks(); !slices.Equal(held, []string{lockName}) {
		t.Errorf("locks held after the sweep: %v, want only the dead sweeper's", held)
	}
}

// A sweep behind a live sweeper gives up without an error.
func TestSweepLeavesALiveSweeperAlone(t *testing.T) {
	st := newMemStorage()
	d, logs := newLockTestDeduper(st)
	other, _ := newLockTestDeduper(st)
	lockName := "kayle_webhook_sweep_" + hashHex(d.prefix)[:32]
	held, _, err := other.acquire(context.Background(), lockName, path.Join(testPrefix, sweepLeaseName), "sweep")
	if err != nil {
		t.Fatal(err)
	}
	if err := held.writeLease(context.Background()); err != nil {
		t.Fatal(err)
	}
	held.heartbeat(other.timing.beatEvery)
	defer func() { held.settle(); held.release() }()
	if err := d.sweep(context.Background()); err != nil {
		t.Errorf("sweep behind a live sweeper: %v", err)
	}
	if takeovers(logs) != 0 || st.callCount("List") != 0 {
		t.Errorf("took over a live sweeper (takeovers %d, lists %d)", takeovers(logs), st.callCount("List"))
	}
}

// The handler answers 503, never waits forever, when the storage's Lock
// fails outright.
func TestLockStorageFailure(t *testing.T) {
	st := newMemStorage()
	d, _ := newLockTestDeduper(st)
	st.fail("Lock", errInjected)
	res := deliverEvent(d, "evt_lock_fails", &testBackend{})
	if he, ok := errors.AsType[caddyhttp.HandlerError](res.Err); !ok || he.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("got %v, want a 503", res.Err)
	}
}

// A copy that took a silent holder's lock over writes its lease before it
// forwards: other waiters then see a change instead of the same silence,
// and do not take it for the dead holder.
func TestLockTakerWritesItsLeaseAtOnce(t *testing.T) {
	st := newMemStorage()
	d, _ := newLockTestDeduper(st)
	d.timing.firstBeat = time.Hour // only the immediate write can be seen
	const id = "evt_taker_lease"
	_, key, lockName := d.eventKeys(id)
	if err := st.Lock(context.Background(), lockName); err != nil { // died before its first lease
		t.Fatal(err)
	}
	var holderAtForward string
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		var rec record
		if data, err := st.Load(context.Background(), key); err == nil && json.Unmarshal(data, &rec) == nil {
			holderAtForward = rec.Holder
		}
		_, err := w.Write([]byte("ok"))
		return err
	}}
	assertForwardedOK(t, deliverEvent(d, id, backend))
	if holderAtForward == "" {
		t.Error("the copy that took the lock over forwarded before writing its lease")
	}
	assertLocksLeft(t, d, lockName)
}

// A holder checks its lease before it releases, however briefly it held the
// lock: a waiter may have watched the record for the stale time before this
// holder came, and taken its lock over within its first second.
func TestLockBriefHolderChecksItsLease(t *testing.T) {
	st := newMemStorage()
	d, _ := newLockTestDeduper(st)
	const id = "evt_brief_holder"
	_, key, lockName := d.eventKeys(id)
	held, _, err := d.acquire(context.Background(), lockName, key, id)
	if err != nil {
		t.Fatal(err)
	}
	writeLeaseAt(t, st, key, "the_taker", time.Now()) // taken over at once
	held.settle()
	held.release()
	if !held.lost.Load() {
		t.Error("a brief holder did not notice it had been taken over")
	}
	if got := st.heldLocks(); !slices.Equal(got, []string{lockName}) {
		t.Errorf("held locks = %v; the brief holder released the taker's lock", got)
	}
}

// ctxBoundStorage is a memStorage whose locks live only as long as the
// context of the Lock call that took them, as pglock's and DynamoDB's
// renewals do: a lock whose context ends lapses.
type ctxBoundStorage struct{ *memStorage }

func (s ctxBoundStorage) Lock(ctx context.Context, name string) error {
	if err := s.memStorage.Lock(ctx, name); err != nil {
		return err
	}
	ch := s.lockChan(name)
	go func() {
		<-ctx.Done()
		select { // lapse, unless already released
		case <-ch:
		default:
		}
	}()
	return nil
}

// A storage lock renewed only while its Lock call's context lives stays
// held for the whole forward: the gateway's Lock context lives as long as
// the hold, and ends only after the release.
func TestLockContextLivesAsLongAsTheHold(t *testing.T) {
	st := ctxBoundStorage{newMemStorage()}
	d, _ := newLockTestDeduper(st.memStorage)
	d.storage = st
	const id = "evt_ctx_bound"
	_, _, lockName := d.eventKeys(id)
	var heldDuringForward []string
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		time.Sleep(3 * fastLockTiming.pollEvery) // a lapse would show by now
		heldDuringForward = st.heldLocks()
		_, err := w.Write([]byte("ok"))
		return err
	}}
	assertForwardedOK(t, deliverEvent(d, id, backend))
	if !slices.Equal(heldDuringForward, []string{lockName}) {
		t.Errorf("storage locks held during the forward: %v, want the event's %s", heldDuringForward, lockName)
	}
	assertNoLocks(t, d)
}

// A copy that wins the storage lock while another holder's lease is alive
// (the storage lock lapsed under it: a TTL, a stall) waits as if it had
// not won, and then finds the event delivered.
func TestLockLiveLeaseDecidesOverAWonStorageLock(t *testing.T) {
	st := newMemStorage()
	here, logs := newLockTestDeduper(st)
	const id = "evt_lapsed_lock"
	there, held, lockName := holdWithLease(t, st, id)
	// the holder's storage lock lapses while it forwards
	if err := st.Unlock(context.Background(), lockName); err != nil {
		t.Fatal(err)
	}
	backend := &testBackend{}
	done := make(chan served, 1)
	go func() { done <- deliverEvent(here, id, backend) }()
	time.Sleep(2 * fastLockTiming.staleAfter)
	if backend.Calls() != 0 || takeovers(logs) != 0 {
		t.Fatalf("a copy that won a lapsed storage lock forwarded beside a live holder (forwards %d, takeovers %d)", backend.Calls(), takeovers(logs))
	}
	held.settle()
	there.remember(context.Background(), held, id, http.StatusOK)
	held.release()
	assertDuplicate(t, waitFor(t, done, "the waiting copy"), id)
	if backend.Calls() != 0 {
		t.Errorf("backend called %d times, want 0", backend.Calls())
	}
}

// holdWithLease has another instance hold event id and keep its lease
// fresh, as a live holder forwarding it slowly does.
func holdWithLease(t *testing.T, st *memStorage, id string) (there *deduper, held *heldLock, lockName string) {
	t.Helper()
	there, _ = newLockTestDeduper(st)
	_, key, lockName := there.eventKeys(id)
	held, _, err := there.acquire(context.Background(), lockName, key, id)
	if err != nil {
		t.Fatal(err)
	}
	if err := held.writeLease(context.Background()); err != nil {
		t.Fatal(err)
	}
	held.heartbeat(there.timing.beatEvery)
	return there, held, lockName
}

// While the storage stalls, a holder cannot renew its lease: the time a
// waiter's reads were stalled is no evidence of the holder's death, so a
// stall longer than the stale time takes no live holder over.
func TestLockStorageStallIsNotSilence(t *testing.T) {
	st := newMemStorage()
	here, logs := newLockTestDeduper(st)
	const id = "evt_storage_stall"
	there, held, _ := holdWithLease(t, st, id)
	var stalled atomic.Bool
	stallOver := make(chan struct{})
	st.hook = func(method, _ string) {
		if (method == "Load" || method == "Store") && stalled.Load() {
			<-stallOver
		}
	}
	backend := &testBackend{}
	done := make(chan served, 1)
	go func() { done <- deliverEvent(here, id, backend) }()
	time.Sleep(3 * fastLockTiming.pollEvery) // the copy is watching the lease
	stalled.Store(true)
	time.Sleep(fastLockTiming.staleAfter + time.Second)
	stalled.Store(false)
	close(stallOver)
	time.Sleep(fastLockTiming.staleAfter / 2) // less than a stale time after the stall
	if backend.Calls() != 0 || takeovers(logs) != 0 {
		t.Errorf("a storage stall was taken for the holder's death (forwards %d, takeovers %d)", backend.Calls(), takeovers(logs))
	}
	held.settle()
	there.remember(context.Background(), held, id, http.StatusOK)
	held.release()
	assertDuplicate(t, waitFor(t, done, "the waiting copy"), id)
}

// Waiters of one silent lease take it over through one lock: exactly one
// of them forwards, the others find the event delivered.
func TestLockOneOfManyWaitersTakesOver(t *testing.T) {
	st := newMemStorage()
	const id = "evt_many_waiters"
	probe, _ := newLockTestDeduper(st)
	_, _, lockName := probe.eventKeys(id)
	if err := st.Lock(context.Background(), lockName); err != nil { // the dead holder's
		t.Fatal(err)
	}
	backend := &testBackend{}
	results := make(chan served, 4)
	for range 4 { // four instances, each with one copy
		d, _ := newLockTestDeduper(st)
		d.timing.waitLimit = 4 * fastLockTiming.staleAfter
		go func() { results <- deliverEvent(d, id, backend) }()
	}
	forwarded := 0
	for range 4 {
		res := waitFor(t, results, "a copy")
		if res.Rec.Header().Get(kayle.HeaderDuplicate) == "" {
			assertForwardedOK(t, res)
			forwarded++
		}
	}
	if forwarded != 1 || backend.Calls() != 1 {
		t.Errorf("%d copies forwarded, backend called %d times; want 1 and 1", forwarded, backend.Calls())
	}
}

// The production timing never takes over a holder that is alive: a copy
// behind a holder that forwards for several seconds (heartbeating as in
// production) waits, then answers duplicate. Every other lock test runs on
// fastLockTiming, so this one guards the constants themselves.
func TestProductionLockTimingWaitsOutALiveHolder(t *testing.T) {
	t.Parallel()
	st := newMemStorage()
	here, logs := newLockTestDeduper(st)
	here.timing = defaultLockTiming
	there, _ := newLockTestDeduper(st)
	there.timing = defaultLockTiming
	const id = "evt_live_production_holder"
	hash, key, lockName := there.eventKeys(id)
	held, _, err := there.acquire(context.Background(), lockName, key, id)
	if err != nil {
		t.Fatal(err)
	}
	held.lease.EventSHA256 = hash
	held.heartbeat(there.timing.firstBeat)
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(2*leaseBeatEvery - leaseFirstBeat) // past two heartbeats
		held.settle()
		there.remember(context.Background(), held, id, http.StatusOK)
		held.release()
	}()
	backend := &testBackend{}
	res := deliverEvent(here, id, backend)
	<-done
	if backend.Calls() != 0 || takeovers(logs) != 0 {
		t.Fatalf("a live holder was taken over: %d forwards, %d takeovers", backend.Calls(), takeovers(logs))
	}
	assertDuplicate(t, res, id)
}

// The production constants keep a live holder's lease fresh with margin: a
// holder renews several times within the silence that counts as death, and
// a waiter looks often enough to see it, and waits long enough to outwait it.
func TestProductionLockTimingHasMargin(t *testing.T) {
	d := defaultLockTiming
	if d.firstBeat >= d.beatEvery || 3*d.beatEvery > d.staleAfter {
		t.Errorf("first beat %s, every %s, stale after %s: a holder must renew at least three times before it counts as silent", d.firstBeat, d.beatEvery, d.staleAfter)
	}
	if 2*d.pollEvery > d.beatEvery {
		t.Errorf("poll every %s, beat every %s: a waiter would miss heartbeats", d.pollEvery, d.beatEvery)
	}
	if d.waitLimit < 2*d.staleAfter {
		t.Errorf("wait limit %s, stale after %s: a copy must be able to outwait a dead holder", d.waitLimit, d.staleAfter)
	}
}
