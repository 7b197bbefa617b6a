package kaylewebhook

import (
	"errors"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// setLogFields adds ids and the outcome to the request's access-log line
// (kayle_event_id, kayle_event_type, kayle_kid, kayle_outcome), so one line
// per delivery tells what became of it. Never payload data.
func setLogFields(r *http.Request, fields ...zap.Field) {
	extra, ok := r.Context().Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields)
	if !ok {
		return
	}
	for _, f := range fields {
		extra.Set(f)
	}
}

// dedupeOutcome names, for the access log, what deliverOnce did with a
// verified delivery, from what it left behind: the forward stage ran, the
// duplicate placeholder, or the status of the error it returned.
func dedupeOutcome(stage *forwardStage, repl *caddy.Replacer, err error) string {
	if stage.called {
		return "forwarded"
	}
	if duplicate, _ := repl.Get("http.kayle.duplicate"); duplicate == true {
		return "duplicate"
	}
	switch forwardStatus(0, err) {
	case statusClientClosedRequest:
		return "client_gone"
	case http.StatusServiceUnavailable:
		if errors.Is(err, errLockBusy) {
			return "lock_busy"
		}
		return "storage_unavailable"
	}
	return "error"
}
