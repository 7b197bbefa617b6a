package storagetest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
)

const (
	// takeoverBound: a holder killed mid-forward has its event forwarded by
	// the other instance within the lease's silence (10 s) and a poll (1 s),
	// with room for a loaded CI machine.
	takeoverBound = 20 * time.Second
	// maxPause caps how long a storage server is frozen past its lock TTL.
	// (PostgreSQL's 20 s lease is passed; NATS's 5 min lock is not: the
	// freeze then still outlasts the lease's 10 s of silence)
	maxPause = 24 * time.Second
	// defaultPrefix is kayle_webhook's default dedupe_prefix (module.go).
	defaultPrefix = "kayle_webhook/events"
	// dedupeWindow is kayle_webhook's default dedupe_window.
	dedupeWindow = 14 * 24 * time.Hour
)

// TestStorageMatrix runs every scenario on every storage row, with two
// gateway processes sharing the row's storage and a backend that counts
// what it receives per event.
func TestStorageMatrix(t *testing.T) {
	bin := buildCaddy(t)
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) {
			t.Parallel()
			row := r.start(t)
			m := matrix{bin: bin, row: row}
			// the scenarios that stop or freeze the server come last
			t.Run("a_concurrent_copies_forward_once", m.concurrentCopies)
			t.Run("b_killed_holder_taken_over", m.killedHolder)
			t.Run("e_reload_mid_forward", m.reloadMidForward)
			t.Run("f_sweep_deletes_expired_keeps_live", m.sweep)
			t.Run("q_queue", m.queue)
			t.Run("d_storage_frozen_past_lock_ttl", m.frozenStorage)
			t.Run("c_storage_stopped_then_restarted", m.stoppedStorage)
		})
	}
}

type matrix struct {
	bin string
	row *storageRow
}

// cluster is two gateways, A and B, on the row's storage, in front of one
// backend.
type cluster struct {
	a, b  *gatewayProc
	be    *backend
	kayle *http.Client
}

func (m matrix) cluster(t *testing.T, respond responder) *cluster {
	t.Helper()
	be := newBackend(t, respond)
	return m.startCluster(t, be, gatewayConfig{storage: m.row.caddyfile, backend: be.hostPort()})
}

// startCluster runs A and B with cfg, in front of be.
func (m matrix) startCluster(t *testing.T, be *backend, cfg gatewayConfig) *cluster {
	t.Helper()
	c := &cluster{
		a:     startGateway(t, m.bin, "A", cfg),
		b:     startGateway(t, m.bin, "B", cfg),
		be:    be,
		kayle: newKayle(t),
	}
	c.a.waitReady(t)
	c.b.waitReady(t)
	return c
}

// expectDuplicate sends a copy of ev to g and fails unless it is answered
// 200 with X-Kayle-Duplicate: true.
func (c *cluster) expectDuplicate(t *testing.T, g *gatewayProc, ev event, why string) {
	t.Helper()
	if a := send(c.kayle, delivery(t, g.url, ev)); !a.isDuplicate() {
		t.Errorf("%s: a copy to %s got %s, want a 200 duplicate", why, g.Name, a)
	}
}

// startForward sends ev to A and waits until A's forward reached the
// backend (the backend closes forwarding then); the answer comes on the
// channel returned.
func (c *cluster) startForward(t *testing.T, ev event, forwarding <-chan struct{}) <-chan answer {
	t.Helper()
	first := sendAsync(c.kayle, delivery(t, c.a.url, ev))
	select {
	case <-forwarding:
	case a := <-first:
		t.Fatalf("A answered %s before its forward reached the backend", a)
	case <-time.After(15 * time.Second):
		t.Fatal("A's forward did not reach the backend within 15 s")
	}
	return first
}

func (c *cluster) expectCount(t *testing.T, ev event, want int, why string) {
	t.Helper()
	if n := c.be.count(ev.id); n != want {
		t.Errorf("%s: the backend received the event %d times, want %d", why, n, want)
	}
}

// a. Ten copies of one event at once, spread over both instances: the
// backend gets it once, and every copy is answered 2xx.
func (m matrix) concurrentCopies(t *testing.T) {
	c := m.cluster(t, func(be *backend, w http.ResponseWriter, r *http.Request, n int) {
		// a backend that takes a moment: copies overlap the forward
		be.hold(r, 200*time.Millisecond)
		ok(w)
	})
	ev := newEvent(t)
	const copies = 10
	reqs := make([]*http.Request, copies)
	for i := range reqs {
		g := c.a
		if i%2 == 1 {
			g = c.b
		}
		reqs[i] = delivery(t, g.url, ev)
	}
	answers := make([]answer, copies)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, req := range reqs {
		wg.Go(func() {
			<-start
			answers[i] = send(c.kayle, req)
		})
	}
	close(start)
	wg.Wait()

	forwarded := 0
	for i, a := range answers {
		switch {
		case a.forwarded():
			forwarded++
		case a.isDuplicate():
		default:
			t.Errorf("copy %d (to %s): %s, want 2xx", i, []string{"A", "B"}[i%2], a)
		}
	}
	if forwarded != 1 {
		t.Errorf("%d copies answered as forwarded, want 1 (the others duplicates)", forwarded)
	}
	c.expectCount(t, ev, 1, "10 concurrent copies")
}

// b. The instance forwarding an event is killed -9 in the middle of the
// forward. A copy then sent to the other instance, patient as a Kayle retry,
// gets the event forwarded within takeoverBound: the event is not stranded.
func (m matrix) killedHolder(t *testing.T) {
	hung := make(chan struct{})
	second := make(chan time.Time, 1)
	c := m.cluster(t, func(be *backend, w http.ResponseWriter, r *http.Request, n int) {
		switch n {
		case 1: // A's forward: hangs until A dies
			close(hung)
			be.hold(r, 2*time.Minute)
			return
		case 2:
			second <- time.Now()
		}
		ok(w)
	})
	ev := newEvent(t)
	c.startForward(t, ev, hung)
	// A holds the event long enough to have shown it is alive (its first
	// lease is written after 1 s), then dies
	time.Sleep(2 * time.Second)
	c.a.kill(t)

	sent := time.Now()
	a := send(c.kayle, delivery(t, c.b.url, ev))
	var took time.Duration
	select {
	case at := <-second:
		took = at.Sub(sent)
		t.Logf("%s: B forwarded the event %s after the copy was sent; B answered %s",
			m.row.name, took.Round(100*time.Millisecond), a)
	default:
		t.Fatalf("%s: the copy sent to B after A was killed got %s, and the backend never received the event again: stranded", m.row.name, a)
	}
	if took > takeoverBound {
		t.Errorf("B forwarded the event %s after the copy was sent, want within %s", took.Round(100*time.Millisecond), takeoverBound)
	}
	if !a.forwarded() {
		t.Errorf("B's copy got %s, want the backend's 200", a)
	}
	c.expectCount(t, ev, 2, "after the takeover (A's hung forward, then B's)")
	c.expectDuplicate(t, c.b, ev, "after the takeover")
	c.expectCount(t, ev, 2, "after a further copy")
}

// e. caddy reload while A forwards slowly: the forward's record is still
// written, so the next copies, at A and at B, are duplicates.
func (m matrix) reloadMidForward(t *testing.T) {
	forwarding := make(chan struct{})
	c := m.cluster(t, func(be *backend, w http.ResponseWriter, r *http.Request, n int) {
		if n == 1 {
			close(forwarding)
			if !be.hold(r, 5*time.Second) {
				return
			}
		}
		ok(w)
	})
	ev := newEvent(t)
	first := c.startForward(t, ev, forwarding)
	began := time.Now()
	out, err := c.a.command(30*time.Second, "reload", "--force", "--config", c.a.config, "--address", c.a.adminAddr)
	if err != nil {
		t.Fatalf("caddy reload: %v\n%s", err, out)
	}
	t.Logf("%s: caddy reload took %s, with A's forward in flight", m.row.name, time.Since(began).Round(time.Millisecond))
	if a := await(t, "A's slow forward", first, 60*time.Second); !a.forwarded() {
		t.Fatalf("A's forward across the reload got %s, want the backend's 200", a)
	}
	c.expectDuplicate(t, c.a, ev, "after the forward that spanned the reload")
	c.expectDuplicate(t, c.b, ev, "after the forward that spanned the reload")
	c.expectCount(t, ev, 1, "after the reload and two more copies")
}

// f. `caddy kayle sweep` deletes a record older than the dedupe window and
// keeps a live one.
func (m matrix) sweep(t *testing.T) {
	c := m.cluster(t, nil)
	st := m.openStorage(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	old, live := newEvent(t), newEvent(t)
	oldKey, oldHash := recordKey(old.id)
	liveKey, _ := recordKey(live.id)
	deliveredAt := time.Now().Add(-dedupeWindow - 24*time.Hour).UTC()
	rec, _ := json.Marshal(map[string]any{
		"v": 1, "event_sha256": oldHash, "delivered_at": deliveredAt.Format(time.RFC3339), "status": 200,
	})
	if err := st.Store(ctx, oldKey, rec); err != nil {
		t.Fatalf("writing the old record: %v", err)
	}
	// as the storage would report a record written 15 days ago
	if m.row.backdate != nil {
		m.row.backdate(t, oldKey, deliveredAt)
	}
	if a := send(c.kayle, delivery(t, c.a.url, live)); !a.forwarded() {
		t.Fatalf("delivering the live event: %s, want the backend's 200", a)
	}
	// the record is written just after the answer, under the event's lock:
	// a further copy waits for it
	c.expectDuplicate(t, c.b, live, "the live event delivered")
	if _, err := st.Load(ctx, oldKey); err != nil {
		t.Fatalf("the old record before the sweep: %v", err)
	}

	out, err := c.a.command(2*time.Minute, "kayle", "sweep", "--config", c.a.config)
	if err != nil {
		if help, _ := c.a.command(30*time.Second, "kayle", "--help"); !strings.Contains(help, "sweep") {
			out += "(this build's `caddy kayle` has no sweep subcommand)"
		}
		t.Fatalf("caddy kayle sweep --config %s: %v\n%s", c.a.config, err, out)
	}
	t.Logf("caddy kayle sweep:\n%s", strings.TrimSpace(out))
	_, err = st.Load(ctx, oldKey)
	switch {
	case m.row.backdate == nil && err != nil:
		// the storage dates each key itself: an old record cannot be
		// staged, and one it calls fresh must never be deleted early
		t.Errorf("a record the storage dates from just now was deleted (Load: %v)", err)
	case m.row.backdate != nil && !errors.Is(err, fs.ErrNotExist):
		t.Errorf("the record delivered 15 days ago is still there after the sweep (Load: %v)", err)
	}
	data, err := st.Load(ctx, liveKey)
	if err != nil {
		t.Fatalf("the live record after the sweep: %v", err)
	}
	var got struct {
		DeliveredAt time.Time `json:"delivered_at"`
	}
	if err := json.Unmarshal(data, &got); err != nil || time.Since(got.DeliveredAt) > time.Hour {
		t.Errorf("the live record after the sweep: %s (%v), want a delivery of just now", data, err)
	}
	c.expectDuplicate(t, c.b, live, "after the sweep")
	c.expectCount(t, live, 1, "after the sweep")
}

// d. The storage server frozen (SIGSTOP) past its lock TTL while A forwards
// slowly, with copies sent to B during and after the freeze: the backend
// still gets the event once. Without a server (file_system) the copies
// come at the same times, while A's forward outlasts the lock's stale time.
func (m matrix) frozenStorage(t *testing.T) {
	pause := min(m.row.lockTTL+3*time.Second, maxPause)
	slow := pause + 4*time.Second
	if m.row.pause != nil && m.row.lockTTL < pause {
		// A lock attempt of B's that the frozen server received is applied
		// when it thaws, though B gave up on it: a lock nobody holds keeps
		// B out for one more TTL. A's forward outlasts that too, so B's
		// later attempts find the storage lock free while A still forwards.
		slow += m.row.lockTTL
	}
	forwarding := make(chan struct{})
	c := m.cluster(t, func(be *backend, w http.ResponseWriter, r *http.Request, n int) {
		if n == 1 {
			close(forwarding)
			if !be.hold(r, slow) {
				return
			}
		}
		ok(w)
	})
	ev := newEvent(t)
	first := c.startForward(t, ev, forwarding)
	began := time.Now()
	if m.row.pause != nil {
		m.row.pause(t)
	}
	time.Sleep(time.Second)
	during := sendAsync(c.kayle, delivery(t, c.b.url, ev))
	time.Sleep(time.Until(began.Add(pause)))
	if m.row.resume != nil {
		m.row.resume(t)
	}
	after := sendAsync(c.kayle, delivery(t, c.b.url, ev))

	a := await(t, "A's slow forward", first, 90*time.Second)
	if !a.forwarded() {
		t.Errorf("A's forward got %s, want the backend's 200", a)
	}
	// each copy to B: a duplicate, or a 503 that Kayle retries; never a
	// second forward
	for _, b := range []struct {
		name string
		ch   <-chan answer
	}{{"during the freeze", during}, {"after the freeze", after}} {
		got := await(t, "B's copy "+b.name, b.ch, 90*time.Second)
		if got.forwarded() || !(got.isDuplicate() || got.status == http.StatusServiceUnavailable) {
			t.Errorf("B's copy sent %s got %s, want a duplicate (or 503)", b.name, got)
		}
		t.Logf("%s: B's copy sent %s got %s", m.row.name, b.name, got)
	}
	c.expectCount(t, ev, 1, "after A's forward and B's copies ended")
	c.expectDuplicate(t, c.b, ev, "after the freeze")
	c.expectCount(t, ev, 1, "after a further copy")
}

// c. The storage server stopped: deliveries are answered 503 and nothing
// is forwarded. Restarted: a redelivery is forwarded once, and a further
// copy is a duplicate.
func (m matrix) stoppedStorage(t *testing.T) {
	c := m.cluster(t, nil)
	ev := newEvent(t)
	m.row.stop(t)
	restarted := false
	defer func() {
		if !restarted {
			m.row.restart(t)
		}
	}()
	for _, g := range []*gatewayProc{c.a, c.b} {
		a := send(c.kayle, delivery(t, g.url, ev))
		if a.err != nil || a.status != http.StatusServiceUnavailable {
			t.Errorf("a copy to %s with the storage stopped got %s, want 503", g.Name, a)
		}
		t.Logf("%s: with the storage stopped, a copy to %s got %s", m.row.name, g.Name, a)
	}
	if n := c.be.total(); n != 0 {
		t.Errorf("with the storage stopped the backend received %d requests, want none", n)
	}
	m.row.restart(t)
	restarted = true
	// Kayle retries a delivery that failed (5 s later, then minutes): here
	// every second, for as long as the gateway cannot reach the storage yet
	var a answer
	refused := 0
	for deadline := time.Now().Add(15 * time.Second); ; refused++ {
		a = send(c.kayle, delivery(t, c.a.url, ev))
		if a.err != nil || a.status != http.StatusServiceUnavailable || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	if !a.forwarded() {
		t.Errorf("the redelivery to A after the restart got %s (after %d answers 503), want the backend's 200", a, refused)
	}
	t.Logf("%s: after the restart, A answered 503 %d times before it forwarded the event", m.row.name, refused)
	c.expectCount(t, ev, 1, "after the restart")
	// B's connections to the restarted server may be stale too: Kayle's
	// retry after a 503 is what must be a duplicate
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(time.Second) {
		a := send(c.kayle, delivery(t, c.b.url, ev))
		if a.err == nil && a.status == http.StatusServiceUnavailable && time.Now().Before(deadline) {
			continue
		}
		if !a.isDuplicate() {
			t.Errorf("after the restart: a copy to B got %s, want a 200 duplicate", a)
		}
		break
	}
	c.expectCount(t, ev, 1, "after a further copy")
}

// recordKey is where kayle_webhook keeps an event's record under the
// default prefix.
func recordKey(eventID string) (key, hash string) { return recordKeyIn(defaultPrefix, eventID) }

// recordKeyIn is where kayle_webhook keeps an event's record under prefix:
// <prefix>/<hh>/<sha256 of the id>.
func recordKeyIn(prefix, eventID string) (key, hash string) {
	sum := sha256.Sum256([]byte(eventID))
	hash = hex.EncodeToString(sum[:])
	return path.Join(prefix, hash[:2], hash), hash
}

// openStorage opens the row's storage module in the test process, with the
// gateways' config, as Caddy does.
func (m matrix) openStorage(t *testing.T) certmagic.Storage {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	mod, err := ctx.LoadModuleByID("caddy.storage."+m.row.module, json.RawMessage(m.row.moduleJSON))
	if err != nil {
		t.Fatalf("loading caddy.storage.%s: %v", m.row.module, err)
	}
	st, err := mod.(caddy.StorageConverter).CertMagicStorage()
	if err != nil {
		t.Fatalf("opening caddy.storage.%s: %v", m.row.module, err)
	}
	return st
}
