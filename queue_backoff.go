package kaylewebhook

import (
	"math/rand/v2"
	"net/http"
	"strconv"
	"time"
)

// queueBackoff is an instance's view of the backend. While the backend
// fails, the queue backs off as a whole: one forward at a time (the probe),
// the next no sooner than until; the first success ends it. So an outage
// costs the backend one try per wait, not one retry stream per event.
type queueBackoff struct {
	failures int       // forwards failed in a row
	until    time.Time // no new forward before
	probing  bool      // the probe is in flight
}

// backingOff reports whether the queue is backing off.
func (b *queueBackoff) backingOff() bool { return b.failures > 0 }

// wait is how long the queue waits after failures forwards failed in a row:
// doubling from a second, up to maxBackoff.
func backoffWait(failures int, maxBackoff time.Duration) time.Duration {
	if failures <= 0 {
		return 0
	}
	wait := time.Second << min(failures-1, 20)
	return min(wait, maxBackoff)
}

// eventRetryWait is how long one event waits after its attempts-th failed
// try: as the queue's wait, with a fifth of jitter so that events that
// failed together do not come back together.
func eventRetryWait(attempts int, maxBackoff time.Duration) time.Duration {
	wait := backoffWait(attempts, maxBackoff)
	return wait - rand.N(wait/5+1)
}

// isBackendFailure reports whether a forward's status says the backend, not
// the event, is at fault: the queue then backs off as a whole. A 4xx other
// than 408 and 429 is the backend refusing this event; it waits alone.
func isBackendFailure(status int) bool {
	return status >= 500 || status == http.StatusRequestTimeout || status == http.StatusTooManyRequests || status < 200
}

// retryAfter is the wait a 429 or 503 asks for in Retry-After (seconds or
// an HTTP date), capped at maxRetryAfter; 0 when none.
func retryAfter(status int, header http.Header, now time.Time) time.Duration {
	if status != http.StatusTooManyRequests && status != http.StatusServiceUnavailable {
		return 0
	}
	value := header.Get("Retry-After")
	if value == "" {
		return 0
	}
	var wait time.Duration
	if secs, err := strconv.ParseInt(value, 10, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		wait = time.Duration(min(secs, int64(maxRetryAfter/time.Second))) * time.Second
	} else if at, err := http.ParseTime(value); err == nil {
		wait = at.Sub(now)
	}
	return max(0, min(wait, maxRetryAfter))
}

// failed records a forward the backend failed, and returns the queue's
// wait from now.
func (q *queueRunner) failed(status int, asked time.Duration) time.Duration {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.backoff.failures++
	wait := max(backoffWait(q.backoff.failures, q.maxBackoff), asked)
	q.backoff.until = q.h.now().Add(wait)
	setQueueBackoff(q.d.prefix, wait)
	return wait
}

// succeeded records a forward the backend answered (2xx, or a refusal of
// that one event): the backend is up, and the queue goes at full speed.
func (q *queueRunner) succeeded() {
	q.mu.Lock()
	was := q.backoff.failures > 0
	q.backoff.failures = 0
	q.backoff.until = time.Time{}
	q.mu.Unlock()
	if was {
		setQueueBackoff(q.d.prefix, 0)
		q.logger.Info("the backend answers again; the queue resumes")
		q.kick()
	}
}
