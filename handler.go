// Package kaylewebhook is a Caddy HTTP handler that receives Kayle ID webhooks:
// it verifies the signature, decrypts the JWE, forwards each event once
// (deduplicated through Caddy's storage) and hands the next handler a plain
// JSON request with trusted X-Kayle-* headers.
package kaylewebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults, documented on the fields that use them.
const (
	defaultTolerance    = 5 * time.Minute
	defaultMaxBodySize  = 4 << 20
	defaultDedupeWindow = 14 * 24 * time.Hour
	// minDedupeWindow covers Kayle's 32.5 h of retries plus 168 h of replay.
	minDedupeWindow     = 8 * 24 * time.Hour
	defaultDedupePrefix = "kayle_webhook/events"
	minSecretLen        = 16
	// maxMaxBodySize is the largest max_body_size: a body is held in memory.
	maxMaxBodySize = 1 << 30
	// rejectLogBurst is how many refusals a second are logged.
	rejectLogBurst = 20
)

// Handler receives Kayle ID webhook deliveries. For each POST it verifies
// X-Kayle-Signature over the raw body, decrypts the JWE body with the private
// key its kid names, drops deliveries of events already forwarded, and calls
// the next handler with the decrypted JSON as the body and X-Kayle-* headers
// taken from the decrypted payload.
//
// It answers itself only when it must not forward: 400 for a bad or stale
// signature (a missing or malformed header before the body is read), 405
// for a method other than POST, 413 for a body over max_body_size, 422 for a
// signed body that cannot be used, 500 for a kid the gateway holds no key
// for, 503 when the dedupe storage fails, 200 with X-Kayle-Duplicate: true
// for an event already delivered, and 200 with X-Kayle-Ignored: true for a
// type outside Events. In queue mode (Queue) it never calls next: a new
// event is stored and answered 202 with X-Kayle-Queued: true, and the queue
// forwards it through its own routes.
type Handler struct {
	// Secrets the signature may be made with; a v1 made with any of them is
	// accepted, so list the old and the new one during a rotation. Each may be
	// or contain a placeholder such as {env.KAYLE_SIGNING_SECRET} or
	// {file./run/secrets/kayle}, resolved once at provisioning; a secret that
	// resolves to fewer than 16 bytes, or holds a control byte (a NUL, a line
	// break), is refused. Required.
	SigningSecrets []string `json:"signing_secrets,omitempty"`

	// Private keys by kid, each read from a PEM (PKCS#8 or PKCS#1) or JWK
	// file. RSA, 2048 bits or more. List old keys too: retries and replays of
	// older deliveries stay encrypted to the key that was active then.
	DecryptionKeys []KeyFile `json:"decryption_keys,omitempty"`

	// Files holding a JWKS of RSA private keys, each with its kid. Together
	// with decryption_keys at least one key is required; no kid may repeat.
	// (The Caddyfile's decryption_jwks; its old name there, decryption_keys
	// with one argument, still works and logs a WARN.)
	DecryptionJWKS []string `json:"decryption_jwks,omitempty"`

	// How far the signature's t may be from this machine's clock, in either
	// direction. Default: 5m.
	Tolerance caddy.Duration `json:"tolerance,omitempty"`

	// The largest body accepted, in bytes, from 1 to 1 GiB; a larger one
	// gets 413 and is not read further. Default: 4 MiB.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	// Forward every verified copy, remembering nothing: for backends that are
	// idempotent on X-Kayle-Event-Id themselves. Default: false (deduplicate).
	DedupeDisabled bool `json:"dedupe_disabled,omitempty"`

	// How long an event that was delivered is remembered. At least 8 days
	// (Kayle's retry and replay horizon). Default: 14d.
	DedupeWindow caddy.Duration `json:"dedupe_window,omitempty"`

	// The storage key prefix for dedupe records. Give each Kayle endpoint
	// its own prefix when several share one storage: Kayle sends the same
	// event id to every subscribed endpoint. Default: kayle_webhook/events.
	DedupePrefix string `json:"dedupe_prefix,omitempty"`

	// The storage module for dedupe records. Instances that share it
	// forward each event once between them. Default: Caddy's global storage.
	StorageRaw json.RawMessage `json:"storage,omitempty" caddy:"namespace=caddy.storage inline_key=module"`

	// Standard Webhooks secrets ("whsec_<base64>") to sign what the backend
	// receives with: webhook-id (the event id), webhook-timestamp (when the
	// forward leaves) and webhook-signature, one "v1,<base64>" per secret,
	// space separated, so list the new one beside the old during a rotation.
	// Placeholders as in signing_secrets, resolved once at provisioning.
	// Inbound webhook-* headers are always dropped. Default: none (unsigned).
	ForwardSignatureSecrets []string `json:"forward_signature_secrets,omitempty"`

	// Event types to forward; a verified delivery of any other type is
	// answered 200 with X-Kayle-Ignored: true, and neither forwarded nor
	// remembered (Kayle stops retrying it). Default: every type.
	Events []string `json:"events,omitempty"`

	// Queue mode: answer Kayle 202 once the delivery is stored, still
	// encrypted, and forward it from the queue (see Queue). Default: off,
	// the rest of the route is called with each delivery.
	Queue *Queue `json:"queue,omitempty"`

	secrets      [][]byte
	macKeys      *kayle.MACKeys // secrets, keyed HMACs pooled
	forwardKeys  [][]byte
	allowedTypes map[string]bool
	keys         kayle.KeyRing
	tolerance    time.Duration
	dedupe       *deduper
	queue        *queueRunner
	// queueForward is the Caddyfile's queue forward block, parsed into
	// Queue.Forward by parseCaddyfile (which has the helper it needs)
	queueForward *caddyfile.Dispenser
	logger       *zap.Logger
	rejectLogger *zap.Logger // logger, sampled: see setLogger
	now          func() time.Time
	exiting      func() bool
	// timing replaces the lock and queue timing; tests shorten it
	timing *handlerTiming
}

// handlerTiming is the timing a test gives a handler before provisioning.
type handlerTiming struct {
	lock                  lockTiming
	queuePoll, queueStats time.Duration
}

// KeyFile names a private key file and the kid Kayle knows it by.
type KeyFile struct {
	// The key_id the public half was registered with at Kayle.
	KeyID string `json:"kid"`
	// Path to a PEM (PKCS#8 or PKCS#1) or JWK private key. Placeholders
	// such as {env.*} are resolved at provisioning.
	File string `json:"file"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.kayle_webhook",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Cleanup releases the storage locks this handler still holds when Caddy
// exits. On a reload it leaves them: requests of the old config may still be
// forwarding (Caddy does not wait for them), and each releases its own lock;
// releasing it under them would let another instance forward a duplicate.
func (h *Handler) Cleanup() error {
	if h.dedupe == nil {
		return nil
	}
	h.dedupe.retire()
	exiting := h.exiting != nil && h.exiting()
	if h.queue != nil {
		h.queue.stopQueue(exiting)
	}
	if exiting {
		h.dedupe.releaseAll()
	}
	return nil
}

// ServeHTTP verifies, decrypts and deduplicates one delivery, then passes the
// plaintext request to next. What became of it is answered in one place
// (answer).
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) (handlerErr error) {
	// Stopped timers of the contexts derived from r's (the dedupe timeouts) stay
	// in the runtime's timer heap for seconds and reach r through Caddy's
	// replacer: drop the plaintext from r once handled, so it can be freed.
	// Not after an error: handle_errors gets this r, and its routes may
	// forward the body (to a fallback backend, say).
	defer func() {
		if handlerErr == nil {
			r.Body, r.GetBody = http.NoBody, nil
		}
	}()
	return h.answer(w, r, h.handle(w, r, next))
}

// handle takes a delivery from its headers to the backend's answer: every
// check in protocol order, then the forward. It writes nothing itself but
// the forward (the backend's answer, streamed).
func (h *Handler) handle(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) result {
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	deliveryID := r.Header.Get(kayle.HeaderDeliveryID)
	if !kayle.HeaderSafe(deliveryID) {
		deliveryID = ""
	}
	repl.Set("http.kayle.delivery_id", deliveryID)
	res, in := h.check(w, r, repl, deliveryID)
	res.deliveryID = deliveryID
	if res.outcome != "" {
		return res
	}
	return h.deliver(w, r, next, res, in)
}

// verified is a delivery check let through: its plaintext (r's body now),
// and for the queue the body as it arrived and its signature.
type verified struct {
	plaintext []byte
	jwe       []byte
	signature string
}

// check verifies and decrypts a delivery and rewrites r into the plaintext
// request. Its result has an outcome only when the delivery is refused.
func (h *Handler) check(w http.ResponseWriter, r *http.Request, repl *caddy.Replacer, deliveryID string) (result, verified) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		closeAfterUnreadBody(w, r)
		return refused(outcomeRejectedMethod, http.StatusMethodNotAllowed, "method_not_allowed", fmt.Errorf("method %s is not POST", r.Method)), verified{}
	}
	// The header before the body: a request that cannot be Kayle's is
	// refused for the price of a header parse, without a 100 Continue or a
	// byte of its body read. The MAC needs the body, so it is checked after.
	signature := r.Header.Get(kayle.SignatureHeader)
	sig, err := kayle.ParseSignature(signature)
	if err != nil {
		closeAfterUnreadBody(w, r)
		return refused(outcomeRejectedSignature, http.StatusBadRequest, signatureReason(err), err), verified{}
	}
	body, err := readBody(w, r, h.MaxBodySize)
	if err != nil {
		closeAfterUnreadBody(w, r)
		return bodyRefusal(err), verified{}
	}

	start := time.Now()
	position, err := sig.Verify(body, h.macKeys, h.now(), h.tolerance)
	observePhase(phaseVerify, start)
	if err != nil {
		return refused(outcomeRejectedSignature, http.StatusBadRequest, signatureReason(err), err), verified{}
	}
	countSecretMatch(position)

	start = time.Now()
	plaintext, kid, err := h.keys.Decrypt(body)
	observePhase(phaseDecrypt, start)
	switch {
	case errors.Is(err, kayle.ErrUnknownKeyID):
		setLogFields(r, zap.String("kayle_kid", kid))
		res := refused(outcomeUnknownKID, http.StatusInternalServerError, "unknown_kid", err)
		res.kid = kid
		return res, verified{}
	case err != nil:
		return refused(outcomeRejectedDecrypt, http.StatusUnprocessableEntity, "jwe_invalid", err), verified{}
	}
	countKeyUse(kid)
	setLogFields(r, zap.String("kayle_kid", kid))

	ev, err := kayle.ParseEvent(plaintext)
	if err != nil {
		return refused(outcomeRejectedPayload, http.StatusUnprocessableEntity, "payload_invalid", err), verified{}
	}

	rewriteRequest(r, repl, plaintext, ev, kid, deliveryID, sig)
	setLogFields(r, zap.String("kayle_event_id", ev.ID), zap.String("kayle_event_type", ev.Type))
	h.logger.Debug("verified delivery",
		zap.String("event_id", ev.ID), zap.String("event_type", ev.Type),
		zap.String("kid", kid), zap.String("delivery_id", deliveryID))
	return result{kid: kid, event: ev}, verified{plaintext: plaintext, jwe: body, signature: signature}
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
)
