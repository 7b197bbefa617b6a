package kaylewebhook

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
)

// queueItem is what the storage keeps of a queued event, inside the event's
// dedupe record: the delivery as it arrived (the JWE and the signature that
// proves it is Kayle's, neither readable without the private key and the
// secret) and ids. A copy of the event finds it and is answered as a
// duplicate; once the backend accepts the event the record becomes a
// delivered one, without it.
type queueItem struct {
	EventID   string `json:"event_id"`
	EventType string `json:"event_type,omitempty"`
	KID       string `json:"kid"`
	// JWE is the body as Kayle sent it, and Signature its X-Kayle-Signature:
	// a try verifies the body again (at its own t), so a record written into
	// the storage by anyone without the signing secret is never forwarded.
	JWE        string `json:"jwe"`
	Signature  string `json:"signature"`
	DeliveryID string `json:"delivery_id,omitempty"`
	// Where Kayle sent it, so the forward routes see the request they would
	// have seen: host, path and query, and the sender's address.
	Host       string `json:"host,omitempty"`
	URI        string `json:"uri,omitempty"`
	RemoteAddr string `json:"remote_addr,omitempty"`

	ReceivedAt time.Time `json:"received_at"`
	// RetriedAt: an operator's retry, from which the horizon counts anew.
	RetriedAt  time.Time `json:"retried_at,omitzero"`
	Attempts   int       `json:"attempts,omitempty"`
	NextTry    time.Time `json:"next_try,omitzero"`
	LastTryAt  time.Time `json:"last_try_at,omitzero"`
	LastStatus int       `json:"last_status,omitempty"`
	// LastError says why the last try did not reach the backend, in fixed
	// words and ids (a key or secret that is not configured).
	LastError string `json:"last_error,omitempty"`
	Dead      bool   `json:"dead,omitempty"`
	// Marker is the key of the event's marker: due/<minute>/… or dead/….
	Marker string `json:"marker"`
}

// horizonStart is when the event's horizon began.
func (it *queueItem) horizonStart() time.Time {
	if it.RetriedAt.After(it.ReceivedAt) {
		return it.RetriedAt
	}
	return it.ReceivedAt
}

// Storage layout under the queue's folder (<dedupe_prefix>/queue):
//
//	due/<unix minute>/<next try ms>-<received ms>-<event hash>   empty markers
//	dead/<event hash>                                          dead events
//	paused                                                     the pause flag
//
// A marker says "this event is due then"; the event itself is its record.
// A poll lists only the minute buckets from the oldest that may hold a
// marker to now, never the whole queue, and the name alone tells whether a
// marker is due yet.
const (
	queueDueFolder  = "due"
	queueDeadFolder = "dead"
	queuePausedKey  = "paused"
)

// queueMarker is a parsed due marker.
type queueMarker struct {
	key       string
	eventHash string
	next      time.Time
	received  time.Time
}

func bucketOf(t time.Time) int64 { return t.Unix() / 60 }

// queueStore is a queue's storage: the events' records (through the
// deduper, which locks them) and the markers under dir. The gateway's
// queue and the queue commands share it.
type queueStore struct {
	d      *deduper
	dir    string // <dedupe_prefix>/queue
	logger *zap.Logger
}

func newQueueStore(d *deduper, logger *zap.Logger) queueStore {
	return queueStore{d: d, dir: path.Join(d.prefix, "queue"), logger: logger}
}

func (q *queueStore) bucketKey(bucket int64) string {
	return path.Join(q.dir, queueDueFolder, strconv.FormatInt(bucket, 10))
}

// dueMarkerKey names the marker of an event due at next. A marker is never
// written into a bucket older than the writer's own minute, so the bucket
// is next's or now's, whichever is later.
func (q *queueStore) dueMarkerKey(eventHash string, next, received, now time.Time) string {
	bucket := max(bucketOf(next), bucketOf(now))
	return path.Join(q.bucketKey(bucket), fmt.Sprintf("%013d-%013d-%s", next.UnixMilli(), received.UnixMilli(), eventHash))
}

func (q *queueStore) deadMarkerKey(eventHash string) string {
	return path.Join(q.dir, queueDeadFolder, eventHash)
}

// parseBucket parses a due bucket's name.
func parseBucket(name string) (int64, bool) {
	bucket, err := strconv.ParseInt(name, 10, 64)
	return bucket, err == nil && bucket > 0
}

// parseDueMarker parses a key listed in a due bucket.
func parseDueMarker(key string) (queueMarker, bool) {
	parts := strings.Split(path.Base(key), "-")
	if len(parts) != 3 || !isRecordName(parts[2]) {
		return queueMarker{}, false
	}
	next, err1 := strconv.ParseInt(parts[0], 10, 64)
	received, err2 := strconv.ParseInt(parts[1], 10, 64)
	if err1 != nil || err2 != nil {
		return queueMarker{}, false
	}
	return queueMarker{key: key, eventHash: parts[2], next: time.UnixMilli(next), received: time.UnixMilli(received)}, true
}

// sameMarker reports whether two keys name one marker. The names are
// compared: a storage may list keys in another form than they were stored
// in (a leading slash, say), and a name is unique to one marker write.
func sameMarker(a, b string) bool { return path.Base(a) == path.Base(b) }

// recordKeyOf is the record key of an event hash, as eventKeys makes it.
func (d *deduper) recordKeyOf(eventHash string) (recordKey, lockName string) {
	recordKey = path.Join(d.prefix, eventHash[:2], eventHash)
	return recordKey, lockNameOf(recordKey)
}

// storeMarker writes an (empty) marker.
func (q *queueStore) storeMarker(ctx context.Context, key string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	return q.d.store(ctx, key, []byte{'1'})
}

// deleteMarker deletes a marker that no longer stands for a due event; one
// left behind is found stale and deleted by the next poll that meets it.
func (q *queueStore) deleteMarker(ctx context.Context, key string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	if err := q.d.storage.Delete(ctx, key); err != nil && !errors.Is(err, fs.ErrNotExist) {
		q.logger.Warn("deleting a queue marker; it is deleted when next met", zap.String("key", key), zap.Error(err))
	}
}

// moveMarker writes item's new marker and, through held, its record
// (released: the next holder need not wait for its silence), then deletes
// the old marker. When the record's write fails both markers stay, and the
// error is returned.
func (q *queueStore) moveMarker(ctx context.Context, held *heldLock, item *queueItem, old string) error {
	fresh := item.Marker
	if fresh != old {
		if err := q.storeMarker(ctx, fresh); err != nil {
			q.logger.Warn("writing a queue marker; the event keeps its old one", zap.String("event_id", item.EventID), zap.Error(err))
			item.Marker = old
		}
	}
	if err := held.writeMark(ctx, true); err != nil {
		// Both markers stay: the write may have been made all the same (a
		// timeout), and whichever marker the record does not name is found
		// stale and deleted by the poll that meets it.
		q.logger.Warn("updating a queued event's record; it is tried again as it was", zap.String("event_id", item.EventID), zap.Error(err))
		item.Marker = old
		return err
	}
	if item.Marker != old {
		q.deleteMarker(ctx, old)
	}
	return nil
}
