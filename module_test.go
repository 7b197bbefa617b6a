package kaylewebhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/go-jose/go-jose/v4"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`kayle_webhook {
		signing_secret {env.KAYLE_SECRET}
		signing_secret "whsec_old secret with spaces"
		decryption_key k1 /keys/k1.pem
		decryption_key k2 {env.KEY2}
		decryption_keys /keys/set.jwks
		tolerance 2m
		max_body_size 1MiB
		dedupe_window 10d
		dedupe_prefix kayle/prod
		storage file_system /var/lib/kayle
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(h)
	want := `{"signing_secrets":["{env.KAYLE_SECRET}","whsec_old secret with spaces"],` +
		`"decryption_keys":[{"kid":"k1","file":"/keys/k1.pem"},{"kid":"k2","file":"{env.KEY2}"}],` +
		`"decryption_jwks":["/keys/set.jwks"],"tolerance":120000000000,"max_body_size":1048576,` +
		`"dedupe_window":864000000000000,"dedupe_prefix":"kayle/prod",` +
		`"storage":{"module":"file_system","root":"/var/lib/kayle"}}`
	if string(got) != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}

	d = caddyfile.NewTestDispenser("kayle_webhook {\n signing_secret s\n dedupe off\n}")
	h = Handler{}
	if err := h.UnmarshalCaddyfile(d); err != nil || !h.DedupeDisabled {
		t.Errorf("dedupe off: %v %v", h.DedupeDisabled, err)
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	const secret = "whsec_TopSecretValue1234567890"
	cases := map[string]string{
		"secret twice on a line": "signing_secret " + secret + " " + secret,
		"secret missing":         "signing_secret",
		"key one arg":            "decryption_key k1",
		"key three args":         "decryption_key k1 a b",
		"jwks no arg":            "decryption_keys",
		"bad tolerance":          "tolerance soon",
		"bad size":               "max_body_size lots",
		"zero size":              "max_body_size 0",
		"dedupe maybe":           "dedupe maybe",
		"unknown option":         "signing_secrets " + secret,
		"unknown storage":        "storage nowhere",
	}
	for name, line := range cases {
		d := caddyfile.NewTestDispenser("kayle_webhook {\n" + line + "\n}")
		var h Handler
		err := h.UnmarshalCaddyfile(d)
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if strings.Contains(err.Error(), secret) && name != "unknown option" {
			t.Errorf("%s: the error repeats the secret: %v", name, err)
		}
	}
	d := caddyfile.NewTestDispenser("kayle_webhook extra {\n}")
	if err := new(Handler).UnmarshalCaddyfile(d); err == nil {
		t.Error("an argument after the directive was accepted")
	}
}

func TestProvisionRefuses(t *testing.T) {
	t.Setenv("KAYLE_EMPTY_SECRET", "")
	t.Setenv("KAYLE_SHORT_SECRET", "shhh9")
	const leaked = "whsec_must_not_leak_0123456789"
	t.Setenv("KAYLE_LEAK", leaked)
	cases := map[string]struct {
		configure func(h *Handler)
		want      string
	}{
		"no secret":        {func(h *Handler) { h.SigningSecrets = nil }, "no signing_secret"},
		"unset env secret": {func(h *Handler) { h.SigningSecrets = []string{"{env.KAYLE_UNSET_FOR_TEST}"} }, "signing secret #1"},
		"empty env secret": {func(h *Handler) { h.SigningSecrets = []string{"{env.KAYLE_EMPTY_SECRET}"} }, "signing secret #1"},
		"short secret":     {func(h *Handler) { h.SigningSecrets = []string{"{env.KAYLE_SHORT_SECRET}"} }, "5 bytes"},
		"missing file":     {func(h *Handler) { h.SigningSecrets = []string{"{file./nonexistent/kayle}"} }, "signing secret #1"},
		"no key":           {func(h *Handler) { h.DecryptionKeys = nil }, "no decryption_key"},
		"unreadable key":   {func(h *Handler) { h.DecryptionKeys = []KeyFile{{KeyID: "a", File: "/nonexistent.pem"}} }, "no such file"},
		"duplicate kid": {func(h *Handler) {
			h.DecryptionKeys = append(h.DecryptionKeys, KeyFile{KeyID: demoKID, File: demoKeyFile})
		}, "two decryption keys"},
		"kid clash with jwks": {func(h *Handler) {
			h.DecryptionKeys = []KeyFile{{KeyID: "k1", File: demoKeyFile}}
			h.DecryptionJWKS = []string{vectorsDir + "/keys/private.jwks.json"}
		}, "two decryption keys"},
		"jwk kid mismatch": {func(h *Handler) {
			h.DecryptionKeys = []KeyFile{{KeyID: "k1", File: vectorsDir + "/keys/k2.private.jwk.json"}}
		}, `says kid "k2"`},
		"public key": {func(h *Handler) {
			h.DecryptionKeys = []KeyFile{{KeyID: "k1", File: vectorsDir + "/keys/k1.public.jwk.json"}}
		}, "public key"},
		"short window":    {func(h *Handler) { h.DedupeWindow = caddy.Duration(7 * 24 * time.Hour) }, "at least 8d"},
		"prefix escapes":  {func(h *Handler) { h.DedupePrefix = "../certificates" }, ".."},
		"negative size":   {func(h *Handler) { h.MaxBodySize = -1 }, "max_body_size"},
		"negative window": {func(h *Handler) { h.Tolerance = caddy.Duration(-time.Second) }, "tolerance"},
		"forward secret without whsec_": {func(h *Handler) {
			h.ForwardSignatureSecrets = []string{"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
		}, "forward_signature secret #1 is not whsec_"},
		"forward secret not base64": {func(h *Handler) {
			h.ForwardSignatureSecrets = []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", leaked}
		}, "forward_signature secret #2 is not whsec_"},
		"forward secret unset": {func(h *Handler) {
			h.ForwardSignatureSecrets = []string{"{env.KAYLE_UNSET_FOR_TEST}"}
		}, "forward_signature secret #1: a placeholder"},
		"leaky secret alone is fine, but a short one must not be echoed": {func(h *Handler) {
			h.SigningSecrets = []string{"{env.KAYLE_LEAK}", "{env.KAYLE_SHORT_SECRET}"}
		}, "signing secret #2"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			h := &Handler{
				SigningSecrets: []string{demoSecret(t)},
				DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
				StorageRaw:     fileStorageJSON(t.TempDir()),
			}
			c.configure(h)
			err := provisionTestHandler(t, h)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error containing %q", err, c.want)
			}
			for _, s := range []string{leaked, "shhh9", demoSecret(t)} {
				if strings.Contains(err.Error(), s) {
					t.Errorf("the error reveals a secret: %v", err)
				}
			}
		})
	}
}

func TestSecretFromPlaceholders(t *testing.T) {
	t.Setenv("KAYLE_TEST_SECRET", demoSecret(t))
	for _, secret := range []string{"{env.KAYLE_TEST_SECRET}", "{file." + demoSecretFile + "}"} {
		h := newTestHandler(t, func(h *Handler) { h.SigningSecrets = []string{secret} })
		backend := &testBackend{}
		res := serve(h, makeDelivery(t, eventPayload("evt_ph"), time.Now()), backend)
		if res.Status != http.StatusOK || backend.Calls() != 1 {
			t.Errorf("%s: status %d, %d forwards (%v)", secret, res.Status, backend.Calls(), res.Err)
		}
	}
}

func TestMethodAndSize(t *testing.T) {
	h := newTestHandler(t, func(h *Handler) { h.MaxBodySize = 64 << 10 })
	backend := &testBackend{}
	for _, method := range []string{http.MethodGet, http.MethodPut, http.MethodHead, http.MethodOptions} {
		res := serve(h, httptest.NewRequest(method, "/kayle", nil), backend)
		if res.Status != http.StatusMethodNotAllowed || res.Rec.Header().Get("Allow") != http.MethodPost {
			t.Errorf("%s: %d, Allow %q", method, res.Status, res.Rec.Header().Get("Allow"))
		}
	}
	big := bytes.Repeat([]byte("A"), 64<<10+1)
	header := kayle.SignatureHeaderValue([]byte(demoSecret(t)), time.Now(), big)
	// declared length over the cap, and a chunked body (no length) over it
	res := serve(h, deliveryRequest(big, header), backend)
	if res.Status != http.StatusRequestEntityTooLarge {
		t.Errorf("declared length: %d", res.Status)
	}
	chunked := deliveryRequest(big, header)
	chunked.ContentLength = -1
	chunked.Body = io.NopCloser(bytes.NewReader(big))
	if res := serve(h, chunked, backend); res.Status != http.StatusRequestEntityTooLarge {
		t.Errorf("chunked: %d", res.Status)
	}
	if backend.Calls() != 0 {
		t.Errorf("%d forwards", backend.Calls())
	}
	// a body at the cap is read whole (and then fails the signature, not the size)
	atCap := deliveryRequest(big[:64<<10], header)
	if res := serve(h, atCap, backend); res.Status != http.StatusBadRequest {
		t.Errorf("body at the cap: %d", res.Status)
	}
}

// TestRewriteHeaders: the backend sees only headers the gateway set, from
// the decrypted payload, whatever the request claimed.
func TestRewriteHeaders(t *testing.T) {
	h := newTestHandler(t)
	backend := &testBackend{}
	payload := eventPayload("evt_real")
	req := makeDelivery(t, payload, time.Now())
	req.Header.Set(kayle.HeaderEventID, "evt_spoofed")
	req.Header.Add(kayle.HeaderEventID, "evt_spoofed2")
	req.Header.Set(kayle.HeaderVerified, "yes")
	req.Header.Set(kayle.HeaderDuplicate, "false")
	req.Header.Set(kayle.HeaderEvent, "verification.session.failed")
	req.Header.Set("X-Kayle-Anything", "1")
	req.Header.Set("Content-Encoding", "gzip")
	req.Header["x-kayle-session-id"] = []string{"vs_lowercase_spoof"} // not canonical
	res := serve(h, req, backend)
	if res.Status != http.StatusOK || backend.Calls() != 1 {
		t.Fatalf("status %d, %d forwards, %v", res.Status, backend.Calls(), res.Err)
	}
	got := backend.Request(0)
	if !bytes.Equal(got.Body, payload) {
		t.Error("body is not the exact plaintext")
	}
	want := map[string][]string{
		kayle.HeaderEventID:    {"evt_real"},
		kayle.HeaderEventType:  {"verification.session.succeeded"},
		kayle.HeaderEvent:      {"verification.session.succeeded"},
		kayle.HeaderSessionID:  {"vs_test"},
		kayle.HeaderVerified:   {"true"},
		kayle.HeaderKeyID:      {demoKID},
		kayle.HeaderDeliveryID: {"whd_test"},
		"Content-Type":         {"application/json"},
		kayle.HeaderDuplicate:  nil,
		kayle.SignatureHeader:  nil,
		"X-Kayle-Anything":     nil,
		"Content-Encoding":     nil,
	}
	for name, values := range want {
		if g := got.Header.Values(name); strings.Join(g, "|") != strings.Join(values, "|") {
			t.Errorf("%s: %q, want %q", name, g, values)
		}
	}
	//lint:ignore SA1008 the non-canonical name is the attack: net/http keeps it as sent
	if v, ok := got.Header["x-kayle-session-id"]; ok {
		t.Errorf("non-canonical spoofed header kept: %q", v)
	}
	for ph, want := range map[string]string{
		"http.kayle.event_id":    "evt_real",
		"http.kayle.event_type":  "verification.session.succeeded",
		"http.kayle.session_id":  "vs_test",
		"http.kayle.key_id":      demoKID,
		"http.kayle.delivery_id": "whd_test",
		"http.kayle.duplicate":   "false",
	} {
		if v, _ := res.Repl.GetString(ph); v != want {
			t.Errorf("{%s} = %q, want %q", ph, v, want)
		}
	}
}

// TestNoRSABeforeSignature: a forged request costs no RSA work; its body is
// never even parsed as a JWE.
func TestRejectedWithoutDecrypting(t *testing.T) {
	h := newTestHandler(t)
	h.keys = kayle.KeyRing{} // any decryption attempt would now fail as unknown kid (500)
	body, _ := signDelivery(t, eventPayload("evt"), time.Now())
	forged := deliveryRequest(body, kayle.SignatureHeaderValue([]byte("whsec_attacker_guess_000000000"), time.Now(), body))
	backend := &testBackend{}
	if res := serve(h, forged, backend); res.Status != http.StatusBadRequest {
		t.Fatalf("forged: %d (a 500 would mean decryption was attempted)", res.Status)
	}
}

// TestErrorsAreHandlerErrors: handle_errors routes type-assert the error.
func TestErrorsAreHandlerErrors(t *testing.T) {
	h := newTestHandler(t)
	res := serve(h, deliveryRequest([]byte("x"), "t=1,v1=00"), &testBackend{})
	if _, ok := res.Err.(caddyhttp.HandlerError); !ok {
		t.Fatalf("%T", res.Err)
	}
}

// TestMetricsSurviveReload: each config load has a fresh registry; the
// counters must be registered into every one of them, not just the first.
func TestMetricsSurviveReload(t *testing.T) {
	for load := range 2 {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		h := &Handler{
			SigningSecrets: []string{demoSecret(t)},
			DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
			DedupeDisabled: true,
		}
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		serve(h, httptest.NewRequest(http.MethodGet, "/", nil), &testBackend{})
		families, err := ctx.GetMetricsRegistry().Gather()
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, mf := range families {
			found = found || mf.GetName() == "caddy_kayle_webhook_requests_total"
		}
		if !found {
			t.Errorf("load %d: caddy_kayle_webhook_requests_total is not in the config's registry", load+1)
		}
	}
}

// TestReadBodyDoesNotTrustContentLength: a declared length preallocates
// nothing large before the bytes arrive (an unauthenticated client could
// otherwise pin max_body_size per connection by sending nothing).
func TestReadBodyDoesNotTrustContentLength(t *testing.T) {
	const declared = 4 << 20
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 20 {
		r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("tiny"))
		r.ContentLength = declared
		body, err := readBody(httptest.NewRecorder(), r, declared)
		if err != nil || string(body) != "tiny" {
			t.Fatalf("%q %v", body, err)
		}
	}
	runtime.ReadMemStats(&after)
	if allocated := after.TotalAlloc - before.TotalAlloc; allocated > declared {
		t.Errorf("20 tiny bodies declaring 4 MiB allocated %d bytes", allocated)
	}
}

// TestRewriteDropsExpectAndUnsafeDeliveryID: the backend gets no Expect
// (the body is already read; its 100 Continue would reach Kayle), and the
// delivery id only as one value that is safe to log.
func TestRewriteDropsHopHeadersAndUnsafeDeliveryID(t *testing.T) {
	h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled = true })
	for name, ids := range map[string][]string{
		"two values":   {"whd_a", "whd_b"},
		"too long":     {strings.Repeat("w", kayle.MaxIDLen+1)},
		"control char": {"whd_\x01"},
	} {
		backend := &testBackend{}
		req := makeDelivery(t, eventPayload("evt_"+strings.ReplaceAll(name, " ", "_")), time.Now())
		req.Header.Set("Expect", "100-continue")
		// reverse_proxy would drop the headers Connection lists, ours too
		req.Header.Set("Connection", "Upgrade, "+kayle.HeaderVerified+", "+kayle.HeaderEventID)
		req.Header.Set("Upgrade", "websocket")
		req.Header[kayle.HeaderDeliveryID] = ids
		if res := serve(h, req, backend); res.Status != http.StatusOK {
			t.Fatalf("%s: %d %v", name, res.Status, res.Err)
		}
		got := backend.Request(0).Header
		for _, hop := range []string{"Expect", "Connection", "Upgrade"} {
			if got.Get(hop) != "" {
				t.Errorf("%s: %s forwarded", name, hop)
			}
		}
		want := []string(nil)
		if name == "two values" {
			want = []string{"whd_a"}
		}
		if v := got.Values(kayle.HeaderDeliveryID); strings.Join(v, "|") != strings.Join(want, "|") {
			t.Errorf("%s: %s = %q, want %q", name, kayle.HeaderDeliveryID, v, want)
		}
	}
}

// TestLiteralSecretWithBraceIsNotEchoed: a literal secret is read as a
// template; the refusal must not quote it.
func TestLiteralSecretWithBraceIsNotEchoed(t *testing.T) {
	const secret = "whsec_ab{cdSECRETxyz}0123456789"
	h := &Handler{
		SigningSecrets: []string{secret},
		DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
		DedupeDisabled: true,
	}
	err := provisionTestHandler(t, h)
	if err == nil {
		t.Fatal("accepted")
	}
	if strings.Contains(err.Error(), "SECRET") {
		t.Errorf("the error quotes the secret: %v", err)
	}
}

// TestNothingAnsweredIsNotDelivered: a route whose later handlers answer
// nothing (reverse_proxy matching another path) must not become Caddy's
// empty 200: Kayle would stop retrying an event nobody received.
// So must a chain that answers only an informational 1xx.
func TestNothingAnsweredIsNotDelivered(t *testing.T) {
	silent := &testBackend{Respond: func(int, http.ResponseWriter, *http.Request) error { return nil }}
	hintsOnly := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(http.StatusEarlyHints)
		return nil
	}}
	for _, next := range []*testBackend{silent, hintsOnly} {
		for _, dedupeOff := range []bool{false, true} {
			h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled = dedupeOff })
			payload := eventPayload("evt_unrouted")
			body, sig := signDelivery(t, payload, time.Now())
			for attempt := range 2 {
				res := serve(h, deliveryRequest(body, sig), next)
				if res.Status != http.StatusBadGateway || !errors.Is(res.Err, errNothingAnswered) {
					t.Fatalf("dedupe off=%v, attempt %d: status %d, %v", dedupeOff, attempt+1, res.Status, res.Err)
				}
			}
		}
	}
}

// TestPlaintextDroppedAfterServe: once a delivery is handled, the request
// Caddy's replacer captured no longer holds the plaintext. Stopped timers of
// contexts derived from the request linger in the runtime's timer heap and
// reach that request through the replacer; a 1 MiB body stayed reachable for
// seconds. After an error the body stays, for handle_errors routes that
// forward it (to a fallback backend).
func TestPlaintextDroppedAfterServe(t *testing.T) {
	failing := &testBackend{Respond: func(int, http.ResponseWriter, *http.Request) error {
		return caddyhttp.Error(http.StatusBadGateway, errors.New("backend down"))
	}}
	for _, dedupeOff := range []bool{false, true} {
		h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled = dedupeOff })
		backend := &testBackend{}
		r, _ := prepareTestRequest(makeDelivery(t, eventPayload("evt_drop"), time.Now()), httptest.NewRecorder())
		if err := h.ServeHTTP(httptest.NewRecorder(), r, backend); err != nil {
			t.Fatal(err)
		}
		if backend.Calls() != 1 || len(backend.Request(0).Body) == 0 {
			t.Fatalf("dedupe off=%v: backend got %d requests, want 1 with the plaintext", dedupeOff, backend.Calls())
		}
		if r.Body != http.NoBody || r.GetBody != nil {
			t.Errorf("dedupe off=%v: after ServeHTTP the request still holds its plaintext body (Body %T, GetBody set %v)", dedupeOff, r.Body, r.GetBody != nil)
		}

		r, _ = prepareTestRequest(makeDelivery(t, eventPayload("evt_keep"), time.Now()), httptest.NewRecorder())
		if err := h.ServeHTTP(httptest.NewRecorder(), r, failing); err == nil {
			t.Fatal("a failed forward returned no error")
		}
		if r.GetBody == nil {
			t.Fatalf("dedupe off=%v: after an error the request has no body for handle_errors", dedupeOff)
		}
		body, err := r.GetBody()
		if err != nil {
			t.Fatal(err)
		}
		if data, _ := io.ReadAll(body); !bytes.Contains(data, []byte("evt_keep")) {
			t.Errorf("dedupe off=%v: after an error handle_errors would read %q, want the plaintext", dedupeOff, data)
		}
	}
}

// loadJSONHandler loads a kayle_webhook handler from its JSON config as
// Caddy loads one (strict decoding, Provision, Validate), in a server
// listening on listen (none: outside any server), and returns it or the
// error Caddy would report.
func loadJSONHandler(t *testing.T, config string, listen ...string) (*Handler, error) {
	t.Helper()
	parent := context.Background()
	if listen != nil {
		parent = context.WithValue(parent, caddyhttp.ServerCtxKey, &caddyhttp.Server{Listen: listen})
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: parent})
	mod, err := ctx.LoadModuleByID("http.handlers.kayle_webhook", json.RawMessage(config))
	if err != nil {
		cancel()
		return nil, err
	}
	h := mod.(*Handler)
	t.Cleanup(func() {
		cancel()
		_ = h.Cleanup()
	})
	return h, nil
}

func jsonString(s string) string {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// TestSigningSecretWithControlByteIsRefused: a signing secret holding a
// control byte is refused when the config loads, without quoting it. HMAC
// pads a key with zero bytes, so the published demo secret plus a NUL
// ("…\u0000" in a JSON config) signs exactly as the demo secret; beside a
// secret and key of one's own on a public listener, it let anyone sign
// deliveries, with no refusal and no WARN.
func TestSigningSecretWithControlByteIsRefused(t *testing.T) {
	demo := demoSecret(t)
	if !bytes.Equal(kayle.SignatureMAC([]byte(demo), "1", []byte("x")), kayle.SignatureMAC([]byte(demo+"\x00"), "1", []byte("x"))) {
		t.Fatal("the test's premise: HMAC signs with the demo secret plus NUL as with the demo secret")
	}
	const own = "whsec_own_secret_0123456789abcdef0123"
	keyFile, key := newKeyFile(t)
	twoNewlines := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(twoNewlines, []byte(own+"\n\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KAYLE_TEST_SECRET_CR", own+"\r")
	cases := map[string]struct {
		secrets  []string
		position int // 1-based, of the refused secret
	}{
		"the demo secret plus NUL beside one's own": {[]string{own, demo + "\x00"}, 2},
		"NUL inside":                       {[]string{own[:10] + "\x00" + own[10:]}, 1},
		"tab":                              {[]string{own + "\t"}, 1},
		"DEL":                              {[]string{own + "\x7f"}, 1},
		"a file ending in two line breaks": {[]string{"{file." + twoNewlines + "}"}, 1}, // {file.} drops one
		"an env var ending in CR":          {[]string{"{env.KAYLE_TEST_SECRET_CR}"}, 1},
	}
	for name, c := range cases {
		quoted := make([]string, len(c.secrets))
		for i, s := range c.secrets {
			quoted[i] = jsonString(s)
		}
		config := `{"signing_secrets":[` + strings.Join(quoted, ",") + `],` +
			`"decryption_keys":[{"kid":"k-own","file":` + jsonString(keyFile) + `}],"dedupe_disabled":true}`
		h, err := loadJSONHandler(t, config, ":8443")
		if err == nil {
			// what the attacker gets: a delivery signed with the published secret
			payload := eventPayload("evt_forged_with_demo_secret")
			body, err := kayle.EncryptDelivery(payload, &key.PublicKey, "k-own", jose.A256GCM)
			if err != nil {
				t.Fatal(err)
			}
			backend := &testBackend{}
			serve(h, deliveryRequest(body, kayle.SignatureHeaderValue([]byte(demo), time.Now(), body)), backend)
			t.Errorf("%s: accepted (a delivery signed with the published demo secret: %d forwards)", name, backend.Calls())
			continue
		}
		want := fmt.Sprintf("signing secret #%d (signing_secret, JSON signing_secrets[%d]) holds a control byte", c.position, c.position-1)
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", name, err, want)
		}
		if strings.Contains(err.Error(), own[6:]) || strings.Contains(err.Error(), demo[6:]) {
			t.Errorf("%s: the error quotes a secret: %v", name, err)
		}
	}
}

// TestJSONConfigRangeChecks: a JSON config is held to the ranges a
// Caddyfile is (max_body_size's 1 B to 1 GiB was checked by the Caddyfile
// parser only, so JSON took 2 GiB or 1 TiB), each refusal names the JSON
// field, and a range is checked before the storage is opened.
func TestJSONConfigRangeChecks(t *testing.T) {
	base := func(root, extra string) string {
		return `{"signing_secrets":[` + jsonString(demoSecret(t)) + `],` +
			`"decryption_keys":[{"kid":"demo","file":` + jsonString(demoKeyFile) + `}],` +
			`"storage":{"module":"file_system","root":` + jsonString(root) + `}` + extra + `}`
	}
	refused := map[string]struct{ extra, want string }{
		"max_body_size 1GiB+1": {`,"max_body_size":1073741825`, "max_body_size (JSON max_body_size) is 1073741825 bytes; it must be between 1 byte and 1GiB"},
		"max_body_size 1TiB":   {`,"max_body_size":1099511627776`, "max_body_size (JSON max_body_size)"},
		"max_body_size -1":     {`,"max_body_size":-1`, "max_body_size (JSON max_body_size)"},
		"tolerance -1s":        {`,"tolerance":"-1s"`, "tolerance (JSON tolerance)"},
		"dedupe_window 7d":     {`,"dedupe_window":"7d"`, "dedupe_window (JSON dedupe_window) 168h0m0s is shorter"},
		"dedupe_window -14d":   {`,"dedupe_window":"-14d"`, "dedupe_window (JSON dedupe_window)"},
	}
	for name, c := range refused {
		root := t.TempDir()
		_, err := loadJSONHandler(t, base(root, c.extra))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, c.want)
		}
		if entries, _ := os.ReadDir(root); len(entries) != 0 {
			t.Errorf("%s: the storage was written before the refusal (%d entries)", name, len(entries))
		}
	}
	accepted := map[string]struct {
		extra string
		size  int64
	}{
		"max_body_size 1GiB":                  {`,"max_body_size":1073741824`, 1 << 30},
		"max_body_size 1":                     {`,"max_body_size":1`, 1},
		"max_body_size absent: the default":   {``, defaultMaxBodySize},
		"dedupe_window 7d with dedupe off":    {`,"dedupe_window":"7d","dedupe_disabled":true`, defaultMaxBodySize},
		"dedupe_window 8d, the least allowed": {`,"dedupe_window":"8d"`, defaultMaxBodySize},
	}
	for name, c := range accepted {
		h, err := loadJSONHandler(t, base(t.TempDir(), c.extra))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if h.MaxBodySize != c.size {
			t.Errorf("%s: max_body_size %d, want %d", name, h.MaxBodySize, c.size)
		}
	}
}

// TestConfigErrorsNameTheJSONField: a JSON config's author reads JSON field
// names; every refusal names the field it is about in JSON too.
func TestConfigErrorsNameTheJSONField(t *testing.T) {
	t.Setenv("KAYLE_TEST_SHORT", "short")
	secret := jsonString(demoSecret(t))
	key := `[{"kid":"demo","file":` + jsonString(demoKeyFile) + `}]`
	cases := map[string]struct{ config, want string }{
		"no secret":          {`{"decryption_keys":` + key + `,"dedupe_disabled":true}`, "no signing_secret (JSON signing_secrets) configured"},
		"short secret":       {`{"signing_secrets":["{env.KAYLE_TEST_SHORT}"],"decryption_keys":` + key + `,"dedupe_disabled":true}`, "(signing_secret, JSON signing_secrets[0]) is 5 bytes"},
		"unset placeholder":  {`{"signing_secrets":[` + secret + `,"{env.KAYLE_TEST_UNSET_X}"],"decryption_keys":` + key + `,"dedupe_disabled":true}`, "signing secret #2 (signing_secret, JSON signing_secrets[1]): a placeholder"},
		"no key":             {`{"signing_secrets":[` + secret + `],"dedupe_disabled":true}`, "no decryption_key (JSON decryption_keys) or decryption_jwks (JSON decryption_jwks) configured"},
		"unreadable key":     {`{"signing_secrets":[` + secret + `],"decryption_keys":[{"kid":"k9","file":"/nonexistent.pem"}],"dedupe_disabled":true}`, `decryption key "k9" (decryption_key, JSON decryption_keys[0])`},
		"duplicate kid":      {`{"signing_secrets":[` + secret + `],"decryption_keys":[{"kid":"demo","file":` + jsonString(demoKeyFile) + `},{"kid":"demo","file":` + jsonString(demoKeyFile) + `}],"dedupe_disabled":true}`, `(decryption_key, JSON decryption_keys[1]): two decryption keys`},
		"unreadable JWKS":    {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"decryption_jwks":["/nonexistent.jwks"],"dedupe_disabled":true}`, "decryption JWKS #1 (decryption_jwks, JSON decryption_jwks[0])"},
		"bad forward secret": {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"forward_signature_secrets":["whsec_x"],"dedupe_disabled":true}`, "(JSON forward_signature_secrets[0])"},
		"empty event type":   {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"events":[""],"dedupe_disabled":true}`, "(JSON events)"},
		"prefix escapes":     {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"storage":{"module":"file_system","root":` + jsonString(t.TempDir()) + `},"dedupe_prefix":"a/../.."}`, "(JSON dedupe_prefix)"},
		"unknown storage":    {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"storage":{"module":"nowhere"}}`, "(storage, JSON storage)"},
	}
	for name, c := range cases {
		_, err := loadJSONHandler(t, c.config)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, c.want)
		}
	}
}

// adaptKayleBlock adapts a site whose kayle_webhook block holds lines, with
// Caddy's Caddyfile adapter, and returns the handler's JSON and what the
// parser logged at WARN.
func adaptKayleBlock(t *testing.T, lines string) (json.RawMessage, *observer.ObservedLogs, error) {
	t.Helper()
	core, logs := observer.New(zapcore.WarnLevel)
	caddyfileLog = func() *zap.Logger { return zap.New(core) }
	t.Cleanup(func() { caddyfileLog = caddy.Log })
	caddyfile := "http://127.0.0.1:8080 {\n\tkayle_webhook {\n\t\tsigning_secret {env.KAYLE_SECRET}\n" + lines + "\t}\n}\n"
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return nil, logs, err
	}
	if handler := findKayleHandler(adapted); handler != nil {
		return handler, logs, nil
	}
	t.Fatalf("no kayle_webhook handler in %s", adapted)
	return nil, nil, nil
}

// findKayleHandler returns the first kayle_webhook handler in a JSON config,
// wherever it is nested (the site's subroute).
func findKayleHandler(raw json.RawMessage) json.RawMessage {
	var obj map[string]json.RawMessage
	if json.Unmarshal(raw, &obj) == nil {
		if string(obj["handler"]) == `"kayle_webhook"` {
			return raw
		}
		for _, v := range obj {
			if found := findKayleHandler(v); found != nil {
				return found
			}
		}
		return nil
	}
	var arr []json.RawMessage
	if json.Unmarshal(raw, &arr) == nil {
		for _, v := range arr {
			if found := findKayleHandler(v); found != nil {
				return found
			}
		}
	}
	return nil
}

// TestCaddyfileDecryptionJWKS: the Caddyfile names a JWKS file
// decryption_jwks, as JSON does. Its old Caddyfile name, decryption_keys
// (in JSON the decryption_key lines), still works, and logs a WARN with the
// file and line where the Caddyfile is adapted: the adapted JSON is the
// same, so nothing later could tell.
func TestCaddyfileDecryptionJWKS(t *testing.T) {
	jwks := filepath.Join(vectorsDir, "keys/private.jwks.json")
	handler, logs, err := adaptKayleBlock(t, "\t\tdedupe off\n\t\tdecryption_jwks "+jwks+"\n")
	if err != nil {
		t.Fatal(err)
	}
	if want := `"decryption_jwks":[` + jsonString(jwks) + `]`; !bytes.Contains(handler, []byte(want)) {
		t.Errorf("decryption_jwks adapts to %s, want %s", handler, want)
	}
	if logs.Len() != 0 {
		t.Errorf("decryption_jwks logged %v", logs.All())
	}
	t.Setenv("KAYLE_SECRET", "whsec_own_secret_0123456789abcdef0123") // the demo's would be refused beside k1
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(handler, &fields); err != nil {
		t.Fatal(err)
	}
	delete(fields, "handler") // the module's name, which Caddy reads before loading it
	config, _ := json.Marshal(fields)
	if _, err := loadJSONHandler(t, string(config)); err != nil {
		t.Errorf("the adapted handler does not load: %v", err)
	}

	old, logs, err := adaptKayleBlock(t, "\t\tdedupe off\n\t\tdecryption_keys "+jwks+"\n")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(old, handler) {
		t.Errorf("decryption_keys <file> adapts to %s, decryption_jwks to %s", old, handler)
	}
	warns := logs.FilterMessageSnippet("use decryption_jwks").AllUntimed()
	if len(warns) != 1 {
		t.Fatalf("decryption_keys <file>: WARN lines %v, want one saying to use decryption_jwks", logs.All())
	}
	if f := warns[0].ContextMap(); f["file"] != "Caddyfile" || f["line"] != int64(5) {
		t.Errorf("the WARN points at %v:%v, want Caddyfile:5", f["file"], f["line"])
	}

	for _, line := range []string{"decryption_jwks", "decryption_jwks a.jwks b.jwks", "decryption_jwks \"\""} {
		if _, _, err := adaptKayleBlock(t, "\t\t"+line+"\n"); err == nil || !strings.Contains(err.Error(), "decryption_jwks takes one argument") {
			t.Errorf("%s: %v", line, err)
		}
	}
}

// TestCaddyfileMaxBodySizeRange: the Caddyfile parser refuses the sizes
// Validate refuses, with the same words, at the line.
func TestCaddyfileMaxBodySizeRange(t *testing.T) {
	for _, size := range []string{"0", "2GiB", "1073741825", "9EiB"} {
		_, _, err := adaptKayleBlock(t, "\t\tmax_body_size "+size+"\n")
		if err == nil || !strings.Contains(err.Error(), "max_body_size (JSON max_body_size) is "+size+";") || !strings.Contains(err.Error(), "Caddyfile:4") {
			t.Errorf("max_body_size %s: %v", size, err)
		}
	}
	handler, _, err := adaptKayleBlock(t, "\t\tmax_body_size 1GiB\n")
	if err != nil || !bytes.Contains(handler, []byte(`"max_body_size":1073741824`)) {
		t.Errorf("max_body_size 1GiB: %s %v", handler, err)
	}
}
