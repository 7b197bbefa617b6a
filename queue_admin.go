package kaylewebhook

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
	"strings"
	"sync"
	"time"
)

// The operator's side of the queue (caddy kayle queue): listing, retrying,
// dropping, pausing. Each change to an event is made under its lock, as a
// poll takes it, so it never races a forward in flight: it waits for that
// forward to end (or for a dead holder to be found silent).

// queueEntry is what a listing shows of a queued or dead event: ids, times
// and counts from its record. Never its JWE, signature or anything in it.
type queueEntry struct {
	EventID    string
	EventType  string
	KID        string
	ReceivedAt time.Time
	RetriedAt  time.Time
	Attempts   int
	LastStatus int
	NextTry    time.Time
	LastError  string
	Dead       bool
}

// queueListing is a listing of the queue's due or dead events.
type queueListing struct {
	Entries []queueEntry // by received time, then event id
	// Stale counts the markers that stand for no event: its record is gone,
	// delivered, or names another marker (a move under way). A poll deletes
	// a stale due marker when it meets it.
	Stale int
	// Unreadable counts the records the storage failed to read; ReadErr is
	// the first such failure.
	Unreadable int
	ReadErr    error
}

// queueListLoads is how many records a listing reads at once: network
// storage answers each read in a round trip, and a queue may hold 100 000.
const queueListLoads = 8

// listQueue lists the queued events (their due markers), or with dead the
// dead ones, each as its record says. A marker the record does not name is
// skipped as stale, so an event moving between markers is listed once.
func (q *queueStore) listQueue(ctx context.Context, dead bool) (queueListing, error) {
	type marker struct{ key, eventHash string }
	var markers []marker
	if dead {
		keys, err := q.listKeys(ctx, path.Join(q.dir, queueDeadFolder), false)
		if err != nil {
			return queueListing{}, err
		}
		for _, key := range keys {
			if name := path.Base(key); isRecordName(name) {
				markers = append(markers, marker{key, name})
			}
		}
	} else {
		keys, err := q.listKeys(ctx, path.Join(q.dir, queueDueFolder), true)
		if err != nil {
			return queueListing{}, err
		}
		for _, key := range keys {
			if m, ok := parseDueMarker(key); ok {
				markers = append(markers, marker{key, m.eventHash})
			}
		}
	}

	var (
		mu      sync.Mutex
		listing queueListing
		wg      sync.WaitGroup
		next    = make(chan marker)
	)
	for range min(queueListLoads, len(markers)) {
		wg.Go(func() {
			for m := range next {
				recordKey, _ := q.d.recordKeyOf(m.eventHash)
				rec, err := q.d.loadRecord(ctx, recordKey)
				mu.Lock()
				switch {
				case err != nil:
					listing.Unreadable++
					listing.ReadErr = cmp.Or(listing.ReadErr, err)
				case !rec.isQueued() || !sameMarker(rec.Queue.Marker, m.key) || rec.Queue.Dead != dead:
					listing.Stale++
				default:
					listing.Entries = append(listing.Entries, entryOf(rec.Queue))
				}
				mu.Unlock()
			}
		})
	}
	for _, m := range markers {
		next <- m
	}
	close(next)
	wg.Wait()
	slices.SortFunc(listing.Entries, func(a, b queueEntry) int {
		return cmp.Or(a.ReceivedAt.Compare(b.ReceivedAt), strings.Compare(a.EventID, b.EventID))
	})
	return listing, nil
}

func entryOf(it *queueItem) queueEntry {
	return queueEntry{
		EventID:    it.EventID,
		EventType:  it.EventType,
		KID:        it.KID,
		ReceivedAt: it.ReceivedAt,
		RetriedAt:  it.RetriedAt,
		Attempts:   it.Attempts,
		LastStatus: it.LastStatus,
		NextTry:    it.NextTry,
		LastError:  it.LastError,
		Dead:       it.Dead,
	}
}

// listKeys lists a folder of the queue; none when it does not exist. Keys
// listed before a file vanished under the walk (file_system) are kept.
func (q *queueStore) listKeys(ctx context.Context, folder string, recursive bool) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*storageTimeout)
	defer cancel()
	keys, err := q.d.storage.List(ctx, folder, recursive)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("listing %s: %w", folder, err)
	}
	return keys, nil
}

// countDead counts the dead markers, without reading their records.
func (q *queueStore) countDead(ctx context.Context) (int, error) {
	keys, err := q.listKeys(ctx, path.Join(q.dir, queueDeadFolder), false)
	n := 0
	for _, key := range keys {
		if isRecordName(path.Base(key)) {
			n++
		}
	}
	return n, err
}

// queueAction is what an operator's retry or drop did to an event.
type queueAction string

const (
	actionDue       queueAction = "due now"    // a queued event, made due now
	actionRevived   queueAction = "revived"    // a dead event, alive and due now
	actionDropped   queueAction = "dropped"    // out of the queue, answered as a duplicate
	actionNotQueued queueAction = "not queued" // no record, or delivered (or dropped) already
	actionNotDead   queueAction = "not dead"   // retry --dead: retried or delivered since listed
)

// queueChange is what became of one event.
type queueChange struct {
	Action  queueAction
	EventID string
	// WasDead: the event was dead (a drop); Attempts: its tries so far.
	WasDead  bool
	Attempts int
	// Delivered is when a not-queued event was delivered (or dropped), if
	// it was; Dropped says it was dropped.
	Delivered time.Time
	Dropped   bool
}

// retryEvent makes a queued event due now, or a dead one alive again: its
// tries counted from 0, its last error cleared, its horizon counting anew
// from now. A running gateway forwards it at its next poll.
func (q *queueStore) retryEvent(ctx context.Context, eventID string) (queueChange, error) {
	change, err := q.retryHash(ctx, hashHex(eventID), eventID, false)
	change.EventID = cmp.Or(change.EventID, eventID)
	return change, err
}

// retryDead retries every dead event, calling each with what became of it
// (an event that is no longer dead when its turn comes is left as it is).
func (q *queueStore) retryDead(ctx context.Context, each func(queueChange, error)) error {
	keys, err := q.listKeys(ctx, path.Join(q.dir, queueDeadFolder), false)
	if err != nil {
		return err
	}
	for _, key := range keys {
		eventHash := path.Base(key)
		if !isRecordName(eventHash) {
			continue
		}
		change, err := q.retryHash(ctx, eventHash, "dead event "+eventHash[:16], true)
		if change.EventID == "" {
			change.EventID = "(event " + eventHash[:16] + "…)"
		}
		each(change, err)
	}
	return nil
}

func (q *queueStore) retryHash(ctx context.Context, eventHash, what string, onlyDead bool) (queueChange, error) {
	held, rec, release, err := q.lockQueued(ctx, eventHash, what)
	if err != nil {
		return queueChange{}, err
	}
	defer release()
	if onlyDead && held != nil && (!rec.isQueued() || !sameMarker(rec.Queue.Marker, q.deadMarkerKey(eventHash))) {
		// a dead marker left behind (its record moved on, and deleting it
		// failed): nothing else deletes it, and the metrics count it
		q.deleteMarker(ctx, q.deadMarkerKey(eventHash))
	}
	if change, queued := notQueued(rec); !queued {
		if onlyDead {
			change.Action = actionNotDead
		}
		return change, nil
	}
	item := rec.Queue
	change := queueChange{Action: actionDue, EventID: item.EventID, Attempts: item.Attempts, WasDead: item.Dead}
	if onlyDead && !item.Dead {
		change.Action = actionNotDead
		return change, nil
	}
	now := q.d.now().UTC()
	if item.Dead {
		change.Action = actionRevived
		item.Dead, item.RetriedAt, item.Attempts, item.LastError = false, now, 0, ""
	}
	old := item.Marker
	item.NextTry = now
	item.Marker = q.dueMarkerKey(eventHash, now, item.ReceivedAt, now)
	held.lease = *rec
	held.lease.EventSHA256 = eventHash
	if err := q.moveMarker(ctx, held, item, old); err != nil {
		return queueChange{EventID: item.EventID}, fmt.Errorf("writing its record: %w", err)
	}
	return change, nil
}

// dropEvent takes a queued or dead event out of the queue for good: its
// record becomes a delivered one (Dropped), so a later copy from Kayle is
// answered as a duplicate until the dedupe window ends (or caddy kayle
// forget deletes it), and its marker goes. Nothing is forwarded.
func (q *queueStore) dropEvent(ctx context.Context, eventID string) (queueChange, error) {
	eventHash := hashHex(eventID)
	held, rec, release, err := q.lockQueued(ctx, eventHash, eventID)
	if err != nil {
		return queueChange{EventID: eventID}, err
	}
	defer release()
	if change, queued := notQueued(rec); !queued {
		change.EventID = eventID
		return change, nil
	}
	item := rec.Queue
	recordKey, _ := q.d.recordKeyOf(eventHash)
	// the record first: a marker left behind stands for nothing, and a
	// poll that meets it deletes it
	dropped := record{EventSHA256: eventHash, Holder: held.token, Dropped: true}
	if err := q.d.commit(ctx, recordKey, dropped, 0); err != nil {
		return queueChange{EventID: eventID}, fmt.Errorf("writing its record: %w", err)
	}
	q.deleteMarker(ctx, item.Marker)
	return queueChange{Action: actionDropped, EventID: eventID, WasDead: item.Dead, Attempts: item.Attempts}, nil
}

// notQueued describes an event whose record is not a queued one.
func notQueued(rec *record) (queueChange, bool) {
	if rec.isQueued() {
		return queueChange{}, true
	}
	change := queueChange{Action: actionNotQueued}
	if rec != nil {
		change.Delivered, change.Dropped = rec.DeliveredAt, rec.Dropped
	}
	return change, false
}

// lockQueued takes an event's lock as a poll does (after the in-process
// claim; a dead holder is taken over), waiting at most forgetLockWait for
// a forward in flight to end. held is nil when the wait ended on a
// delivered record (rec); release must be called once either way.
func (q *queueStore) lockQueued(ctx context.Context, eventHash, what string) (held *heldLock, rec *record, release func(), err error) {
	recordKey, lockName := q.d.recordKeyOf(eventHash)
	waitCtx, cancel := context.WithTimeout(ctx, forgetLockWait)
	defer cancel()
	releaseClaim, err := inProcessClaims.acquire(waitCtx, recordKey)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("the wait for the lock ended: %w", errLockBusy)
	}
	held, rec, err = q.d.acquire(waitCtx, lockName, recordKey, what)
	if err != nil {
		releaseClaim()
		return nil, nil, nil, err
	}
	if held == nil {
		return nil, rec, releaseClaim, nil
	}
	return held, rec, func() { held.release(); releaseClaim() }, nil
}

// pausedKey is the pause flag every instance reads at each poll.
func (q *queueStore) pausedKey() string { return path.Join(q.dir, queuePausedKey) }

// pauseState reads the pause flag: whether the queue is paused, and the
// note the pause left (when and by whom, for humans).
func (q *queueStore) pauseState(ctx context.Context) (paused bool, note string, err error) {
	ctx, cancel := context.WithTimeout(ctx, storageTimeout)
	defer cancel()
	data, err := q.d.load(ctx, q.pausedKey())
	if errors.Is(err, fs.ErrNotExist) {
		return false, "", nil
	}
	if err != nil {
		return false, "", fmt.Errorf("reading the pause flag: %w", err)
	}
	return true, strings.TrimSpace(string(data)), nil
}

// setPaused writes the pause flag with note, or deletes it. Running
// gateways obey it at their next poll: while it stands they start no
// forward, and deliveries are still queued. changed is false when the
// queue already was so (a pause then keeps the first pause's note).
func (q *queueStore) setPaused(ctx context.Context, paused bool, note string) (changed bool, err error) {
	was, _, err := q.pauseState(ctx)
	if err != nil {
		return false, err
	}
	if was == paused {
		return false, nil
	}
	ctx, cancel := context.WithTimeout(ctx, storageTimeout)
	defer cancel()
	if paused {
		err = q.d.store(ctx, q.pausedKey(), []byte(note+"\n"))
	} else if err = q.d.storage.Delete(ctx, q.pausedKey()); errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	if err != nil {
		return false, fmt.Errorf("writing the pause flag: %w", err)
	}
	return true, nil
}
