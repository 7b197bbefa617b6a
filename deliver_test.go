package kaylewebhook

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"github.com/go-jose/go-jose/v4"
	"go.uber.org/zap"
)

// ---------------------------------------------------------------------------
// memStorage: an in-memory certmagic.Storage test double.

// ---------------------------------------------------------------------------
// Helpers for deduper tests.

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
			forwarded := counterValue(t, requestsTotal.WithLabelValues("forwarded"))
			defer func() {
				if got := counterValue(t, requestsTotal.WithLabelValues("forwarded")) - forwarded; got != 1 {
					t.Errorf("requests_total{outcome=forwarded} grew by %v, want 1", got)
				}
			}()
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

// ---------------------------------------------------------------------------
// Sweep.

// ---------------------------------------------------------------------------
// Event ids are hashed.

// ---------------------------------------------------------------------------
// Provision.

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
		if err := deliverThrough(d, w, req, next, "evt_bench_"+strconv.Itoa(i)); err != nil {
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
	if err := deliverThrough(d, httptest.NewRecorder(), req, next, "evt_bench_dup"); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		w := httptest.NewRecorder()
		if err := deliverThrough(d, w, req, next, "evt_bench_dup"); err != nil || w.Header().Get(kayle.HeaderDuplicate) != "true" {
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
		done <- deliverThrough(d, rec, r, backend, "evt_slow")
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
		done <- deliverThrough(d, rec, r, &testBackend{}, "evt_busy")
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
		handled <- deliverThrough(d, w, r, backend, "evt_flush")
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
