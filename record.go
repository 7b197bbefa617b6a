package kaylewebhook

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"path"
	"time"

	"go.uber.org/zap"
)

// recordVersion is the v of the records this version writes.
const recordVersion = 1

// record is what the storage keeps per event: no plaintext, and of a
// delivered event not even its id, only its hash. A delivered event has
// DeliveredAt. While an instance forwards the event, or after its forward
// failed, the record is a lease instead: the holder's token and its last
// sign of life (see lock.go). A queued event's record also holds the
// delivery, still encrypted, and its ids (Queue).
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
	// Queue: the event is queued (or dead) and not yet delivered; the
	// delivery as it arrived, still encrypted (queue_item.go).
	Queue *queueItem `json:"queue,omitempty"`
	// Dropped: an operator dropped the queued event (caddy kayle queue
	// drop); DeliveredAt is when, so a later copy is still a duplicate.
	Dropped bool `json:"dropped,omitempty"`
}

// eventKeys derives the record key and lock name from a hash of the event id,
// so no id can leave the prefix, and two ids never share a lock through
// certmagic's Safe() folding of case and punctuation.
func (d *deduper) eventKeys(eventID string) (eventHash, recordKey, lockName string) {
	sum := sha256.Sum256([]byte(eventID))
	eventHash = hex.EncodeToString(sum[:])
	recordKey, lockName = d.recordKeyOf(eventHash)
	return eventHash, recordKey, lockName
}

// lockNameOf is the storage lock of the event whose record is recordKey.
func lockNameOf(recordKey string) string {
	lockSum := sha256.Sum256([]byte(recordKey))
	return "kayle_webhook_event_" + hex.EncodeToString(lockSum[:16])
}

// isQueued reports whether rec is a queued (or dead) event's.
func (rec *record) isQueued() bool { return rec != nil && rec.Queue != nil && rec.DeliveredAt.IsZero() }

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
	rec.Queue = nil // the delivery leaves the storage with its delivery
	data, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	// the request may be gone by now; the record must still be written
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	return d.store(ctx, recordKey, data)
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

// forget deletes the "delivered" record of an event, so the next copy of it
// (an operator's replay from Kayle's dashboard) is forwarded again. It holds
// the event's storage lock meanwhile, taken as a copy takes it (a dead
// holder's lock is taken over): a copy being forwarded right now ends, and
// writes its record, before the record is looked at. found reports whether
// there was a delivered record, expired or not; a lease left by a failed
// forward is deleted too, but is not one.
func (d *deduper) forget(ctx context.Context, eventID string) (found bool, err error) {
	_, recordKey, lockName := d.eventKeys(eventID)
	var held *heldLock
	for held == nil {
		// nil while the holder that wrote a delivered record still holds
		// the lock: wait for it to let go
		if held, _, err = d.acquire(ctx, lockName, recordKey, eventID); err != nil {
			return false, err
		}
	}
	defer held.release()
	rec, err := d.loadRecord(ctx, recordKey)
	if err != nil {
		return false, err
	}
	if rec.isQueued() {
		// deleting it would take the event out of the queue unseen
		return false, errEventQueued
	}
	if err := d.storage.Delete(ctx, recordKey); err != nil {
		return false, err
	}
	return rec != nil && !rec.DeliveredAt.IsZero(), nil
}

// errEventQueued: forget met an event the queue still holds.
var errEventQueued = errors.New("the event is in the queue, not delivered: take it out with caddy kayle queue drop")

// loadRecord reads the record at key; nil when there is none, or when it
// cannot be parsed (forwarding again is safer than refusing the event).
func (d *deduper) loadRecord(ctx context.Context, key string) (*record, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	data, err := d.load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var rec record
	if err := json.Unmarshal(data, &rec); err != nil || (rec.DeliveredAt.IsZero() && rec.HeartbeatAt.IsZero() && rec.Queue == nil) {
		d.logger.Warn("ignoring an unreadable dedupe record", zap.String("key", key))
		return nil, nil
	}
	return &rec, nil
}

// isRecordKey reports whether key is prefix/<hh>/<hash> as eventKeys makes
// it. Records of a nested prefix (another endpoint's) are not ours to expire.
func (d *deduper) isRecordKey(key string) bool {
	dir, name := path.Split(key)
	return isRecordName(name) && path.Clean(dir) == path.Join(d.prefix, name[:2])
}
