package kaylewebhook

import (
	"crypto/sha256"
	"fmt"
	"net/http"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"go.uber.org/zap"
)

// enqueue is a verified delivery's last step in queue mode: an event not
// yet delivered or queued is written to the storage as it arrived, and only
// once that write has returned is it answered (202, outcomeQueued). This
// instance then tries to forward it at once with the plaintext it holds,
// keeping the event's lock; when it cannot (every forward slot busy, the
// queue backing off or paused) it lets go and a poll forwards it later.
func (q *queueRunner) enqueue(r *http.Request, res result, in verified) result {
	d := q.d
	ev := res.event
	held, rec, releaseClaim, o, err := d.lockEvent(r.Context(), ev.ID)
	if o != "" {
		res.outcome, res.err = o, err
		res.status, res.reason = lockFailureStatus(o)
		return res
	}
	if held == nil || d.isDelivered(rec) || rec.isQueued() {
		if held != nil {
			held.release()
		}
		releaseClaim()
		res.outcome = outcomeDuplicate
		return res
	}

	now := d.now().UTC()
	eventHash := held.lease.EventSHA256
	item := &queueItem{
		EventID:    ev.ID,
		EventType:  ev.Type,
		KID:        res.kid,
		JWE:        string(in.jwe),
		Signature:  in.signature,
		DeliveryID: res.deliveryID,
		Host:       r.Host,
		URI:        r.URL.RequestURI(),
		RemoteAddr: r.RemoteAddr,
		ReceivedAt: now,
	}
	tryNow := q.takeSlotNow()
	// Due now even with a first try: other instances' polls see its live
	// lease and pass (a read each), and one that watches it go silent takes
	// the event over, a stale time after this instance died.
	item.NextTry = now
	item.Marker = q.dueMarkerKey(eventHash, item.NextTry, now, now)
	held.lease = record{EventSHA256: eventHash, Queue: item}

	// The marker first: a record without a marker would never be found by
	// a poll, a marker without a record is found stale and deleted.
	err = q.storeMarker(r.Context(), item.Marker)
	if err == nil {
		err = held.writeMark(r.Context(), !tryNow)
	}
	if err != nil {
		if tryNow {
			q.freeSlot()
		}
		held.release()
		releaseClaim()
		// The marker stays: a record write reported failed may have been
		// made all the same (a timeout), and Kayle's copy would then be a
		// duplicate of an event no poll finds. A marker with no record is
		// deleted by a poll an hour on (orphaned).
		res.outcome, res.err = outcomeStorageUnavailable, fmt.Errorf("queueing event %s: %w", ev.ID, err)
		res.status, res.reason = http.StatusServiceUnavailable, string(outcomeStorageUnavailable)
		return res
	}
	res.outcome = outcomeQueued
	if !tryNow {
		if q.onlyBusy() {
			q.keepReady(eventHash, readyEvent{plaintext: in.plaintext, event: ev,
				sigTimestamp: r.Header.Get(kayle.HeaderSignatureTimestamp), jweSum: sha256.Sum256(in.jwe), at: now})
		}
		held.release()
		releaseClaim()
		q.kick()
		return res
	}
	held.heartbeat(d.timing.firstBeat)
	job := &queueJob{held: held, releaseClaim: releaseClaim, item: item, eventHash: eventHash, plaintext: in.plaintext, event: ev, sigTimestamp: r.Header.Get(kayle.HeaderSignatureTimestamp)}
	q.startJob(job)
	q.logger.Debug("queued; forwarding it now", zap.String("event_id", ev.ID))
	return res
}

// lockFailureStatus is the answer to a copy whose event could not be
// locked: nothing was forwarded or queued, so Kayle retries.
func lockFailureStatus(o outcome) (int, string) {
	switch o {
	case outcomeClientGone:
		return statusClientClosedRequest, ""
	default:
		return http.StatusServiceUnavailable, string(o)
	}
}
