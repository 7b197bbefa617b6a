package kaylewebhook

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2"
)

// switchableBackend fails with failStatus (and Retry-After, when set) until
// up is set, counting the requests in flight at once.
type switchableBackend struct {
	testBackend
	up          atomic.Bool
	failStatus  int
	retryAfter  string
	inFlight    atomic.Int32
	maxInFlight atomic.Int32
	mu          sync.Mutex
	times       []time.Time
}

func newSwitchableBackend(failStatus int) *switchableBackend {
	b := &switchableBackend{failStatus: failStatus}
	b.Respond = func(_ int, w http.ResponseWriter, _ *http.Request) error {
		n := b.inFlight.Add(1)
		defer b.inFlight.Add(-1)
		for {
			m := b.maxInFlight.Load()
			if n <= m || b.maxInFlight.CompareAndSwap(m, n) {
				break
			}
		}
		b.mu.Lock()
		b.times = append(b.times, time.Now())
		b.mu.Unlock()
		time.Sleep(5 * time.Millisecond) // long enough to overlap, were they concurrent
		if b.up.Load() {
			_, err := w.Write([]byte("ok"))
			return err
		}
		if b.retryAfter != "" {
			w.Header().Set("Retry-After", b.retryAfter)
		}
		w.WriteHeader(b.failStatus)
		return nil
	}
	return b
}

func (b *switchableBackend) tryTimes() []time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]time.Time(nil), b.times...)
}

func TestQueueBacksOffAsAWholeAndRecovers(t *testing.T) {
	t.Parallel()
	backend := newSwitchableBackend(http.StatusBadGateway)
	qt := newQueueTest(t, &backend.testBackend)
	const events = 6
	id := func(i int) string { return "evt_bo" + string(rune('a'+i)) }
	// the first event's first try finds the backend down
	qt.deliver(t, id(0))
	qt.waitTried(t, id(0))
	for i := 1; i < events; i++ {
		if res := qt.deliver(t, id(i)); res.Status != http.StatusAccepted {
			t.Fatalf("delivery %d: %d", i, res.Status)
		}
	}
	backend.maxInFlight.Store(0)
	tries := backend.Calls()
	time.Sleep(1500 * time.Millisecond)
	tries = backend.Calls() - tries
	// one retry stream per event, every max_backoff (200 ms), would be ~45
	// tries by now; the whole queue backing off probes one at a time
	if tries > 12 {
		t.Errorf("%d tries in 1.5 s of outage for %d events; the queue does not back off as a whole", tries, events)
	}
	if m := backend.maxInFlight.Load(); m > 1 {
		t.Errorf("%d forwards at once while the backend failed; a backing-off queue sends one probe at a time", m)
	}
	prefix := qt.h.dedupe.prefix
	eventually(t, "the depth gauge counts the queued events", func() bool {
		return gaugeValue(t, queueDepth.WithLabelValues(prefix)) == events &&
			gaugeValue(t, queueOldestAge.WithLabelValues(prefix)) > 0
	})
	if n := counterValue(t, queueForwardsTotal.WithLabelValues(prefix, "502")); n < 1 {
		t.Errorf("queue_forwards_total{status=502} = %v while the backend fails", n)
	}
	okBefore := counterValue(t, queueForwardsTotal.WithLabelValues(prefix, "200"))
	var backoff float64
	eventually(t, "the backoff gauge shows the wait", func() bool {
		backoff = gaugeValue(t, queueBackoffSeconds.WithLabelValues(qt.h.dedupe.prefix))
		return backoff > 0
	})

	backend.up.Store(true)
	eventually(t, "every event reached the backend", func() bool {
		for i := range events {
			if !remembered(qt.h.dedupe, id(i)) {
				return false
			}
		}
		return true
	})
	// each delivered event is forwarded once after the backend came back
	delivered := backend.Calls()
	time.Sleep(200 * time.Millisecond)
	if backend.Calls() != delivered {
		t.Errorf("forwards went on after every event was delivered: %d, then %d", delivered, backend.Calls())
	}
	eventually(t, "no marker is left", func() bool { return len(qt.markers(t)) == 0 })
	if n := counterValue(t, queueForwardsTotal.WithLabelValues(prefix, "200")) - okBefore; n != events {
		t.Errorf("queue_forwards_total{status=200} rose by %v, want %d", n, events)
	}
	eventually(t, "the depth gauge is back to 0", func() bool { return gaugeValue(t, queueDepth.WithLabelValues(prefix)) == 0 })
	if g := gaugeValue(t, queueBackoffSeconds.WithLabelValues(qt.h.dedupe.prefix)); g != 0 {
		t.Errorf("backoff gauge %v after recovery, want 0", g)
	}
}

func TestQueueHonoursRetryAfter(t *testing.T) {
	t.Parallel()
	backend := newSwitchableBackend(http.StatusTooManyRequests)
	backend.retryAfter = "2"
	qt := newQueueTest(t, &backend.testBackend)
	if res := qt.deliver(t, "evt_ra"); res.Status != http.StatusAccepted {
		t.Fatalf("%d", res.Status)
	}
	qt.waitTried(t, "evt_ra")
	backend.up.Store(true)
	eventually(t, "the event is delivered", func() bool { return remembered(qt.h.dedupe, "evt_ra") })
	times := backend.tryTimes()
	if len(times) != 2 {
		t.Fatalf("%d tries, want 2", len(times))
	}
	// max_backoff is 200 ms; the backend asked for 2 s
	if gap := times[1].Sub(times[0]); gap < 1900*time.Millisecond {
		t.Errorf("retried %s after a 429 with Retry-After: 2", gap)
	}
}

func TestQueueRefusalOfOneEventDoesNotStopTheQueue(t *testing.T) {
	t.Parallel()
	backend := &testBackend{}
	backend.Respond = func(_ int, w http.ResponseWriter, r *http.Request) error {
		if r.Header.Get(kayle.HeaderEventID) == "evt_poison" {
			w.WriteHeader(http.StatusBadRequest)
			return nil
		}
		_, err := w.Write([]byte("ok"))
		return err
	}
	qt := newQueueTest(t, backend)
	qt.deliver(t, "evt_poison")
	eventually(t, "the poison event was tried", func() bool { return callsFor(backend, "evt_poison") >= 1 })
	for _, id := range []string{"evt_fine1", "evt_fine2"} {
		qt.deliver(t, id)
	}
	eventually(t, "the other events are delivered", func() bool {
		return remembered(qt.h.dedupe, "evt_fine1") && remembered(qt.h.dedupe, "evt_fine2")
	})
	eventually(t, "the poison event is tried again", func() bool { return callsFor(backend, "evt_poison") >= 2 })
	rec, _ := qt.record(t, "evt_poison")
	if rec.Queue == nil || rec.Queue.LastStatus != http.StatusBadRequest || rec.Queue.Attempts < 1 {
		t.Errorf("poison event's record: %+v", rec.Queue)
	}
}

func TestQueueEventPastHorizonIsDead(t *testing.T) {
	t.Parallel()
	backend := newSwitchableBackend(http.StatusServiceUnavailable)
	qt := newQueueTest(t, &backend.testBackend, func(h *Handler) { h.Queue.Horizon = caddy.Duration(500 * time.Millisecond) })
	qt.deliver(t, "evt_dead")
	eventually(t, "the event is dead", func() bool {
		rec, _ := qt.record(t, "evt_dead")
		return rec.Queue != nil && rec.Queue.Dead
	})
	markers := qt.markers(t)
	if len(markers) != 1 || !strings.Contains(markers[0], "/queue/dead/") {
		t.Errorf("markers %v, want the one dead marker", markers)
	}
	tries := backend.Calls()
	backend.up.Store(true)
	time.Sleep(300 * time.Millisecond) // many polls
	if backend.Calls() != tries {
		t.Errorf("a dead event was tried again by itself")
	}
	// kept: a copy from Kayle is a duplicate, not a new event
	assertDuplicate(t, qt.deliver(t, "evt_dead"), "evt_dead")
	eventually(t, "the dead gauge counts it", func() bool {
		return gaugeValue(t, queueDead.WithLabelValues(qt.h.dedupe.prefix)) == 1
	})
}

func TestQueueSignsEachForwardAsItLeaves(t *testing.T) {
	t.Parallel()
	secret := "whsec_" + strings.Repeat("A", 43) + "="
	key, err := standardwebhooks.ParseSecret(secret)
	if err != nil {
		t.Fatal(err)
	}
	backend := newSwitchableBackend(http.StatusServiceUnavailable)
	qt := newQueueTest(t, &backend.testBackend, func(h *Handler) {
		h.ForwardSignatureSecrets = []string{secret}
		h.Queue.MaxBackoff = caddy.Duration(1100 * time.Millisecond)
	})
	qt.deliver(t, "evt_sig")
	qt.waitTried(t, "evt_sig")
	backend.up.Store(true)
	eventually(t, "delivered", func() bool { return remembered(qt.h.dedupe, "evt_sig") })
	if backend.Calls() != 2 {
		t.Fatalf("%d tries, want 2", backend.Calls())
	}
	times := backend.tryTimes()
	for i := range backend.Calls() {
		req := backend.Request(i)
		if got := req.Header.Get("webhook-id"); got != "evt_sig" {
			t.Errorf("try %d: webhook-id %q", i, got)
		}
		ts := req.Header.Get("webhook-timestamp")
		want := standardwebhooks.Signature([][]byte{key}, "evt_sig", ts, req.Body)
		if got := req.Header.Get("webhook-signature"); got != want {
			t.Errorf("try %d: webhook-signature %q, want %q", i, got, want)
		}
		if sent := time.Unix(mustAtoi(t, ts), 0); times[i].Sub(sent) > 2*time.Second || sent.Sub(times[i]) > time.Second {
			t.Errorf("try %d at %s carries webhook-timestamp %s: not the time it left", i, times[i], sent)
		}
	}
}

func TestQueueNeverForwardsATamperedRecord(t *testing.T) {
	t.Parallel()
	backend := newSwitchableBackend(http.StatusServiceUnavailable)
	root := t.TempDir()
	first := newQueueTestAt(t, root, &backend.testBackend)
	first.deliverUntilTried(t, "evt_victim")
	_ = first.h.Cleanup() // its queue stops

	// Someone with write access to the storage, without the signing secret,
	// swaps in another event's JWE (encrypted to the gateway's public key).
	_, recordKey, _ := first.h.dedupe.eventKeys("evt_victim")
	ctx := context.Background()
	swap := func(change func(*queueItem)) {
		data, err := first.h.dedupe.storage.Load(ctx, recordKey)
		if err != nil {
			t.Fatal(err)
		}
		var rec record
		if err := json.Unmarshal(data, &rec); err != nil {
			t.Fatal(err)
		}
		change(rec.Queue)
		rec.Queue.NextTry = time.Now()
		data, _ = json.Marshal(rec)
		if err := first.h.dedupe.storage.Store(ctx, recordKey, data); err != nil {
			t.Fatal(err)
		}
	}
	forgedBody, _ := signDelivery(t, eventPayload("evt_injected"), time.Now())
	swap(func(it *queueItem) { it.JWE = string(forgedBody) })

	backend.up.Store(true)
	second := newQueueTestAt(t, root, &backend.testBackend)
	eventually(t, "the record says why it is not forwarded", func() bool {
		rec, _ := second.record(t, "evt_victim")
		return rec.Queue != nil && strings.Contains(rec.Queue.LastError, "signing_secret")
	})
	// A genuine delivery of another event (its own valid signature) put in
	// this event's record is not this event: dead, never forwarded.
	body, sig := signDelivery(t, eventPayload("evt_injected"), time.Now())
	_ = second.h.Cleanup()
	swap(func(it *queueItem) { it.JWE, it.Signature, it.LastError = string(body), sig, "" })
	third := newQueueTestAt(t, root, &backend.testBackend)
	eventually(t, "the swapped record is dead", func() bool {
		rec, _ := third.record(t, "evt_victim")
		return rec.Queue != nil && rec.Queue.Dead
	})
	if n := callsFor(&backend.testBackend, "evt_injected"); n != 0 {
		t.Errorf("the injected event was forwarded %d times", n)
	}
}

func TestQueuedEventWhoseKeyIsGoneWaitsAndSaysSo(t *testing.T) {
	t.Parallel()
	backend := newSwitchableBackend(http.StatusServiceUnavailable)
	root := t.TempDir()
	first := newQueueTestAt(t, root, &backend.testBackend)
	first.deliver(t, "evt_nokey")
	first.waitTried(t, "evt_nokey")
	_ = first.h.Cleanup()
	tries := backend.Calls()

	// the next config has no key for kid demo
	backend.up.Store(true)
	second := newQueueTestAt(t, root, &backend.testBackend, func(h *Handler) {
		h.DecryptionKeys = []KeyFile{{KeyID: "other", File: demoKeyFile}}
	})
	eventually(t, "the record names the missing key", func() bool {
		rec, _ := second.record(t, "evt_nokey")
		return rec.Queue != nil && strings.Contains(rec.Queue.LastError, "key demo is not configured")
	})
	rec, _ := second.record(t, "evt_nokey")
	if rec.Queue.Dead {
		t.Error("an event whose key is missing was made dead; it waits for its key")
	}
	time.Sleep(100 * time.Millisecond)
	if n := backend.Calls() - tries; n != 0 {
		t.Errorf("forwarded %d times without its key", n)
	}
}

func TestQueuePauseFlagStopsForwardsUntilResumed(t *testing.T) {
	t.Parallel()
	backend := &testBackend{}
	qt := newQueueTest(t, backend)
	ctx := context.Background()
	if err := qt.h.dedupe.storage.Store(ctx, qt.h.queue.dir+"/"+queuePausedKey, []byte("test")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the queue sees the pause", func() bool {
		qt.h.queue.mu.Lock()
		defer qt.h.queue.mu.Unlock()
		return qt.h.queue.paused
	})
	if res := qt.deliver(t, "evt_paused"); res.Status != http.StatusAccepted {
		t.Fatalf("a paused queue must still queue: %d", res.Status)
	}
	time.Sleep(200 * time.Millisecond) // ten polls
	if backend.Calls() != 0 {
		t.Fatalf("forwarded while paused")
	}
	if err := qt.h.dedupe.storage.Delete(ctx, qt.h.queue.dir+"/"+queuePausedKey); err != nil {
		t.Fatal(err)
	}
	eventually(t, "delivered after resume", func() bool { return remembered(qt.h.dedupe, "evt_paused") })
}

func TestQueueTakesOverAnEventWhoseHolderDied(t *testing.T) {
	t.Parallel()
	backend := newSwitchableBackend(http.StatusServiceUnavailable)
	root := t.TempDir()
	first := newQueueTestAt(t, root, &backend.testBackend)
	first.deliverUntilTried(t, "evt_orphan")
	_ = first.h.Cleanup()
	// as an instance that died mid-forward leaves it: a live lease, never renewed
	_, recordKey, _ := first.h.dedupe.eventKeys("evt_orphan")
	ctx := context.Background()
	data, _ := first.h.dedupe.storage.Load(ctx, recordKey)
	var rec record
	_ = json.Unmarshal(data, &rec)
	rec.Holder, rec.Released, rec.HeartbeatAt = "dead-holder", false, time.Now()
	rec.Queue.NextTry = time.Now()
	data, _ = json.Marshal(rec)
	_ = first.h.dedupe.storage.Store(ctx, recordKey, data)

	backend.up.Store(true)
	second := newQueueTestAt(t, root, &backend.testBackend)
	start := time.Now()
	eventually(t, "the event is taken over and delivered", func() bool { return remembered(second.h.dedupe, "evt_orphan") })
	if waited := time.Since(start); waited < fastLockTiming.staleAfter {
		t.Errorf("taken over after %s, before the lease was silent for %s", waited, fastLockTiming.staleAfter)
	}
	if n := callsFor(&backend.testBackend, "evt_orphan"); n != 2 {
		t.Errorf("%d forwards in all, want 2 (the failed first try, the takeover's)", n)
	}
}

func TestSweepKeepsQueuedEvents(t *testing.T) {
	t.Parallel()
	backend := newSwitchableBackend(http.StatusServiceUnavailable)
	qt := newQueueTest(t, &backend.testBackend)
	qt.deliver(t, "evt_old")
	qt.waitTried(t, "evt_old")
	_ = qt.h.Cleanup()
	d := newDeduper(qt.h.dedupe.storage, qt.h.dedupe.prefix, defaultDedupeWindow, qt.h.logger, func() time.Time { return time.Now().Add(60 * 24 * time.Hour) })
	d.timing = fastLockTiming
	if _, _, err := d.sweepRecords(context.Background(), true); err != nil {
		t.Fatal(err)
	}
	if rec, ok := qt.record(t, "evt_old"); !ok || rec.Queue == nil {
		t.Error("the sweep deleted a queued event's record")
	}
}

func TestForgetRefusesAQueuedEvent(t *testing.T) {
	t.Parallel()
	backend := newSwitchableBackend(http.StatusServiceUnavailable)
	qt := newQueueTest(t, &backend.testBackend)
	qt.deliver(t, "evt_forget")
	qt.waitTried(t, "evt_forget")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := qt.h.dedupe.forget(ctx, "evt_forget"); err == nil || !strings.Contains(err.Error(), "queue drop") {
		t.Fatalf("forget of a queued event: %v, want a refusal pointing at queue drop", err)
	}
	if rec, ok := qt.record(t, "evt_forget"); !ok || !rec.isQueued() {
		t.Error("forget took the event out of the queue")
	}
}

func TestQueueDeliveredButUnrecordedIsForwardedAgain(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	backend := &testBackend{Respond: func(call int, w http.ResponseWriter, _ *http.Request) error {
		if call == 0 {
			<-release
		}
		_, err := w.Write([]byte("ok"))
		return err
	}}
	h := newTestHandler(t, func(h *Handler) {
		h.StorageRaw = json.RawMessage(`{"module":"kayle_test_locks","behaviour":"queue_commit_fails"}`)
		h.Queue = &Queue{Forward: forwardTo(t, backend), MaxBackoff: caddy.Duration(200 * time.Millisecond)}
		timing := queueTestTiming
		h.timing = &timing
	})
	st, _ := testStorages.Load("queue_commit_fails")
	mem := st.(*memStorage)
	if res := serve(h, makeDelivery(t, eventPayload("evt_unrecorded"), time.Now()), &testBackend{}); res.Status != http.StatusAccepted {
		t.Fatalf("%d", res.Status)
	}
	eventually(t, "the first try is at the backend", func() bool { return backend.Calls() == 1 })
	_, recordKey, _ := h.dedupe.eventKeys("evt_unrecorded")
	mem.failOnly("Store", recordKey, errInjected)
	close(release)
	time.Sleep(300 * time.Millisecond) // the 200 came, the record write failed
	mem.mu.Lock()
	mem.hook = nil
	mem.mu.Unlock()
	mem.fail("Store", nil)
	// the event is still queued: forwarded again once the lease is silent
	eventually(t, "forwarded again and recorded", func() bool { return backend.Calls() == 2 && remembered(h.dedupe, "evt_unrecorded") })
}

func TestQueueDeletesAMarkerWithoutARecordOnlyWhenOld(t *testing.T) {
	t.Parallel()
	qt := newQueueTest(t, &testBackend{})
	ctx := context.Background()
	now := time.Now()
	fresh := qt.h.queue.dueMarkerKey(hashHex("evt_fresh_orphan"), now, now, now)
	old := qt.h.queue.dueMarkerKey(hashHex("evt_old_orphan"), now, now.Add(-2*time.Hour), now)
	for _, key := range []string{fresh, old} {
		if err := qt.h.queue.storeMarker(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the old orphan marker is deleted", func() bool { return !qt.h.dedupe.storage.Exists(ctx, old) })
	// a marker without a record an hour young may be a storage's failed
	// read of a queued event: kept
	if !qt.h.dedupe.storage.Exists(ctx, fresh) {
		t.Error("a young marker without a record was deleted")
	}
}
