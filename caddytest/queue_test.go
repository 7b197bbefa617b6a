package caddytest

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// The queue in real Caddy processes on a file_system storage, with
// production timing: what a user of queue mode relies on.

// queueFolder is where the queue of the default dedupe_prefix lives in a
// file_system storage.
const queueFolder = "kayle_webhook/events/queue"

// backoffSeries is the queue's backoff gauge, as the admin /metrics exposes it.
const backoffSeries = `caddy_kayle_webhook_queue_backoff_seconds{queue="kayle_webhook/events"}`

// answerPromise is how soon a delivery must be answered in queue mode (the
// user-facing promise; the real answers take milliseconds).
const answerPromise = time.Second

// queueGateway is a gateway in queue mode on storage, forwarding from the
// queue to backend; the site has no reverse_proxy of its own.
func queueGateway(t *testing.T, storage, backend string, q queueBlock) gateway {
	q.backend = backend
	return gateway{adminPort: mustFreePort(t), port: mustFreePort(t), storage: storage, queue: &q}
}

// sender is Kayle's side: a client that waits a few seconds for an answer.
func sender(t *testing.T) *http.Client {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 100}}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// answer is what the gateway answered to one delivery.
type answer struct {
	status    int
	queued    bool // 202, X-Kayle-Queued: true, {"status":"queued","event_id":…} of the event
	duplicate bool // 200, X-Kayle-Duplicate: true, {"status":"duplicate",…} of the event
	body      string
	latency   time.Duration // from sending to the answer's last byte
	err       error
}

func (a answer) String() string {
	if a.err != nil {
		return fmt.Sprintf("no answer after %s: %v", a.latency.Round(time.Millisecond), a.err)
	}
	return fmt.Sprintf("%d %q after %s", a.status, truncate([]byte(a.body)), a.latency.Round(time.Millisecond))
}

// send sends a delivery of eventID and reads the answer.
func send(client *http.Client, req *http.Request, eventID string) answer {
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return answer{latency: time.Since(start), err: err}
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	a := answer{status: resp.StatusCode, body: string(body), latency: time.Since(start), err: err}
	var parsed struct {
		Status  string `json:"status"`
		EventID string `json:"event_id"`
	}
	_ = json.Unmarshal(body, &parsed)
	ours := parsed.EventID == eventID && resp.Header.Get(kayle.HeaderEventID) == eventID
	a.queued = resp.StatusCode == http.StatusAccepted && resp.Header.Get(kayle.HeaderQueued) == "true" &&
		parsed.Status == "queued" && ours
	a.duplicate = resp.StatusCode == http.StatusOK && resp.Header.Get(kayle.HeaderDuplicate) == "true" &&
		parsed.Status == "duplicate" && ours
	return a
}

// expectQueued delivers ev to url and fails the test unless it is queued
// within the promise.
func expectQueued(t *testing.T, client *http.Client, url string, ev event) answer {
	t.Helper()
	a := send(client, deliver(t, url, ev), ev.id)
	if !a.queued {
		t.Fatalf("delivery of %s: %s, want 202 queued", ev.id, a)
	}
	if a.latency >= answerPromise {
		t.Errorf("delivery of %s answered in %s, want under %s", ev.id, a.latency.Round(time.Millisecond), answerPromise)
	}
	return a
}

// expectDuplicateAnswer delivers a copy of ev to url and fails the test
// unless it is answered as a duplicate.
func expectDuplicateAnswer(t *testing.T, client *http.Client, url string, ev event) {
	t.Helper()
	if a := send(client, deliver(t, url, ev), ev.id); !a.duplicate {
		t.Errorf("copy of %s: %s, want a 200 duplicate", ev.id, a)
	}
}

// waitUntil polls cond until it holds, and fails the test if it does not
// within timeout. It returns how long it took.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			t.Fatalf("not within %s: %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return time.Since(start)
}

// metric reads one series from the process's admin /metrics (-1: absent).
func (p *caddyProcess) metric(t *testing.T, series string) float64 {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/metrics", p.gw.adminPort), nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Close = true
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("Caddy %s admin /metrics: %v", p.Name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("Caddy %s admin /metrics: %d, %v", p.Name, resp.StatusCode, err)
	}
	return metricValue(t, string(body), series)
}

func eventHash(id string) string {
	sum := sha256.Sum256([]byte(id))
	return hex.EncodeToString(sum[:])
}

// diskRecord is what the storage holds of an event (record.go), as an
// operator would read the file.
type diskRecord struct {
	DeliveredAt time.Time `json:"delivered_at"`
	Status      int       `json:"status"`
	Queue       *struct {
		EventID    string `json:"event_id"`
		Attempts   int    `json:"attempts"`
		LastStatus int    `json:"last_status"`
		Dead       bool   `json:"dead"`
		Marker     string `json:"marker"`
	} `json:"queue"`
}

// readRecord reads the event's record from the storage folder; nil when
// there is none (yet).
func readRecord(t *testing.T, storage, eventID string) *diskRecord {
	t.Helper()
	h := eventHash(eventID)
	data, err := os.ReadFile(filepath.Join(storage, "kayle_webhook", "events", h[:2], h))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var rec diskRecord
	if err := json.Unmarshal(data, &rec); err != nil {
		t.Fatalf("the record of %s: %v\n%s", eventID, err, data)
	}
	return &rec
}

// delivered reports whether the storage records the event as delivered.
func delivered(t *testing.T, storage, eventID string) bool {
	rec := readRecord(t, storage, eventID)
	return rec != nil && !rec.DeliveredAt.IsZero() && rec.Queue == nil
}

var markerName = regexp.MustCompile(`^[0-9]{13}-[0-9]{13}-([0-9a-f]{64})$`)

// dueMarkers lists the event hashes that have a due marker in the storage
// (certmagic's temporary files aside).
func dueMarkers(t *testing.T, storage string) []string {
	t.Helper()
	var hashes []string
	err := filepath.WalkDir(filepath.Join(storage, queueFolder, "due"), func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // a bucket deleted under the walk
		}
		if err != nil {
			return err
		}
		if m := markerName.FindStringSubmatch(d.Name()); m != nil && !d.IsDir() {
			hashes = append(hashes, m[1])
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	return hashes
}

// waitDrained waits until every event is recorded as delivered and no due
// marker is left: then no poll of any instance forwards any of them again.
func waitDrained(t *testing.T, storage string, evs []event, timeout time.Duration) {
	t.Helper()
	waitUntil(t, timeout, "every event recorded as delivered, no due marker left", func() bool {
		for _, ev := range evs {
			if !delivered(t, storage, ev.id) {
				return false
			}
		}
		return len(dueMarkers(t, storage)) == 0
	})
}

// expectEachOnce fails the test unless the backend got each event exactly once.
func expectEachOnce(t *testing.T, be *backend, evs []event) {
	t.Helper()
	for _, ev := range evs {
		if n := be.count(ev.id); n != 1 {
			t.Errorf("backend got %s %d times, want exactly 1", ev.id, n)
		}
	}
}

// privateEvent is an event whose claims are unique strings, and those
// strings with the session id and the payload's field names: what must
// never be at rest.
func privateEvent(t *testing.T) (event, []string) {
	ev := newEvent(t, map[string]any{
		"given_names": "Given" + randomHex(t, 10),
		"family_name": "Family" + randomHex(t, 10),
	})
	var p struct {
		Data struct {
			Claims map[string]any `json:"claims"`
		} `json:"data"`
	}
	if err := json.Unmarshal(ev.payload, &p); err != nil {
		t.Fatal(err)
	}
	secrets := []string{sessionID(t, ev), "verification_session_id", "selected_field_keys"}
	for k, v := range p.Data.Claims {
		secrets = append(secrets, k)
		if s, ok := v.(string); ok {
			secrets = append(secrets, s)
		}
	}
	return ev, secrets
}

// expectNoPlaintextAtRest walks the storage folder and fails the test if
// any file holds one of the secrets; logs too, when given.
func expectNoPlaintextAtRest(t *testing.T, storage string, secrets []string, logs ...string) {
	t.Helper()
	files := 0
	err := filepath.WalkDir(storage, func(path string, d fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil // a lock or temporary file gone under the walk
		}
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		files++
		for _, s := range secrets {
			if bytes.Contains(data, []byte(s)) {
				rel, _ := filepath.Rel(storage, path)
				t.Errorf("the storage file %s holds plaintext: %q", rel, s)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files == 0 {
		t.Fatal("the storage folder holds no file at all")
	}
	for i, log := range logs {
		for _, s := range secrets {
			if s != "verification_session_id" && s != "selected_field_keys" && bytes.Contains([]byte(log), []byte(s)) {
				t.Errorf("log %d holds plaintext: %q", i, s)
			}
		}
	}
	t.Logf("no plaintext in %d storage files", files)
}

// switchedListener is a backend's listener that, while down, accepts each
// connection and closes it at once, as a crashed backend's port does, and
// counts them: the gateway's tries while the backend is down.
type switchedListener struct {
	net.Listener
	down  atomic.Bool
	tries atomic.Int64
}

func (l *switchedListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil || !l.down.Load() {
			return conn, err
		}
		l.tries.Add(1)
		conn.Close()
	}
}

// newSwitchedBackend is a backend behind a switchedListener.
func newSwitchedBackend(t *testing.T, down bool) (*backend, *switchedListener) {
	be := &backend{byEvent: make(map[string]int)}
	be.srv = httptest.NewUnstartedServer(http.HandlerFunc(be.serveHTTP))
	l := &switchedListener{Listener: be.srv.Listener}
	l.down.Store(down)
	be.srv.Listener = l
	be.srv.Start()
	t.Cleanup(be.srv.Close)
	return be, l
}

// startReady starts a Caddy process serving gw and waits until it answers.
func startReady(t *testing.T, bin, name string, gw gateway) *caddyProcess {
	t.Helper()
	p := startCaddy(t, bin, name, gw)
	p.waitReady(t)
	return p
}

func skipShort(t *testing.T) {
	if testing.Short() {
		t.Skip("builds ./cmd/caddy and runs Caddy processes; skipped with -short")
	}
}

// Two instances share one queue: N events, copies of each at both at once,
// reach the backend exactly once each; every copy is answered at once as
// queued (one per event) or as a duplicate, never an error.
func TestQueueTwoInstancesDeliverEachEventOnce(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	be := newBackend(t)
	// a backend that takes a moment: copies then meet forwards in flight
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		time.Sleep(100 * time.Millisecond)
		_, _ = io.WriteString(w, `{"received":true}`)
	}
	storage := t.TempDir()
	procs := []*caddyProcess{
		startCaddy(t, bin, "A", queueGateway(t, storage, be.hostPort(), queueBlock{})),
		startCaddy(t, bin, "B", queueGateway(t, storage, be.hostPort(), queueBlock{})),
	}
	for _, p := range procs {
		p.waitReady(t)
	}

	const events, copies = 10, 2 // copies per event per instance
	evs := make([]event, events)
	type shot struct {
		event int
		req   *http.Request
	}
	var shots []shot
	for e := range evs {
		evs[e] = newEvent(t, nil)
		for _, p := range procs {
			for range copies {
				shots = append(shots, shot{e, deliver(t, p.gw.url(), evs[e])})
			}
		}
	}
	client := sender(t)
	answers := make([]answer, len(shots))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, s := range shots {
		wg.Go(func() {
			<-start
			answers[i] = send(client, s.req, evs[s.event].id)
		})
	}
	close(start)
	wg.Wait()

	queued := make([]int, events)
	var slowest time.Duration
	for i, a := range answers {
		slowest = max(slowest, a.latency)
		switch {
		case a.queued:
			queued[shots[i].event]++
		case !a.duplicate:
			t.Errorf("copy %d of event %d: %s, want 202 queued or a 200 duplicate", i, shots[i].event, a)
		}
	}
	t.Logf("%d copies of %d events answered, the slowest in %s", len(shots), events, slowest.Round(time.Millisecond))
	for e, n := range queued {
		if n != 1 {
			t.Errorf("event %d: %d copies answered as queued, want 1", e, n)
		}
	}

	took := waitUntil(t, 30*time.Second, "the backend got every event", func() bool {
		for _, ev := range evs {
			if be.count(ev.id) == 0 {
				return false
			}
		}
		return true
	})
	t.Logf("every event reached the backend %s after the answers", took.Round(time.Millisecond))
	waitDrained(t, storage, evs, 15*time.Second)
	for e, ev := range evs {
		expectDuplicateAnswer(t, client, procs[e%2].gw.url(), ev)
	}
	expectEachOnce(t, be, evs)
	if n := be.total(); n != events {
		t.Errorf("backend got %d requests, want %d", n, events)
	}
}

// The backend goes down: deliveries are still queued at once, the queue
// backs off as a whole (few tries at the backend's port, the backoff gauge
// up), and once the backend is back every queued event reaches it once,
// within max_backoff and a margin. Nothing of the plaintext is at rest.
func TestQueueBackendDownAndBack(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	be, port := newSwitchedBackend(t, false)
	storage := t.TempDir()
	const maxBackoff = 2 * time.Second
	p := startReady(t, bin, "A", queueGateway(t, storage, be.hostPort(), queueBlock{maxBackoff: "2s"}))
	client := sender(t)

	warm := newEvent(t, nil)
	expectQueued(t, client, p.gw.url(), warm)
	waitUntil(t, 10*time.Second, "the first event reached the backend", func() bool { return be.count(warm.id) == 1 })

	// the backend crashes
	port.down.Store(true)
	be.srv.CloseClientConnections()
	downAt := time.Now()

	const events = 12
	evs := make([]event, events)
	var secrets []string
	for i := range evs {
		var s []string
		evs[i], s = privateEvent(t)
		secrets = append(secrets, s...)
	}
	expectQueued(t, client, p.gw.url(), evs[0]) // tried at once, and fails
	waitUntil(t, 10*time.Second, "the backoff gauge is up after the failed try", func() bool {
		return p.metric(t, backoffSeries) > 0
	})
	for _, ev := range evs[1:] {
		expectQueued(t, client, p.gw.url(), ev)
	}
	expectNoPlaintextAtRest(t, storage, secrets)

	// the outage goes on: each event retried on its own would come back
	// about every second; backing off as a whole, the queue sends one probe
	// at a time, at most one a second
	time.Sleep(5 * time.Second)
	if v := p.metric(t, backoffSeries); v <= 0 {
		t.Errorf("%s is %v while the backend is down, want > 0", backoffSeries, v)
	}
	tries := port.tries.Load()
	down := time.Since(downAt)
	port.down.Store(false)
	t.Logf("%d tries at the backend's port in the %s it was down, with %d events queued", tries, down.Round(time.Millisecond), events)
	if tries < 1 {
		t.Error("the queue never tried the backend while it was down")
	}
	if limit := 2 + int64(down/time.Second); tries > limit || tries >= events {
		t.Errorf("%d tries in %s while the backend was down, want at most %d, and fewer than the %d events queued",
			tries, down.Round(time.Millisecond), limit, events)
	}

	// back: every queued event arrives within max_backoff (the next probe)
	// and a margin for forwarding them all
	bound := maxBackoff + 10*time.Second
	took := waitUntil(t, bound, "every event queued during the outage reached the backend", func() bool {
		for _, ev := range evs {
			if be.count(ev.id) == 0 {
				return false
			}
		}
		return true
	})
	t.Logf("every queued event reached the backend %s after it came back", took.Round(time.Millisecond))
	waitDrained(t, storage, evs, 15*time.Second)
	expectEachOnce(t, be, append(evs, warm))
	waitUntil(t, 5*time.Second, "the backoff gauge back to 0", func() bool { return p.metric(t, backoffSeries) == 0 })
	expectNoPlaintextAtRest(t, storage, secrets, p.Out.String())
}

// A reload while a queued event is being forwarded: that forward completes
// and is recorded (the event delivered once), and deliveries after the
// reload are queued and forwarded by the new config.
func TestQueueReloadMidForward(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	first := newEvent(t, nil)
	inFlight, release := make(chan struct{}), make(chan struct{})
	be := newBackend(t)
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		if r.Header.Get(kayle.HeaderEventID) == first.id && n == 1 {
			close(inFlight)
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		}
		_, _ = io.WriteString(w, `{"received":true}`)
	}
	storage := t.TempDir()
	gw := queueGateway(t, storage, be.hostPort(), queueBlock{})
	p := startReady(t, bin, "A", gw)
	client := sender(t)

	expectQueued(t, client, gw.url(), first)
	select {
	case <-inFlight:
	case <-time.After(10 * time.Second):
		t.Fatal("the first try did not reach the backend")
	}

	reloaded := gw
	q := *gw.queue
	q.proxyExtra = "\t\t\t\t\theader_up X-Queue-Config reloaded\n"
	reloaded.queue = &q
	config := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(config, []byte(reloaded.caddyfile()), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "reload", "--config", config, "--adapter", "caddyfile",
		"--address", fmt.Sprintf("localhost:%d", gw.adminPort), "--force")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("caddy reload: %v\n%s", err, out)
	}

	after := newEvent(t, nil)
	expectQueued(t, client, gw.url(), after)
	waitUntil(t, 10*time.Second, "the delivery after the reload reached the backend", func() bool { return be.count(after.id) == 1 })
	close(release)
	waitDrained(t, storage, []event{first, after}, 20*time.Second)
	expectDuplicateAnswer(t, client, gw.url(), first)
	expectDuplicateAnswer(t, client, gw.url(), after)
	expectEachOnce(t, be, []event{first, after})
	for _, r := range be.requests() {
		got := r.Header.Get("X-Queue-Config")
		switch r.Header.Get(kayle.HeaderEventID) {
		case first.id:
			if got != "" {
				t.Errorf("the forward in flight across the reload has X-Queue-Config %q, want the old config's none", got)
			}
		case after.id:
			if got != "reloaded" {
				t.Errorf("the delivery after the reload was forwarded with X-Queue-Config %q, want the new config's", got)
			}
		}
	}
	if t.Failed() {
		t.Logf("Caddy output:\n%s", p.Out.String())
	}
}

// Past its horizon an event is dead: its record says so on disk, its dead
// marker is listed, and it is not forwarded when the backend is back (nor
// by a copy of it), while a new event is.
func TestQueueDeadPastHorizon(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	be, port := newSwitchedBackend(t, true)
	storage := t.TempDir()
	p := startReady(t, bin, "A", queueGateway(t, storage, be.hostPort(), queueBlock{horizon: "3s", maxBackoff: "1s"}))
	client := sender(t)

	ev := newEvent(t, nil)
	expectQueued(t, client, p.gw.url(), ev)
	deadMarker := filepath.Join(storage, queueFolder, "dead", eventHash(ev.id))
	took := waitUntil(t, 20*time.Second, "the event has a dead marker", func() bool {
		_, err := os.Stat(deadMarker)
		return err == nil
	})
	t.Logf("dead %s after it was queued, after %d tries at the backend's port", took.Round(100*time.Millisecond), port.tries.Load())
	rec := readRecord(t, storage, ev.id)
	switch {
	case rec == nil || rec.Queue == nil:
		t.Fatalf("the dead event's record is not a queued one: %+v", rec)
	case !rec.Queue.Dead || !rec.DeliveredAt.IsZero():
		t.Errorf("the record of the dead event: dead %v, delivered at %v; want dead, not delivered", rec.Queue.Dead, rec.DeliveredAt)
	case rec.Queue.Attempts < 1 || rec.Queue.LastStatus != http.StatusBadGateway:
		t.Errorf("the dead event's record: %d attempts, last status %d; want at least 1, 502", rec.Queue.Attempts, rec.Queue.LastStatus)
	case rec.Queue.Marker != filepath.ToSlash(filepath.Join(queueFolder, "dead", eventHash(ev.id))):
		t.Errorf("the dead event's record names marker %q", rec.Queue.Marker)
	}
	if slices.Contains(dueMarkers(t, storage), eventHash(ev.id)) {
		t.Error("the dead event still has a due marker")
	}
	if port.tries.Load() < 1 {
		t.Error("the event was never tried")
	}

	// the backend is back: a new event goes through, the dead one stays
	port.down.Store(false)
	later := newEvent(t, nil)
	expectQueued(t, client, p.gw.url(), later)
	waitDrained(t, storage, []event{later}, 15*time.Second)
	expectDuplicateAnswer(t, client, p.gw.url(), ev)
	if n := be.count(ev.id); n != 0 {
		t.Errorf("the dead event reached the backend %d times, want never", n)
	}
	if n := be.count(later.id); n != 1 {
		t.Errorf("the event queued after the backend came back reached it %d times, want 1", n)
	}
	if rec := readRecord(t, storage, ev.id); rec == nil || rec.Queue == nil || !rec.Queue.Dead {
		t.Errorf("the dead event's record after the backend came back: %+v, want it still dead", rec)
	}
	if _, err := os.Stat(deadMarker); err != nil {
		t.Errorf("the dead marker: %v", err)
	}
}

// A slow backend (10 s an event) behind the queue: deliveries at 20 a
// second are each answered in under a second, and the backend gets each
// event once.
func TestQueueSlowBackendFastAnswers(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	const backendTakes = 10 * time.Second
	be := newBackend(t)
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		select {
		case <-time.After(backendTakes):
		case <-r.Context().Done():
			return
		}
		_, _ = io.WriteString(w, `{"received":true}`)
	}
	storage := t.TempDir()
	p := startReady(t, bin, "A", queueGateway(t, storage, be.hostPort(), queueBlock{concurrency: 64}))
	client := sender(t)

	const events, every = 60, 50 * time.Millisecond // 20 a second for 3 s
	evs := make([]event, events)
	reqs := make([]*http.Request, events)
	var secrets []string
	for i := range evs {
		var s []string
		evs[i], s = privateEvent(t)
		secrets = append(secrets, s...)
		reqs[i] = deliver(t, p.gw.url(), evs[i])
	}
	answers := make([]answer, events)
	var wg sync.WaitGroup
	tick := time.NewTicker(every)
	began := time.Now()
	for i := range reqs {
		if i > 0 {
			<-tick.C
		}
		wg.Go(func() { answers[i] = send(client, reqs[i], evs[i].id) })
	}
	tick.Stop()
	wg.Wait()
	sent := time.Since(began)

	latencies := make([]time.Duration, 0, events)
	for i, a := range answers {
		if !a.queued {
			t.Errorf("delivery %d: %s, want 202 queued", i, a)
		}
		latencies = append(latencies, a.latency)
	}
	slices.Sort(latencies)
	t.Logf("%d deliveries in %s: answered in median %s, p99 %s, max %s", events, sent.Round(time.Millisecond),
		latencies[events/2].Round(time.Millisecond), latencies[events*99/100].Round(time.Millisecond), latencies[events-1].Round(time.Millisecond))
	if slowest := latencies[events-1]; slowest >= answerPromise {
		t.Errorf("the slowest delivery was answered in %s, want under %s", slowest.Round(time.Millisecond), answerPromise)
	}

	expectNoPlaintextAtRest(t, storage, secrets) // while the forwards are in flight

	took := waitUntil(t, backendTakes+30*time.Second, "the backend answered every event", func() bool {
		for _, ev := range evs {
			if !delivered(t, storage, ev.id) {
				return false
			}
		}
		return true
	})
	t.Logf("every event delivered %s after the last answer", took.Round(100*time.Millisecond))
	waitDrained(t, storage, evs, 15*time.Second)
	expectEachOnce(t, be, evs)
	if n := be.total(); n != events {
		t.Errorf("backend got %d requests, want %d", n, events)
	}
	expectNoPlaintextAtRest(t, storage, secrets, p.Out.String())
}

// A copy of an event whose forward from the queue is in flight, at the
// instance forwarding it or at another, is answered at once as a duplicate:
// the event is queued already, and Kayle waits only a few seconds.
func TestQueueCopyDuringForwardIsAnsweredAtOnce(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	holding, release := make(chan struct{}), make(chan struct{})
	be := newBackend(t)
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		if n == 1 { // a slow backend: the first forward takes a while
			close(holding)
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		}
		_, _ = io.WriteString(w, `{"received":true}`)
	}
	storage := t.TempDir()
	a := startCaddy(t, bin, "A", queueGateway(t, storage, be.hostPort(), queueBlock{}))
	b := startCaddy(t, bin, "B", queueGateway(t, storage, be.hostPort(), queueBlock{}))
	a.waitReady(t)
	b.waitReady(t)
	client := sender(t)
	client.Timeout = 5 * time.Second // Kayle's few seconds

	ev := newEvent(t, nil)
	expectQueued(t, client, a.gw.url(), ev)
	select {
	case <-holding:
	case <-time.After(10 * time.Second):
		t.Fatal("the first try did not reach the backend")
	}
	procs := []*caddyProcess{a, b}
	reqs := make([]*http.Request, len(procs))
	for i, p := range procs {
		reqs[i] = deliver(t, p.gw.url(), ev)
	}
	answers := make([]answer, len(procs))
	var wg sync.WaitGroup
	for i := range procs {
		wg.Go(func() { answers[i] = send(client, reqs[i], ev.id) })
	}
	wg.Wait()
	close(release)
	for i, a := range answers {
		if !a.duplicate || a.latency >= answerPromise {
			t.Errorf("a copy at %s while the event's forward is in flight: %s; want a 200 duplicate within %s",
				procs[i].Name, a, answerPromise)
		}
	}
	waitDrained(t, storage, []event{ev}, 15*time.Second)
	expectEachOnce(t, be, []event{ev})
}

// An instance SIGKILLed while it forwards an event loses nothing: an
// instance started on the same storage takes the event over once its lease
// is silent and forwards it again; once the backend accepted it, a copy is a
// duplicate and nothing forwards it any more.
func TestQueueKilledMidForwardIsTakenOver(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	holding := make(chan struct{})
	be := newBackend(t)
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		if n == 1 { // the killed instance's forward: held until it dies
			close(holding)
			<-r.Context().Done()
			return
		}
		_, _ = io.WriteString(w, `{"received":true}`)
	}
	storage := t.TempDir()
	gw := queueGateway(t, storage, be.hostPort(), queueBlock{})
	a := startReady(t, bin, "A", gw)
	client := sender(t)

	ev := newEvent(t, nil)
	expectQueued(t, client, a.gw.url(), ev)
	select {
	case <-holding:
	case <-time.After(10 * time.Second):
		t.Fatal("the first try did not reach the backend")
	}
	if err := a.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-a.Exited
	killed := time.Now()

	// the same config again, as a supervisor restarts it
	b := startReady(t, bin, "A restarted", gw)
	// the lease goes silent for 10 s, seen by the new instance's clock from
	// its first look at it; then a poll and a takeover
	took := waitUntil(t, 30*time.Second, "the event forwarded again after the kill", func() bool { return be.count(ev.id) >= 2 })
	t.Logf("the event was forwarded again %s after the kill", took.Round(100*time.Millisecond))
	waitDrained(t, storage, []event{ev}, 15*time.Second)
	t.Logf("recorded as delivered %s after the kill", time.Since(killed).Round(100*time.Millisecond))
	if !strings.Contains(b.Out.String(), "taking over an event") {
		t.Error("the restarted instance did not log the takeover")
	}
	expectDuplicateAnswer(t, client, b.gw.url(), ev)
	if n := be.count(ev.id); n != 2 {
		t.Errorf("backend got the event %d times, want 2: the killed forward and the takeover's", n)
	}
	if v := b.metric(t, `caddy_kayle_webhook_queue_forwards_total{queue="kayle_webhook/events",status="200"}`); v != 1 {
		t.Errorf("the restarted instance counts %v forwards answered 200, want 1", v)
	}
}

// pausedSeries is the queue's pause gauge, as the admin /metrics exposes it.
const pausedSeries = `caddy_kayle_webhook_queue_paused{queue="kayle_webhook/events"}`

// configOf is the Caddyfile the process runs with (startCaddy writes it).
func configOf(p *caddyProcess) string { return filepath.Join(p.Cmd.Dir, "Caddyfile") }

// kayleQueue runs the built binary's `caddy kayle queue` on config, as an
// operator does next to a running gateway, and returns what it printed on
// stdout and on stderr. It fails the test unless the command succeeds.
func kayleQueue(t *testing.T, bin, config string, args ...string) (out, notes string) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"kayle", "queue", "--config", config, "--adapter", "caddyfile"}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("caddy kayle queue %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), stderr.String()
}

// listedRows are the event rows of a `caddy kayle queue list`, by event id:
// id, type, received, attempts, last status, next try (and notes).
func listedRows(out string) map[string][]string {
	rows := make(map[string][]string)
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) >= 6 && strings.HasPrefix(f[0], "evt_") {
			rows[f[0]] = f
		}
	}
	return rows
}

// expectListed fails the test unless every event has a row of its own in a
// listing, with its type, and nothing else has one.
func expectListed(t *testing.T, out string, evs []event) map[string][]string {
	t.Helper()
	rows := listedRows(out)
	for _, ev := range evs {
		row, ok := rows[ev.id]
		switch {
		case !ok:
			t.Errorf("the listing lacks %s:\n%s", ev.id, out)
		case row[1] != ev.typ:
			t.Errorf("the listing shows %s with type %q, want %q:\n%s", ev.id, row[1], ev.typ, out)
		}
	}
	if len(rows) != len(evs) {
		t.Errorf("the listing has %d event rows, want %d:\n%s", len(rows), len(evs), out)
	}
	return rows
}

// gatedBackend is a backend that answers 503 while down, as an application
// being deployed or overloaded does, and counts the events it accepted.
type gatedBackend struct {
	*backend
	down     atomic.Bool
	mu       sync.Mutex
	accepted map[string]int
}

func newGatedBackend(t *testing.T) *gatedBackend {
	g := &gatedBackend{backend: newBackend(t), accepted: make(map[string]int)}
	g.down.Store(true)
	g.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		if g.down.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		g.mu.Lock()
		g.accepted[r.Header.Get(kayle.HeaderEventID)]++
		g.mu.Unlock()
		_, _ = io.WriteString(w, `{"received":true}`)
	}
	return g
}

func (g *gatedBackend) acceptedOf(eventID string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.accepted[eventID]
}

// An operator drives a running cluster with `caddy kayle queue`: two
// instances on one storage queue events while the backend answers 503.
// pause holds both instances (nothing reaches the backend once it is back,
// and a delivery is still queued); list shows every queued event by id and
// type and nothing of its content; drop takes one out for good (never
// delivered, a copy at either instance a duplicate); resume delivers every
// other event once. On a third instance with a short horizon, events gone
// dead are listed with --dead, and retry (by id, and --dead) delivers each
// once.
func TestQueueOperatorCommandsDriveACluster(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	be := newGatedBackend(t) // down: 503
	storage := t.TempDir()
	const maxBackoff = 2 * time.Second
	a := startCaddy(t, bin, "A", queueGateway(t, storage, be.hostPort(), queueBlock{maxBackoff: "2s"}))
	b := startCaddy(t, bin, "B", queueGateway(t, storage, be.hostPort(), queueBlock{maxBackoff: "2s"}))
	// C: a storage of its own, a horizon of 3 s and a crashed backend;
	// its events go dead while A and B are driven
	deadBE, deadPort := newSwitchedBackend(t, true)
	deadStorage := t.TempDir()
	c := startCaddy(t, bin, "C", queueGateway(t, deadStorage, deadBE.hostPort(), queueBlock{horizon: "3s", maxBackoff: "1s"}))
	procs := []*caddyProcess{a, b}
	for _, p := range []*caddyProcess{a, b, c} {
		p.waitReady(t)
	}
	client := sender(t)
	began := time.Now()

	var secrets []string
	doomed := make([]event, 2)
	for i := range doomed {
		var s []string
		doomed[i], s = privateEvent(t)
		secrets = append(secrets, s...)
		expectQueued(t, client, c.gw.url(), doomed[i])
	}

	const events = 6
	evs := make([]event, events)
	for i := range evs {
		var s []string
		evs[i], s = privateEvent(t)
		secrets = append(secrets, s...)
		expectQueued(t, client, procs[i%2].gw.url(), evs[i])
	}
	expectNoSecrets := func(what, text string) {
		t.Helper()
		for _, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("%s holds plaintext: %q", what, s)
			}
		}
	}

	// pause, with B's config: both instances obey the flag at their next poll
	out, _ := kayleQueue(t, bin, configOf(b), "pause")
	if !strings.Contains(out, "paused: ") {
		t.Errorf("pause printed:\n%s", out)
	}
	waitUntil(t, 5*time.Second, "both instances report the queue paused", func() bool {
		return a.metric(t, pausedSeries) == 1 && b.metric(t, pausedSeries) == 1
	})

	// list, with A's config. Paused, no forward moves an event between
	// markers under the listing, so it is exact.
	out, notes := kayleQueue(t, bin, configOf(a), "list")
	t.Logf("caddy kayle queue list:\n%s", out)
	rows := expectListed(t, out, evs)
	for _, ev := range evs[:2] { // the first at each instance, tried at once
		if row := rows[ev.id]; row != nil && (row[3] == "0" || row[4] != "503") {
			t.Errorf("listed %s with %s tries, last status %s; want a try, answered 503", ev.id, row[3], row[4])
		}
	}
	for _, want := range []string{"PAUSED (", "\n6 queued events\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("the listing lacks %q:\n%s", want, out)
		}
	}
	expectNoSecrets("the listing", out+notes)

	// the backend is back, the queue paused: nothing reaches the backend,
	// not even a probe, and a new delivery is still queued (not tried)
	before := be.total()
	be.down.Store(false)
	late := newEvent(t, nil)
	expectQueued(t, client, b.gw.url(), late)
	time.Sleep(3 * time.Second)
	if n := be.total() - before; n != 0 {
		t.Errorf("the backend got %d requests in the 3 s the queue was paused after it came back, want none", n)
	}

	// drop, with A's config
	dropped, rest := evs[0], append(slices.Clone(evs[1:]), late)
	out, notes = kayleQueue(t, bin, configOf(a), "drop", dropped.id)
	if !strings.Contains(out, "dropped     "+dropped.id+" (was queued") {
		t.Errorf("drop printed:\n%s", out)
	}
	expectNoSecrets("drop's output", out+notes)
	for _, p := range procs {
		expectDuplicateAnswer(t, client, p.gw.url(), dropped)
	}

	// resume, with B's config: every other event reaches the backend once
	resumed := time.Now()
	out, _ = kayleQueue(t, bin, configOf(b), "resume")
	if !strings.Contains(out, "resumed: ") {
		t.Errorf("resume printed:\n%s", out)
	}
	waitUntil(t, maxBackoff+10*time.Second, "every event but the dropped one reached the backend after resume", func() bool {
		for _, ev := range rest {
			if be.acceptedOf(ev.id) == 0 {
				return false
			}
		}
		return true
	})
	t.Logf("every queued event reached the backend %s after resume was run", time.Since(resumed).Round(time.Millisecond))
	waitDrained(t, storage, rest, 15*time.Second)
	for _, ev := range rest {
		if n := be.acceptedOf(ev.id); n != 1 {
			t.Errorf("the backend accepted %s %d times, want exactly 1", ev.id, n)
		}
	}
	if n := be.acceptedOf(dropped.id); n != 0 {
		t.Errorf("the dropped event reached the backend %d times since it came back, want never", n)
	}
	if !delivered(t, storage, dropped.id) {
		t.Errorf("the dropped event's record is not a done one: %+v", readRecord(t, storage, dropped.id))
	}
	out, _ = kayleQueue(t, bin, configOf(a), "list")
	if rows := listedRows(out); len(rows) != 0 || !strings.Contains(out, "\n0 queued events\n") {
		t.Errorf("the listing once the queue drained:\n%s", out)
	}
	for _, p := range procs {
		expectDuplicateAnswer(t, client, p.gw.url(), dropped)
	}

	// C's events are dead: listed with --dead, retried once the backend is back
	for _, ev := range doomed {
		marker := filepath.Join(deadStorage, queueFolder, "dead", eventHash(ev.id))
		waitUntil(t, 20*time.Second, "C's event has a dead marker", func() bool {
			_, err := os.Stat(marker)
			return err == nil
		})
	}
	out, notes = kayleQueue(t, bin, configOf(c), "list", "--dead")
	t.Logf("caddy kayle queue list --dead:\n%s", out)
	rows = expectListed(t, out, doomed)
	for _, ev := range doomed {
		if row := rows[ev.id]; row != nil && (row[4] != "502" || row[5] != "dead") {
			t.Errorf("listed dead %s with last status %s, next try %s; want 502, dead", ev.id, row[4], row[5])
		}
	}
	if !strings.Contains(out, "\n2 dead events\n") {
		t.Errorf("list --dead lacks its count:\n%s", out)
	}
	expectNoSecrets("the listing of the dead", out+notes)
	if out, _ := kayleQueue(t, bin, configOf(c), "list"); len(listedRows(out)) != 0 || !strings.Contains(out, "0 queued events; 2 dead") {
		t.Errorf("the listing of C's queue with its events dead:\n%s", out)
	}
	if n := deadBE.total(); n != 0 {
		t.Fatalf("C's backend got %d requests while down", n)
	}
	deadPort.down.Store(false)

	retried := time.Now()
	out, _ = kayleQueue(t, bin, configOf(c), "retry", doomed[0].id)
	if !strings.Contains(out, "revived     "+doomed[0].id) {
		t.Errorf("retry printed:\n%s", out)
	}
	waitUntil(t, 10*time.Second, "the event retried by id reached the backend", func() bool { return deadBE.count(doomed[0].id) > 0 })
	t.Logf("the dead event retried by id reached the backend %s after retry was run", time.Since(retried).Round(time.Millisecond))
	out, _ = kayleQueue(t, bin, configOf(c), "retry", "--dead")
	if !strings.Contains(out, "revived     "+doomed[1].id) || !strings.Contains(out, "1 of 1 dead event revived") {
		t.Errorf("retry --dead printed:\n%s", out)
	}
	waitDrained(t, deadStorage, doomed, 10*time.Second)
	expectEachOnce(t, deadBE, doomed)
	if n := deadBE.total(); n != len(doomed) {
		t.Errorf("C's backend got %d requests, want %d", n, len(doomed))
	}
	if out, _ := kayleQueue(t, bin, configOf(c), "list", "--dead"); !strings.Contains(out, "\n0 dead events\n") {
		t.Errorf("list --dead once the dead events were retried:\n%s", out)
	}
	for _, ev := range doomed {
		expectDuplicateAnswer(t, client, c.gw.url(), ev)
	}
	t.Logf("driven in %s", time.Since(began).Round(100*time.Millisecond))
}

// newBackendAt is a backend listening on hostPort (a port nothing listens
// on until now).
func newBackendAt(t *testing.T, hostPort string) *backend {
	l, err := net.Listen("tcp", hostPort)
	if err != nil {
		t.Fatal(err)
	}
	be := &backend{byEvent: make(map[string]int)}
	be.srv = httptest.NewUnstartedServer(http.HandlerFunc(be.serveHTTP))
	be.srv.Listener.Close()
	be.srv.Listener = l
	be.srv.Start()
	t.Cleanup(be.srv.Close)
	return be
}

// A graceful stop (caddy stop) never drops queued work: events queued
// while the backend refuses connections are still queued once the instance
// stopped, and the instance started again with the backend up forwards
// each of them once.
func TestQueueGracefulStopKeepsQueuedWork(t *testing.T) {
	skipShort(t)
	t.Parallel()
	bin := buildCaddy(t)
	backendAt := fmt.Sprintf("127.0.0.1:%d", mustFreePort(t)) // nothing listens: refused
	storage := t.TempDir()
	const maxBackoff = 2 * time.Second
	gw := queueGateway(t, storage, backendAt, queueBlock{maxBackoff: "2s"})
	p := startReady(t, bin, "A", gw)
	client := sender(t)

	const events = 5
	evs := make([]event, events)
	for i := range evs {
		evs[i] = newEvent(t, nil)
		expectQueued(t, client, gw.url(), evs[i])
	}
	// the first try failed and was recorded: the queue is backing off
	waitUntil(t, 10*time.Second, "the first event's failed try recorded", func() bool {
		rec := readRecord(t, storage, evs[0].id)
		return rec != nil && rec.Queue != nil && rec.Queue.Attempts > 0
	})

	stop := exec.Command(bin, "stop", "--address", fmt.Sprintf("localhost:%d", gw.adminPort))
	if out, err := stop.CombinedOutput(); err != nil {
		t.Fatalf("caddy stop: %v\n%s", err, out)
	}
	select {
	case <-p.Exited:
	case <-time.After(15 * time.Second):
		t.Fatal("Caddy did not exit within 15 s of caddy stop")
	}
	if p.WaitErr != nil {
		t.Errorf("Caddy exited after caddy stop with %v, want status 0", p.WaitErr)
	}
	for _, ev := range evs {
		if rec := readRecord(t, storage, ev.id); rec == nil || rec.Queue == nil || !rec.DeliveredAt.IsZero() || rec.Queue.Dead {
			t.Errorf("after the stop the record of %s is %+v, want it queued", ev.id, rec)
		}
	}
	if n := len(dueMarkers(t, storage)); n != events {
		t.Errorf("after the stop the storage holds %d due markers, want %d", n, events)
	}

	be := newBackendAt(t, backendAt)
	restarted := startReady(t, bin, "A restarted", gw)
	took := waitUntil(t, maxBackoff+10*time.Second, "every queued event reached the backend after the restart", func() bool {
		for _, ev := range evs {
			if be.count(ev.id) == 0 {
				return false
			}
		}
		return true
	})
	t.Logf("every queued event reached the backend %s after the restarted instance was ready", took.Round(time.Millisecond))
	waitDrained(t, storage, evs, 15*time.Second)
	expectEachOnce(t, be, evs)
	if n := be.total(); n != events {
		t.Errorf("backend got %d requests, want %d", n, events)
	}
	for _, ev := range evs {
		expectDuplicateAnswer(t, client, restarted.gw.url(), ev)
	}
}
