package kaylewebhook

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

const (
	// forwardTimeout bounds a forward, which no longer ends with the sender's
	// connection (see deliverOnce). Kayle itself waits only a few seconds.
	forwardTimeout = 2 * time.Minute
	// statusClientClosedRequest is the de facto status (nginx, Caddy) for a
	// request whose client went away; nobody receives it.
	statusClientClosedRequest = 499
)

// deliver is a verified delivery's last step: an event type outside the
// allowlist is ignored, any other is queued in queue mode, or else
// forwarded, through the deduper when dedupe is on.
func (h *Handler) deliver(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, res result, in verified) result {
	if !h.wantsType(res.event.Type) {
		res.outcome = outcomeIgnored
		return res
	}
	if h.queue != nil {
		start := time.Now()
		res = h.queue.enqueue(r, res, in)
		observePhase(phaseDedupeStorage, start)
		return res
	}
	plaintext := in.plaintext
	stage := &forwardStage{next: next, h: h, eventID: res.event.ID, body: plaintext}
	returned := false
	defer func() {
		// next panicked: reverse_proxy does (http.ErrAbortHandler) when the
		// response body breaks after the status went out. answer never sees
		// that forward, so it is counted and logged here.
		if !returned && stage.started {
			countRequest(outcomeForwarded)
			setLogFields(r, zap.String("kayle_outcome", string(outcomeForwarded)))
		}
	}()
	if h.dedupe == nil {
		res.outcome = outcomeForwarded
		_, res.err = forward(caddyhttp.NewResponseRecorder(w, nil, nil), r, stage)
		returned = true
		return res
	}
	start := time.Now()
	res.outcome, res.err = h.dedupe.deliverOnce(w, r, stage, res.event.ID)
	returned = true
	observeDuration(phaseDedupeStorage, time.Since(start)-stage.elapsed)
	switch res.outcome {
	case outcomeLockBusy, outcomeStorageUnavailable, outcomeClientGone:
		res.status, res.reason = lockFailureStatus(res.outcome)
	}
	return res
}

// deliverOnce forwards the rewritten request to next unless the event was
// delivered already, and remembers it when the backend answers 2xx. It
// writes no answer itself: on any outcome but forwarded, the caller answers;
// the error is then the reason, or else what next returned.
func (d *deduper) deliverOnce(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, eventID string) (outcome, error) {
	ctx := r.Context()
	held, rec, releaseClaim, o, err := d.lockEvent(ctx, eventID)
	if o != "" {
		return o, err
	}
	defer releaseClaim()
	if held == nil || d.isDelivered(rec) || rec.isQueued() {
		if held != nil {
			held.release()
		}
		return outcomeDuplicate, nil
	}
	defer held.release()
	if rec != nil || held.tookOver {
		// an earlier holder's lease or failure mark, or a takeover: write
		// this holder's lease at once, so that waiters see a change and do
		// not take this holder for the silent one
		if err := held.writeLease(ctx); err != nil {
			return outcomeStorageUnavailable, fmt.Errorf("writing the lease of event %s: %w", eventID, err)
		}
		held.heartbeat(d.timing.beatEvery)
	} else {
		held.heartbeat(d.timing.firstBeat)
	}

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
		return outcomeForwarded, nextErr
	}
	d.remember(ctx, held, eventID, status)
	return outcomeForwarded, nextErr
}

// lockEvent takes an event for one copy of it: the in-process claim (so
// same-instance copies never pay the storage lock's poll), then the storage
// lock, and reads the event's record. On failure the outcome says what the
// copy is answered (the claim is then released). held is nil when the wait
// ended on a delivered or queued record. releaseClaim must be called once, after
// held's release.
func (d *deduper) lockEvent(ctx context.Context, eventID string) (held *heldLock, rec *record, releaseClaim func(), o outcome, err error) {
	eventHash, recordKey, lockName := d.eventKeys(eventID)
	releaseClaim, claimed := inProcessClaims.tryAcquire(recordKey)
	if !claimed {
		// Another copy is in hand here. A queued event's is its queue's
		// forward, which may take long: the stored record answers at once.
		if rec, err := d.loadRecord(ctx, recordKey); err == nil && rec.isQueued() {
			return nil, rec, func() {}, "", nil
		}
		if releaseClaim, err = inProcessClaims.acquire(ctx, recordKey); err != nil {
			o, err = clientGone(eventID, err)
			return nil, nil, nil, o, err
		}
	}
	// The wait does not end with Kayle's connection: a copy must be able to
	// wait out a dead holder's silence and take the event over, even when
	// Kayle hung up after a few seconds. It is bounded all the same.
	waitCtx, cancelWait := context.WithTimeout(context.WithoutCancel(ctx), d.timing.waitLimit)
	// a queued event ends the wait too: it is in the queue's hands
	held, rec, err = d.acquireUntil(waitCtx, lockName, recordKey, eventID, func(rec *record) bool {
		return d.isDelivered(rec) || rec.isQueued()
	})
	cancelWait()
	switch {
	case errors.Is(err, errLockBusy) && ctx.Err() != nil:
		o, err = clientGone(eventID, err)
	case errors.Is(err, errLockBusy):
		o, err = outcomeLockBusy, fmt.Errorf("event %s: %w", eventID, err)
	case err != nil:
		o, err = outcomeStorageUnavailable, fmt.Errorf("dedupe storage, event %s: %w", eventID, err)
	}
	if o != "" {
		releaseClaim()
		return nil, nil, nil, o, err
	}
	if held != nil {
		held.lease.EventSHA256 = eventHash // every lease and record of the event carries it
	}
	return held, rec, releaseClaim, "", nil
}

// remember writes the record of an event the backend accepted, and
// reports whether it was written.
func (d *deduper) remember(ctx context.Context, held *heldLock, eventID string, status int) bool {
	rec := held.lease
	rec.Holder = held.token
	if err := d.commit(ctx, held.leaseKey, rec, status); err != nil {
		// the backend has the event; a later copy may be forwarded again
		d.logger.Error("event delivered but its dedupe record could not be written; a retry of it would be forwarded again",
			zap.String("event_id", eventID), zap.Error(err))
		countRecordWriteFailure()
		return false
	}
	return true
}

// clientGone ends a copy whose sender hung up while another copy of the
// event was being handled.
func clientGone(eventID string, err error) (outcome, error) {
	return outcomeClientGone, fmt.Errorf("waiting for another copy of event %s: %w", eventID, err)
}
