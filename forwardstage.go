package kaylewebhook

import (
	"net/http"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// forwardStage stands between the handler and the rest of the route for one
// delivery: it signs the forward at the moment it leaves (a copy that waited
// for another copy's lock must not carry an old webhook-timestamp), times
// it, and records that it happened. Used by one request, never concurrently.
type forwardStage struct {
	next    caddyhttp.Handler
	h       *Handler
	eventID string
	body    []byte

	called  bool
	elapsed time.Duration
}

func (f *forwardStage) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	f.called = true
	if len(f.h.forwardKeys) > 0 {
		standardwebhooks.Sign(r.Header, f.h.forwardKeys, f.eventID, f.h.now(), f.body)
	}
	start := time.Now()
	defer func() { // also when next panics (reverse_proxy's ErrAbortHandler)
		f.elapsed = time.Since(start)
		observeDuration(phaseForward, f.elapsed)
	}()
	return f.next.ServeHTTP(w, r)
}
