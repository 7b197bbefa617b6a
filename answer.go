package kaylewebhook

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// answer logs, counts and answers a request's result, once. Every answer
// the gateway makes itself is made here: the acknowledgements (200 with
// X-Kayle-Duplicate or X-Kayle-Ignored) are written, refusals and errors are
// returned as caddyhttp.HandlerError for Caddy (or handle_errors) to
// answer. A forwarded request was answered by the backend.
func (h *Handler) answer(w http.ResponseWriter, r *http.Request, res result) error {
	countRequest(res.outcome)
	setLogFields(r, zap.String("kayle_outcome", string(res.outcome)))
	ev := res.event
	switch res.outcome {
	case outcomeForwarded:
		return res.err
	case outcomeQueued:
		h.logger.Debug("delivery queued", zap.String("event_id", ev.ID))
		return acknowledge(w, http.StatusAccepted, kayle.HeaderQueued, "queued", ev.ID)
	case outcomeDuplicate:
		r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer).Set("http.kayle.duplicate", true)
		h.logger.Debug("duplicate delivery acknowledged, not forwarded", zap.String("event_id", ev.ID))
		return acknowledge(w, http.StatusOK, kayle.HeaderDuplicate, "duplicate", ev.ID)
	case outcomeIgnored:
		// nothing is remembered, so a later change of the allowlist lets a
		// replay of it through
		h.logger.Info("event type not in the events allowlist; acknowledged, not forwarded",
			zap.String("event_id", ev.ID), zap.String("event_type", ev.Type),
			zap.String("kid", res.kid), zap.String("delivery_id", res.deliveryID))
		return acknowledge(w, http.StatusOK, kayle.HeaderIgnored, "ignored", ev.ID)
	}
	if res.reason != "" {
		w.Header().Set(kayle.HeaderRefused, res.reason)
	}
	if res.outcome.isRefusal() {
		// A flood of forged requests must not become a flood of log lines
		// (see setLogger).
		if entry := h.rejectLogger.Check(zapcore.WarnLevel, "rejected delivery"); entry != nil {
			entry.Write(zap.Int("status", res.status), zap.String("reason", strings.TrimPrefix(string(res.outcome), "rejected_")),
				zap.String("delivery_id", res.deliveryID), zap.Error(res.err))
		}
		// built here rather than by caddyhttp.Error, whose stack walk and
		// random id would be paid per forged request (BENCHMARKS.md); the
		// trace would always name this function anyway
		return caddyhttp.HandlerError{StatusCode: res.status, Err: res.err, Trace: rejectTrace}
	}
	switch res.outcome {
	case outcomeUnknownKID:
		// Kayle signed it, so Kayle encrypted it to a key it knows: ours is missing
		h.logger.Error("delivery encrypted to a key id with no configured private key; add its decryption_key (Kayle retries for ~32 h)",
			zap.String("kid", res.kid), zap.String("delivery_id", res.deliveryID))
	case outcomeLockBusy:
		h.logger.Warn("another copy of the event has held it too long; answering 503 so Kayle retries",
			zap.String("event_id", ev.ID), zap.Error(res.err))
	case outcomeStorageUnavailable:
		h.logger.Error("dedupe storage failed; answering 503 so Kayle retries",
			zap.String("event_id", ev.ID), zap.Error(res.err))
	case outcomeClientGone:
		// routine when the backend is slow, not a fault
		h.logger.Info("sender gone while another copy of the event was being handled",
			zap.String("event_id", ev.ID), zap.Error(res.err))
	}
	return caddyhttp.Error(res.status, res.err)
}

// rejectTrace is the Trace of every refusal's HandlerError.
const rejectTrace = "kaylewebhook.(*Handler).answer"

// acknowledge answers Kayle itself, without forwarding (200, or 202 for a
// queued event): the body is {"status":<status>,"event_id":<id>} and the
// header named marker says why (X-Kayle-Duplicate, X-Kayle-Ignored,
// X-Kayle-Queued). Kayle stops retrying the event.
func acknowledge(w http.ResponseWriter, code int, marker, status, eventID string) error {
	body, err := json.Marshal(struct {
		Status  string `json:"status"`
		EventID string `json:"event_id"`
	}{status, eventID})
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	body = append(body, '\n')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set(marker, "true")
	w.Header().Set(kayle.HeaderEventID, eventID)
	w.WriteHeader(code)
	_, _ = w.Write(body)
	return nil
}
