package kaylewebhook

import (
	"errors"
	"net/http"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// errNothingAnswered: no handler after kayle_webhook wrote a response (say,
// a route whose reverse_proxy matches another path). Caddy would send an
// empty 200, Kayle would stop retrying, and nobody would have the event.
var errNothingAnswered = errors.New("no handler after kayle_webhook answered the request; check that the route reaches reverse_proxy")

// forward calls next through rec, a streaming recorder, and returns the
// status Kayle gets. A chain that answers nothing, or only an informational
// 1xx, is a 502, not the empty 200 Go would send.
func forward(rec caddyhttp.ResponseRecorder, r *http.Request, next caddyhttp.Handler) (int, error) {
	err := next.ServeHTTP(rec, r)
	if err == nil && rec.Status() < 200 {
		err = caddyhttp.Error(http.StatusBadGateway, errNothingAnswered)
	}
	return forwardStatus(rec.Status(), err), err
}

// forwardStatus is the status the next handler answered with. Once a status
// was written it is what the client got, even if next then returned an
// error. A handler that returned an error and wrote nothing has the status
// in the error.
func forwardStatus(recorded int, err error) int {
	if recorded >= 200 {
		return recorded
	}
	if err != nil {
		if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok && he.StatusCode != 0 {
			return he.StatusCode
		}
		return http.StatusInternalServerError
	}
	return recorded
}

// forwardStage stands between the handler and the rest of the route for one
// delivery: it signs the forward at the moment it leaves (a copy that waited
// for another copy's lock must not carry an old webhook-timestamp), times
// it, and notes that it started. Used by one request, never concurrently.
type forwardStage struct {
	next    caddyhttp.Handler
	h       *Handler
	eventID string
	body    []byte

	started bool
	elapsed time.Duration
}

func (f *forwardStage) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	if len(f.h.forwardKeys) > 0 {
		standardwebhooks.Sign(r.Header, f.h.forwardKeys, f.eventID, f.h.now(), f.body)
	}
	f.started = true
	start := time.Now()
	defer func() { // also when next panics (reverse_proxy's ErrAbortHandler)
		f.elapsed = time.Since(start)
		observeDuration(phaseForward, f.elapsed)
	}()
	return f.next.ServeHTTP(w, r)
}
