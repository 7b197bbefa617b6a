package kaylewebhook

// Fixtures of the queue tests: a forward handler module that stands for the
// backend, and a handler in queue mode with short timing.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func init() { caddy.RegisterModule(testForward{}) }

// testForward is a handler module for queue forward routes: it hands each
// request to the testBackend registered under Name.
type testForward struct {
	Name string `json:"name"`
}

func (testForward) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.kayle_test_forward",
		New: func() caddy.Module { return new(testForward) },
	}
}

var (
	testForwards    sync.Map // name → *testBackend
	testForwardSeq  atomic.Int64
	queueTestTiming = handlerTiming{lock: fastLockTiming, queuePoll: 20 * time.Millisecond, queueStats: 100 * time.Millisecond}
)

func (f testForward) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	b, ok := testForwards.Load(f.Name)
	if !ok {
		return caddyhttp.Error(http.StatusBadGateway, fmt.Errorf("no test backend %q", f.Name))
	}
	return b.(*testBackend).ServeHTTP(w, r)
}

// forwardTo is a queue forward route list reaching backend.
func forwardTo(t testing.TB, backend *testBackend) caddyhttp.RouteList {
	name := fmt.Sprintf("%s#%d", t.Name(), testForwardSeq.Add(1))
	testForwards.Store(name, backend)
	t.Cleanup(func() { testForwards.Delete(name) })
	raw, _ := json.Marshal(map[string]string{"handler": "kayle_test_forward", "name": name})
	return caddyhttp.RouteList{{HandlersRaw: []json.RawMessage{raw}}}
}

// queueTest is a handler in queue mode on a file_system storage at root,
// forwarding to backend, with short lock and poll timing.
type queueTest struct {
	h       *Handler
	backend *testBackend
	root    string
}

func newQueueTest(t *testing.T, backend *testBackend, configure ...func(*Handler)) *queueTest {
	t.Helper()
	root := t.TempDir()
	return newQueueTestAt(t, root, backend, configure...)
}

// newQueueTestAt is newQueueTest on the storage at root (another instance,
// or the config after a reload, sharing it).
func newQueueTestAt(t *testing.T, root string, backend *testBackend, configure ...func(*Handler)) *queueTest {
	t.Helper()
	h := newTestHandler(t, func(h *Handler) {
		h.StorageRaw = fileStorageJSON(root)
		// a prefix of its own: the queue's gauges are labelled by it, and
		// the tests run in parallel
		h.DedupePrefix = "kayle_webhook/" + strings.NewReplacer("/", "_", "#", "_").Replace(t.Name())
		h.Queue = &Queue{Forward: forwardTo(t, backend), MaxBackoff: caddy.Duration(200 * time.Millisecond)}
		timing := queueTestTiming
		h.timing = &timing
		for _, f := range configure {
			f(h)
		}
	})
	t.Cleanup(func() {
		// stop the queue and let its forwards end before the storage goes
		_ = h.Cleanup()
		h.queue.active.Wait()
	})
	return &queueTest{h: h, backend: backend, root: root}
}

// deliver serves one genuine delivery of eventID, signed now.
func (qt *queueTest) deliver(t *testing.T, eventID string) served {
	t.Helper()
	return serve(qt.h, makeDelivery(t, eventPayload(eventID), time.Now()), &testBackend{})
}

// deliverUntilTried delivers eventID and waits until its record counts a
// try (with a failing backend: a first try that failed).
func (qt *queueTest) deliverUntilTried(t *testing.T, eventID string) {
	t.Helper()
	qt.deliver(t, eventID)
	qt.waitTried(t, eventID)
}

// waitTried waits until eventID's record counts a try.
func (qt *queueTest) waitTried(t *testing.T, eventID string) {
	t.Helper()
	eventually(t, "a try of "+eventID, func() bool {
		rec, _ := qt.record(t, eventID)
		return rec.Queue != nil && rec.Queue.Attempts > 0
	})
}

// record is eventID's record; ok is false when there is none.
func (qt *queueTest) record(t *testing.T, eventID string) (record, bool) {
	t.Helper()
	_, key, _ := qt.h.dedupe.eventKeys(eventID)
	rec, err := qt.h.dedupe.loadRecord(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	if rec == nil {
		return record{}, false
	}
	return *rec, true
}

// markers lists the queue's marker files (due and dead), relative to root.
func (qt *queueTest) markers(t *testing.T) []string {
	t.Helper()
	var found []string
	dir := filepath.Join(qt.root, qt.h.queue.dir)
	_ = filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && !strings.HasSuffix(p, queuePausedKey) {
			rel, _ := filepath.Rel(qt.root, p)
			found = append(found, filepath.ToSlash(rel))
		}
		return nil
	})
	return found
}

// eventually fails the test unless cond holds within a bound.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// callsFor counts the requests backend received for eventID.
func callsFor(b *testBackend, eventID string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, r := range b.requests {
		if r.Header.Get("X-Kayle-Event-Id") == eventID {
			n++
		}
	}
	return n
}

// gaugeValue reads a gauge.
func gaugeValue(t *testing.T, g prometheus.Gauge) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}

func mustAtoi(t *testing.T, s string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("%q is not a number", s)
	}
	return n
}
