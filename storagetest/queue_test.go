package storagetest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
)

// The queue's promises on every row: exactly once across the cluster, a
// dead holder taken over (4), and nothing lost to a SIGKILL after the 202
// (5).
const (
	// queueMaxBackoff is the scenarios' max_backoff: a backend back up is
	// tried within it.
	queueMaxBackoff = time.Second
	// queuePoll is how often an instance looks for due events.
	queuePoll = time.Second
	// leaseSilence is kayle_webhook's leaseStaleAfter: a holder silent
	// that long is taken for dead.
	leaseSilence = 10 * time.Second
	// queueTakeoverBound: an event whose holder was killed mid-forward is
	// forwarded by the other instance within one silence (watched by its
	// polls, on its own clock), a few polls and room for a loaded CI machine.
	queueTakeoverBound = leaseSilence + 3*queuePoll + 10*time.Second
	// queueRecoveryBound is promise 3's: every queued event reaches the
	// backend within a minute of it answering again, holders killed on the
	// way included (a kill inside a retry's move of its marker: the takeover
	// through the marker the record does not name lets go with a mark, so
	// the claim through the other one does not watch the lease again).
	queueRecoveryBound = time.Minute
	// queueDrainBound: once the backend accepted an event, its record is
	// delivered and its marker gone within this.
	queueDrainBound = 15 * time.Second
)

// queue runs the queue scenarios side by side, each cluster on a
// dedupe_prefix of its own. They mostly wait for a lease's silence, so
// they run at once rather than as parallel tests, which -parallel would
// queue behind the other rows.
func (m matrix) queue(t *testing.T) {
	scenarios := []struct {
		name string
		run  func(t *testing.T, prefix string)
	}{
		{"q1_copies_at_both_delivered_once", m.queueCopies},
		{"q2_backend_down_instance_killed", m.queueBackendDownKilled},
		{"q3_killed_mid_forward_taken_over", m.queueKilledMidForward},
	}
	var wg sync.WaitGroup
	for _, s := range scenarios {
		wg.Go(func() {
			t.Run(s.name, func(t *testing.T) { s.run(t, "kayle_webhook/"+s.name[:2]) })
		})
	}
	wg.Wait()
}

// queueCluster is A and B in queue mode on the row's storage, under
// prefix, delivering to be.
func (m matrix) queueCluster(t *testing.T, be *backend, prefix string) *cluster {
	t.Helper()
	return m.startCluster(t, be, gatewayConfig{
		storage: m.row.caddyfile,
		backend: be.hostPort(),
		prefix:  prefix,
		queue:   &queueConfig{maxBackoff: queueMaxBackoff},
	})
}

// forwardsOK is the series counting an instance's queued forwards the
// backend answered 200.
func forwardsOK(prefix string) string {
	return fmt.Sprintf(`caddy_kayle_webhook_queue_forwards_total{queue=%q,status="200"}`, prefix)
}

// q1. Eight events, two copies of each sent to each instance at once: every
// copy is answered at once, one per event 202 queued and the others 200
// duplicates; each event reaches the backend exactly once, and its record
// ends delivered with no marker left.
func (m matrix) queueCopies(t *testing.T, prefix string) {
	be := newBackend(t, func(be *backend, w http.ResponseWriter, r *http.Request, n int) {
		// a backend that takes a moment: copies meet first tries in flight
		be.hold(r, 200*time.Millisecond)
		ok(w)
	})
	c := m.queueCluster(t, be, prefix)
	st := m.openStorage(t)

	const events, copies = 8, 2 // copies per event per instance
	type shot struct {
		event int
		to    *gatewayProc
		req   *http.Request
	}
	evs := make([]event, events)
	var shots []shot
	for e := range evs {
		evs[e] = newEvent(t)
		for range copies {
			for _, g := range []*gatewayProc{c.a, c.b} {
				shots = append(shots, shot{e, g, delivery(t, g.url, evs[e])})
			}
		}
	}
	answers := make([]answer, len(shots))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, s := range shots {
		wg.Go(func() {
			<-start
			answers[i] = send(c.kayle, s.req)
		})
	}
	close(start)
	wg.Wait()

	queued := make([]int, events)
	var slowest time.Duration
	for i, a := range answers {
		s := shots[i]
		slowest = max(slowest, a.took)
		switch {
		case a.isQueued(evs[s.event]):
			queued[s.event]++
		case !a.isDuplicate():
			t.Errorf("copy %d of event %d (to %s): %s, want 202 queued or a 200 duplicate", i, s.event, s.to.Name, a)
		}
	}
	for e, n := range queued {
		if n != 1 {
			t.Errorf("event %d: %d copies answered 202 queued, want 1", e, n)
		}
	}
	t.Logf("%s: %d copies of %d events answered, the slowest after %s", m.row.name, len(shots), events, slowest.Round(time.Millisecond))

	took := waitUntil(t, queueTakeoverBound, "the backend got every event", func() bool {
		for _, ev := range evs {
			if be.count(ev.id) == 0 {
				return false
			}
		}
		return true
	})
	waitDrained(t, st, prefix, evs)
	t.Logf("%s: every event reached the backend %s after the answers", m.row.name, took.Round(time.Millisecond))
	for e, ev := range evs {
		c.expectDuplicate(t, []*gatewayProc{c.a, c.b}[e%2], ev, "once delivered")
	}
	for _, ev := range evs {
		c.expectCount(t, ev, 1, "after the copies and the queue's forwards")
	}
	if n := be.total(); n != events {
		t.Errorf("the backend received %d requests, want %d", n, events)
	}
	if n := c.a.metric(t, forwardsOK(prefix)) + c.b.metric(t, forwardsOK(prefix)); n != events {
		t.Errorf("A and B count %v forwards answered 200, want %d", n, events)
	}
}

// q2. The backend down (its port closes every connection): events queued
// at both instances, which try and back off. A is SIGKILLed once six tries
// failed, so often while it reschedules an event. The backend comes back:
// B, the survivor, forwards every event, each exactly once (none reached
// the backend before), within queueRecoveryBound.
func (m matrix) queueBackendDownKilled(t *testing.T, prefix string) {
	be := newBackend(t, nil)
	be.port.down.Store(true)
	c := m.queueCluster(t, be, prefix)
	st := m.openStorage(t)

	const events = 6
	evs := make([]event, events)
	chans := make([]<-chan answer, events)
	for i := range evs {
		evs[i] = newEvent(t)
		g := []*gatewayProc{c.a, c.b}[i%2]
		chans[i] = sendAsync(c.kayle, delivery(t, g.url, evs[i]))
	}
	for i, ch := range chans {
		if a := await(t, "a delivery with the backend down", ch, time.Minute); !a.isQueued(evs[i]) {
			t.Fatalf("event %d, the backend down: %s, want 202 queued", i, a)
		}
	}
	// both instances have tried and back off: a try a second each
	waitUntil(t, 20*time.Second, "tries at the backend's port", func() bool { return be.port.refused.Load() >= events })
	c.a.kill(t)
	if n := be.total(); n != 0 {
		t.Fatalf("the backend, down, received %d requests", n)
	}
	be.port.down.Store(false)
	t.Logf("%s: A killed and the backend up after %d tries at its port", m.row.name, be.port.refused.Load())

	took := waitUntil(t, queueRecoveryBound, "B forwarded every event", func() bool {
		for _, ev := range evs {
			if be.count(ev.id) == 0 {
				return false
			}
		}
		return true
	})
	t.Logf("%s: every event reached the backend %s after it came back", m.row.name, took.Round(100*time.Millisecond))
	waitDrained(t, st, prefix, evs)
	for _, ev := range evs {
		c.expectDuplicate(t, c.b, ev, "once delivered")
	}
	for _, ev := range evs {
		c.expectCount(t, ev, 1, "A killed, B forwarding")
	}
	if n := c.b.metric(t, forwardsOK(prefix)); n != events {
		t.Errorf("B counts %v forwards answered 200, want %d (every event, A being dead)", n, events)
	}
}

// q3. A's first try of an event is held by the backend, and A is
// SIGKILLed: B, whose copy meanwhile was a duplicate, takes the event over
// once A's lease is silent and forwards it; then a copy is a duplicate and
// nothing forwards it again.
func (m matrix) queueKilledMidForward(t *testing.T, prefix string) {
	holding := make(chan struct{})
	be := newBackend(t, func(be *backend, w http.ResponseWriter, r *http.Request, n int) {
		if n == 1 { // A's first try: held until A dies
			close(holding)
			be.hold(r, 2*time.Minute)
			return
		}
		ok(w)
	})
	c := m.queueCluster(t, be, prefix)
	st := m.openStorage(t)

	ev := newEvent(t)
	if a := send(c.kayle, delivery(t, c.a.url, ev)); !a.isQueued(ev) {
		t.Fatalf("the delivery to A: %s, want 202 queued", a)
	}
	select {
	case <-holding:
	case <-time.After(15 * time.Second):
		t.Fatal("A's first try did not reach the backend within 15 s")
	}
	c.expectDuplicate(t, c.b, ev, "while A's first try is held")
	c.a.kill(t)

	took := waitUntil(t, queueTakeoverBound, "B forwarded the event after A was killed", func() bool { return be.count(ev.id) >= 2 })
	t.Logf("%s: B forwarded the event %s after A was killed", m.row.name, took.Round(100*time.Millisecond))
	waitDrained(t, st, prefix, []event{ev})
	if !strings.Contains(c.b.Out.String(), "taking over an event") {
		t.Error("B did not log the takeover")
	}
	c.expectDuplicate(t, c.b, ev, "after the takeover")
	// the marker is gone and the record delivered: no poll may find it
	time.Sleep(2 * queuePoll)
	c.expectCount(t, ev, 2, "A's held first try, then B's forward")
	if n := c.b.metric(t, forwardsOK(prefix)); n != 1 {
		t.Errorf("B counts %v forwards answered 200, want 1", n)
	}
}

// waitUntil polls cond until it holds, failing the test after limit; it
// returns how long that took.
func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	began := time.Now()
	for !cond() {
		if time.Since(began) > limit {
			t.Fatalf("%s: not within %s", what, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Since(began)
}

// storedRecord is what the tests read of an event's record.
type storedRecord struct {
	DeliveredAt time.Time `json:"delivered_at"`
	Holder      string    `json:"holder"`
	Released    bool      `json:"released"`
	Queue       *struct {
		Attempts   int    `json:"attempts"`
		LastStatus int    `json:"last_status"`
		LastError  string `json:"last_error"`
		Dead       bool   `json:"dead"`
		Marker     string `json:"marker"`
	} `json:"queue"`
}

func (r storedRecord) delivered() bool { return !r.DeliveredAt.IsZero() && r.Queue == nil }

func (r storedRecord) String() string {
	if q := r.Queue; q != nil {
		return fmt.Sprintf("queued (attempts %d, last status %d, last error %q, dead %v, marker %s, holder %q, released %v)",
			q.Attempts, q.LastStatus, q.LastError, q.Dead, path.Base(q.Marker), r.Holder, r.Released)
	}
	if r.delivered() {
		return "delivered at " + r.DeliveredAt.Format(time.RFC3339Nano)
	}
	return fmt.Sprintf("a lease (holder %q, released %v)", r.Holder, r.Released)
}

// markerName is a due marker's name: <next ms>-<received ms>-<event hash>.
var markerName = regexp.MustCompile(`^[0-9]{13}-[0-9]{13}-[0-9a-f]{64}$`)

// undrained reads, through the storage, what keeps evs from being done
// with: the events whose record is not a delivered one (and why), and the
// due markers left under prefix.
func undrained(ctx context.Context, st certmagic.Storage, prefix string, evs []event) (pending, markers []string, err error) {
	for _, ev := range evs {
		key, _ := recordKeyIn(prefix, ev.id)
		data, err := st.Load(ctx, key)
		if errors.Is(err, fs.ErrNotExist) {
			pending = append(pending, ev.id+": no record")
			continue
		}
		if err != nil {
			return nil, nil, fmt.Errorf("loading %s: %w", key, err)
		}
		var rec storedRecord
		if err := json.Unmarshal(data, &rec); err != nil {
			return nil, nil, fmt.Errorf("%s is not a record: %w", key, err)
		}
		if !rec.delivered() {
			pending = append(pending, ev.id+": "+rec.String())
		}
	}
	keys, err := st.List(ctx, path.Join(prefix, "queue", "due"), true)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, fmt.Errorf("listing the due markers: %w", err)
	}
	for _, key := range keys {
		if markerName.MatchString(path.Base(key)) {
			markers = append(markers, key)
		}
	}
	return pending, markers, nil
}

// waitDrained waits until every event of evs is recorded delivered in the
// storage and no due marker is left under prefix.
func waitDrained(t *testing.T, st certmagic.Storage, prefix string, evs []event) {
	t.Helper()
	deadline := time.Now().Add(queueDrainBound)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		pending, markers, err := undrained(ctx, st, prefix, evs)
		cancel()
		if err == nil && len(pending) == 0 && len(markers) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not drained within %s of the backend's last 2xx: %v; not delivered: %q; markers left: %q",
				queueDrainBound, err, pending, markers)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
