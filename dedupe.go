package kaylewebhook

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

const (
	// sweepInterval is how often, at most, one instance of a cluster deletes
	// expired records.
	sweepInterval = time.Hour
	// storageTimeout bounds storage calls made after the request may be gone
	// (writing the record, releasing locks).
	storageTimeout = 30 * time.Second
	// sweepLockWait is how long an instance waits for the sweep lock, past
	// the time it takes to find its holder dead, before assuming another
	// instance is sweeping.
	sweepLockWait = 5 * time.Second
	// sweepLeaseName is the key, below the prefix, of the sweeper's lease.
	sweepLeaseName = "sweep_lease"
	// sweepPause: after each record folder the sweep rests this many times
	// as long as the folder took (at most sweepMaxPause), so it uses at most
	// a fifth of a CPU. On slow network storage it is a fifth of the time.
	sweepPause    = 4
	sweepMaxPause = time.Second
	// sweepShards is the number of record folders: eventKeys names them by
	// the first byte of the hash, in hex.
	sweepShards = 256
	// sweepClockMargin: records whose file time is within it of the cutoff
	// are read, so a storage clock ahead of this instance's by up to it
	// does not keep expired records an extra sweep.
	sweepClockMargin = time.Hour
	// forwardTimeout bounds a forward, which no longer ends with the sender's
	// connection (see deliverOnce). Kayle itself waits only a few seconds.
	forwardTimeout = 2 * time.Minute
	// statusClientClosedRequest is the de facto status (nginx, Caddy) for a
	// request whose client went away; nobody receives it.
	statusClientClosedRequest = 499
	recordVersion             = 1
)

// deduper forwards each event once across every Caddy instance sharing its
// storage. Per event it takes an in-process claim (so same-instance copies
// never pay the storage lock's poll), then the storage lock (so copies on
// other instances wait), then looks for the "delivered" record. The record is
// written only after the backend answered 2xx, so a failed forward is retried
// by Kayle and forwarded again. The storage lock can be lost in rare cases
// (a holder stalled past the stale-lock timeout); the cost is then at most one
// duplicate forward, never a lost event.
type deduper struct {
	storage certmagic.Storage
	prefix  string
	window  time.Duration
	logger  *zap.Logger
	now     func() time.Time

	timing lockTiming

	mu   sync.Mutex
	held map[string]int // storage locks held now, by name, for Cleanup

	// identity names the records this deduper keeps (storage and prefix),
	// and generation orders the dedupers of one identity (see successor).
	identity   string
	generation uint64
	retired    atomic.Bool // the handler was cleaned up (a reload, a stop)
}

// record is what the storage keeps per event: no plaintext, and not even
// the event id, only its hash. A delivered event has DeliveredAt. While an
// instance forwards the event, or after its forward failed, the record is a
// lease instead: the holder's token and its last sign of life (see lock.go).
type record struct {
	Version     int       `json:"v"`
	EventSHA256 string    `json:"event_sha256,omitempty"`
	DeliveredAt time.Time `json:"delivered_at,omitzero"`
	Status      int       `json:"status,omitempty"`
	Holder      string    `json:"holder,omitempty"`
	HeartbeatAt time.Time `json:"heartbeat_at,omitzero"`
	// Released: the holder let go without delivering (its forward failed),
	// so the next copy need not wait for the lease's silence.
	Released bool `json:"released,omitempty"`
}

func newDeduper(storage certmagic.Storage, prefix string, window time.Duration, logger *zap.Logger, now func() time.Time) *deduper {
	return &deduper{
		storage: storage,
		prefix:  prefix,
		window:  window,
		logger:  logger,
		now:     now,
		timing:  defaultLockTiming,
		held:    make(map[string]int),
	}
}

// cleanPrefix normalizes a storage prefix and refuses one that could climb
// out of the storage root.
func cleanPrefix(prefix string) (string, error) {
	cleaned := path.Clean("/" + prefix)[1:]
	if cleaned == "" || cleaned == "." {
		return "", errors.New("dedupe_prefix must name a folder below the storage root")
	}
	// '\\' too: file_system storage on Windows splits on it
	if slices.Contains(strings.FieldsFunc(prefix, func(r rune) bool { return r == '/' || r == '\\' }), "..") {
		return "", fmt.Errorf("dedupe_prefix %q must not contain '..'", prefix)
	}
	return cleaned, nil
}

// eventKeys derives the record key and lock name from a hash of the event id,
// so no id can leave the prefix, and two ids never share a lock through
// certmagic's Safe() folding of case and punctuation.
func (d *deduper) eventKeys(eventID string) (eventHash, recordKey, lockName string) {
	sum := sha256.Sum256([]byte(eventID))
	eventHash = hex.EncodeToString(sum[:])
	recordKey = path.Join(d.prefix, eventHash[:2], eventHash)
	lockSum := sha256.Sum256([]byte(recordKey))
	lockName = "kayle_webhook_event_" + hex.EncodeToString(lockSum[:16])
	return eventHash, recordKey, lockName
}

// deliverOnce forwards the rewritten request to next unless the event was
// delivered already, and remembers it when the backend answers 2xx.
func (d *deduper) deliverOnce(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, eventID string) error {
	eventHash, recordKey, lockName := d.eventKeys(eventID)
	ctx := r.Context()

	releaseClaim, err := inProcessClaims.acquire(ctx, recordKey)
	if err != nil {
		return d.clientGone(eventID, err)
	}
	defer releaseClaim()

	// The wait does not end with Kayle's connection: a copy must be able to
	// wait out a dead holder's silence and take the event over, even when
	// Kayle hung up after a few seconds. It is bounded all the same.
	waitCtx, cancelWait := context.WithTimeout(context.WithoutCancel(ctx), d.timing.waitLimit)
	held, rec, err := d.acquire(waitCtx, lockName, recordKey, eventID)
	cancelWait()
	switch {
	case errors.Is(err, errLockBusy) && ctx.Err() != nil:
		return d.clientGone(eventID, err)
	case errors.Is(err, errLockBusy):
		d.logger.Warn("another copy of the event has held it too long; answering 503 so Kayle retries",
			zap.String("event_id", eventID), zap.Error(err))
		countRequest("lock_busy")
		return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("event %s: %w", eventID, err))
	case err != nil:
		d.logger.Error("dedupe storage failed; answering 503 so Kayle retries",
			zap.String("event_id", eventID), zap.Error(err))
		countRequest("storage_unavailable")
		return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("dedupe storage, event %s: %w", eventID, err))
	}
	if held == nil || d.isDelivered(rec) {
		if held != nil {
			held.release()
		}
		return d.answerDuplicate(w, r, eventID)
	}
	defer held.release()
	held.lease.EventSHA256 = eventHash
	if rec != nil || held.tookOver {
		// an earlier holder's lease or failure mark, or a takeover: write
		// this holder's lease at once, so that waiters see a change and do
		// not take this holder for the silent one
		if err := held.writeLease(ctx); err != nil {
			d.logger.Error("dedupe storage unwritable; answering 503 so Kayle retries",
				zap.String("event_id", eventID), zap.Error(err))
			countRequest("storage_unavailable")
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("writing the lease of event %s: %w", eventID, err))
		}
		held.heartbeat(d.timing.beatEvery)
	} else {
		held.heartbeat(d.timing.firstBeat)
	}

	countRequest("forwarded")
	// Kayle hangs up after a few seconds. The forward goes on without it, so
	// a slow backend's 2xx is still seen and remembered and Kayle's retry is
	// answered as a duplicate, instead of reaching the backend again.
	fwdCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), forwardTimeout)
	defer cancel()
	r = r.WithContext(fwdCtx)
	recorder := caddyhttp.NewResponseRecorder(w, nil, nil) // streams; only observes the status
	returned := false
	defer func() {
		// next panicked: reverse_proxy does (http.ErrAbortHandler) when the
		// response body breaks after the backend's status went out. A 2xx
		// that went out is still the backend accepting the event.
		if status := recorder.Status(); !returned && status >= 200 && status <= 299 {
			held.settle()
			d.remember(ctx, held, eventID, status)
		}
	}()
	status, nextErr := forward(recorder, r, next)
	returned = true
	if nextErr == nil && status >= 200 {
		// The backend's answer is written: send it to Kayle now, not after
		// the storage round trips that follow (ownership check, record,
		// unlock). A retry of the event waits for the lock all the same,
		// which is released only once the record is written.
		_ = http.NewResponseController(recorder).Flush()
	}
	held.settle()
	if status < 200 || status > 299 {
		d.logger.Info("backend did not accept the event; not remembered, Kayle will retry",
			zap.String("event_id", eventID), zap.Int("status", status))
		if !held.lost.Load() {
			// for copies waiting now: this holder let go, the next may forward
			if err := held.writeMark(ctx, true); err != nil {
				d.logger.Warn("marking a failed forward in dedupe storage", zap.String("event_id", eventID), zap.Error(err))
			}
		}
		return nextErr
	}
	d.remember(ctx, held, eventID, status)
	return nextErr
}

// remember writes the record of an event the backend accepted.
func (d *deduper) remember(ctx context.Context, held *heldLock, eventID string, status int) {
	rec := held.lease
	rec.Holder = held.token
	if err := d.commit(ctx, held.leaseKey, rec, status); err != nil {
		// the backend has the event; a later copy may be forwarded again
		d.logger.Error("event delivered but its dedupe record could not be written; a retry of it would be forwarded again",
			zap.String("event_id", eventID), zap.Error(err))
		countRecordWriteFailure()
	}
}

// clientGone ends a copy whose sender hung up while another copy of the
// event was being handled: routine when the backend is slow, not a fault.
func (d *deduper) clientGone(eventID string, err error) error {
	d.logger.Info("sender gone while another copy of the event was being handled",
		zap.String("event_id", eventID), zap.Error(err))
	countRequest("client_gone")
	return caddyhttp.Error(statusClientClosedRequest, fmt.Errorf("waiting for another copy of event %s: %w", eventID, err))
}

func (d *deduper) answerDuplicate(w http.ResponseWriter, r *http.Request, eventID string) error {
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	repl.Set("http.kayle.duplicate", true)
	countRequest("duplicate")
	d.logger.Debug("duplicate delivery acknowledged, not forwarded", zap.String("event_id", eventID))
	return acknowledge(w, kayle.HeaderDuplicate, "duplicate", eventID)
}

// isDelivered reports whether rec says the event was delivered within the
// window.
func (d *deduper) isDelivered(rec *record) bool {
	return rec != nil && !rec.DeliveredAt.IsZero() && d.now().Sub(rec.DeliveredAt) <= d.window
}

// commit writes rec as the record of a delivered event.
func (d *deduper) commit(ctx context.Context, recordKey string, rec record, status int) error {
	rec.Version = recordVersion
	rec.DeliveredAt = d.now().UTC()
	rec.Status = status
	rec.HeartbeatAt = time.Time{}
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	// the request may be gone by now; the record must still be written
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	return d.store(ctx, recordKey, data)
}

// startSweeper deletes expired records in the background until ctx ends.
func (d *deduper) startSweeper(ctx context.Context) {
	go func() {
		// a random first delay spreads the instances of a cluster
		timer := time.NewTimer(time.Minute + rand.N(4*time.Minute))
		defer timer.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
				if err := d.sweep(ctx); err != nil && ctx.Err() == nil {
					d.logger.Warn("sweeping expired dedupe records", zap.Error(err))
				}
				timer.Reset(sweepInterval)
			}
		}
	}()
}

// sweep deletes the records older than the window. One instance of a cluster
// sweeps at a time (a storage lock), and at most once per sweepInterval (a
// marker record). A record re-written between our read and our delete is
// lost; the cost is one duplicate forward of an event older than the window.
func (d *deduper) sweep(ctx context.Context) error {
	_, _, err := d.sweepRecords(ctx, false)
	return err
}

// sweepRecords is sweep; now: even within an hour of the last sweep (the
// sweep command). It returns how many records it deleted and saw.
func (d *deduper) sweepRecords(ctx context.Context, now bool) (deleted, seen int, err error) {
	lockName := "kayle_webhook_sweep_" + hashHex(d.prefix)[:32]
	// long enough to outwait a dead sweeper's silence and take over
	waitCtx, cancel := context.WithTimeout(ctx, d.timing.staleAfter+sweepLockWait)
	held, _, err := d.acquire(waitCtx, lockName, path.Join(d.prefix, sweepLeaseName), "sweep")
	cancel()
	if errors.Is(err, errLockBusy) {
		return 0, 0, nil // another instance is sweeping (or Caddy is stopping)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("taking the sweep lock: %w", err)
	}
	if held == nil {
		return 0, 0, nil // cannot happen: a sweep lease is never a delivery
	}
	defer held.release()
	if err := held.writeLease(ctx); err != nil {
		return 0, 0, fmt.Errorf("writing the sweep lease: %w", err)
	}
	held.heartbeat(d.timing.beatEvery)
	defer func() {
		held.settle()
		if !held.lost.Load() {
			// the next sweeper need not wait for this lease's silence
			_ = held.writeMark(ctx, true)
		}
	}()

	markerKey := path.Join(d.prefix, "last_sweep")
	if data, err := d.storage.Load(ctx, markerKey); err == nil && !now {
		if last, err := time.Parse(time.RFC3339Nano, string(data)); err == nil && d.now().Sub(last) < sweepInterval {
			return 0, 0, nil
		}
	}
	clock, sweepStart := d.now(), time.Now()
	cutoff := clock.Add(-d.window)
	var listErr error
	// One record folder at a time: the keys of a busy window (a million
	// records) are never all in memory at once, and the sweep rests between
	// folders so that it takes little from the requests it runs beside. It
	// starts at a random folder, so sweeps cut short (a reload, a stop)
	// still reach every folder in time.
	first := rand.N(sweepShards)
	for i := range sweepShards {
		began := time.Now()
		folder := path.Join(d.prefix, fmt.Sprintf("%02x", (first+i)%sweepShards))
		keys, err := d.storage.List(ctx, folder, false)
		if errors.Is(err, fs.ErrNotExist) {
			// no such folder yet, or (file_system) a temp file renamed
			// during the listing: the keys listed so far are still good
			err = nil
		}
		if err != nil {
			// the other folders are still swept; the marker is not written,
			// so the next sweep tries this one again
			if listErr == nil {
				d.logger.Warn("listing a dedupe record folder; sweeping the others", zap.String("folder", folder), zap.Error(err))
			}
			listErr = cmp.Or(listErr, err)
			continue
		}
		seen += len(keys)
		for _, key := range keys {
			if ctx.Err() != nil {
				return deleted, seen, ctx.Err()
			}
			expired, err := d.expired(ctx, key, cutoff, clock)
			if err != nil || !expired {
				continue
			}
			if err := d.storage.Delete(ctx, key); err != nil {
				d.logger.Warn("deleting an expired dedupe record", zap.String("key", key), zap.Error(err))
				continue
			}
			deleted++
		}
		select {
		case <-ctx.Done():
			return deleted, seen, ctx.Err()
		case <-time.After(min(time.Since(began)*sweepPause, sweepMaxPause)):
		}
	}
	d.logger.Info("swept expired dedupe records", zap.Int("deleted", deleted), zap.Int("seen", seen),
		zap.Duration("took", time.Since(sweepStart)))
	if listErr != nil {
		return deleted, seen, listErr
	}
	return deleted, seen, d.storage.Store(ctx, markerKey, []byte(d.now().UTC().Format(time.RFC3339Nano)))
}

// expired reports whether key is one of ours and older than cutoff: a record
// (by its own time), or a temp file a crashed Store left in a record folder
// (by its modification time). Anything else in a record folder is left
// alone, and so is a folder: deleting a folder key deletes its contents.
//
// A record is written when its event is delivered, so a file time well
// after the cutoff and not after now (by the storage's clock; a time from
// the future is not trusted) says it is fresh without reading it: the
// hourly sweep then costs a Stat per record, not a read. A record whose
// file is newer than its own time (a copied storage) is kept a while
// longer, never deleted early.
func (d *deduper) expired(ctx context.Context, key string, cutoff, now time.Time) (bool, error) {
	isRecord := d.isRecordKey(key)
	if !isRecord && !d.isStrayTempFile(key) {
		return false, nil
	}
	info, err := d.storage.Stat(ctx, key)
	if err != nil {
		return false, err
	}
	// A record key is never a folder in our layout, and some storage
	// modules (pteich/caddy-tlsconsul) report no key as terminal: a record is
	// read whatever Stat says. A stray temp file must be a file, since
	// deleting a folder key deletes what is below it.
	if !info.IsTerminal && !isRecord {
		return false, nil
	}
	if info.Modified.After(cutoff.Add(sweepClockMargin)) && !info.Modified.After(now) {
		return false, nil
	}
	if isRecord {
		data, err := d.storage.Load(ctx, key)
		if err != nil {
			return false, err
		}
		var rec record
		if json.Unmarshal(data, &rec) == nil && !rec.DeliveredAt.IsZero() {
			return rec.DeliveredAt.Before(cutoff), nil
		}
	}
	return !info.Modified.IsZero() && info.Modified.Before(cutoff), nil
}

// isRecordKey reports whether key is prefix/<hh>/<hash> as eventKeys makes
// it. Records of a nested prefix (another endpoint's) are not ours to expire.
func (d *deduper) isRecordKey(key string) bool {
	dir, name := path.Split(key)
	return isRecordName(name) && path.Clean(dir) == path.Join(d.prefix, name[:2])
}

// isStrayTempFile reports whether key looks like file_system's temp file
// (os.CreateTemp's decimal name) inside one of our record folders.
func (d *deduper) isStrayTempFile(key string) bool {
	dir, name := path.Split(key)
	shard := path.Base(dir)
	if path.Dir(path.Clean(dir)) != d.prefix || len(shard) != 2 || !isLowerHex(shard) || name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if name[i] < '0' || name[i] > '9' {
			return false
		}
	}
	return true
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func isRecordName(name string) bool {
	return len(name) == 2*sha256.Size && isLowerHex(name)
}

func hashHex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// inProcessClaims serializes copies of one event inside this process. It is
// package-level so that handlers of the old and the new config share it
// during a reload.
var inProcessClaims = &keyedMutex{entries: make(map[string]*keyedEntry)}

type keyedMutex struct {
	mu      sync.Mutex
	entries map[string]*keyedEntry
}

type keyedEntry struct {
	token chan struct{} // holds one value while the key is claimed
	refs  int
}

// acquire waits until key is free or ctx ends; release must be called once.
func (k *keyedMutex) acquire(ctx context.Context, key string) (release func(), err error) {
	k.mu.Lock()
	e := k.entries[key]
	if e == nil {
		e = &keyedEntry{token: make(chan struct{}, 1)}
		k.entries[key] = e
	}
	e.refs++
	k.mu.Unlock()

	select {
	case e.token <- struct{}{}:
		return func() {
			<-e.token
			k.drop(key, e)
		}, nil
	case <-ctx.Done():
		k.drop(key, e)
		return nil, ctx.Err()
	}
}

func (k *keyedMutex) drop(key string, e *keyedEntry) {
	k.mu.Lock()
	if e.refs--; e.refs == 0 {
		delete(k.entries, key)
	}
	k.mu.Unlock()
}
