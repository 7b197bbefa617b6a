package kaylewebhook

import (
	"errors"
	"net/http"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// outcome is what became of one request, in one word: the requests_total
// label and the access log's kayle_outcome.
type outcome string

const (
	outcomeForwarded          outcome = "forwarded"
	outcomeQueued             outcome = "queued"
	outcomeDuplicate          outcome = "duplicate"
	outcomeIgnored            outcome = "ignored"
	outcomeRejectedMethod     outcome = "rejected_method"
	outcomeRejectedSignature  outcome = "rejected_signature"
	outcomeRejectedBody       outcome = "rejected_body"
	outcomeRejectedDecrypt    outcome = "rejected_decrypt"
	outcomeRejectedPayload    outcome = "rejected_payload"
	outcomeUnknownKID         outcome = "unknown_kid"
	outcomeStorageUnavailable outcome = "storage_unavailable"
	outcomeLockBusy           outcome = "lock_busy"
	outcomeClientGone         outcome = "client_gone"
)

// isRefusal reports whether the request was refused before anything was
// trusted in it: such refusals are logged sampled (a forged flood).
func (o outcome) isRefusal() bool {
	switch o {
	case outcomeRejectedMethod, outcomeRejectedSignature, outcomeRejectedBody, outcomeRejectedDecrypt, outcomeRejectedPayload:
		return true
	}
	return false
}

// result is what the handler did with a request, for answer to log, count
// and answer once. Everything in it is an id or a fixed word: no payload
// byte.
type result struct {
	outcome outcome
	// status is the answer's status when the gateway answers itself with a
	// refusal or an error; reason is its X-Kayle-Refused word.
	status int
	reason string
	// err is the refusal's cause, or what the forward returned.
	err error

	deliveryID string
	kid        string
	event      kayle.Event // set once the payload was read
}

// refused is a result for a request the gateway answers with status.
func refused(o outcome, status int, reason string, err error) result {
	return result{outcome: o, status: status, reason: reason, err: err}
}

// signatureReason is the X-Kayle-Refused word for a signature failure.
func signatureReason(err error) string {
	switch {
	case errors.Is(err, kayle.ErrNoSignature):
		return "signature_missing"
	case errors.Is(err, kayle.ErrSignatureFormat):
		return "signature_malformed"
	}
	if _, ok := errors.AsType[*kayle.ExpiredError](err); ok {
		return "signature_expired"
	}
	return "signature_mismatch"
}

// bodyRefusal is the result for a body that could not be read whole.
func bodyRefusal(err error) result {
	if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
		return refused(outcomeRejectedBody, http.StatusRequestEntityTooLarge, "body_too_large", err)
	}
	return refused(outcomeRejectedBody, http.StatusBadRequest, "body_unreadable", err)
}

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
