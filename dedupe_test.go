package kaylewebhook

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
)

// ---------------------------------------------------------------------------
// memStorage: an in-memory certmagic.Storage test double.

// memStorage keeps keys in a map. Lock/Unlock give real mutual exclusion per
// name; Unlock, like file_system's, does not check the owner and fails for a
// lock that is not held. List returns the implied directories as well as the
// files, as file_system does. fail makes a method return an error, hook runs
// at the start of every call (to pause a caller), and lockWaits receives the
// name of every Lock call that has to wait.
type memStorage struct {
	mu       sync.Mutex
	files    map[string]memFile
	locks    map[string]chan struct{} // holds one value while the lock is held
	failures map[string]error         // by method name: "Lock", "Load", ...
	calls    map[string]int           // by method name
	// folderDeletes counts Delete calls made on a folder key (which deletes
	// everything below it).
	folderDeletes int

	hook      func(method, key string)
	lockWaits chan string
}

type memFile struct {
	value    []byte
	modified time.Time
}

var errInjected = errors.New("injected storage failure")

func newMemStorage() *memStorage {
	return &memStorage{
		files:     make(map[string]memFile),
		locks:     make(map[string]chan struct{}),
		failures:  make(map[string]error),
		calls:     make(map[string]int),
		lockWaits: make(chan string, 1000),
	}
}

// fail makes every later call of method return err (nil: succeed again).
func (m *memStorage) fail(method string, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err == nil {
		delete(m.failures, method)
	} else {
		m.failures[method] = err
	}
}

// failOnly makes method fail with err for key alone.
func (m *memStorage) failOnly(method, key string, err error) {
	m.hook = func(called, calledKey string) {
		if called == method && calledKey == key {
			m.fail(method, err)
		} else if called == method {
			m.fail(method, nil)
		}
	}
}

func (m *memStorage) callCount(method string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.calls[method]
}

// enter counts the call, runs the hook and returns the injected failure.
func (m *memStorage) enter(method, key string) error {
	m.mu.Lock()
	m.calls[method]++
	hook := m.hook
	m.mu.Unlock()
	if hook != nil {
		hook(method, key)
	}
	m.mu.Lock()
	err := m.failures[method]
	m.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, key, err)
	}
	return nil
}

func (m *memStorage) lockChan(name string) chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch := m.locks[name]
	if ch == nil {
		ch = make(chan struct{}, 1)
		m.locks[name] = ch
	}
	return ch
}

func (m *memStorage) Lock(ctx context.Context, name string) error {
	if err := m.enter("Lock", name); err != nil {
		return err
	}
	ch := m.lockChan(name)
	select {
	case ch <- struct{}{}:
		return nil
	default:
	}
	select {
	case m.lockWaits <- name:
	default:
	}
	select {
	case ch <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (m *memStorage) Unlock(_ context.Context, name string) error {
	if err := m.enter("Unlock", name); err != nil {
		return err
	}
	select {
	case <-m.lockChan(name):
		return nil
	default:
		return fmt.Errorf("unlock %s: %w", name, fs.ErrNotExist)
	}
}

// heldLocks lists the locks held now.
func (m *memStorage) heldLocks() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var held []string
	for name, ch := range m.locks {
		if len(ch) > 0 {
			held = append(held, name)
		}
	}
	slices.Sort(held)
	return held
}

func (m *memStorage) isFolder(key string) bool {
	for k := range m.files {
		if strings.HasPrefix(k, key+"/") {
			return true
		}
	}
	return false
}

func (m *memStorage) Store(_ context.Context, key string, value []byte) error {
	if err := m.enter("Store", key); err != nil {
		return err
	}
	m.put(key, value, time.Now())
	return nil
}

// put stores a file with the given modification time.
func (m *memStorage) put(key string, value []byte, modified time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.files[key] = memFile{value: slices.Clone(value), modified: modified}
}

func (m *memStorage) Load(_ context.Context, key string) ([]byte, error) {
	if err := m.enter("Load", key); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	f, ok := m.files[key]
	if !ok {
		return nil, fmt.Errorf("load %s: %w", key, fs.ErrNotExist)
	}
	return slices.Clone(f.value), nil
}

func (m *memStorage) Delete(_ context.Context, key string) error {
	if err := m.enter("Delete", key); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.isFolder(key) {
		m.folderDeletes++
	}
	for k := range m.files {
		if k == key || strings.HasPrefix(k, key+"/") {
			delete(m.files, k)
		}
	}
	return nil
}

func (m *memStorage) Exists(_ context.Context, key string) bool {
	if m.enter("Exists", key) != nil {
		return true // as file_system: any error but not-exist reads as true
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.files[key]
	return ok || m.isFolder(key)
}

func (m *memStorage) List(_ context.Context, prefix string, recursive bool) ([]string, error) {
	if err := m.enter("List", prefix); err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	seen := map[string]bool{}
	for k := range m.files {
		rest, ok := strings.CutPrefix(k, prefix+"/")
		if !ok {
			continue
		}
		parts := strings.Split(rest, "/")
		if !recursive {
			parts = parts[:1]
		}
		for i := range parts {
			seen[path.Join(prefix, strings.Join(parts[:i+1], "/"))] = true
		}
	}
	if len(seen) == 0 {
		return nil, fmt.Errorf("list %s: %w", prefix, fs.ErrNotExist)
	}
	keys := make([]string, 0, len(seen))
	for k := range seen {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys, nil
}

func (m *memStorage) Stat(_ context.Context, key string) (certmagic.KeyInfo, error) {
	if err := m.enter("Stat", key); err != nil {
		return certmagic.KeyInfo{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if f, ok := m.files[key]; ok {
		return certmagic.KeyInfo{Key: key, Modified: f.modified, Size: int64(len(f.value)), IsTerminal: true}, nil
	}
	if m.isFolder(key) {
		return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
	}
	return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, fs.ErrNotExist)
}

var _ certmagic.Storage = (*memStorage)(nil)

// ---------------------------------------------------------------------------
// Helpers for deduper tests.

const testPrefix = "kayle_webhook/events"

// testEpoch is the test clock's start: any fixed time works.
var testEpoch = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// newTestDeduper is a deduper on storage with the default window and a test
// clock, logging nowhere. A copy behind a lock that never comes free gives
// up after 2 s (the test clock stands still, so no holder is ever presumed
// dead).
func newTestDeduper(storage certmagic.Storage, clock *testClock) *deduper {
	d := newDeduper(storage, testPrefix, defaultDedupeWindow, zap.NewNop(), clock.Now)
	d.timing.waitLimit = 2 * time.Second
	return d
}

// storageCase is a storage the unit tests run against.
type storageCase struct {
	name string
	new  func(t *testing.T) certmagic.Storage
}

var storageCases = []storageCase{
	{"file_system", func(t *testing.T) certmagic.Storage { return &certmagic.FileStorage{Path: t.TempDir()} }},
	{"memory", func(t *testing.T) certmagic.Storage { return newMemStorage() }},
}

// deliverEvent runs one copy of eventID through d.deliverOnce, as ServeHTTP
// does after verifying and decrypting it, and returns the outcome.
// A copy stuck on a lock gives up after testWaitBound with a 503.
func deliverEvent(d *deduper, eventID string, next caddyhttp.Handler) served {
	ctx, cancel := context.WithTimeout(context.Background(), testWaitBound)
	defer cancel()
	rec := httptest.NewRecorder()
	r := httptest.NewRequestWithContext(ctx, http.MethodPost, "/kayle", strings.NewReader(`{"metadata":{}}`))
	r, repl := prepareTestRequest(r, rec)
	repl.Set("http.kayle.duplicate", false) // as rewriteRequest does
	err := d.deliverOnce(rec, r, next, eventID)
	res := served{Rec: rec, Err: err, Repl: repl, Status: rec.Code}
	if err != nil {
		res.Status = http.StatusInternalServerError
		if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok && he.StatusCode != 0 {
			res.Status = he.StatusCode
		}
	}
	return res
}

// assertDuplicate checks the answer to an event already delivered.
func assertDuplicate(t *testing.T, res served, eventID string) {
	t.Helper()
	if res.Err != nil || res.Rec.Code != http.StatusOK {
		t.Fatalf("duplicate: status %d, error %v; want 200 and no error", res.Rec.Code, res.Err)
	}
	if got := res.Rec.Header().Get(kayle.HeaderDuplicate); got != "true" {
		t.Errorf("%s = %q, want true", kayle.HeaderDuplicate, got)
	}
	if got := res.Rec.Header().Get("Content-Type"); got != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", got)
	}
	if got, want := res.Rec.Header().Get("Content-Length"), strconv.Itoa(res.Rec.Body.Len()); got != want {
		t.Errorf("Content-Length = %s, body is %s bytes", got, want)
	}
	var body struct {
		Status  string `json:"status"`
		EventID string `json:"event_id"`
	}
	if err := json.Unmarshal(res.Rec.Body.Bytes(), &body); err != nil || body.Status != "duplicate" || body.EventID != eventID {
		t.Errorf("duplicate body = %q (%v), want status duplicate and event_id %q", res.Rec.Body, err, eventID)
	}
	if res.Rec.Body.Len() > 512 {
		t.Errorf("duplicate body is %d bytes; want a small answer", res.Rec.Body.Len())
	}
	if dup, _ := res.Repl.Get("http.kayle.duplicate"); dup != true {
		t.Errorf("{http.kayle.duplicate} = %v, want true", dup)
	}
}

// assertForwarded checks that a copy reached the backend and its 2xx answer
// went back.
func assertForwardedOK(t *testing.T, res served) {
	t.Helper()
	if res.Err != nil || res.Rec.Code != http.StatusOK || res.Rec.Body.String() != "ok" {
		t.Fatalf("forward: status %d body %q error %v; want the backend's 200 ok", res.Rec.Code, res.Rec.Body, res.Err)
	}
	if res.Rec.Header().Get(kayle.HeaderDuplicate) != "" {
		t.Errorf("a forwarded event's answer carries %s", kayle.HeaderDuplicate)
	}
	if dup, _ := res.Repl.Get("http.kayle.duplicate"); dup != false {
		t.Errorf("{http.kayle.duplicate} = %v, want false", dup)
	}
}

// assertNoLocks checks that nothing of the deduper's is still held: no
// storage lock (memStorage), no lock file (file_system), no in-process claim.
func assertNoLocks(t *testing.T, d *deduper) {
	t.Helper()
	assertLocksLeft(t, d)
}

// assertLocksLeft is assertNoLocks where the storage still holds exactly
// left: the locks of dead or stalled instances, which no other instance may
// release.
func assertLocksLeft(t *testing.T, d *deduper, left ...string) {
	t.Helper()
	switch s := d.storage.(type) {
	case *memStorage:
		slices.Sort(left)
		if held := s.heldLocks(); !slices.Equal(held, left) {
			t.Errorf("storage locks held: %v, want %v", held, left)
		}
	case *certmagic.FileStorage:
		entries, err := os.ReadDir(filepath.Join(s.Path, "locks"))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			t.Fatal(err)
		}
		for _, e := range entries {
			t.Errorf("lock file left behind: %s", e.Name())
		}
	}
	d.mu.Lock()
	if len(d.held) > 0 {
		t.Errorf("deduper still counts locks as held: %v", d.held)
	}
	d.mu.Unlock()
	inProcessClaims.mu.Lock()
	if n := len(inProcessClaims.entries); n > 0 {
		t.Errorf("%d in-process claims left", n)
	}
	inProcessClaims.mu.Unlock()
}

// loadRecord reads the record of eventID, failing the test when there is none.
func loadRecord(t *testing.T, d *deduper, eventID string) record {
	t.Helper()
	_, key, _ := d.eventKeys(eventID)
	data, err := d.storage.Load(context.Background(), key)
	if err != nil {
		t.Fatalf("record of %s: %v", eventID, err)
	}
	if strings.Contains(string(data), eventID) {
		t.Errorf("the record holds the event id in clear: %s", data)
	}
	var rec record
	if err := json.Unmarshal(data, &rec); err != nil {
		t.Fatalf("record of %s: %v", eventID, err)
	}
	return rec
}

func hasRecord(d *deduper, eventID string) bool {
	_, key, _ := d.eventKeys(eventID)
	_, err := d.storage.Load(context.Background(), key)
	return err == nil
}

// remembered reports whether eventID has a "delivered" record (a failed
// forward leaves a lease, which is not one).
func remembered(d *deduper, eventID string) bool {
	_, key, _ := d.eventKeys(eventID)
	data, err := d.storage.Load(context.Background(), key)
	var rec record
	return err == nil && json.Unmarshal(data, &rec) == nil && !rec.DeliveredAt.IsZero()
}

// waitFor receives from ch, failing the test after testWaitBound.
func waitFor[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(testWaitBound):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// counterValue reads a counter through its collector.
func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// ---------------------------------------------------------------------------
// Claim, commit, release.

func TestDedupeClaimCommitRelease(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			clock := newTestClock(testEpoch)
			d := newTestDeduper(sc.new(t), clock)
			backend := &testBackend{}
			const id = "evt_claim_commit"

			assertForwardedOK(t, deliverEvent(d, id, backend))
			if backend.Calls() != 1 {
				t.Fatalf("backend called %d times, want 1", backend.Calls())
			}
			assertNoLocks(t, d)
			rec := loadRecord(t, d, id)
			hash, _, _ := d.eventKeys(id)
			if rec.Version != recordVersion || rec.EventSHA256 != hash || !rec.DeliveredAt.Equal(testEpoch) || rec.Status != http.StatusOK {
				t.Errorf("record = %+v, want version %d, hash %s, delivered at %s, status 200", rec, recordVersion, hash, testEpoch)
			}

			clock.Advance(time.Hour)
			res := deliverEvent(d, id, backend)
			assertDuplicate(t, res, id)
			if got := res.Rec.Header().Get(kayle.HeaderEventID); got != id {
				t.Errorf("%s = %q, want %q", kayle.HeaderEventID, got, id)
			}
			if backend.Calls() != 1 {
				t.Errorf("backend called %d times after a duplicate, want 1", backend.Calls())
			}
			assertNoLocks(t, d)

			// another event is not a duplicate of it
			assertForwardedOK(t, deliverEvent(d, "evt_other", backend))
			if backend.Calls() != 2 {
				t.Errorf("backend called %d times, want 2", backend.Calls())
			}
		})
	}
}

// TestDedupeHandlerDuplicate runs genuine deliveries through the Handler: a
// retry of a delivered event (newly signed, as Kayle's retries are) is
// answered 200 by the gateway itself.
func TestDedupeHandlerDuplicate(t *testing.T) {
	clock := newTestClock(time.Now())
	h := newTestHandler(t, func(h *Handler) { h.now = clock.Now })
	backend := &testBackend{}
	payload := eventPayload("evt_handler_dup")

	res := serve(h, makeDelivery(t, payload, clock.Now()), backend)
	if res.Status != http.StatusOK || backend.Calls() != 1 {
		t.Fatalf("first copy: status %d, backend calls %d; want 200 and 1 (%v)", res.Status, backend.Calls(), res.Err)
	}
	if dup, _ := res.Repl.Get("http.kayle.duplicate"); dup != false {
		t.Errorf("first copy: {http.kayle.duplicate} = %v, want false", dup)
	}

	clock.Advance(30 * time.Minute) // Kayle's fourth attempt
	res = serve(h, makeDelivery(t, payload, clock.Now()), backend)
	assertDuplicate(t, res, "evt_handler_dup")
	if backend.Calls() != 1 {
		t.Errorf("backend called %d times, want 1", backend.Calls())
	}
	if id, _ := res.Repl.GetString("http.kayle.event_id"); id != "evt_handler_dup" {
		t.Errorf("{http.kayle.event_id} = %q on the duplicate", id)
	}
	assertNoLocks(t, h.dedupe)
}

// ---------------------------------------------------------------------------
// Backend failures are not remembered.

func TestDedupeBackendFailureNotRemembered(t *testing.T) {
	failures := []struct {
		name    string
		respond func(w http.ResponseWriter) error
		status  int
	}{
		{"backend answers 500", func(w http.ResponseWriter) error {
			w.WriteHeader(http.StatusInternalServerError)
			return nil
		}, http.StatusInternalServerError},
		{"next returns caddyhttp.Error 502", func(http.ResponseWriter) error {
			return caddyhttp.Error(http.StatusBadGateway, errors.New("dial tcp: connection refused"))
		}, http.StatusBadGateway},
		{"next returns a plain error", func(http.ResponseWriter) error {
			return errors.New("something broke")
		}, http.StatusInternalServerError},
	}
	for _, sc := range storageCases {
		for _, f := range failures {
			t.Run(sc.name+"/"+f.name, func(t *testing.T) {
				d := newTestDeduper(sc.new(t), newTestClock(testEpoch))
				backend := &testBackend{Respond: func(call int, w http.ResponseWriter, r *http.Request) error {
					if call == 0 {
						return f.respond(w)
					}
					_, err := io.WriteString(w, "ok")
					return err
				}}
				const id = "evt_backend_fails_once"

				res := deliverEvent(d, id, backend)
				if res.Status != f.status {
					t.Errorf("first copy: client gets %d (%v), want the backend's %d", res.Status, res.Err, f.status)
				}
				if he, ok := res.Err.(caddyhttp.HandlerError); f.status == http.StatusBadGateway && (!ok || he.StatusCode != http.StatusBadGateway) {
					t.Errorf("next's caddyhttp.Error is not returned as is: %#v", res.Err)
				}
				if remembered(d, id) {
					t.Error("a failed forward was remembered")
				}
				assertNoLocks(t, d)

				assertForwardedOK(t, deliverEvent(d, id, backend))
				assertDuplicate(t, deliverEvent(d, id, backend), id)
				if backend.Calls() != 2 {
					t.Errorf("backend called %d times, want 2 (the failure, the success)", backend.Calls())
				}
				assertNoLocks(t, d)
			})
		}
	}
}

// A backend whose 2xx went out is remembered even when next then fails:
// reverse_proxy panics with http.ErrAbortHandler when the response body
// breaks after the header, and other handlers may return an error after
// writing. Kayle got (or began to get) a 2xx; the backend has the event.
func TestDedupeRemembersA2xxThatWentOut(t *testing.T) {
	cases := []struct {
		name    string
		respond func(w http.ResponseWriter) error
	}{
		{"next panics with ErrAbortHandler after 200", func(w http.ResponseWriter) error {
			w.WriteHeader(http.StatusOK)
			_, _ = io.WriteString(w, "partial")
			panic(http.ErrAbortHandler)
		}},
		{"next returns an error after 202", func(w http.ResponseWriter) error {
			w.WriteHeader(http.StatusAccepted)
			return caddyhttp.Error(http.StatusBadGateway, errors.New("reading upstream body: unexpected EOF"))
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := newTestDeduper(newMemStorage(), newTestClock(testEpoch))
			backend := &testBackend{Respond: func(call int, w http.ResponseWriter, r *http.Request) error {
				return c.respond(w)
			}}
			func() {
				defer func() {
					if p := recover(); p != nil && p != http.ErrAbortHandler {
						panic(p)
					}
				}()
				_ = deliverEvent(d, "evt_2xx_then_broken", backend)
			}()
			assertNoLocks(t, d)
			if !hasRecord(d, "evt_2xx_then_broken") {
				t.Fatal("the backend answered 2xx but the event was not remembered")
			}
			assertDuplicate(t, deliverEvent(d, "evt_2xx_then_broken", backend), "evt_2xx_then_broken")
			if backend.Calls() != 1 {
				t.Errorf("backend called %d times, want 1", backend.Calls())
			}
		})
	}

	t.Run("next panics before writing", func(t *testing.T) {
		d := newTestDeduper(newMemStorage(), newTestClock(testEpoch))
		backend := &testBackend{Respond: func(int, http.ResponseWriter, *http.Request) error {
			panic(http.ErrAbortHandler)
		}}
		func() {
			defer func() { _ = recover() }()
			_ = deliverEvent(d, "evt_panic_early", backend)
		}()
		assertNoLocks(t, d)
		if hasRecord(d, "evt_panic_early") {
			t.Error("an event whose forward panicked before any answer was remembered")
		}
	})
}

// ---------------------------------------------------------------------------
// Storage failures.

func TestDedupeStorageFailureAnswers503(t *testing.T) {
	for _, method := range []string{"Lock", "Load"} {
		t.Run("fail "+method, func(t *testing.T) {
			st := newMemStorage()
			d := newTestDeduper(st, newTestClock(testEpoch))
			backend := &testBackend{}
			st.fail(method, errInjected)

			res := deliverEvent(d, "evt_storage_down", backend)
			he, ok := res.Err.(caddyhttp.HandlerError)
			if !ok || he.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("error = %#v, want a caddyhttp.HandlerError with 503", res.Err)
			}
			if !errors.Is(res.Err, errInjected) {
				t.Errorf("the 503 does not wrap the storage error: %v", res.Err)
			}
			if backend.Calls() != 0 || res.Rec.Body.Len() != 0 {
				t.Errorf("backend called %d times, %d bytes written; want nothing forwarded", backend.Calls(), res.Rec.Body.Len())
			}
			assertNoLocks(t, d)

			// once the storage is back the event goes through
			st.fail(method, nil)
			assertForwardedOK(t, deliverEvent(d, "evt_storage_down", backend))
			if backend.Calls() != 1 {
				t.Errorf("backend called %d times after recovery, want 1", backend.Calls())
			}
		})
	}

	t.Run("a missing record is not a failure", func(t *testing.T) {
		// memStorage's Load wraps fs.ErrNotExist, as a network storage might
		d := newTestDeduper(newMemStorage(), newTestClock(testEpoch))
		assertForwardedOK(t, deliverEvent(d, "evt_new", &testBackend{}))
	})
}

func TestDedupeStorageStoreFailureAfter2xx(t *testing.T) {
	st := newMemStorage()
	d := newTestDeduper(st, newTestClock(testEpoch))
	backend := &testBackend{}
	const id = "evt_store_fails"
	before := counterValue(t, recordWriteFailuresTotal)

	st.fail("Store", errInjected)
	assertForwardedOK(t, deliverEvent(d, id, backend)) // the backend's 2xx is answered
	if got := counterValue(t, recordWriteFailuresTotal) - before; got != 1 {
		t.Errorf("record write failures went up by %v, want 1", got)
	}
	assertNoLocks(t, d)

	st.fail("Store", nil)
	assertForwardedOK(t, deliverEvent(d, id, backend)) // not remembered: forwarded again
	assertDuplicate(t, deliverEvent(d, id, backend), id)
	if backend.Calls() != 2 {
		t.Errorf("backend called %d times, want 2", backend.Calls())
	}
	if got := counterValue(t, recordWriteFailuresTotal) - before; got != 1 {
		t.Errorf("record write failures went up by %v, want 1", got)
	}
}

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

// ---------------------------------------------------------------------------
// Locks are released.

func TestDedupeLocksReleasedOnEveryPath(t *testing.T) {
	st := newMemStorage()
	d := newTestDeduper(st, newTestClock(testEpoch))
	paths := []struct {
		name string
		run  func()
	}{
		{"forward", func() { deliverEvent(d, "evt_a", &testBackend{}) }},
		{"duplicate", func() { deliverEvent(d, "evt_a", &testBackend{}) }},
		{"backend 500", func() { deliverEvent(d, "evt_b", &testBackend{Respond: respondStatus(500)}) }},
		{"next error", func() {
			deliverEvent(d, "evt_b", &testBackend{Respond: func(int, http.ResponseWriter, *http.Request) error {
				return caddyhttp.Error(http.StatusBadGateway, errors.New("down"))
			}})
		}},
		{"Load fails", func() {
			st.fail("Load", errInjected)
			defer st.fail("Load", nil)
			deliverEvent(d, "evt_c", &testBackend{})
		}},
		{"Store fails", func() {
			st.fail("Store", errInjected)
			defer st.fail("Store", nil)
			deliverEvent(d, "evt_d", &testBackend{})
		}},
		{"Unlock fails once", func() {
			// a failed release is logged; the deduper does not count it held
			st.fail("Unlock", errInjected)
			deliverEvent(d, "evt_e", &testBackend{})
			st.fail("Unlock", nil)
			_, _, lock := d.eventKeys("evt_e")
			_ = st.Unlock(context.Background(), lock) // the storage's stale-lock expiry, in effect
		}},
		{"next panics", func() {
			defer func() { _ = recover() }()
			deliverEvent(d, "evt_f", &testBackend{Respond: func(int, http.ResponseWriter, *http.Request) error { panic("boom") }})
		}},
	}
	for _, p := range paths {
		p.run()
		if held := st.heldLocks(); len(held) > 0 {
			t.Errorf("after %s: storage locks still held: %v", p.name, held)
		}
		assertNoLocks(t, d)
	}
}

// TestDedupeCleanupReleasesLocks: Cleanup (releaseAll) releases the locks of
// copies still in flight, and the late unlock of such a copy does not
// release a lock another instance has taken since (Unlock checks no owner).
func TestDedupeCleanupReleasesLocks(t *testing.T) {
	st := newMemStorage()
	d := newTestDeduper(st, newTestClock(testEpoch))
	const id = "evt_in_flight"
	_, _, lockName := d.eventKeys(id)

	inBackend, release := make(chan struct{}), make(chan struct{})
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		close(inBackend)
		<-release
		w.WriteHeader(http.StatusOK)
		return nil
	}}
	done := make(chan served)
	go func() { done <- deliverEvent(d, id, backend) }()
	waitFor(t, inBackend, "the copy to reach the backend")
	if held := st.heldLocks(); !slices.Equal(held, []string{lockName}) {
		t.Fatalf("while forwarding, held locks = %v, want [%s]", held, lockName)
	}

	d.releaseAll() // Handler.Cleanup
	if held := st.heldLocks(); len(held) > 0 {
		t.Fatalf("after Cleanup: locks still held: %v", held)
	}

	// another instance takes the event's lock now
	if err := st.Lock(context.Background(), lockName); err != nil {
		t.Fatal(err)
	}
	close(release)
	if res := waitFor(t, done, "the in-flight copy"); res.Err != nil {
		t.Fatalf("in-flight copy: %v", res.Err)
	}
	if held := st.heldLocks(); !slices.Equal(held, []string{lockName}) {
		t.Errorf("the in-flight copy's late unlock released the other instance's lock: held = %v", held)
	}
	_ = st.Unlock(context.Background(), lockName)
	assertNoLocks(t, d)

	t.Run("Handler.Cleanup", func(t *testing.T) {
		exiting := false
		h := &Handler{dedupe: newTestDeduper(st, newTestClock(testEpoch)), exiting: func() bool { return exiting }}
		if err := h.dedupe.lock(context.Background(), "kayle_webhook_event_x"); err != nil {
			t.Fatal(err)
		}
		// a reload: Caddy does not wait for the old config's requests, so
		// their locks stay theirs to release
		if err := h.Cleanup(); err != nil {
			t.Fatal(err)
		}
		if held := st.heldLocks(); !slices.Equal(held, []string{"kayle_webhook_event_x"}) {
			t.Errorf("Cleanup on a reload released an in-flight lock: held = %v", held)
		}
		exiting = true
		if err := h.Cleanup(); err != nil {
			t.Fatal(err)
		}
		if held := st.heldLocks(); len(held) > 0 {
			t.Errorf("after Handler.Cleanup at exit: locks still held: %v", held)
		}
		if err := (&Handler{}).Cleanup(); err != nil { // dedupe off
			t.Error(err)
		}
	})
}

// ---------------------------------------------------------------------------
// Concurrency.

// deliverConcurrently sends n copies of one delivery at once, the i-th
// through handlers[i%len(handlers)], and returns the statuses.
func deliverConcurrently(t *testing.T, n int, handlers []*Handler, body []byte, sig string, backend *testBackend) []int {
	t.Helper()
	statuses := make([]int, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		req := deliveryRequest(body, sig)
		wg.Go(func() {
			<-start
			statuses[i] = serve(handlers[i%len(handlers)], req, backend).Status
		})
	}
	close(start)
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	waitFor(t, allDone, "the concurrent copies")
	return statuses
}

func TestDedupeConcurrentCopies(t *testing.T) {
	const copies = 50
	sharedRoot := t.TempDir()
	setups := []struct {
		name     string
		handlers func(t *testing.T) []*Handler
	}{
		{"one handler", func(t *testing.T) []*Handler {
			return []*Handler{newTestHandler(t)}
		}},
		{"two handlers sharing one storage folder", func(t *testing.T) []*Handler {
			shared := func(h *Handler) { h.StorageRaw = fileStorageJSON(sharedRoot) }
			return []*Handler{newTestHandler(t, shared), newTestHandler(t, shared)}
		}},
	}
	for _, s := range setups {
		t.Run(s.name, func(t *testing.T) {
			handlers := s.handlers(t)
			backend := &testBackend{}
			body, sig := signDelivery(t, eventPayload("evt_concurrent_"+strconv.Itoa(len(handlers))), time.Now())

			statuses := deliverConcurrently(t, copies, handlers, body, sig, backend)
			if backend.Calls() != 1 {
				t.Errorf("backend got %d copies of one event, want 1", backend.Calls())
			}
			for i, st := range statuses {
				if st != http.StatusOK {
					t.Errorf("copy %d answered %d, want 200", i, st)
				}
			}
			for _, h := range handlers {
				assertNoLocks(t, h.dedupe)
			}
		})
	}
}

// TestDedupeCrossInstanceLock: a copy arriving while another instance holds
// the event's storage lock (forwarding it) waits for that lock, then finds
// the record and does not forward. The other instance is simulated with the
// storage calls it makes, because two dedupers in one process meet on the
// in-process claim before they reach the storage lock.
func TestDedupeCrossInstanceLock(t *testing.T) {
	st := newMemStorage()
	clock := newTestClock(testEpoch)
	here, there := newTestDeduper(st, clock), newTestDeduper(st, clock)
	const id = "evt_two_instances"
	hash, key, lockName := there.eventKeys(id)

	// the other instance has claimed the event and is forwarding it
	if err := st.Lock(context.Background(), lockName); err != nil {
		t.Fatal(err)
	}
	backend := &testBackend{}
	done := make(chan served)
	go func() { done <- deliverEvent(here, id, backend) }()
	if waiting := waitFor(t, st.lockWaits, "the copy to wait on the storage lock"); waiting != lockName {
		t.Fatalf("waiting on lock %s, want %s", waiting, lockName)
	}
	if backend.Calls() != 0 {
		t.Fatal("forwarded while another instance holds the event")
	}
	// its backend answered 2xx: it writes the record and releases the lock
	if err := there.commit(context.Background(), key, record{EventSHA256: hash}, http.StatusOK); err != nil {
		t.Fatal(err)
	}
	if err := st.Unlock(context.Background(), lockName); err != nil {
		t.Fatal(err)
	}
	assertDuplicate(t, waitFor(t, done, "the waiting copy"), id)
	if backend.Calls() != 0 {
		t.Errorf("backend called %d times, want 0", backend.Calls())
	}

	// and when the other instance's forward fails, the waiting copy forwards
	const id2 = "evt_two_instances_failed"
	_, _, lockName2 := there.eventKeys(id2)
	if err := st.Lock(context.Background(), lockName2); err != nil {
		t.Fatal(err)
	}
	go func() { done <- deliverEvent(here, id2, backend) }()
	waitFor(t, st.lockWaits, "the copy to wait on the storage lock")
	if err := st.Unlock(context.Background(), lockName2); err != nil { // no record written
		t.Fatal(err)
	}
	assertForwardedOK(t, waitFor(t, done, "the waiting copy"))
	if backend.Calls() != 1 {
		t.Errorf("backend called %d times, want 1", backend.Calls())
	}
	assertNoLocks(t, here)
}

// TestDedupeTwoProcesses runs two gateway processes (this test binary,
// re-executed) on one file_system folder, each delivering 25 copies of one
// event at once: the backends see it once between them.
func TestDedupeTwoProcesses(t *testing.T) {
	if os.Getenv("KAYLE_DEDUPE_HELPER_ROOT") != "" {
		t.Skip("running as a helper process")
	}
	root := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	type proc struct {
		cmd   *exec.Cmd
		stdin io.WriteCloser
		lines *bufio.Scanner
	}
	var procs []proc
	for range 2 {
		cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestDedupeHelperProcess$", "-test.count=1")
		cmd.Env = append(os.Environ(), "KAYLE_DEDUPE_HELPER_ROOT="+root, "KAYLE_DEDUPE_HELPER_COPIES=25")
		cmd.Stderr = os.Stderr
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		procs = append(procs, proc{cmd, stdin, bufio.NewScanner(stdout)})
	}
	for i, p := range procs {
		if !p.lines.Scan() || p.lines.Text() != "ready" {
			t.Fatalf("helper %d did not start: %q %v", i, p.lines.Text(), p.lines.Err())
		}
	}
	for _, p := range procs {
		_ = p.stdin.Close() // go
	}
	result := regexp.MustCompile(`^forwarded=(\d+) duplicates=(\d+)$`)
	forwarded, duplicates := 0, 0
	for i, p := range procs {
		found := false
		for p.lines.Scan() {
			if m := result.FindStringSubmatch(p.lines.Text()); m != nil {
				f, _ := strconv.Atoi(m[1])
				d, _ := strconv.Atoi(m[2])
				forwarded, duplicates, found = forwarded+f, duplicates+d, true
			}
		}
		if err := p.cmd.Wait(); err != nil || !found {
			t.Fatalf("helper %d: %v (result found: %v)", i, err, found)
		}
	}
	if forwarded != 1 || duplicates != 49 {
		t.Errorf("two processes forwarded %d and acknowledged %d duplicates of 50 copies; want 1 and 49", forwarded, duplicates)
	}
}

// TestDedupeHelperProcess is one gateway process of TestDedupeTwoProcesses.
func TestDedupeHelperProcess(t *testing.T) {
	root := os.Getenv("KAYLE_DEDUPE_HELPER_ROOT")
	if root == "" {
		return // not a test of its own: the body of TestDedupeTwoProcesses's processes
	}
	copies, _ := strconv.Atoi(os.Getenv("KAYLE_DEDUPE_HELPER_COPIES"))
	d := newDeduper(&certmagic.FileStorage{Path: root}, testPrefix, defaultDedupeWindow, zap.NewNop(), time.Now)
	backend := &testBackend{}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin) // the parent closes stdin to start both at once
	var wg sync.WaitGroup
	var mu sync.Mutex
	duplicates := 0
	for range copies {
		wg.Go(func() {
			res := deliverEvent(d, "evt_two_processes", backend)
			if res.Err != nil || res.Rec.Code != http.StatusOK {
				t.Errorf("copy answered %d: %v", res.Rec.Code, res.Err)
			}
			if res.Rec.Header().Get(kayle.HeaderDuplicate) == "true" {
				mu.Lock()
				duplicates++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	fmt.Printf("forwarded=%d duplicates=%d\n", backend.Calls(), duplicates)
}

// ---------------------------------------------------------------------------
// Expiry on read.

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

// ---------------------------------------------------------------------------
// Sweep.

// sweepFixture fills a storage with what a sweep meets: records delivered
// past the window and within it, a marker, stray temp files (as
// certmagic's atomic Store leaves after a crash) old and new, and folders.
type sweepFixture struct {
	expiredIDs, freshIDs []string
	oldStray, newStray   string   // keys
	folderFile           string   // a fresh file in a subfolder with an old time
	foreign              []string // old files that are not ours: never swept
}

// modTimer sets a key's modification time.
type modTimer func(t *testing.T, key string, modified time.Time)

func storageModTimer(st certmagic.Storage) modTimer {
	return func(t *testing.T, key string, modified time.Time) {
		t.Helper()
		switch s := st.(type) {
		case *memStorage:
			data, err := s.Load(context.Background(), key)
			if err != nil {
				t.Fatal(err)
			}
			s.put(key, data, modified)
		case *certmagic.FileStorage:
			if err := os.Chtimes(s.Filename(key), modified, modified); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func newSweepFixture(t *testing.T, st certmagic.Storage, now time.Time) sweepFixture {
	t.Helper()
	ctx := context.Background()
	setMod := storageModTimer(st)
	var f sweepFixture
	writeAt := func(id string, at, fileTime time.Time) {
		old := newTestDeduper(st, newTestClock(at))
		hash, key, _ := old.eventKeys(id)
		if err := old.commit(ctx, key, record{EventSHA256: hash}, http.StatusOK); err != nil {
			t.Fatal(err)
		}
		setMod(t, key, fileTime)
	}
	for i := range 3 {
		id := fmt.Sprintf("evt_expired_%d", i)
		at := now.Add(-defaultDedupeWindow - time.Duration(i+1)*time.Hour)
		// written when delivered, by a storage clock up to 50 min ahead
		writeAt(id, at, at.Add(time.Duration(i)*25*time.Minute))
		f.expiredIDs = append(f.expiredIDs, id)
		// a fresh record in a file that looks old: its own time decides
		id = fmt.Sprintf("evt_fresh_%d", i)
		writeAt(id, now.Add(-defaultDedupeWindow+time.Duration(i+1)*time.Hour), now.Add(-2*defaultDedupeWindow))
		f.freshIDs = append(f.freshIDs, id)
	}
	// an unreadable record file goes by its modification time too
	_, garbled, _ := newTestDeduper(st, newTestClock(now)).eventKeys("evt_garbled")
	f.oldStray = path.Join(testPrefix, "0f", "2367183409") // os.CreateTemp's naming
	f.newStray = path.Join(testPrefix, "0f", "981276354")
	f.folderFile = path.Join(testPrefix, "0f", "sub", "keep")
	// a prefix pointed at a folder that holds other data must not lose it
	f.foreign = []string{path.Join(testPrefix, "notes.txt"), path.Join(testPrefix, "0f", "readme"), path.Join(testPrefix, "12345")}
	for _, key := range f.foreign {
		if err := st.Store(ctx, key, []byte("not ours")); err != nil {
			t.Fatal(err)
		}
		setMod(t, key, now.Add(-2*defaultDedupeWindow))
	}
	for key, mod := range map[string]time.Time{
		f.oldStray:   now.Add(-defaultDedupeWindow - time.Minute),
		f.newStray:   now.Add(-time.Minute),
		f.folderFile: now,
		garbled:      now.Add(-time.Hour),
	} {
		if err := st.Store(ctx, key, []byte("{partial")); err != nil {
			t.Fatal(err)
		}
		setMod(t, key, mod)
	}
	f.freshIDs = append(f.freshIDs, "evt_garbled") // its file is an hour old
	if fsys, ok := st.(*certmagic.FileStorage); ok {
		// an old folder: it must stay, with what is in it
		dir := fsys.Filename(path.Dir(f.folderFile))
		old := now.Add(-2 * defaultDedupeWindow)
		if err := os.Chtimes(dir, old, old); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(fsys.Filename(path.Join(testPrefix, "empty_old_dir")), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(fsys.Filename(path.Join(testPrefix, "empty_old_dir")), old, old); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func (f sweepFixture) assertSwept(t *testing.T, d *deduper) {
	t.Helper()
	ctx := context.Background()
	for _, id := range f.expiredIDs {
		if hasRecord(d, id) {
			t.Errorf("expired record of %s survived the sweep", id)
		}
	}
	for _, id := range f.freshIDs {
		if !hasRecord(d, id) {
			t.Errorf("fresh record of %s was swept", id)
		}
	}
	if _, err := d.storage.Stat(ctx, f.oldStray); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old stray temp file survived the sweep (%v)", err)
	}
	for _, key := range append([]string{f.newStray, f.folderFile}, f.foreign...) {
		if _, err := d.storage.Stat(ctx, key); err != nil {
			t.Errorf("%s: %v; want it kept", key, err)
		}
	}
	if info, err := d.storage.Stat(ctx, path.Dir(f.folderFile)); err != nil || info.IsTerminal {
		t.Errorf("the old subfolder is gone or not a folder: %+v %v", info, err)
	}
	if fsys, ok := d.storage.(*certmagic.FileStorage); ok {
		if _, err := os.Stat(fsys.Filename(path.Join(testPrefix, "empty_old_dir"))); err != nil {
			t.Errorf("an old empty folder was deleted: %v", err)
		}
	}
	if ms, ok := d.storage.(*memStorage); ok && ms.folderDeletes > 0 {
		t.Errorf("the sweep called Delete on a folder key %d times", ms.folderDeletes)
	}
	if _, err := d.storage.Load(ctx, path.Join(testPrefix, "last_sweep")); err != nil {
		t.Errorf("no sweep marker: %v", err)
	}
}

func TestSweepExpiredRecords(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			st := sc.new(t)
			now := testEpoch
			f := newSweepFixture(t, st, now)
			d := newTestDeduper(st, newTestClock(now))
			if err := d.sweep(context.Background()); err != nil {
				t.Fatalf("sweep: %v", err)
			}
			f.assertSwept(t, d)
			assertNoLocks(t, d)

			// the swept event is forwarded again, the fresh one is not
			backend := &testBackend{}
			assertForwardedOK(t, deliverEvent(d, f.expiredIDs[0], backend))
			assertDuplicate(t, deliverEvent(d, f.freshIDs[0], backend), f.freshIDs[0])
		})
	}
}

func TestSweepEmptyStorage(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			d := newTestDeduper(sc.new(t), newTestClock(testEpoch))
			if err := d.sweep(context.Background()); err != nil {
				t.Fatalf("sweep of a storage with no records: %v", err)
			}
			assertNoLocks(t, d)
		})
	}
}

func TestSweepHourlyMarker(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			st := sc.new(t)
			clock := newTestClock(testEpoch)
			d := newTestDeduper(st, clock)
			ctx := context.Background()
			if err := d.sweep(ctx); err != nil {
				t.Fatal(err)
			}

			// a record that expires 10 minutes after that sweep
			old := newTestDeduper(st, newTestClock(testEpoch.Add(-defaultDedupeWindow+10*time.Minute)))
			hash, key, _ := old.eventKeys("evt_expires_soon")
			if err := old.commit(ctx, key, record{EventSHA256: hash}, 200); err != nil {
				t.Fatal(err)
			}
			clock.Advance(59 * time.Minute)
			if err := d.sweep(ctx); err != nil {
				t.Fatal(err)
			}
			if !hasRecord(d, "evt_expires_soon") {
				t.Error("a second sweep within the hour deleted a record")
			}
			if ms, ok := st.(*memStorage); ok && ms.callCount("List") != sweepShards {
				t.Errorf("List called %d times, want %d (one sweep): the second sweep must do nothing", ms.callCount("List"), sweepShards)
			}

			clock.Advance(time.Minute)
			if err := d.sweep(ctx); err != nil {
				t.Fatal(err)
			}
			if hasRecord(d, "evt_expires_soon") {
				t.Error("the sweep an hour later kept an expired record")
			}
			assertNoLocks(t, d)
		})
	}
}

// TestSweepConcurrentSweepers: of two instances sweeping at once, one does
// the work; the other waits for the sweep lock, then finds the marker.
func TestSweepConcurrentSweepers(t *testing.T) {
	t.Run("memory", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		a, b := newTestDeduper(st, newTestClock(testEpoch)), newTestDeduper(st, newTestClock(testEpoch))

		// pause a in its first Delete, so b arrives mid-sweep
		inDelete, resume := make(chan struct{}), make(chan struct{})
		var once sync.Once
		st.hook = func(method, key string) {
			if method == "Delete" {
				once.Do(func() { close(inDelete); <-resume })
			}
		}
		errA := make(chan error, 1)
		go func() { errA <- a.sweep(context.Background()) }()
		waitFor(t, inDelete, "the first sweeper to delete")

		// b gives up waiting for the lock (its 5 s wait, shortened)
		ctxB, cancelB := context.WithCancel(context.Background())
		errB := make(chan error, 1)
		go func() { errB <- b.sweep(ctxB) }()
		waitFor(t, st.lockWaits, "the second sweeper to wait on the lock")
		cancelB()
		if err := waitFor(t, errB, "the second sweeper to give up"); err != nil {
			t.Errorf("a sweeper that lost the lock race: %v, want nil", err)
		}

		// b waits for the lock this time, and finds a's marker
		go func() { errB <- b.sweep(context.Background()) }()
		waitFor(t, st.lockWaits, "the second sweeper to wait on the lock")
		close(resume)
		if err := waitFor(t, errA, "the first sweeper"); err != nil {
			t.Fatal(err)
		}
		if err := waitFor(t, errB, "the second sweeper"); err != nil {
			t.Fatal(err)
		}
		if n := st.callCount("List"); n != sweepShards {
			t.Errorf("List called %d times, want %d (one sweep): one sweeper does the work", n, sweepShards)
		}
		if n := st.callCount("Delete"); n != len(f.expiredIDs)+1 {
			t.Errorf("Delete called %d times, want %d (each expired file once)", n, len(f.expiredIDs)+1)
		}
		f.assertSwept(t, a)
		assertNoLocks(t, a)
		assertNoLocks(t, b)
	})

	t.Run("file_system", func(t *testing.T) {
		root := t.TempDir()
		f := newSweepFixture(t, &certmagic.FileStorage{Path: root}, testEpoch)
		// two instances: two FileStorage values on one folder
		a := newTestDeduper(&certmagic.FileStorage{Path: root}, newTestClock(testEpoch))
		b := newTestDeduper(&certmagic.FileStorage{Path: root}, newTestClock(testEpoch))
		errs := make(chan error, 2)
		start := make(chan struct{})
		for _, d := range []*deduper{a, b} {
			go func() { <-start; errs <- d.sweep(context.Background()) }()
		}
		close(start)
		for range 2 {
			if err := waitFor(t, errs, "a sweeper"); err != nil {
				t.Error(err)
			}
		}
		f.assertSwept(t, a)
		assertNoLocks(t, a)
	})
}

func TestSweepStorageFailures(t *testing.T) {
	t.Run("Stat fails: nothing deleted", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		st.fail("Stat", errInjected)
		if err := d.sweep(context.Background()); err != nil {
			t.Fatal(err)
		}
		if n := st.callCount("Delete"); n != 0 {
			t.Errorf("Delete called %d times with Stat failing", n)
		}
		for _, id := range append(f.expiredIDs, f.freshIDs...) {
			if !hasRecord(d, id) {
				t.Errorf("record of %s deleted", id)
			}
		}
		assertNoLocks(t, d)
	})

	t.Run("Lock fails: an error to log, not a silent skip", func(t *testing.T) {
		st := newMemStorage()
		d := newTestDeduper(st, newTestClock(testEpoch))
		st.fail("Lock", errInjected)
		if err := d.sweep(context.Background()); !errors.Is(err, errInjected) {
			t.Errorf("sweep = %v, want the Lock error", err)
		}
		if n := st.callCount("List"); n != 0 {
			t.Errorf("swept without the lock (%d List calls)", n)
		}
	})

	t.Run("List fails: an error, no marker, tried again next time", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		st.fail("List", errInjected)
		if err := d.sweep(context.Background()); !errors.Is(err, errInjected) {
			t.Errorf("sweep = %v, want the List error", err)
		}
		assertNoLocks(t, d)
		st.fail("List", nil)
		if err := d.sweep(context.Background()); err != nil {
			t.Fatal(err)
		}
		f.assertSwept(t, d)
	})

	t.Run("List of one folder fails: the others are swept, no marker", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		_, victim, _ := d.eventKeys(f.expiredIDs[0])
		st.failOnly("List", path.Dir(victim), errInjected)
		if err := d.sweep(context.Background()); !errors.Is(err, errInjected) {
			t.Errorf("sweep = %v, want the List error", err)
		}
		for _, id := range f.expiredIDs {
			_, key, _ := d.eventKeys(id)
			if inVictim := path.Dir(key) == path.Dir(victim); hasRecord(d, id) != inVictim {
				t.Errorf("record of %s (in the unlisted folder: %v) kept: %v", id, inVictim, hasRecord(d, id))
			}
		}
		if _, err := st.Load(context.Background(), path.Join(testPrefix, "last_sweep")); err == nil {
			t.Error("a sweep that missed a folder wrote the marker")
		}
		assertNoLocks(t, d)
	})

	t.Run("List cut short by a vanished temp file: the keys listed are swept", func(t *testing.T) {
		// file_system's List is a filepath.Walk: a temp file renamed between
		// reading a folder and stat-ing the file ends it with fs.ErrNotExist
		st := &partialList{newMemStorage()}
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		if err := d.sweep(context.Background()); err != nil {
			t.Fatal(err)
		}
		for _, id := range f.expiredIDs {
			if hasRecord(d, id) {
				t.Errorf("expired record of %s survived", id)
			}
		}
	})

	t.Run("Delete fails: the others are still deleted", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		_, victim, _ := d.eventKeys(f.expiredIDs[0])
		st.failOnly("Delete", victim, errInjected)
		if err := d.sweep(context.Background()); err != nil {
			t.Fatal(err)
		}
		for _, id := range f.expiredIDs[1:] {
			if hasRecord(d, id) {
				t.Errorf("expired record of %s survived", id)
			}
		}
		assertNoLocks(t, d)
	})
}

// partialList is a memStorage whose List returns its keys together with
// fs.ErrNotExist, as file_system's walk does when a file vanishes under it.
type partialList struct{ *memStorage }

func (p *partialList) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	keys, err := p.memStorage.List(ctx, prefix, recursive)
	if err != nil {
		return keys, err
	}
	return keys, fmt.Errorf("lstat %s: %w", path.Join(prefix, "vanished"), fs.ErrNotExist)
}

// ---------------------------------------------------------------------------
// Event ids are hashed.

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

// ---------------------------------------------------------------------------
// Provision.

func TestProvisionDedupe(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		h := newTestHandler(t)
		if h.dedupe == nil {
			t.Fatal("dedupe is off by default")
		}
		if h.dedupe.window != 14*24*time.Hour {
			t.Errorf("default window = %s, want 14 days", h.dedupe.window)
		}
		if h.dedupe.prefix != "kayle_webhook/events" {
			t.Errorf("default prefix = %q", h.dedupe.prefix)
		}
	})

	for _, c := range []struct {
		window time.Duration
		ok     bool
	}{
		{time.Hour, false},
		{8*24*time.Hour - time.Second, false},
		{8 * 24 * time.Hour, true},
		{30 * 24 * time.Hour, true},
	} {
		t.Run("dedupe_window "+c.window.String(), func(t *testing.T) {
			h := &Handler{
				SigningSecrets: []string{demoSecret(t)},
				DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
				StorageRaw:     fileStorageJSON(t.TempDir()),
				DedupeWindow:   caddy.Duration(c.window),
			}
			err := provisionTestHandler(t, h)
			if c.ok && (err != nil || h.dedupe.window != c.window) {
				t.Errorf("window %s: %v, want it accepted", c.window, err)
			}
			if !c.ok && (err == nil || !strings.Contains(err.Error(), "8d")) {
				t.Errorf("window %s: error %v, want a refusal naming the 8d minimum", c.window, err)
			}
		})
	}

	for _, c := range []struct {
		prefix, want string // want "" means refused
	}{
		{"..", ""},
		{"../outside", ""},
		{"a/../../b", ""},
		{"a/../b", ""},
		{`a\..\b`, ""},
		{"/", ""},
		{"kayle/endpoint_a", "kayle/endpoint_a"},
		{"/kayle/endpoint_b/", "kayle/endpoint_b"},
	} {
		t.Run("dedupe_prefix "+c.prefix, func(t *testing.T) {
			h := &Handler{
				SigningSecrets: []string{demoSecret(t)},
				DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
				StorageRaw:     fileStorageJSON(t.TempDir()),
				DedupePrefix:   c.prefix,
			}
			err := provisionTestHandler(t, h)
			if c.want == "" && err == nil {
				t.Errorf("prefix %q accepted as %q, want refused", c.prefix, h.dedupe.prefix)
			}
			if c.want != "" && (err != nil || h.dedupe.prefix != c.want) {
				t.Errorf("prefix %q: %v, want %q", c.prefix, err, c.want)
			}
		})
	}

	t.Run("dedupe off forwards every copy", func(t *testing.T) {
		h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled = true; h.StorageRaw = nil })
		if h.dedupe != nil {
			t.Fatal("dedupe off still made a deduper")
		}
		backend := &testBackend{}
		body, sig := signDelivery(t, eventPayload("evt_no_dedupe"), time.Now())
		for range 3 {
			if res := serve(h, deliveryRequest(body, sig), backend); res.Status != http.StatusOK || res.Rec.Header().Get(kayle.HeaderDuplicate) != "" {
				t.Fatalf("status %d, %s %q", res.Status, kayle.HeaderDuplicate, res.Rec.Header().Get(kayle.HeaderDuplicate))
			}
		}
		if backend.Calls() != 3 {
			t.Errorf("backend got %d copies, want 3", backend.Calls())
		}
	})

	t.Run("storage module from JSON is used", func(t *testing.T) {
		root := t.TempDir()
		h := newTestHandler(t, func(h *Handler) {
			h.StorageRaw = json.RawMessage(`{"module":"file_system","root":` + strconv.Quote(root) + `}`)
			h.DedupePrefix = "endpoint_a"
		})
		if fsys, ok := h.dedupe.storage.(*certmagic.FileStorage); !ok || fsys.Path != root {
			t.Fatalf("storage = %#v, want file_system at %s", h.dedupe.storage, root)
		}
		res := serve(h, makeDelivery(t, eventPayload("evt_json_storage"), time.Now()), &testBackend{})
		if res.Status != http.StatusOK {
			t.Fatalf("status %d: %v", res.Status, res.Err)
		}
		_, key, _ := h.dedupe.eventKeys("evt_json_storage")
		if _, err := os.Stat(filepath.Join(root, filepath.FromSlash(key))); err != nil {
			t.Errorf("no record in the configured storage: %v", err)
		}
		if !strings.HasPrefix(key, "endpoint_a/") {
			t.Errorf("record key %q is not under the configured prefix", key)
		}
	})

	t.Run("unknown storage module refused", func(t *testing.T) {
		h := &Handler{
			SigningSecrets: []string{demoSecret(t)},
			DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
			StorageRaw:     json.RawMessage(`{"module":"no_such_storage"}`),
		}
		if err := provisionTestHandler(t, h); err == nil {
			t.Error("an unknown storage module was accepted")
		}
	})
}

// ---------------------------------------------------------------------------
// Benchmarks.

// BenchmarkDedupeFileSystem is the dedupe path on file_system storage for a
// new event: claim, storage lock, record lookup, forward (a no-op backend),
// record write, unlock.
func BenchmarkDedupeFileSystem(b *testing.B) {
	d := newDeduper(&certmagic.FileStorage{Path: b.TempDir()}, testPrefix, defaultDedupeWindow, zap.NewNop(), time.Now)
	next := answerNoContent // a backend that answers: forward refuses a silent chain
	req, _ := prepareTestRequest(httptest.NewRequest(http.MethodPost, "/kayle", nil), httptest.NewRecorder())
	w := httptest.NewRecorder()
	b.ResetTimer()
	for i := range b.N {
		if err := d.deliverOnce(w, req, next, "evt_bench_"+strconv.Itoa(i)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDedupeFileSystemDuplicate is the path of a copy already delivered:
// claim, storage lock, record read, the 200 answer, unlock.
func BenchmarkDedupeFileSystemDuplicate(b *testing.B) {
	d := newDeduper(&certmagic.FileStorage{Path: b.TempDir()}, testPrefix, defaultDedupeWindow, zap.NewNop(), time.Now)
	next := answerNoContent // a backend that answers: forward refuses a silent chain
	req, _ := prepareTestRequest(httptest.NewRequest(http.MethodPost, "/kayle", nil), httptest.NewRecorder())
	if err := d.deliverOnce(httptest.NewRecorder(), req, next, "evt_bench_dup"); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		w := httptest.NewRecorder()
		if err := d.deliverOnce(w, req, next, "evt_bench_dup"); err != nil || w.Header().Get(kayle.HeaderDuplicate) != "true" {
			b.Fatalf("not a duplicate: %v", err)
		}
	}
}

// answerNoContent is the cheapest backend that answers.
var answerNoContent = caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
	w.WriteHeader(http.StatusNoContent)
	return nil
})

var rsa4096 = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 4096) })

// BenchmarkDedupeReferenceDecryptRSA4096 is the yardstick for the dedupe
// numbers: decrypting one ~1 KB delivery encrypted to an RSA-4096 key (the
// size Kayle suggests), which every delivery costs before dedupe starts.
func BenchmarkDedupeReferenceDecryptRSA4096(b *testing.B) {
	key, err := rsa4096()
	if err != nil {
		b.Fatal(err)
	}
	var kr kayle.KeyRing
	if err := kr.Add("k4096", key); err != nil {
		b.Fatal(err)
	}
	payload := eventPayload("evt_bench_rsa")
	payload = append(payload[:len(payload)-1], []byte(`,"pad":"`+strings.Repeat("x", 1024-len(payload)-10)+`"}`)...)
	body, err := kayle.EncryptDelivery(payload, &key.PublicKey, "k4096", jose.A256GCM)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		if _, _, err := kr.Decrypt(body); err != nil {
			b.Fatal(err)
		}
	}
}

// TestForwardOutlivesTheSender: Kayle hangs up after a few seconds; a slow
// backend's 2xx must still be remembered so the retry is a duplicate.
func TestForwardOutlivesTheSender(t *testing.T) {
	d := newTestDeduper(newMemStorage(), newTestClock(testEpoch))
	ctx, hangUp := context.WithCancel(context.Background())
	inBackend, finish := make(chan struct{}), make(chan struct{})
	backendCtxErr := make(chan error, 1)
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, r *http.Request) error {
		close(inBackend)
		<-finish
		backendCtxErr <- r.Context().Err()
		w.WriteHeader(http.StatusOK)
		return nil
	}}
	done := make(chan error, 1)
	go func() {
		rec := httptest.NewRecorder()
		r, _ := prepareTestRequest(httptest.NewRequestWithContext(ctx, http.MethodPost, "/", strings.NewReader("{}")), rec)
		done <- d.deliverOnce(rec, r, backend, "evt_slow")
	}()
	waitFor(t, inBackend, "the backend to be called")
	hangUp()
	close(finish)
	if err := waitFor(t, backendCtxErr, "the backend to answer"); err != nil {
		t.Errorf("the forward was cancelled with the sender: %v", err)
	}
	if err := waitFor(t, done, "the forward"); err != nil {
		t.Fatal(err)
	}
	if !hasRecord(d, "evt_slow") {
		t.Fatal("a 2xx after the sender hung up was not remembered")
	}
	if res := deliverEvent(d, "evt_slow", backend); res.Rec.Header().Get(kayle.HeaderDuplicate) != "true" || backend.Calls() != 1 {
		t.Errorf("retry: status %d, %d forwards", res.Status, backend.Calls())
	}
}

// TestSenderGoneWhileWaiting: a copy whose sender hangs up while another
// copy holds the event is not a storage failure.
func TestSenderGoneWhileWaiting(t *testing.T) {
	st := newMemStorage()
	d := newTestDeduper(st, newTestClock(testEpoch))
	_, _, lockName := d.eventKeys("evt_busy")
	if err := st.Lock(context.Background(), lockName); err != nil { // another instance forwards it
		t.Fatal(err)
	}
	defer st.Unlock(context.Background(), lockName)
	unavailable := counterValue(t, requestsTotal.WithLabelValues("storage_unavailable"))
	gone := counterValue(t, requestsTotal.WithLabelValues("client_gone"))

	ctx, hangUp := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		rec := httptest.NewRecorder()
		r, _ := prepareTestRequest(httptest.NewRequestWithContext(ctx, http.MethodPost, "/", strings.NewReader("{}")), rec)
		done <- d.deliverOnce(rec, r, &testBackend{}, "evt_busy")
	}()
	waitFor(t, st.lockWaits, "the copy to wait on the storage lock")
	hangUp()
	err := waitFor(t, done, "the waiting copy")
	if he, ok := errors.AsType[caddyhttp.HandlerError](err); !ok || he.StatusCode != statusClientClosedRequest {
		t.Errorf("got %v, want a %d", err, statusClientClosedRequest)
	}
	if counterValue(t, requestsTotal.WithLabelValues("storage_unavailable")) != unavailable {
		t.Error("counted as storage_unavailable")
	}
	if counterValue(t, requestsTotal.WithLabelValues("client_gone")) != gone+1 {
		t.Error("not counted as client_gone")
	}
}

// TestSweepLeavesNestedPrefixes: with prefixes kayle and kayle/ep2 (two
// endpoints, as the README advises), kayle's sweep leaves ep2's records.
func TestSweepLeavesNestedPrefixes(t *testing.T) {
	st := newMemStorage()
	old := testEpoch.Add(-2 * defaultDedupeWindow)
	parent := newDeduper(st, "kayle", defaultDedupeWindow, zap.NewNop(), newTestClock(testEpoch).Now)
	child := newDeduper(st, "kayle/ep2", 30*24*time.Hour, zap.NewNop(), newTestClock(old).Now)
	oldParent := newDeduper(st, "kayle", defaultDedupeWindow, zap.NewNop(), newTestClock(old).Now)
	for _, dd := range []*deduper{child, oldParent} {
		hash, key, _ := dd.eventKeys("evt_1")
		if err := dd.commit(context.Background(), key, record{EventSHA256: hash}, http.StatusOK); err != nil {
			t.Fatal(err)
		}
	}
	if err := parent.sweep(context.Background()); err != nil {
		t.Fatal(err)
	}
	if hasRecord(parent, "evt_1") {
		t.Error("the parent's expired record survived")
	}
	if !hasRecord(child, "evt_1") {
		t.Error("the parent's sweep deleted a record of the nested prefix")
	}
	_, key, _ := child.eventKeys("evt_1")
	if !strings.HasPrefix(key, "kayle/ep2/") || path.Base(path.Dir(key)) != path.Base(key)[:2] {
		t.Errorf("record key %s", key)
	}
}

// TestSweepReadsOnlyRecordsNearTheCutoff: the hourly sweep of a busy window
// reads no record whose file time says it is fresh; it reads those near the
// cutoff, and those whose file time is ahead of this instance's clock.
func TestSweepReadsOnlyRecordsNearTheCutoff(t *testing.T) {
	st := newMemStorage()
	now := testEpoch
	d := newTestDeduper(st, newTestClock(now))
	ctx := context.Background()
	write := func(id string, deliveredAt, fileTime time.Time) string {
		hash, key, _ := d.eventKeys(id)
		old := newTestDeduper(st, newTestClock(deliveredAt))
		if err := old.commit(ctx, key, record{EventSHA256: hash}, http.StatusOK); err != nil {
			t.Fatal(err)
		}
		storageModTimer(st)(t, key, fileTime)
		return key
	}
	for i := range 200 {
		at := now.Add(-time.Duration(i) * time.Hour)
		write(fmt.Sprintf("evt_recent_%d", i), at, at)
	}
	nearCutoff := now.Add(-defaultDedupeWindow + 30*time.Minute)
	wantRead := map[string]bool{
		write("evt_near_cutoff", nearCutoff, nearCutoff):                  true,
		write("evt_clock_ahead", now.Add(-time.Hour), now.Add(time.Hour)): true,
	}
	read := map[string]bool{}
	st.hook = func(method, key string) {
		if method == "Load" && d.isRecordKey(key) {
			read[key] = true
		}
	}
	if err := d.sweep(ctx); err != nil {
		t.Fatal(err)
	}
	for key := range read {
		if !wantRead[key] {
			t.Errorf("the sweep read %s, whose file time says it is fresh", key)
		}
	}
	for key := range wantRead {
		if !read[key] {
			t.Errorf("the sweep did not read %s", key)
		}
	}
	for _, id := range []string{"evt_recent_0", "evt_recent_199", "evt_near_cutoff", "evt_clock_ahead"} {
		if !hasRecord(d, id) {
			t.Errorf("fresh record of %s was swept", id)
		}
	}
}

// TestAnswerNotHeldBackByTheRecordWrite: Kayle gets the backend's answer in
// full while the record is still being written; a retry meanwhile waits for
// the lock and is answered as a duplicate once the record is there.
func TestAnswerNotHeldBackByTheRecordWrite(t *testing.T) {
	st := newMemStorage()
	d := newTestDeduper(st, newTestClock(time.Now()))
	_, recordKey, _ := d.eventKeys("evt_flush")
	inStore, releaseStore := make(chan struct{}), make(chan struct{})
	release := sync.OnceFunc(func() { close(releaseStore) })
	var once sync.Once
	st.hook = func(method, key string) {
		if method == "Store" && key == recordKey {
			// the first write: the forward is instant, so no lease comes
			// before the record
			if data, _ := st.Load(context.Background(), key); data == nil {
				once.Do(func() { close(inStore) })
				<-releaseStore
			}
		}
	}
	// as reverse_proxy copies it from a backend's answer
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		w.Header().Set("Content-Length", "2")
		_, err := io.WriteString(w, "ok")
		return err
	}}
	handled := make(chan error, 2)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r, repl := prepareTestRequest(r, w)
		repl.Set("http.kayle.duplicate", false)
		handled <- d.deliverOnce(w, r, backend, "evt_flush")
	}))
	defer srv.Close()
	defer release() // first: the server cannot close while a handler waits

	client := srv.Client()
	client.Timeout = 10 * time.Second
	res, err := client.Post(srv.URL, "application/json", strings.NewReader(`{}`))
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || res.StatusCode != http.StatusOK || string(body) != "ok" {
		t.Fatalf("answer: %d %q %v", res.StatusCode, body, err)
	}
	select {
	case <-inStore:
	case <-time.After(10 * time.Second):
		t.Fatal("no record write after the answer")
	}
	select {
	case err := <-handled:
		t.Fatalf("the handler returned (%v) before its record write ended", err)
	default:
	}

	type answer struct {
		res *http.Response
		err error
	}
	retry := make(chan answer, 1)
	go func() {
		res, err := client.Post(srv.URL, "application/json", strings.NewReader(`{}`))
		retry <- answer{res, err}
	}()
	time.Sleep(100 * time.Millisecond)
	if backend.Calls() != 1 {
		t.Fatalf("the retry reached the backend while the record was being written (%d calls)", backend.Calls())
	}
	release()
	if err := <-handled; err != nil {
		t.Fatal(err)
	}
	if a := <-retry; a.err != nil || a.res.Header.Get(kayle.HeaderDuplicate) != "true" {
		t.Errorf("the retry was not answered as a duplicate: %+v", a)
	} else {
		a.res.Body.Close()
	}
	<-handled
	if backend.Calls() != 1 || !remembered(d, "evt_flush") {
		t.Errorf("backend calls %d, remembered %v; want 1, true", backend.Calls(), remembered(d, "evt_flush"))
	}
	assertNoLocks(t, d)
}

// vagueStat is a storage whose Stat calls no key terminal and gives no
// modification time, as some storage modules' do.
type vagueStat struct{ *memStorage }

func (v vagueStat) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	info, err := v.memStorage.Stat(ctx, key)
	info.IsTerminal, info.Modified = false, time.Time{}
	return info, err
}

// Expired records are deleted, and fresh ones kept, on a storage whose
// Stat never says a key is terminal: each record is judged by its own time.
func TestSweepWhereStatSaysNothing(t *testing.T) {
	st := vagueStat{newMemStorage()}
	now := testEpoch
	var expired, fresh []string
	for i := range 3 {
		for _, c := range []struct {
			kind string
			ids  *[]string
			at   time.Time
		}{
			{"expired", &expired, now.Add(-defaultDedupeWindow - time.Duration(i+1)*time.Hour)},
			{"fresh", &fresh, now.Add(-defaultDedupeWindow + time.Duration(i+1)*time.Hour)},
		} {
			id := fmt.Sprintf("evt_%s_%d", c.kind, i)
			old := newTestDeduper(st, newTestClock(c.at))
			hash, key, _ := old.eventKeys(id)
			if err := old.commit(context.Background(), key, record{EventSHA256: hash}, http.StatusOK); err != nil {
				t.Fatal(err)
			}
			*c.ids = append(*c.ids, id)
		}
	}
	d := newTestDeduper(st, newTestClock(now))
	if err := d.sweep(context.Background()); err != nil {
		t.Fatalf("sweep: %v", err)
	}
	for _, id := range expired {
		if _, key, _ := d.eventKeys(id); st.Exists(context.Background(), key) {
			t.Errorf("expired record of %s kept", id)
		}
	}
	for _, id := range fresh {
		if _, key, _ := d.eventKeys(id); !st.Exists(context.Background(), key) {
			t.Errorf("fresh record of %s deleted", id)
		}
	}
}
