package kaylewebhook

import (
	"crypto/sha256"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// Deliveries come faster than the backend takes them (a burst, a slow
// backend): an event queued while every forward slot is busy waits for a
// poll. Its plaintext is kept here, in memory only and bounded, so that the
// poll that takes it on this instance need not decrypt it again (an RSA
// operation, most of a delivery's CPU). Anything that does not fit, or an
// event another instance takes, is decrypted from the storage as usual.
const (
	readyMaxEvents = 4096
	readyMaxBytes  = 64 << 20
	// readyMaxAge: an entry older than this is dropped; its event has been
	// taken elsewhere, or is being retried.
	readyMaxAge = 10 * time.Minute
)

// readyEvent is an opened delivery waiting for a forward slot.
type readyEvent struct {
	plaintext    []byte
	event        kayle.Event
	sigTimestamp string
	jweSum       [sha256.Size]byte // the stored JWE this plaintext is of
	at           time.Time
}

// keepReady keeps an opened delivery for the poll that will take it.
func (q *queueRunner) keepReady(eventHash string, e readyEvent) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.ready) >= readyMaxEvents || q.readyBytes+len(e.plaintext) > readyMaxBytes {
		return
	}
	q.ready[eventHash] = e
	q.readyBytes += len(e.plaintext)
}

// takeReady hands a job the plaintext kept for its event, if it is of the
// very JWE the record holds now.
func (q *queueRunner) takeReady(j *queueJob) bool {
	q.mu.Lock()
	e, ok := q.ready[j.eventHash]
	if ok {
		delete(q.ready, j.eventHash)
		q.readyBytes -= len(e.plaintext)
	}
	q.mu.Unlock()
	if !ok || e.jweSum != sha256.Sum256([]byte(j.item.JWE)) {
		return false
	}
	j.plaintext, j.event, j.sigTimestamp = e.plaintext, e.event, e.sigTimestamp
	return true
}

// dropStaleReady forgets the entries older than readyMaxAge.
func (q *queueRunner) dropStaleReady(now time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for hash, e := range q.ready {
		if now.Sub(e.at) > readyMaxAge {
			delete(q.ready, hash)
			q.readyBytes -= len(e.plaintext)
		}
	}
}

// onlyBusy reports whether a first try could not start for want of a slot
// (or of the rate) alone: not paused, not backing off, when the wait may be
// long and the plaintext is not kept.
func (q *queueRunner) onlyBusy() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return !q.paused && !q.backoff.backingOff()
}
