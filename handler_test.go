package kaylewebhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/go-jose/go-jose/v4"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestDedupeCleanupReleasesLocks: Cleanup (releaseAll) releases the locks of
// copies still in flight, and the late unlock of such a copy does not
// release a lock another instance has taken since (Unlock checks no owner).
func TestDedupeCleanupReleasesLocks(t *testing.T) {
	st := newMemStorage()
	d := newTestDeduper(st, newTestClock(testEpoch))
	const id = "evt_in_flight"
	_, _, lockName := d.eventKeys(id)

	inBackend, release := make(chan struct{}), make(chan struct{})
	backend := &testBackend{Respond: func(_ int, w http.ResponseWriter, _ *http.Request) error {
		close(inBackend)
		<-release
		w.WriteHeader(http.StatusOK)
		return nil
	}}
	done := make(chan served)
	go func() { done <- deliverEvent(d, id, backend) }()
	waitFor(t, inBackend, "the copy to reach the backend")
	if held := st.heldLocks(); !slices.Equal(held, []string{lockName}) {
		t.Fatalf("while forwarding, held locks = %v, want [%s]", held, lockName)
	}

	d.releaseAll() // Handler.Cleanup
	if held := st.heldLocks(); len(held) > 0 {
		t.Fatalf("after Cleanup: locks still held: %v", held)
	}

	// another instance takes the event's lock now
	if err := st.Lock(context.Background(), lockName); err != nil {
		t.Fatal(err)
	}
	close(release)
	if res := waitFor(t, done, "the in-flight copy"); res.Err != nil {
		t.Fatalf("in-flight copy: %v", res.Err)
	}
	if held := st.heldLocks(); !slices.Equal(held, []string{lockName}) {
		t.Errorf("the in-flight copy's late unlock released the other instance's lock: held = %v", held)
	}
	_ = st.Unlock(context.Background(), lockName)
	assertNoLocks(t, d)

	t.Run("Handler.Cleanup", func(t *testing.T) {
		exiting := false
		h := &Handler{dedupe: newTestDeduper(st, newTestClock(testEpoch)), exiting: func() bool { return exiting }}
		if err := h.dedupe.lock(context.Background(), "kayle_webhook_event_x"); err != nil {
			t.Fatal(err)
		}
		// a reload: Caddy does not wait for the old config's requests, so
		// their locks stay theirs to release
		if err := h.Cleanup(); err != nil {
			t.Fatal(err)
		}
		if held := st.heldLocks(); !slices.Equal(held, []string{"kayle_webhook_event_x"}) {
			t.Errorf("Cleanup on a reload released an in-flight lock: held = %v", held)
		}
		exiting = true
		if err := h.Cleanup(); err != nil {
			t.Fatal(err)
		}
		if held := st.heldLocks(); len(held) > 0 {
			t.Errorf("after Handler.Cleanup at exit: locks still held: %v", held)
		}
		if err := (&Handler{}).Cleanup(); err != nil { // dedupe off
			t.Error(err)
		}
	})
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

// countingBody counts the bytes the handler reads from a request body.
type countingBody struct {
	r    io.Reader
	read atomic.Int64
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.read.Add(int64(n))
	return n, err
}

func (c *countingBody) Close() error { return nil }

// A request without a well-formed X-Kayle-Signature is refused before a byte
// of its body is read: a forged flood costs a header parse, and net/http
// sends no 100 Continue (it does on the first Read).
func TestNoSignatureRefusedBeforeTheBody(t *testing.T) {
	h := newTestHandler(t)
	body, header := signDelivery(t, eventPayload("evt_cheap"), time.Now())
	for name, sigHeader := range map[string]string{
		"missing":   "",
		"malformed": "t=soon,v1=zz",
		"no v1":     "t=1780000000",
		"short v1":  "t=1780000000,v1=abcd",
	} {
		counted := &countingBody{r: bytes.NewReader(body)}
		req := deliveryRequest(nil, sigHeader)
		if sigHeader == "" {
			req.Header.Del(kayle.SignatureHeader)
		}
		req.Body, req.ContentLength = counted, int64(len(body))
		res := serve(h, req, &testBackend{})
		if res.Status != http.StatusBadRequest {
			t.Errorf("%s: status %d", name, res.Status)
		}
		if n := counted.read.Load(); n != 0 {
			t.Errorf("%s: %d body bytes read before refusing", name, n)
		}
	}
	// a well-formed header with a wrong MAC needs the body to be refused
	counted := &countingBody{r: bytes.NewReader(body)}
	last := "0"
	if strings.HasSuffix(header, "0") {
		last = "1"
	}
	req := deliveryRequest(nil, header[:len(header)-1]+last)
	req.Body, req.ContentLength = counted, int64(len(body))
	if res := serve(h, req, &testBackend{}); res.Status != http.StatusBadRequest || counted.read.Load() != int64(len(body)) {
		t.Errorf("wrong MAC: status %d after reading %d of %d bytes", res.Status, counted.read.Load(), len(body))
	}
}

// serveRefusedPayload sends payload as one genuine delivery (signed with the
// demo secret, encrypted to the demo key) and checks that the gateway
// refuses it with a 422 HandlerError, forwards nothing, and quotes none of
// the plaintext's values in its error or its log. It returns the error.
func serveRefusedPayload(t *testing.T, name string, payload []byte, plaintextValues ...string) error {
	t.Helper()
	h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled, h.StorageRaw = true, nil })
	core, logs := observer.New(zapcore.DebugLevel)
	h.setLogger(zap.New(core))
	backend := &testBackend{}
	res := serve(h, makeDelivery(t, payload, time.Now()), backend)
	if backend.Calls() != 0 {
		t.Errorf("%s: forwarded (status %d)", name, res.Status)
	}
	he, ok := errors.AsType[caddyhttp.HandlerError](res.Err)
	if !ok || he.StatusCode != http.StatusUnprocessableEntity {
		t.Errorf("%s: status %d, error %v; want a 422 caddyhttp.HandlerError", name, res.Status, res.Err)
		return res.Err
	}
	logged := ""
	for _, e := range logs.All() {
		logged += e.Message
		for k, v := range e.ContextMap() {
			logged += " " + k + "=" + strings.TrimSpace(strings.ReplaceAll(fmtAny(v), "\n", " "))
		}
	}
	for _, v := range plaintextValues {
		if strings.Contains(res.Err.Error(), v) || strings.Contains(logged, v) {
			t.Errorf("%s: the error or the log quotes the plaintext (%q): %v | %s", name, v, res.Err, logged)
		}
	}
	return res.Err
}

func fmtAny(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(b)
}

// backendView decodes a payload as a Go backend would, into a struct:
// encoding/json matches member names case-insensitively, the last one wins.
type backendView struct {
	Type     string `json:"type"`
	Metadata struct {
		EventID         string `json:"event_id"`
		SessionID       string `json:"verification_session_id"`
		ContractVersion int    `json:"contract_version"`
	} `json:"metadata"`
}

// TestAmbiguousPayloadFieldIsRefused: a signed payload in which type,
// metadata or one of the metadata ids the gateway reads has a sibling whose
// name differs only in letter case (or '_' / '-', or repeats exactly) is
// refused with 422. Forwarded, the gateway would deduplicate, filter and
// set headers on one value while a backend decoding into a struct reads
// the other: one event delivered as another, or twice.
func TestAmbiguousPayloadFieldIsRefused(t *testing.T) {
	const meta = `"metadata":{"contract_version":1,"event_id":"evt_gateway","verification_session_id":"vs_gateway"}`
	cases := map[string]string{
		"TYPE after type":         `{"type":"verification.session.failed","TYPE":"verification.session.succeeded",` + meta + `}`,
		"Type before type":        `{"Type":"verification.session.succeeded","type":"verification.session.failed",` + meta + `}`,
		"TYPE alone":              `{"TYPE":"verification.session.succeeded",` + meta + `}`,
		"type repeated":           `{"type":"verification.session.failed","type":"verification.session.succeeded",` + meta + `}`,
		"escaped \\u0054ype":      `{"type":"verification.session.failed","\u0054ype":"verification.session.succeeded",` + meta + `}`,
		"Metadata after metadata": `{"type":"verification.session.failed",` + meta + `,"Metadata":{"event_id":"evt_backend"}}`,
		"METADATA alone":          `{"type":"x","METADATA":{"event_id":"evt_backend"}}`,
		"EVENT_ID after event_id": `{"type":"x","metadata":{"event_id":"evt_gateway","EVENT_ID":"evt_backend"}}`,
		"Event_Id before":         `{"type":"x","metadata":{"Event_Id":"evt_backend","event_id":"evt_gateway"}}`,
		"event_id repeated":       `{"type":"x","metadata":{"event_id":"evt_gateway","event_id":"evt_backend"}}`,
		"eventId (json/v2)":       `{"type":"x","metadata":{"event_id":"evt_gateway","eventId":"evt_backend"}}`,
		"event-id (json/v2)":      `{"type":"x","metadata":{"event_id":"evt_gateway","event-id":"evt_backend"}}`,
		"session id, long s":      `{"type":"x","metadata":{"event_id":"evt_gateway","verification_session_id":"vs_gateway","verification_` + "\u017f" + `ession_id":"vs_backend"}}`,
		"Contract_Version":        `{"type":"x","metadata":{"event_id":"evt_gateway","contract_version":1,"Contract_Version":2}}`,
	}
	// the cases in which encoding/json (v1) reads another value than the
	// gateway; in the others json/v2's case-insensitive matching (which
	// ignores '_' and '-') or a first-wins decoder (gjson) does
	v1Attacks := []string{"TYPE after type", "TYPE alone", "escaped \\u0054ype", "Metadata after metadata", "METADATA alone",
		"EVENT_ID after event_id", "session id, long s", "Contract_Version"}
	for name, payload := range cases {
		if slices.Contains(v1Attacks, name) {
			var v backendView
			if err := json.Unmarshal([]byte(payload), &v); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if v.Type != "verification.session.succeeded" && v.Metadata.EventID != "evt_backend" &&
				v.Metadata.SessionID != "vs_backend" && v.Metadata.ContractVersion != 2 {
				t.Fatalf("%s: the test case is no attack: a Go backend reads %+v", name, v)
			}
		}
		err := serveRefusedPayload(t, name, []byte(payload), "evt_backend", "vs_backend", "verification.session.succeeded", "TYPE", "Metadata", "EVENT_ID", "eventId")
		if err != nil && !strings.Contains(err.Error(), "ambiguous") {
			t.Errorf("%s: %v, want it called ambiguous", name, err)
		}
	}
}

// TestPayloadCaseVariantsElsewhereAreForwarded: only the levels the gateway
// reads are checked; a claim or a member of data may be named anything.
func TestPayloadCaseVariantsElsewhereAreForwarded(t *testing.T) {
	h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled, h.StorageRaw = true, nil })
	payload := `{"type":"verification.session.succeeded","metadata":{"contract_version":1,"event_id":"evt_nested",` +
		`"verification_session_id":"vs_1","verification_attempt_id":"va_1","Data":{"EVENT_ID":"x"}},` +
		`"data":{"TYPE":"claim","type":"claim","claims":{"Metadata":{"event_id":"y","EVENT_ID":"z"}}}}`
	backend := &testBackend{}
	res := serve(h, makeDelivery(t, []byte(payload), time.Now()), backend)
	if res.Status != http.StatusOK || backend.Calls() != 1 {
		t.Fatalf("status %d, %d forwards, %v", res.Status, backend.Calls(), res.Err)
	}
	if got := backend.Request(0).Header.Get(kayle.HeaderEventID); got != "evt_nested" {
		t.Errorf("event id %q", got)
	}
}

// TestContractVersionMustBeASmallInteger: metadata.contract_version is
// forwarded only as an integer from 1 to 1000. 1e309 is valid JSON that a Go
// backend cannot decode into an int and that JavaScript reads as Infinity:
// forwarded, the backend fails on every one of Kayle's retries.
func TestContractVersionMustBeASmallInteger(t *testing.T) {
	var v backendView
	if json.Unmarshal([]byte(`{"metadata":{"contract_version":1e309}}`), &v) == nil {
		t.Fatal("the test's premise: a Go backend decodes 1e309 into an int")
	}
	for _, version := range []string{"1e309", "-1e309", "1.0", "1e0", "1.5", "0", "-0", "-1", "1001", "1000000", "99999999999999999999", `"1"`, "true", "[1]", "{}"} {
		payload := `{"type":"verification.session.succeeded","metadata":{"contract_version":` + version + `,"event_id":"evt_cv"}}`
		var quoted []string
		if len(version) > 4 {
			quoted = append(quoted, version)
		}
		err := serveRefusedPayload(t, "contract_version "+version, []byte(payload), quoted...)
		if err != nil && !strings.Contains(err.Error(), "metadata.contract_version") {
			t.Errorf("contract_version %s: %v, want it named", version, err)
		}
	}

	h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled, h.StorageRaw = true, nil })
	for version, header := range map[string]string{"1": "1", "2": "2", "1000": "1000", "null": "", "": ""} {
		member := ""
		if version != "" {
			member = `"contract_version":` + version + `,`
		}
		payload := `{"type":"verification.session.succeeded","metadata":{` + member + `"event_id":"evt_cv_` + version + `"}}`
		backend := &testBackend{}
		res := serve(h, makeDelivery(t, []byte(payload), time.Now()), backend)
		if res.Status != http.StatusOK || backend.Calls() != 1 {
			t.Errorf("contract_version %q: status %d, %d forwards, %v", version, res.Status, backend.Calls(), res.Err)
			continue
		}
		if got := backend.Request(0).Header.Get(kayle.HeaderContractVersion); got != header {
			t.Errorf("contract_version %q: %s %q, want %q", version, kayle.HeaderContractVersion, got, header)
		}
	}
}

// FuzzHandler sends arbitrary bodies and headers through the whole handler,
// configured as the vectors' gateway. When sign is set the fuzzer's body is
// given a genuine signature, so the JWE, key and payload paths are explored
// too. Whatever comes in, the handler must not panic, must answer with one
// of its documented statuses, and may call next only with a verified,
// decrypted event and headers it set itself.
func FuzzHandler(f *testing.F) {
	m := loadVectors(f)
	for _, c := range m.Cases {
		body := readVectorFile(f, c.Request.BodyFile)
		f.Add(body, c.Request.Headers[kayle.SignatureHeader], c.Request.Headers[kayle.HeaderDeliveryID], false)
		f.Add(body, "", "whd_x", true)
	}
	secret, err := os.ReadFile(filepath.Join(vectorsDir, m.SecretFile))
	if err != nil {
		f.Fatal(err)
	}
	secret = bytes.TrimSpace(secret)
	now := time.Unix(m.Cases[0].Now, 0)
	h := vectorHandler(f, m, m.Cases[0], f.TempDir())
	h.dedupe = nil // storage is tested elsewhere; keep iterations fast
	h.setLogger(zap.NewNop())

	allowed := map[int]bool{
		http.StatusOK: true, http.StatusBadRequest: true, http.StatusMethodNotAllowed: true,
		http.StatusRequestEntityTooLarge: true, http.StatusUnprocessableEntity: true,
		http.StatusInternalServerError: true,
	}
	f.Fuzz(func(t *testing.T, body []byte, sigHeader, deliveryID string, sign bool) {
		if sign {
			sigHeader = kayle.SignatureHeaderValue(secret, now, body)
		}
		req := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
		req.Header.Set(kayle.SignatureHeader, sigHeader)
		req.Header.Set(kayle.HeaderDeliveryID, deliveryID)
		req.Header.Set(kayle.HeaderVerified, "spoofed")
		backend := &testBackend{}
		res := serve(h, req, backend)
		if !allowed[res.Status] {
			t.Fatalf("undocumented status %d: %v", res.Status, res.Err)
		}
		if backend.Calls() == 0 {
			if res.Status == http.StatusOK {
				t.Fatal("200 without forwarding")
			}
			return
		}
		if !sign && sigHeader != kayle.SignatureHeaderValue(secret, now, body) {
			// reaching next needs a valid signature; a random one must not
			if _, err := kayle.VerifySignature(sigHeader, body, [][]byte{secret}, now, 5*time.Minute); err != nil {
				t.Fatalf("forwarded with an invalid signature: %v", err)
			}
		}
		got := backend.Request(0)
		plaintext, _, err := h.keys.Decrypt(body)
		if err != nil || !bytes.Equal(got.Body, plaintext) {
			t.Fatal("forwarded body is not the decryption of the delivery")
		}
		ev, err := kayle.ParseEvent(plaintext)
		if err != nil || got.Header.Get(kayle.HeaderEventID) != ev.ID || got.Header.Get(kayle.HeaderVerified) != "true" {
			t.Fatalf("forwarded headers do not match the payload: %v", err)
		}
		for name := range got.Header {
			if strings.HasPrefix(name, "X-Kayle-") && strings.ContainsAny(got.Header.Get(name), "\r\n") {
				t.Fatalf("header %s carries a line break", name)
			}
		}
	})
}

// A signed delivery encrypted to a kid the gateway holds no key for is our
// misconfiguration: 500 (Kayle retries), logged as an error naming the kid,
// counted, and nothing forwarded or remembered.
func TestUnknownKIDIs500AndLoud(t *testing.T) {
	h := newTestHandler(t)
	core, logs := observer.New(zapcore.InfoLevel)
	h.setLogger(zap.New(core))
	before := counterValue(t, requestsTotal.WithLabelValues("unknown_kid"))
	body, err := kayle.EncryptDelivery(eventPayload("evt_unknown_kid"), demoPublicKey(t), "k2027", jose.A256GCM)
	if err != nil {
		t.Fatal(err)
	}
	backend := &testBackend{}
	res := serve(h, deliveryRequest(body, kayle.SignatureHeaderValue([]byte(demoSecret(t)), time.Now(), body)), backend)
	if res.Status != http.StatusInternalServerError || backend.Calls() != 0 {
		t.Fatalf("status %d, %d forwards; want 500 and none", res.Status, backend.Calls())
	}
	if _, ok := errors.AsType[caddyhttp.HandlerError](res.Err); !ok {
		t.Errorf("error %T, want a caddyhttp.HandlerError", res.Err)
	}
	entries := logs.FilterLevelExact(zapcore.ErrorLevel).FilterField(zap.String("kid", "k2027")).All()
	if len(entries) != 1 {
		t.Errorf("%d error lines naming kid k2027, want 1 (all: %v)", len(entries), logs.All())
	}
	if got := counterValue(t, requestsTotal.WithLabelValues("unknown_kid")) - before; got != 1 {
		t.Errorf("unknown_kid counted %v times, want 1", got)
	}
	// the same event, once its key is there, is forwarded: nothing was remembered
	again := serve(h, makeDelivery(t, eventPayload("evt_unknown_kid"), time.Now()), backend)
	if again.Status != http.StatusOK || backend.Calls() != 1 {
		t.Errorf("the event under a known kid: status %d, %d forwards; want 200 and 1", again.Status, backend.Calls())
	}
}

// RSA-OAEP with SHA-1 (go-jose's RSA-OAEP) is outside Kayle's allowlist: a
// signed delivery using it is refused with 422 before any key is tried,
// even though the demo key would open it.
func TestRSAOAEPWithSHA1IsRefused(t *testing.T) {
	h := newTestHandler(t)
	encrypter, err := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: jose.RSA_OAEP, Key: demoPublicKey(t), KeyID: demoKID}, nil)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := encrypter.Encrypt(eventPayload("evt_oaep_sha1"))
	if err != nil {
		t.Fatal(err)
	}
	compact, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(compact)
	backend := &testBackend{}
	res := serve(h, deliveryRequest(body, kayle.SignatureHeaderValue([]byte(demoSecret(t)), time.Now(), body)), backend)
	if res.Status != http.StatusUnprocessableEntity || backend.Calls() != 0 {
		t.Fatalf("RSA-OAEP (SHA-1): status %d, %d forwards; want 422 and none", res.Status, backend.Calls())
	}
	if !errors.Is(res.Err, kayle.ErrNotJWE) {
		t.Errorf("error %v, want the algorithm refusal (ErrNotJWE)", res.Err)
	}
	if key, _ := res.Repl.Get("http.kayle.key_id"); key != nil {
		t.Errorf("{http.kayle.key_id} = %v: the refused delivery was decrypted", key)
	}
}
