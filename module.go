// Package kaylewebhook is a Caddy HTTP handler that receives Kayle ID webhooks:
// it verifies the signature, decrypts the JWE, forwards each event once
// (deduplicated through Caddy's storage) and hands the next handler a plain
// JSON request with trusted X-Kayle-* headers.
package kaylewebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"github.com/dustin/go-humanize"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func init() {
	caddy.RegisterModule(Handler{})
	httpcaddyfile.RegisterHandlerDirective("kayle_webhook", parseCaddyfile)
	// runs after timeouts (which puts a read deadline on the body) and before
	// reverse_proxy, so no `order` line is needed
	httpcaddyfile.RegisterDirectiveOrder("kayle_webhook", httpcaddyfile.After, "timeouts")
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
	// initialBodyBuffer caps what a declared Content-Length preallocates.
	initialBodyBuffer = 64 << 10
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
// type outside Events.
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

	secrets      [][]byte
	macKeys      *kayle.MACKeys // secrets, keyed HMACs pooled
	forwardKeys  [][]byte
	allowedTypes map[string]bool
	keys         kayle.KeyRing
	tolerance    time.Duration
	dedupe       *deduper
	logger       *zap.Logger
	rejectLogger *zap.Logger // logger, sampled: see setLogger
	now          func() time.Time
	exiting      func() bool
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

// Provision resolves secrets, loads the keys and opens the dedupe storage.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.setLogger(ctx.Logger())
	// Caddy validates after provisioning; a value that can never work is
	// refused before any file is read or the storage is opened and probed.
	if err := h.Validate(); err != nil {
		return err
	}
	if h.now == nil {
		h.now = time.Now
	}
	if h.exiting == nil {
		h.exiting = caddy.Exiting
	}
	h.tolerance = time.Duration(h.Tolerance)
	if h.tolerance == 0 {
		h.tolerance = defaultTolerance
	}
	if h.MaxBodySize == 0 {
		h.MaxBodySize = defaultMaxBodySize
	}
	repl := caddy.NewReplacer()
	if err := h.provisionSecrets(repl); err != nil {
		return err
	}
	if err := h.provisionForwardKeys(repl); err != nil {
		return err
	}
	if err := h.provisionKeys(repl); err != nil {
		return err
	}
	if err := h.checkDemoMaterial(ctx); err != nil {
		return err
	}
	if err := h.provisionEvents(); err != nil {
		return fmt.Errorf("%v (JSON events)", err)
	}
	kids := make([]string, len(h.keys.Keys))
	for i, k := range h.keys.Keys {
		kids[i] = k.KID
	}
	if err := registerMetrics(ctx.GetMetricsRegistry(), kids, len(h.secrets)); err != nil {
		return err
	}
	if h.DedupeDisabled {
		if h.StorageRaw != nil || h.DedupeWindow != 0 || h.DedupePrefix != "" {
			h.logger.Warn("dedupe is off: storage, dedupe_window and dedupe_prefix are ignored")
		}
		return nil
	}
	return h.provisionDedupe(ctx)
}

func (h *Handler) provisionSecrets(repl *caddy.Replacer) error {
	h.secrets = h.secrets[:0]
	for i, raw := range h.SigningSecrets {
		secret, err := repl.ReplaceOrErr(raw, true, true)
		name := fmt.Sprintf("signing secret #%d (signing_secret, JSON signing_secrets[%d])", i+1, i)
		if err != nil {
			// not err itself: it quotes the {…} it stopped at, which in a
			// literal secret would be part of the secret
			return fmt.Errorf("%s: a placeholder in it is unknown or empty (an unset env var, an unreadable file); a literal secret must not contain '{'", name)
		}
		if len(secret) < minSecretLen {
			return fmt.Errorf("%s is %d bytes after placeholders; at least %d are required (Kayle's are whsec_ and 32 more)", name, len(secret), minSecretLen)
		}
		if hasControlByte(secret) {
			// HMAC pads a key with zero bytes to its block size, so the
			// published demo secret plus a NUL signs as the demo secret
			return fmt.Errorf("%s holds a control byte (a NUL, a line break, a tab…) after placeholders; Kayle's secrets have none, and HMAC would sign with a secret ending in NUL exactly as without it", name)
		}
		h.secrets = append(h.secrets, []byte(secret))
	}
	if len(h.secrets) == 0 {
		return errors.New("no signing_secret (JSON signing_secrets) configured")
	}
	h.macKeys = kayle.NewMACKeys(h.secrets)
	return nil
}

func (h *Handler) provisionForwardKeys(repl *caddy.Replacer) error {
	h.forwardKeys = h.forwardKeys[:0]
	for i, raw := range h.ForwardSignatureSecrets {
		secret, err := repl.ReplaceOrErr(raw, true, true)
		if err != nil {
			// not err itself, which would quote part of a literal secret
			return fmt.Errorf("forward_signature secret #%d: a placeholder in it is unknown or empty (an unset env var, an unreadable file); a literal secret must not contain '{' (JSON forward_signature_secrets[%d])", i+1, i)
		}
		key, err := standardwebhooks.ParseSecret(strings.TrimSpace(secret))
		if err != nil {
			return fmt.Errorf("forward_signature secret #%d %v (JSON forward_signature_secrets[%d])", i+1, err, i)
		}
		h.forwardKeys = append(h.forwardKeys, key)
	}
	return nil
}

func (h *Handler) provisionKeys(repl *caddy.Replacer) error {
	h.keys = kayle.KeyRing{}
	for i, kf := range h.DecryptionKeys {
		name := fmt.Sprintf("decryption key %q (decryption_key, JSON decryption_keys[%d])", kf.KeyID, i)
		path, err := repl.ReplaceOrErr(kf.File, true, true)
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		key, fileKID, err := kayle.LoadPrivateKeyFile(path)
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		if fileKID != "" && fileKID != kf.KeyID {
			return fmt.Errorf("%s: the JWK in %s says kid %q", name, path, fileKID)
		}
		if err := h.keys.Add(kf.KeyID, key); err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
	}
	for i, raw := range h.DecryptionJWKS {
		name := fmt.Sprintf("decryption JWKS #%d (decryption_jwks, JSON decryption_jwks[%d])", i+1, i)
		path, err := repl.ReplaceOrErr(raw, true, true)
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		keys, err := kayle.LoadJWKSFile(path)
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		for _, k := range keys {
			if err := h.keys.Add(k.KID, k.Private); err != nil {
				return fmt.Errorf("%s: %v", name, err)
			}
		}
	}
	if len(h.keys.Keys) == 0 {
		return errors.New("no decryption_key (JSON decryption_keys) or decryption_jwks (JSON decryption_jwks) configured")
	}
	return nil
}

func (h *Handler) provisionDedupe(ctx caddy.Context) error {
	window := time.Duration(h.DedupeWindow) // checked by Validate
	if window == 0 {
		window = defaultDedupeWindow
	}
	if h.DedupePrefix == "" {
		h.DedupePrefix = defaultDedupePrefix
	}
	prefix, err := cleanPrefix(h.DedupePrefix)
	if err != nil {
		return fmt.Errorf("%v (JSON dedupe_prefix)", err)
	}
	var storage certmagic.Storage
	storageRaw := h.StorageRaw // LoadModule clears it
	if h.StorageRaw != nil {
		mod, err := ctx.LoadModule(h, "StorageRaw")
		if err != nil {
			return fmt.Errorf("loading dedupe storage module (storage, JSON storage): %v", err)
		}
		storage, err = mod.(caddy.StorageConverter).CertMagicStorage()
		if err != nil {
			return fmt.Errorf("opening dedupe storage (storage, JSON storage): %v", err)
		}
	} else {
		storage = ctx.Storage()
	}
	d := newDeduper(storage, prefix, window, h.logger, h.now)
	if err := probeExclusion(storage, storageIdentity(storage, prefix), h.logger); err != nil {
		return fmt.Errorf("dedupe storage %s: %w; use a storage whose lock excludes (see the README's storage table), or set dedupe off", storageName(storageRaw, storage), err)
	}
	d.register()
	h.dedupe = d
	h.dedupe.startSweeper(ctx)
	return nil
}

// storageName names a dedupe storage for an error: its module name when
// the handler configures one, else the global storage's type.
func storageName(raw json.RawMessage, storage certmagic.Storage) string {
	var mod struct {
		Module string `json:"module"`
	}
	if json.Unmarshal(raw, &mod) == nil && mod.Module != "" {
		return "caddy.storage." + mod.Module
	}
	return fmt.Sprintf("(the global storage, %T)", storage)
}

// setLogger sets the handler's logger. A flood of forged requests must not
// become a flood of log lines (nor cost one each): refusals are logged at
// most rejectLogBurst a second, and every one is still counted.
func (h *Handler) setLogger(logger *zap.Logger) {
	h.logger = logger
	h.rejectLogger = logger.WithOptions(zap.WrapCore(func(core zapcore.Core) zapcore.Core {
		return zapcore.NewSamplerWithOptions(core, time.Second, rejectLogBurst, 0)
	}))
}

// Validate checks the configuration for values that can never work: every
// range check of a setting is here, so a JSON config gets the same ones as
// a Caddyfile (whose parser checks the same ranges, to point at the line).
// Zero is each setting's default. Provision calls it first too.
func (h *Handler) Validate() error {
	if h.MaxBodySize < 0 || (h.MaxBodySize != 0 && !validMaxBodySize(uint64(h.MaxBodySize))) {
		return errMaxBodySizeRange(strconv.FormatInt(h.MaxBodySize, 10) + " bytes")
	}
	if h.Tolerance < 0 {
		return fmt.Errorf("tolerance (JSON tolerance) is %s; it must not be negative", time.Duration(h.Tolerance))
	}
	if !h.DedupeDisabled && h.DedupeWindow != 0 && time.Duration(h.DedupeWindow) < minDedupeWindow {
		return fmt.Errorf("dedupe_window (JSON dedupe_window) %s is shorter than Kayle's retry and replay horizon; use at least 8d", time.Duration(h.DedupeWindow))
	}
	return nil
}

// validMaxBodySize is max_body_size's range: from 1 byte to 1 GiB.
func validMaxBodySize(size uint64) bool { return size >= 1 && size <= maxMaxBodySize }

// errMaxBodySizeRange refuses a max_body_size, as given, outside its range.
func errMaxBodySizeRange(given string) error {
	return fmt.Errorf("max_body_size (JSON max_body_size) is %s; it must be between 1 byte and 1GiB", given)
}

// hasControlByte reports whether s holds an ASCII control byte (below 0x20,
// or DEL).
func hasControlByte(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return true
		}
	}
	return false
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
	if h.exiting != nil && h.exiting() {
		h.dedupe.releaseAll()
	}
	return nil
}

// ServeHTTP verifies, decrypts and deduplicates one delivery, then passes the
// plaintext request to next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) (handlerErr error) {
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	deliveryID := r.Header.Get(kayle.HeaderDeliveryID)
	if !kayle.HeaderSafe(deliveryID) {
		deliveryID = ""
	}
	repl.Set("http.kayle.delivery_id", deliveryID)

	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		closeAfterUnreadBody(w, r)
		return h.reject(r, http.StatusMethodNotAllowed, "method", fmt.Errorf("method %s is not POST", r.Method), deliveryID)
	}
	// The header before the body: a request that cannot be Kayle's is
	// refused for the price of a header parse, without a 100 Continue or a
	// byte of its body read. The MAC needs the body, so it is checked after.
	sig, err := kayle.ParseSignature(r.Header.Get(kayle.SignatureHeader))
	if err != nil {
		closeAfterUnreadBody(w, r)
		return h.reject(r, http.StatusBadRequest, "signature", err, deliveryID)
	}
	body, err := readBody(w, r, h.MaxBodySize)
	if err != nil {
		closeAfterUnreadBody(w, r)
		status := http.StatusBadRequest
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			status = http.StatusRequestEntityTooLarge
		}
		return h.reject(r, status, "body", err, deliveryID)
	}

	start := time.Now()
	position, err := sig.Verify(body, h.macKeys, h.now(), h.tolerance)
	observePhase(phaseVerify, start)
	if err != nil {
		return h.reject(r, http.StatusBadRequest, "signature", err, deliveryID)
	}
	countSecretMatch(position)

	start = time.Now()
	plaintext, kid, err := h.keys.Decrypt(body)
	observePhase(phaseDecrypt, start)
	switch {
	case errors.Is(err, kayle.ErrUnknownKeyID):
		// Kayle signed it, so Kayle encrypted it to a key it knows: ours is missing
		h.logger.Error("delivery encrypted to a key id with no configured private key; add its decryption_key (Kayle retries for ~32 h)",
			zap.String("kid", kid), zap.String("delivery_id", deliveryID))
		countRequest("unknown_kid")
		setLogFields(r, zap.String("kayle_kid", kid), zap.String("kayle_outcome", "unknown_kid"))
		return caddyhttp.Error(http.StatusInternalServerError, err)
	case err != nil:
		return h.reject(r, http.StatusUnprocessableEntity, "decrypt", err, deliveryID)
	}
	countKeyUse(kid)
	setLogFields(r, zap.String("kayle_kid", kid))

	ev, err := kayle.ParseEvent(plaintext)
	if err != nil {
		return h.reject(r, http.StatusUnprocessableEntity, "payload", err, deliveryID)
	}

	rewriteRequest(r, repl, plaintext, ev, kid, deliveryID, sig)
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
	setLogFields(r, zap.String("kayle_event_id", ev.ID), zap.String("kayle_event_type", ev.Type))
	h.logger.Debug("verified delivery",
		zap.String("event_id", ev.ID), zap.String("event_type", ev.Type),
		zap.String("kid", kid), zap.String("delivery_id", deliveryID))

	if !h.wantsType(ev.Type) {
		setLogFields(r, zap.String("kayle_outcome", "ignored"))
		return h.answerIgnored(w, ev, kid, deliveryID)
	}

	stage := &forwardStage{next: next, h: h, eventID: ev.ID, body: plaintext}
	if h.dedupe == nil {
		countRequest("forwarded")
		setLogFields(r, zap.String("kayle_outcome", "forwarded"))
		_, err := forward(caddyhttp.NewResponseRecorder(w, nil, nil), r, stage)
		return err
	}
	start = time.Now()
	err = h.dedupe.deliverOnce(w, r, stage, ev.ID)
	observeDuration(phaseDedupeStorage, time.Since(start)-stage.elapsed)
	setLogFields(r, zap.String("kayle_outcome", dedupeOutcome(stage, repl, err)))
	return err
}

// reject logs why a delivery is refused (never with any of its content) and
// returns the error Caddy answers with.
func (h *Handler) reject(r *http.Request, status int, reason string, err error, deliveryID string) error {
	if entry := h.rejectLogger.Check(zapcore.WarnLevel, "rejected delivery"); entry != nil {
		entry.Write(zap.Int("status", status), zap.String("reason", reason),
			zap.String("delivery_id", deliveryID), zap.Error(err))
	}
	outcome := "rejected_" + reason
	countRequest(outcome)
	setLogFields(r, zap.String("kayle_outcome", outcome))
	// A caddyhttp.HandlerError built here rather than by caddyhttp.Error,
	// whose stack walk and random id cost about 5% of the process per
	// refusal in a forged flood (profiled); the trace would always name
	// this function anyway.
	return caddyhttp.HandlerError{StatusCode: status, Err: err, Trace: rejectTrace}
}

// rejectTrace is the Trace of every refusal's HandlerError.
const rejectTrace = "kaylewebhook.(*Handler).reject"

// closeAfterUnreadBody ends the connection after a refusal to a client that
// waits for 100 Continue before sending its body. Otherwise net/http, which
// no longer sees its own body type under Caddy's wrappers, would read up to
// 256 KB of the body before answering, and so ask for it with a 100
// Continue that the client waits for. A client that sends its body without
// waiting is left to net/http's own handling (it reads up to 256 KB, then
// closes gracefully): closing at once would reset the connection under a
// body still arriving, and the client would lose the answer.
func closeAfterUnreadBody(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 && r.ContentLength != 0 && strings.EqualFold(r.Header.Get("Expect"), "100-continue") {
		w.Header().Set("Connection", "close")
	}
}

// readBody reads the whole body, at most limit bytes.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	if r.Body == nil {
		return nil, nil
	}
	if r.ContentLength > limit {
		return nil, &http.MaxBytesError{Limit: limit}
	}
	// Not closed here: net/http must see the unread rest of a refused body
	// and drain or drop the connection, or it would parse the rest as the
	// next request. (Caddy's wrapped writer hides MaxBytesReader's signal.)
	body := http.MaxBytesReader(w, r.Body, limit)
	// Memory grows with the bytes that arrive, never to more than three
	// times them: a client declaring 4 MiB and sending nothing pins little.
	// The buffer doubles, but jumps to the declared Content-Length once that
	// is within three times what arrived, so it ends at the body's size
	// instead of doubling past it (a 1.4 MB body used to end in a 2.2 MB
	// buffer, after 4.2 MB of allocations). The spare byte lets a read see
	// EOF, or the limit passed, without growing.
	size := limit
	if r.ContentLength >= 0 {
		size = r.ContentLength
	}
	buf := make([]byte, 0, min(size, initialBodyBuffer)+1)
	for {
		if len(buf) == cap(buf) {
			if int64(len(buf)) > size {
				size = limit // longer than declared: only the limit bounds it
			}
			next := 2 * int64(len(buf))
			if size <= 3*int64(len(buf)) {
				next = size + 1
			}
			grown := make([]byte, len(buf), min(next, size+1))
			copy(grown, buf)
			buf = grown
		}
		n, err := body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax, with
// each line's JSON field:
//
//	kayle_webhook {
//		signing_secret <secret>          # signing_secrets; repeatable; placeholders like {env.X}, {file.path}
//		decryption_key <kid> <file>      # decryption_keys; repeatable; PEM (PKCS#8, PKCS#1) or JWK
//		decryption_jwks <jwks-file>      # decryption_jwks; repeatable; a JWKS of private keys with kids
//		tolerance <duration>             # tolerance; default 5m
//		max_body_size <size>             # max_body_size; default 4MiB, from 1B to 1GiB
//		dedupe_window <duration>         # dedupe_window; default 14d, at least 8d
//		dedupe_prefix <key-prefix>       # dedupe_prefix; default kayle_webhook/events
//		storage <module> { … }           # storage; default: the global storage
//		dedupe off                       # dedupe_disabled; forward every verified copy
//		forward_signature <whsec_secret> # forward_signature_secrets; repeatable; sign the forward (Standard Webhooks)
//		events <type>…                   # events; repeatable; forward only these types
//	}
//
// decryption_keys <jwks-file>, decryption_jwks's old name, is still read,
// with a WARN. Error messages never repeat a signing_secret or
// forward_signature token.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "signing_secret":
			if !d.NextArg() || d.Val() == "" {
				return d.Err("signing_secret's value is empty; " + unsetVariableHint)
			}
			h.SigningSecrets = append(h.SigningSecrets, d.Val())
			if d.NextArg() {
				return d.Err("signing_secret takes exactly one argument (quote a secret that contains spaces)")
			}
		case "forward_signature":
			if !d.NextArg() || d.Val() == "" {
				return d.Err("forward_signature needs one argument, a whsec_ secret, and its value is empty; " + unsetVariableHint)
			}
			h.ForwardSignatureSecrets = append(h.ForwardSignatureSecrets, d.Val())
			if d.NextArg() {
				return d.Err("forward_signature takes exactly one argument; repeat the line for a second secret")
			}
		case "events":
			types := d.RemainingArgs()
			if len(types) == 0 {
				return d.Err("events needs at least one event type")
			}
			h.Events = append(h.Events, types...)
		case "decryption_key":
			var kid, file string
			if !d.Args(&kid, &file) || kid == "" || file == "" {
				return d.Err("decryption_key takes two arguments, <kid> <file>, and one is missing or empty; " + unsetVariableHint)
			}
			if d.NextArg() {
				return d.Err("decryption_key takes two arguments: <kid> <file>")
			}
			h.DecryptionKeys = append(h.DecryptionKeys, KeyFile{KeyID: kid, File: file})
		case "decryption_jwks", "decryption_keys":
			name := d.Val()
			var file string
			if !d.Args(&file) || file == "" {
				return d.Errf("%s takes one argument, <jwks-file>, and its value is empty; %s", name, unsetVariableHint)
			}
			if d.NextArg() {
				return d.Errf("%s takes one argument: <jwks-file>", name)
			}
			if name == "decryption_keys" {
				warnJWKSAlias(d)
			}
			h.DecryptionJWKS = append(h.DecryptionJWKS, file)
		case "tolerance", "dedupe_window":
			name := d.Val()
			var value string
			if !d.Args(&value) || d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(value)
			if err != nil {
				return d.Errf("%s: %v", name, err)
			}
			if name == "tolerance" {
				h.Tolerance = caddy.Duration(dur)
			} else {
				h.DedupeWindow = caddy.Duration(dur)
			}
		case "max_body_size":
			var value string
			if !d.Args(&value) || d.NextArg() {
				return d.ArgErr()
			}
			size, err := humanize.ParseBytes(value)
			if err != nil {
				return d.Errf("max_body_size: %v", err)
			}
			if !validMaxBodySize(size) {
				return d.Err(errMaxBodySizeRange(value).Error())
			}
			h.MaxBodySize = int64(size)
		case "dedupe_prefix":
			if !d.Args(&h.DedupePrefix) || d.NextArg() {
				return d.ArgErr()
			}
		case "dedupe":
			var value string
			if !d.Args(&value) || d.NextArg() {
				return d.ArgErr()
			}
			switch value {
			case "off":
				h.DedupeDisabled = true
			case "on":
				h.DedupeDisabled = false
			default:
				return d.Errf("dedupe takes on or off, not %q", value)
			}
		case "storage":
			if !d.NextArg() {
				return d.ArgErr()
			}
			modStem := d.Val()
			modID := "caddy.storage." + modStem
			unm, err := caddyfile.UnmarshalModule(d, modID)
			if err != nil {
				return err
			}
			storage, ok := unm.(caddy.StorageConverter)
			if !ok {
				return d.Errf("module %s is not a caddy.StorageConverter", modID)
			}
			h.StorageRaw = caddyconfig.JSONModuleObject(storage, "module", modStem, nil)
		default:
			return d.Errf("unrecognized kayle_webhook option %q", d.Val())
		}
	}
	return nil
}

// caddyfileLog is where the Caddyfile parser warns: Caddy's log, where the
// process that adapts a Caddyfile (caddy run, adapt, reload, a config posted
// as text/caddyfile) logs the adapter's own warnings. The adapter hands the
// server JSON, in which an old Caddyfile name leaves no trace, so this is
// the only place it can be noticed. A variable for the tests.
var caddyfileLog = caddy.Log

// warnJWKSAlias logs that the line just read uses decryption_keys with one
// argument, decryption_jwks's old name in the Caddyfile (decryption_keys is
// the JSON name of the decryption_key lines).
func warnJWKSAlias(d *caddyfile.Dispenser) {
	caddyfileLog().Warn("kayle_webhook: decryption_keys <jwks-file> is the old name of decryption_jwks <jwks-file>, which means the same (JSON decryption_jwks); use decryption_jwks",
		zap.String("adapter", "caddyfile"), zap.String("file", d.File()), zap.Int("line", d.Line()))
}

// unsetVariableHint explains an empty argument: a Caddyfile {$VAR} whose
// variable is unset becomes nothing, and the line loses that argument.
const unsetVariableHint = "is an environment variable ({$VAR}) on that line unset? The Caddyfile's {$VAR} are replaced when it is adapted, by the process running caddy run, adapt or reload"

func parseCaddyfile(helper httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	h := new(Handler)
	err := h.UnmarshalCaddyfile(helper.Dispenser)
	return h, err
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
)
