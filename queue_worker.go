package kaylewebhook

import (
	"context"
	"errors"
	"io/fs"
	"net/http"
	"net/url"
	"path"
	"slices"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// queueJob is one forward of a queued event, made while holding its lock.
type queueJob struct {
	held         *heldLock // nil until the lock is taken
	releaseClaim func()
	eventHash    string
	item         *queueItem // the record's; lease writes carry it
	probe        bool       // the one forward of a queue backing off

	// the delivery opened: in memory only, for this forward
	plaintext    []byte
	event        kayle.Event
	sigTimestamp string
}

// takeSlotNow takes a forward slot for a first try, if one may start now:
// a slot is free, the queue neither paused nor backing off, the rate allows.
func (q *queueRunner) takeSlotNow() bool {
	q.mu.Lock()
	ok := !q.paused && !q.backoff.backingOff()
	q.mu.Unlock()
	if !ok {
		return false
	}
	select {
	case q.slots <- struct{}{}:
	default:
		return false
	}
	if q.limiter != nil && !q.limiter.Allow() {
		q.freeSlot()
		return false
	}
	return true
}

func (q *queueRunner) freeSlot() { <-q.slots }

// waitTurn waits for a slot and the rate for a polled event. ok is false
// when no forward may start now: stopping, paused, or backing off with the
// probe out or not yet due; probe: this forward is the probe.
func (q *queueRunner) waitTurn() (probe, ok bool) {
	select {
	case q.slots <- struct{}{}:
	case <-q.ctx.Done():
		return false, false
	}
	q.mu.Lock()
	switch {
	case q.paused:
		ok = false
	case q.backoff.backingOff():
		ok = !q.backoff.probing && !q.h.now().Before(q.backoff.until)
		if ok {
			probe, q.backoff.probing = true, true
		}
	default:
		ok = true
	}
	q.mu.Unlock()
	if !ok {
		q.freeSlot()
		return false, false
	}
	if q.limiter != nil && q.limiter.Wait(q.ctx) != nil {
		q.endTurn(probe)
		return false, false
	}
	return probe, true
}

// startJob runs a first try, whose event's lock the caller holds.
func (q *queueRunner) startJob(j *queueJob) {
	q.active.Add(1)
	go func() {
		defer q.endJob(j)
		q.forwardJob(context.Background(), j)
	}()
}

// endJob lets go of what a job held.
func (q *queueRunner) endJob(j *queueJob) {
	if r := recover(); r != nil {
		q.logger.Error("a queued event's forward panicked; it is tried again once its lease is found silent",
			zap.String("event_hash", j.eventHash), zap.Any("panic", r))
	}
	if j.held != nil {
		j.held.release()
	}
	j.releaseClaim()
	j.plaintext = nil
	q.endTurn(j.probe)
	q.active.Done()
}

// endTurn gives back what waitTurn (or takeSlotNow) gave.
func (q *queueRunner) endTurn(probe bool) {
	if probe {
		q.mu.Lock()
		q.backoff.probing = false
		q.mu.Unlock()
	}
	q.freeSlot()
}

// loop polls for due events until the queue stops.
func (q *queueRunner) loop() {
	defer close(q.done)
	q.scan()
	poll := time.NewTicker(q.pollEvery)
	defer poll.Stop()
	stats := time.NewTicker(q.statsEvery)
	defer stats.Stop()
	for {
		select {
		case <-q.ctx.Done():
			return
		case <-stats.C:
			q.scan()
			continue
		case <-poll.C:
		case <-q.wake:
		}
		q.poll()
	}
}

// poll starts a forward for each due event, bucket by bucket from the
// cursor to now, as slots, the rate and the backoff allow.
func (q *queueRunner) poll() {
	if q.readPaused() {
		return
	}
	q.mu.Lock()
	waiting := q.backoff.backingOff() && (q.backoff.probing || q.h.now().Before(q.backoff.until))
	from := q.cursor
	q.mu.Unlock()
	if waiting {
		return
	}
	now := q.h.now()
	skewed := bucketOf(now.Add(-queueClockSkew))
	for bucket := from; bucket <= bucketOf(now); bucket++ {
		// A past bucket within the clock skew gets a marker only from a
		// writer whose clock is behind: one found empty is looked at again
		// every queueQuietRecheck, not every poll.
		if bucket >= skewed && bucket < bucketOf(now)-1 && now.Sub(q.quiet[bucket]) < queueQuietRecheck {
			continue
		}
		markers, err := q.listBucket(bucket)
		if err != nil {
			q.logger.Warn("listing due queue markers", zap.Int64("bucket", bucket), zap.Error(err))
			return
		}
		if len(markers) == 0 {
			q.quiet[bucket] = now
		} else {
			delete(q.quiet, bucket)
		}
		if len(markers) == 0 && bucket < skewed {
			q.mu.Lock()
			if q.cursor == bucket {
				q.cursor = bucket + 1
			}
			q.mu.Unlock()
			delete(q.quiet, bucket)
			continue
		}
		for _, m := range markers {
			if m.next.After(now) {
				continue
			}
			if !q.dispatch(m) {
				return
			}
		}
	}
}

// listBucket lists a due bucket's markers, soonest first.
func (q *queueRunner) listBucket(bucket int64) ([]queueMarker, error) {
	ctx, cancel := context.WithTimeout(q.ctx, storageTimeout)
	defer cancel()
	keys, err := q.d.storage.List(ctx, q.bucketKey(bucket), false)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	markers := make([]queueMarker, 0, len(keys))
	for _, key := range keys {
		if m, ok := parseDueMarker(key); ok {
			markers = append(markers, m)
		}
	}
	slices.SortFunc(markers, func(a, b queueMarker) int { return a.next.Compare(b.next) })
	return markers, nil
}

// dispatch starts the forward of a due marker's event, once a slot is free.
// It returns false when this poll should stop.
func (q *queueRunner) dispatch(m queueMarker) bool {
	probe, ok := q.waitTurn()
	if !ok {
		return false
	}
	recordKey, lockName := q.d.recordKeyOf(m.eventHash)
	releaseClaim, ok := inProcessClaims.tryAcquire(recordKey)
	if !ok {
		// in hand in this process (a first try, a copy): the turn goes back
		q.endTurn(probe)
		return true
	}
	j := &queueJob{releaseClaim: releaseClaim, eventHash: m.eventHash, probe: probe}
	q.active.Add(1)
	go func() {
		defer q.endJob(j)
		q.claim(j, m, recordKey, lockName)
	}()
	return true
}

// claim takes a due event's lock, as a copy of it would (a dead holder is
// taken over), checks that the marker still stands for it, opens the stored
// delivery and forwards it.
func (q *queueRunner) claim(j *queueJob, m queueMarker, recordKey, lockName string) {
	ctx := context.Background()
	d := q.d
	rec, err := d.loadRecord(ctx, recordKey)
	if err != nil {
		q.logger.Warn("reading a queued event's record", zap.String("event_hash", m.eventHash), zap.Error(err))
		return
	}
	var watched *record
	quietSince := d.now()
	switch {
	case rec == nil && d.now().Sub(m.received) < orphanAfter:
		return // an enqueue still writing its record (or one that failed: see orphaned)
	case rec != nil && !rec.isQueued():
		q.forgetSighting(m.eventHash)
		q.deleteMarker(ctx, m.key) // delivered: a marker left behind
		return
	case isLiveLease(rec):
		// another holder is at it; once this instance has seen its lease
		// unchanged for the stale time (polls count), it takes it over
		quietSince = q.sighting(m.eventHash, rec)
		if d.now().Sub(quietSince) < d.timing.staleAfter {
			return
		}
		watched = rec
	}
	q.forgetSighting(m.eventHash)
	// long enough to find a dead holder silent and take over
	waitCtx, cancel := context.WithTimeout(ctx, d.timing.staleAfter+5*d.timing.pollEvery)
	held, rec, err := d.acquireWatched(waitCtx, lockName, recordKey, "queued event "+m.eventHash[:16], d.isDelivered, watched, quietSince)
	cancel()
	if errors.Is(err, errLockBusy) {
		return
	}
	if err != nil {
		q.logger.Warn("locking a queued event", zap.String("event_hash", m.eventHash), zap.Error(err))
		return
	}
	j.held = held
	if held != nil && rec == nil && !q.orphaned(ctx, m, recordKey) {
		return
	}
	if held == nil || !rec.isQueued() || !sameMarker(rec.Queue.Marker, m.key) {
		// delivered, never written (an enqueue that failed), or moved: the
		// marker stands for nothing
		q.deleteMarker(ctx, m.key)
		if held != nil && held.tookOver && rec.isQueued() {
			// a move its dead holder left half done: let go of the event
			// in its record, so the claim through its own marker need not
			// watch the dead lease again
			held.lease = *rec
			_ = held.writeMark(ctx, true)
		}
		return
	}
	q.mu.Lock()
	paused := q.paused
	q.mu.Unlock()
	if paused {
		return // paused while this poll waited for the lock
	}
	j.item = rec.Queue
	held.lease = *rec
	held.lease.EventSHA256 = m.eventHash
	now := d.now()
	if q.pastHorizon(j.item, now) {
		q.bury(ctx, j, "")
		return
	}
	// the lease now, so other instances' polls see this holder alive
	if err := held.writeLease(ctx); err != nil {
		q.logger.Warn("writing a queued event's lease", zap.String("event_id", j.item.EventID), zap.Error(err))
		return
	}
	held.heartbeat(d.timing.beatEvery)
	if q.takeReady(j) {
		// opened when it arrived here: no second decryption
	} else if why, tampered := q.open(j); why != "" {
		q.cannotOpen(ctx, j, why, tampered)
		return
	}
	q.forwardJob(ctx, j)
}

// leaseSighting is when this instance first saw a holder's lease as it is.
type leaseSighting struct {
	holder    string
	heartbeat time.Time
	since     time.Time
}

// sighting returns since when this instance has seen the lease in rec
// unchanged, starting the count when it changed.
func (q *queueRunner) sighting(eventHash string, rec *record) time.Time {
	q.mu.Lock()
	defer q.mu.Unlock()
	s, ok := q.leases[eventHash]
	if !ok || s.holder != rec.Holder || !s.heartbeat.Equal(rec.HeartbeatAt) {
		s = leaseSighting{holder: rec.Holder, heartbeat: rec.HeartbeatAt, since: q.h.now()}
		q.leases[eventHash] = s
	}
	return s.since
}

func (q *queueRunner) forgetSighting(eventHash string) {
	q.mu.Lock()
	delete(q.leases, eventHash)
	q.mu.Unlock()
}

// orphanAfter is how old a marker whose event has no record must be before
// it is deleted.
const orphanAfter = time.Hour

// orphaned reports whether a marker whose record read as missing (under the
// event's lock) is one an enqueue that failed left: an hour old, and the
// record missing to a second look. Some storage modules read a failing
// Load as "not found" (pberkel/caddy-storage-redis); a queued event whose
// marker went on such a read would never be found again.
func (q *queueRunner) orphaned(ctx context.Context, m queueMarker, recordKey string) bool {
	if q.h.now().Sub(m.received) < orphanAfter {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, storageTimeout)
	defer cancel()
	return !q.d.storage.Exists(ctx, recordKey)
}

// pastHorizon reports whether item's horizon has passed at now.
func (q *queueRunner) pastHorizon(item *queueItem, now time.Time) bool {
	return now.Sub(item.horizonStart()) >= q.horizon
}

// open verifies and decrypts a stored delivery, as check does an incoming
// one (its signature at its own t). why says in fixed words and ids why it
// cannot be opened; tampered: it never will be (not Kayle's, or not this
// event's).
func (q *queueRunner) open(j *queueJob) (why string, tampered bool) {
	item := j.item
	sig, err := kayle.ParseSignature(item.Signature)
	if err != nil {
		return "the stored signature is unreadable", true
	}
	body := []byte(item.JWE)
	if _, err := sig.Verify(body, q.h.macKeys, time.Unix(sig.Unix, 0), q.h.tolerance); err != nil {
		return "no configured signing_secret verifies the stored delivery (a secret removed since it was queued, or a record not written by the gateway)", false
	}
	start := time.Now()
	plaintext, kid, err := q.h.keys.Decrypt(body)
	observePhase(phaseDecrypt, start)
	switch {
	case errors.Is(err, kayle.ErrUnknownKeyID):
		return "its key " + kid + " is not configured: add its decryption_key", false
	case err != nil:
		return "the stored JWE does not decrypt", true
	}
	ev, err := kayle.ParseEvent(plaintext)
	if err != nil {
		return "the stored payload is invalid", true
	}
	if hashHex(ev.ID) != j.eventHash {
		return "the stored delivery is another event's", true
	}
	j.plaintext, j.event, j.sigTimestamp = plaintext, ev, sig.Timestamp
	return "", false
}

// cannotOpen keeps an event whose delivery cannot be opened: it waits the
// longest wait and is looked at again (a key added meanwhile opens it), or,
// tampered, it is dead at once. Never forwarded.
func (q *queueRunner) cannotOpen(ctx context.Context, j *queueJob, why string, tampered bool) {
	q.logger.Error("a queued event cannot be opened; it is not forwarded",
		zap.String("event_id", j.item.EventID), zap.String("kid", j.item.KID), zap.String("why", why))
	j.held.settle() // the heartbeat writes the item: change it only after
	if j.held.lost.Load() {
		return
	}
	j.item.LastError = why
	if tampered {
		q.bury(ctx, j, why)
		return
	}
	q.reschedule(ctx, j, q.h.now().Add(q.maxBackoff))
}

// forwardJob forwards an opened event, then records what became of it:
// delivered (the record, then the marker gone), or tried again later, or
// dead past the horizon.
func (q *queueRunner) forwardJob(ctx context.Context, j *queueJob) {
	item := j.item
	status, header := q.forwardOnce(j)
	j.plaintext = nil
	j.held.settle()
	countQueueForward(q.d.prefix, status)
	if j.held.lost.Load() {
		q.logger.Error("another instance took over a queued event this one was forwarding (this one stalled); it may forward it too",
			zap.String("event_id", item.EventID))
		return
	}
	now := q.h.now()
	if status >= 200 && status <= 299 {
		q.succeeded()
		if !q.d.remember(ctx, j.held, item.EventID, status) {
			// still queued: the marker stays, and once this holder's lease
			// is silent the event is forwarded again (at least once)
			return
		}
		q.deleteMarker(ctx, item.Marker)
		q.logger.Info("queued event delivered", zap.String("event_id", item.EventID),
			zap.Int("status", status), zap.Int("attempts", item.Attempts+1))
		return
	}
	asked := retryAfter(status, header, now)
	if isBackendFailure(status) {
		wait := q.failed(status, asked)
		q.logger.Warn("the backend failed a queued event; the queue backs off",
			zap.String("event_id", item.EventID), zap.Int("status", status), zap.Duration("wait", wait))
	} else {
		q.succeeded()
		q.logger.Warn("the backend refused a queued event; it is tried again later",
			zap.String("event_id", item.EventID), zap.Int("status", status))
	}
	item.Attempts++
	item.LastStatus, item.LastTryAt, item.LastError = status, now.UTC(), ""
	if q.pastHorizon(item, now) {
		q.bury(ctx, j, "")
		return
	}
	q.reschedule(ctx, j, now.Add(max(eventRetryWait(item.Attempts, q.maxBackoff), asked)))
}

// reschedule moves an event's marker to next and lets go of the event: the
// new marker, then the record (released, so the next holder need not wait
// for its silence), then the old marker goes.
func (q *queueRunner) reschedule(ctx context.Context, j *queueJob, next time.Time) {
	item := j.item
	old := item.Marker
	item.NextTry = next.UTC()
	item.Marker = q.dueMarkerKey(j.eventHash, next, item.ReceivedAt, q.h.now())
	_ = q.moveMarker(ctx, j.held, item, old) // logged; the event stays as it was
}

// bury makes an event dead: kept, listed, never tried again by itself.
func (q *queueRunner) bury(ctx context.Context, j *queueJob, why string) {
	item := j.item
	old := item.Marker
	item.Dead, item.NextTry = true, time.Time{}
	if why != "" {
		item.LastError = why
	}
	item.Marker = q.deadMarkerKey(j.eventHash)
	q.logger.Warn("queued event is dead; it stays until an operator retries or drops it (caddy kayle queue)",
		zap.String("event_id", item.EventID), zap.Int("attempts", item.Attempts), zap.Int("last_status", item.LastStatus),
		zap.Duration("horizon", q.horizon))
	_ = q.moveMarker(ctx, j.held, item, old) // logged; the event stays as it was
}

// forwardOnce sends the opened event through the forward routes, as a
// request built here, signed (forward_signature) as it leaves. It returns
// the backend's status (502 when nothing answered) and headers.
func (q *queueRunner) forwardOnce(j *queueJob) (status int, header http.Header) {
	ctx, cancel := context.WithTimeout(context.Background(), forwardTimeout)
	defer cancel()
	w := &queueResponse{header: make(http.Header)}
	r := q.newRequest(ctx, j, w)
	start := time.Now()
	defer func() { observeDuration(phaseForward, time.Since(start)) }()
	err := q.serve(w, r)
	if err == nil && w.status == 0 {
		err = caddyhttp.Error(http.StatusBadGateway, errNothingAnswered)
	}
	if err != nil && w.status == 0 {
		q.logger.Debug("forward failed", zap.String("event_id", j.item.EventID), zap.Error(err))
	}
	return forwardStatus(w.status, err), w.header
}

// serve runs the forward routes; a panic there (reverse_proxy aborts a
// response whose body broke) ends the forward with what was answered.
func (q *queueRunner) serve(w *queueResponse, r *http.Request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			if !errors.Is(asError(p), http.ErrAbortHandler) {
				q.logger.Error("the queue's forward routes panicked", zap.Any("panic", p))
			}
			err = caddyhttp.Error(http.StatusBadGateway, errors.New("the forward was aborted"))
		}
	}()
	return q.forward.ServeHTTP(w, r)
}

func asError(p any) error {
	if err, ok := p.(error); ok {
		return err
	}
	return nil
}

// newRequest builds the plaintext request the forward routes see: the one
// the handler would have passed on, from the stored ids and the opened
// delivery.
func (q *queueRunner) newRequest(ctx context.Context, j *queueJob, w http.ResponseWriter) *http.Request {
	item := j.item
	u, err := url.ParseRequestURI(item.URI)
	if err != nil {
		u = &url.URL{Path: "/"}
	}
	r := (&http.Request{
		Method:     http.MethodPost,
		URL:        u,
		Proto:      "HTTP/1.1",
		ProtoMajor: 1,
		ProtoMinor: 1,
		Header:     make(http.Header),
		Host:       item.Host,
		RemoteAddr: item.RemoteAddr,
		RequestURI: u.RequestURI(),
	}).WithContext(ctx)
	repl := caddy.NewReplacer()
	r = caddyhttp.PrepareRequest(r, repl, w, q.server)
	repl.Set("http.kayle.delivery_id", item.DeliveryID)
	rewriteRequest(r, repl, j.plaintext, j.event, item.KID, item.DeliveryID, kayle.Signature{Timestamp: j.sigTimestamp})
	if len(q.h.forwardKeys) > 0 {
		standardwebhooks.Sign(r.Header, q.h.forwardKeys, j.event.ID, q.h.now(), j.plaintext)
	}
	return r
}

// queueResponse is where the backend's answer to a queued forward goes: its
// status and headers are kept, its body dropped.
type queueResponse struct {
	header http.Header
	status int
}

func (w *queueResponse) Header() http.Header { return w.header }

func (w *queueResponse) WriteHeader(status int) {
	if w.status == 0 && status >= 200 {
		w.status = status
	}
}

func (w *queueResponse) Write(b []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return len(b), nil
}

func (w *queueResponse) Flush() {}

// readPaused reads the pause flag that `caddy kayle queue pause` writes.
func (q *queueRunner) readPaused() bool {
	ctx, cancel := context.WithTimeout(q.ctx, storageTimeout)
	defer cancel()
	paused := q.d.storage.Exists(ctx, path.Join(q.dir, queuePausedKey))
	q.mu.Lock()
	changed := paused != q.paused
	q.paused = paused
	q.mu.Unlock()
	if changed {
		setQueuePaused(q.d.prefix, paused)
		q.logger.Info("queue pause flag changed", zap.Bool("paused", paused))
	}
	return paused
}

// scan counts the queue for its metrics, and moves the cursor back to the
// oldest bucket holding a marker: the one walk over every marker, every
// queueStatsEvery.
func (q *queueRunner) scan() {
	ctx, cancel := context.WithTimeout(q.ctx, 2*storageTimeout)
	defer cancel()
	now := q.h.now()
	keys, err := q.d.storage.List(ctx, path.Join(q.dir, queueDueFolder), true)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		q.logger.Warn("counting the queue", zap.Error(err))
		q.mu.Lock()
		if !q.started {
			q.cursor, q.started = bucketOf(now.Add(-queueClockSkew)), true
		}
		q.mu.Unlock()
		return
	}
	depth, oldest, first := 0, now, bucketOf(now.Add(-queueClockSkew))
	for _, key := range keys {
		m, ok := parseDueMarker(key)
		if !ok {
			continue
		}
		depth++
		if m.received.Before(oldest) {
			oldest = m.received
		}
		if bucket, ok := parseBucket(path.Base(path.Dir(key))); ok && bucket < first {
			first = bucket
		}
	}
	q.dropEmptyBuckets(ctx, keys, now)
	dead, _ := q.d.storage.List(ctx, path.Join(q.dir, queueDeadFolder), false)
	q.mu.Lock()
	if !q.started || first < q.cursor {
		q.cursor = first
	}
	for hash, s := range q.leases {
		if now.Sub(s.since) > time.Hour {
			delete(q.leases, hash) // its event was delivered meanwhile
		}
	}
	q.started = true
	q.mu.Unlock()
	q.dropStaleReady(now)
	setQueueStats(q.d.prefix, depth, now.Sub(oldest), len(dead))
}

// dropEmptyBuckets deletes the bucket folders, listed among keys, that are
// empty and an hour old: file_system keeps a folder after its last marker
// goes, and the minute's walk would meet ever more of them. No writer
// writes into a bucket that old (see queueClockSkew).
func (q *queueRunner) dropEmptyBuckets(ctx context.Context, keys []string, now time.Time) {
	due := path.Join(q.dir, queueDueFolder)
	used := make(map[string]bool)
	for _, key := range keys {
		if _, ok := parseDueMarker(key); ok {
			used[path.Dir(key)] = true
		}
	}
	old := bucketOf(now.Add(-emptyBucketAge))
	for _, key := range keys {
		bucket, ok := parseBucket(path.Base(key))
		if !ok || path.Dir(key) != due || used[key] || bucket >= old {
			continue
		}
		if err := q.d.storage.Delete(ctx, key); err != nil && !errors.Is(err, fs.ErrNotExist) {
			q.logger.Debug("deleting an empty queue bucket", zap.String("key", key), zap.Error(err))
		}
	}
}
