package kaylewebhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

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
	m.mu.Lock()
	defer m.mu.Unlock()
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

// deliverThrough runs one verified copy of eventID through d as ServeHTTP
// does after verifying and decrypting it: deliverOnce, then the answer.
func deliverThrough(d *deduper, w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, eventID string) error {
	h := handlerAround(d)
	return h.answer(w, r, h.deliver(w, r, next, result{event: kayle.Event{ID: eventID}}, verified{}))
}

// handlerAround is the handler deliverThrough runs d in: one per deduper,
// so a benchmark times the delivery, not the making of a logger.
func handlerAround(d *deduper) *Handler {
	if h, ok := testHandlers.Load(d); ok {
		return h.(*Handler)
	}
	h := &Handler{dedupe: d, now: d.now}
	h.setLogger(d.logger)
	actual, _ := testHandlers.LoadOrStore(d, h)
	return actual.(*Handler)
}

var testHandlers sync.Map // *deduper -> *Handler

// deliverEvent runs one copy of eventID through deliverThrough and returns
// the outcome.
// A copy stuck on a lock gives up after testWaitBound with a 503.
func deliverEvent(d *deduper, eventID string, next caddyhttp.Handler) served {
	ctx, cancel := context.WithTimeout(context.Background(), testWaitBound)
	defer cancel()
	rec := httptest.NewRecorder()
	r := httptest.NewRequestWithContext(ctx, http.MethodPost, "/kayle", strings.NewReader(`{"metadata":{}}`))
	r, repl := prepareTestRequest(r, rec)
	repl.Set("http.kayle.duplicate", false) // as rewriteRequest does
	err := deliverThrough(d, rec, r, next, eventID)
	return servedFrom(rec, err, repl)
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

// vagueStat is a storage whose Stat calls no key terminal and gives no
// modification time, as some storage modules' do.
type vagueStat struct{ *memStorage }

func (v vagueStat) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	info, err := v.memStorage.Stat(ctx, key)
	info.IsTerminal, info.Modified = false, time.Time{}
	return info, err
}
