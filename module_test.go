package kaylewebhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
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
	header := SignatureHeaderValue([]byte(demoSecret(t)), time.Now(), big)
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
	req.Header.Set(HeaderEventID, "evt_spoofed")
	req.Header.Add(HeaderEventID, "evt_spoofed2")
	req.Header.Set(HeaderVerified, "yes")
	req.Header.Set(HeaderDuplicate, "false")
	req.Header.Set(HeaderEvent, "verification.session.failed")
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
		HeaderEventID:      {"evt_real"},
		HeaderEventType:    {"verification.session.succeeded"},
		HeaderEvent:        {"verification.session.succeeded"},
		HeaderSessionID:    {"vs_test"},
		HeaderVerified:     {"true"},
		HeaderKeyID:        {demoKID},
		HeaderDeliveryID:   {"whd_test"},
		"Content-Type":     {"application/json"},
		HeaderDuplicate:    nil,
		SignatureHeader:    nil,
		"X-Kayle-Anything": nil,
		"Content-Encoding": nil,
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
	h.keys = keyRing{} // any decryption attempt would now fail as unknown kid (500)
	body, _ := signDelivery(t, eventPayload("evt"), time.Now())
	forged := deliveryRequest(body, SignatureHeaderValue([]byte("whsec_attacker_guess_000000000"), time.Now(), body))
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
		"too long":     {strings.Repeat("w", maxIDLen+1)},
		"control char": {"whd_\x01"},
	} {
		backend := &testBackend{}
		req := makeDelivery(t, eventPayload("evt_"+strings.ReplaceAll(name, " ", "_")), time.Now())
		req.Header.Set("Expect", "100-continue")
		// reverse_proxy would drop the headers Connection lists, ours too
		req.Header.Set("Connection", "Upgrade, "+HeaderVerified+", "+HeaderEventID)
		req.Header.Set("Upgrade", "websocket")
		req.Header[HeaderDeliveryID] = ids
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
		if v := got.Values(HeaderDeliveryID); strings.Join(v, "|") != strings.Join(want, "|") {
			t.Errorf("%s: %s = %q, want %q", name, HeaderDeliveryID, v, want)
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
