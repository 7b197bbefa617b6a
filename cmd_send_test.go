package kaylewebhook

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	_ "github.com/caddyserver/caddy/v2/modules/filestorage" // the dedupe storage below
	"github.com/go-jose/go-jose/v4"
	"github.com/spf13/cobra"
	"go.uber.org/zap/zaptest"
)

var (
	eventIDPattern    = regexp.MustCompile(`^evt_[0-9a-f]{24}$`)
	sessionIDPattern  = regexp.MustCompile(`^vs_[0-9a-f]{24}$`)
	deliveryIDPattern = regexp.MustCompile(`^whd_[0-9a-f]{24}$`)
	signaturePattern  = regexp.MustCompile(`^t=[0-9]+,v1=[0-9a-f]{64}$`)
)

// sendGateway is the real Handler, configured as Caddyfile.example configures
// it (the demo secret through {file.*}, the demo key as kid "demo"), behind
// an httptest server. It records what arrived and what next was given.
type sendGateway struct {
	url string

	mu        sync.Mutex
	incoming  []sendSeen
	forwarded []sendSeen
}

type sendSeen struct {
	header http.Header
	body   []byte
}

func (g *sendGateway) counts() (incoming, forwarded int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.incoming), len(g.forwarded)
}

func (g *sendGateway) lastForwarded(t *testing.T) sendSeen {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.forwarded) == 0 {
		t.Fatal("next was never called")
	}
	return g.forwarded[len(g.forwarded)-1]
}

func newSendGateway(t *testing.T, dedupe bool) *sendGateway {
	t.Helper()
	h := &Handler{
		SigningSecrets: []string{"{file." + sendDefaultSecretFile + "}"},
		DecryptionKeys: []KeyFile{{KeyID: sendDefaultKID, File: sendDefaultKeyFile}},
		DedupeDisabled: !dedupe,
	}
	if dedupe {
		h.StorageRaw = json.RawMessage(`{"module":"file_system","root":` + strconv.Quote(t.TempDir()) + `}`)
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("provision: %v", err)
	}
	t.Cleanup(func() { _ = h.Cleanup() })
	// the bare context's development logger prints a stack trace per rejection
	h.setLogger(zaptest.NewLogger(t))

	g := new(sendGateway)
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return err
		}
		g.mu.Lock()
		g.forwarded = append(g.forwarded, sendSeen{r.Header.Clone(), body})
		g.mu.Unlock()
		_, err = io.WriteString(w, "backend got it\n")
		return err
	})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		g.mu.Lock()
		g.incoming = append(g.incoming, sendSeen{r.Header.Clone(), body})
		g.mu.Unlock()
		r.Body = io.NopCloser(bytes.NewReader(body))
		r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
		if err := h.ServeHTTP(w, r, next); err != nil {
			// what Caddy's server does with a handler error and no handle_errors
			status := http.StatusInternalServerError
			if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok && he.StatusCode != 0 {
				status = he.StatusCode
			}
			w.WriteHeader(status)
		}
	}))
	t.Cleanup(srv.Close)
	g.url = srv.URL + "/kayle"
	return g
}

// clearKayleEnv keeps the KAYLE_* variables Caddyfile.example reads, which
// also set the command's defaults, from leaking into a test.
func clearKayleEnv(t *testing.T) {
	for _, name := range []string{"KAYLE_KEY_FILE", "KAYLE_KEY_ID", "KAYLE_SIGNING_SECRET_FILE", "KAYLE_LISTEN_PORT"} {
		t.Setenv(name, "")
	}
}

func mustPlan(t *testing.T, o sendOptions) *sendPlan {
	t.Helper()
	p, err := newSendPlan(o)
	if err != nil {
		t.Fatalf("newSendPlan: %v", err)
	}
	return p
}

// sendOnce signs p now and POSTs it, returning the status and body.
func sendOnce(t *testing.T, p *sendPlan) (*http.Request, int, string) {
	t.Helper()
	req, err := p.newRequest(context.Background(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return req, resp.StatusCode, string(body)
}

type samplePayloadJSON struct {
	Type     string `json:"type"`
	Metadata struct {
		ContractVersion json.Number `json:"contract_version"`
		EventID         string      `json:"event_id"`
		SessionID       string      `json:"verification_session_id"`
	} `json:"metadata"`
	Data map[string]json.RawMessage `json:"data"`
}

func decodeSample(t *testing.T, payload []byte) samplePayloadJSON {
	t.Helper()
	var s samplePayloadJSON
	if err := json.Unmarshal(payload, &s); err != nil {
		t.Fatalf("sample payload is not JSON: %v", err)
	}
	return s
}

func TestSendCommandDefaultIsForwarded(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, false)
	p := mustPlan(t, sendOptions{URL: g.url})

	req, status, body := sendOnce(t, p)
	if status != http.StatusOK || body != "backend got it\n" {
		t.Fatalf("got %d %q, want 200 from the backend", status, body)
	}

	// what the command sent
	if got := req.Header.Get("Content-Type"); got != "application/jose" {
		t.Errorf("Content-Type = %q", got)
	}
	if got := req.Header.Get(kayle.HeaderEvent); got != defaultEventType {
		t.Errorf("%s = %q, want %q", kayle.HeaderEvent, got, defaultEventType)
	}
	if got := req.Header.Get(kayle.HeaderDeliveryID); !deliveryIDPattern.MatchString(got) {
		t.Errorf("%s = %q, want whd_<24 hex>", kayle.HeaderDeliveryID, got)
	}
	if got := req.Header.Get(kayle.SignatureHeader); !signaturePattern.MatchString(got) {
		t.Errorf("%s = %q", kayle.SignatureHeader, got)
	}
	if got := len(strings.Split(string(p.body), ".")); got != 5 {
		t.Errorf("body has %d dot-separated parts, want a 5-part compact JWE", got)
	}

	sample := decodeSample(t, p.payload)
	if sample.Type != defaultEventType || sample.Metadata.ContractVersion != "1" ||
		!eventIDPattern.MatchString(sample.Metadata.EventID) || !sessionIDPattern.MatchString(sample.Metadata.SessionID) {
		t.Errorf("sample metadata = %+v", sample)
	}
	if _, ok := sample.Data["claims"]; !ok {
		t.Errorf("succeeded sample has no data.claims: %s", p.payload)
	}

	// what the backend got
	fwd := g.lastForwarded(t)
	if !bytes.Equal(fwd.body, p.payload) {
		t.Errorf("forwarded body differs from the payload:\n got %s\nwant %s", fwd.body, p.payload)
	}
	for name, want := range map[string]string{
		kayle.HeaderEventID:    sample.Metadata.EventID,
		kayle.HeaderEventType:  defaultEventType,
		kayle.HeaderSessionID:  sample.Metadata.SessionID,
		kayle.HeaderKeyID:      sendDefaultKID,
		kayle.HeaderVerified:   "true",
		kayle.HeaderDeliveryID: req.Header.Get(kayle.HeaderDeliveryID),
		"Content-Type":         "application/json",
	} {
		if got := fwd.header.Get(name); got != want {
			t.Errorf("forwarded %s = %q, want %q", name, got, want)
		}
	}
}

func TestSendCommandRunPrintsWithoutPayload(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, false)

	var out bytes.Buffer
	if err := runSend(context.Background(), sendOptions{URL: g.url}, cmdIO{out: &out, notes: io.Discard}); err != nil {
		t.Fatalf("runSend: %v\n%s", err, out.String())
	}
	got := out.String()
	for _, want := range []string{"HTTP/1.1 200 OK", "backend got it", defaultEventType} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	payload := g.lastForwarded(t).body
	for _, secret := range []string{string(payload), "Curie", "1995-04-12"} {
		if strings.Contains(got, secret) {
			t.Errorf("output shows plaintext %q without --print-payload:\n%s", secret, got)
		}
	}

	out.Reset()
	if err := runSend(context.Background(), sendOptions{URL: g.url, PrintPayload: true}, cmdIO{out: &out, notes: io.Discard}); err != nil {
		t.Fatal(err)
	}
	if payload := g.lastForwarded(t).body; !strings.Contains(out.String(), string(payload)) {
		t.Errorf("--print-payload output lacks the payload:\n%s", out.String())
	}
}

func TestSendCommandSampleTypes(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, false)
	for eventType, wantData := range map[string][]string{
		"verification.session.succeeded": {"claims", "selected_field_keys"},
		"verification.session.failed":    {"failure_code", "nfc_tries_used", "liveness_tries_used"},
		"verification.session.expired":   nil,
		"verification.session.cancelled": {"outcome", "reason", "nfc_tries_used", "liveness_tries_used"},
		"verification.attempt.succeeded": nil, // not built in: generic sample
		"some.future.event":              nil,
	} {
		t.Run(eventType, func(t *testing.T) {
			p := mustPlan(t, sendOptions{URL: g.url, EventType: eventType})
			if _, status, body := sendOnce(t, p); status != http.StatusOK {
				t.Fatalf("got %d %q", status, body)
			}
			sample := decodeSample(t, p.payload)
			if sample.Type != eventType || !eventIDPattern.MatchString(sample.Metadata.EventID) ||
				!sessionIDPattern.MatchString(sample.Metadata.SessionID) || sample.Metadata.ContractVersion != "1" {
				t.Errorf("sample = %s", p.payload)
			}
			if len(sample.Data) != len(wantData) {
				t.Errorf("data has %d fields, want %v: %s", len(sample.Data), wantData, p.payload)
			}
			for _, key := range wantData {
				if _, ok := sample.Data[key]; !ok {
					t.Errorf("data lacks %q: %s", key, p.payload)
				}
			}
			fwd := g.lastForwarded(t)
			if !bytes.Equal(fwd.body, p.payload) || fwd.header.Get(kayle.HeaderEventType) != eventType {
				t.Errorf("forwarded %s %s", fwd.header.Get(kayle.HeaderEventType), fwd.body)
			}
		})
	}
}

func TestSendCommandCorruptIsRejected(t *testing.T) {
	clearKayleEnv(t)
	for mode, want := range map[string]int{
		"signature":  http.StatusBadRequest,
		"timestamp":  http.StatusBadRequest,
		"ciphertext": http.StatusUnprocessableEntity,
		"body":       http.StatusUnprocessableEntity,
		"kid":        http.StatusInternalServerError,
	} {
		t.Run(mode, func(t *testing.T) {
			if corruptions[mode] != want {
				t.Errorf("the command tells users to expect %d, the handler answers %d", corruptions[mode], want)
			}
			g := newSendGateway(t, true)
			var out bytes.Buffer
			// refused as it must be: the command succeeds
			err := runSend(context.Background(), sendOptions{URL: g.url, Corrupt: mode, Repeat: 2}, cmdIO{out: &out, notes: io.Discard})
			if err != nil {
				t.Errorf("runSend error = %v, want none: the gateway refused as expected", err)
			}
			if !strings.Contains(out.String(), kayle.HeaderRefused+": ") {
				t.Errorf("output does not show the gateway's %s reason:\n%s", kayle.HeaderRefused, out.String())
			}
			statusLine := "HTTP/1.1 " + strconv.Itoa(want) + " " + http.StatusText(want)
			if n := strings.Count(out.String(), statusLine); n != 2 {
				t.Errorf("output has %q %d times, want 2:\n%s", statusLine, n, out.String())
			}
			if incoming, forwarded := g.counts(); incoming != 2 || forwarded != 0 {
				t.Errorf("gateway got %d requests and forwarded %d, want 2 and 0", incoming, forwarded)
			}
		})
	}
}

func TestSendCommandCorruptionsAreMinimal(t *testing.T) {
	clearKayleEnv(t)
	now := time.Unix(1780000000, 0)
	secret, err := loadSecret(sendOptions{})
	if err != nil {
		t.Fatal(err)
	}

	p := mustPlan(t, sendOptions{Corrupt: "signature"})
	req, err := p.newRequest(context.Background(), now)
	if err != nil {
		t.Fatal(err)
	}
	good := kayle.SignatureHeaderValue(secret, now, p.body)
	bad := req.Header.Get(kayle.SignatureHeader)
	if !signaturePattern.MatchString(bad) || bad == good || bad[:len(bad)-1] != good[:len(good)-1] {
		t.Errorf("corrupt signature %q, want %q with its last digit changed", bad, good)
	}

	p = mustPlan(t, sendOptions{Corrupt: "timestamp"})
	req, _ = p.newRequest(context.Background(), now)
	if got, want := req.Header.Get(kayle.SignatureHeader), kayle.SignatureHeaderValue(secret, now.Add(-10*time.Minute), p.body); got != want {
		t.Errorf("corrupt timestamp signature %q, want %q", got, want)
	}

	p = mustPlan(t, sendOptions{Corrupt: "ciphertext"})
	parts := strings.Split(string(p.body), ".")
	if len(parts) != 5 || jweHeader(t, p.body)["kid"] != sendDefaultKID {
		t.Errorf("corrupt ciphertext body is not a JWE to kid demo: %s", p.body)
	}

	p = mustPlan(t, sendOptions{Corrupt: "kid"})
	if got := jweHeader(t, p.body)["kid"]; got != unknownKID {
		t.Errorf("corrupt kid JWE has kid %v", got)
	}
}

func TestSendCommandTimeOffset(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, false)
	for offset, want := range map[time.Duration]int{
		-time.Minute:      http.StatusOK,
		-10 * time.Minute: http.StatusBadRequest,
		10 * time.Minute:  http.StatusBadRequest,
	} {
		p := mustPlan(t, sendOptions{URL: g.url, TimeOffset: offset})
		if _, status, _ := sendOnce(t, p); status != want {
			t.Errorf("--time-offset %s: got %d, want %d", offset, status, want)
		}
	}
}

func TestSendCommandEnc(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, false)
	for _, enc := range []string{"A128GCM", "A192GCM", "A256GCM", "a128gcm", ""} {
		t.Run(enc, func(t *testing.T) {
			p := mustPlan(t, sendOptions{URL: g.url, Enc: enc})
			want := strings.ToUpper(enc)
			if want == "" {
				want = "A256GCM"
			}
			if h := jweHeader(t, p.body); h["enc"] != want || h["alg"] != "RSA-OAEP-256" {
				t.Errorf("JWE header %v, want enc %s", h, want)
			}
			if _, status, body := sendOnce(t, p); status != http.StatusOK {
				t.Fatalf("got %d %q", status, body)
			}
			if fwd := g.lastForwarded(t); !bytes.Equal(fwd.body, p.payload) {
				t.Errorf("forwarded %s, want %s", fwd.body, p.payload)
			}
		})
	}
}

func TestSendCommandRepeatIsOneEvent(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, true)
	var out bytes.Buffer
	if err := runSend(context.Background(), sendOptions{URL: g.url, Repeat: 3}, cmdIO{out: &out, notes: io.Discard}); err != nil {
		t.Fatalf("runSend: %v\n%s", err, out.String())
	}
	if n := strings.Count(out.String(), kayle.HeaderDuplicate+": true"); n != 2 {
		t.Errorf("%d duplicates reported, want 2:\n%s", n, out.String())
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.incoming) != 3 || len(g.forwarded) != 1 {
		t.Fatalf("gateway got %d requests and forwarded %d, want 3 and 1", len(g.incoming), len(g.forwarded))
	}
	deliveryIDs := map[string]bool{}
	for _, in := range g.incoming {
		if !bytes.Equal(in.body, g.incoming[0].body) {
			t.Error("a repeat sent a different body")
		}
		deliveryIDs[in.header.Get(kayle.HeaderDeliveryID)] = true
	}
	if len(deliveryIDs) != 3 {
		t.Errorf("delivery ids %v, want 3 distinct", deliveryIDs)
	}
}

func TestSendCommandRepeatIsResigned(t *testing.T) {
	clearKayleEnv(t)
	p := mustPlan(t, sendOptions{})
	now := time.Now()
	first, _ := p.newRequest(context.Background(), now)
	retry, _ := p.newRequest(context.Background(), now.Add(5*time.Second))
	if first.Header.Get(kayle.SignatureHeader) == retry.Header.Get(kayle.SignatureHeader) {
		t.Error("a retry carries the first attempt's signature")
	}
	if first.Header.Get(kayle.HeaderDeliveryID) == retry.Header.Get(kayle.HeaderDeliveryID) {
		t.Error("a retry carries the first attempt's delivery id")
	}
	a, _ := io.ReadAll(first.Body)
	b, _ := io.ReadAll(retry.Body)
	if !bytes.Equal(a, b) || !bytes.Equal(a, p.body) {
		t.Error("a retry sends another body")
	}
}

func TestSendCommandRepeatWithoutDedupe(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, false)
	if err := runSend(context.Background(), sendOptions{URL: g.url, Repeat: 2}, cmdIO{out: io.Discard, notes: io.Discard}); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.forwarded) != 2 || g.forwarded[0].header.Get(kayle.HeaderEventID) != g.forwarded[1].header.Get(kayle.HeaderEventID) {
		t.Errorf("want the same event forwarded twice, got %d forwards", len(g.forwarded))
	}
}

func TestSendCommandEventIDOverride(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, true)
	const id = "evt_same_event_twice"
	// two separate runs encrypt anew: only the event id is shared
	for i, wantDuplicate := range []bool{false, true} {
		var out bytes.Buffer
		if err := runSend(context.Background(), sendOptions{URL: g.url, EventID: id}, cmdIO{out: &out, notes: io.Discard}); err != nil {
			t.Fatalf("run %d: %v", i+1, err)
		}
		if got := strings.Contains(out.String(), kayle.HeaderDuplicate+": true"); got != wantDuplicate {
			t.Errorf("run %d: duplicate = %v, want %v:\n%s", i+1, got, wantDuplicate, out.String())
		}
	}
	if _, forwarded := g.counts(); forwarded != 1 {
		t.Errorf("forwarded %d times, want 1", forwarded)
	}
	if got := g.lastForwarded(t).header.Get(kayle.HeaderEventID); got != id {
		t.Errorf("forwarded event id %q, want %q", got, id)
	}
}

func TestSendCommandPayloadFile(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, false)
	payload := []byte(`{"type":"verification.attempt.failed","metadata":{"event_id":"evt_from_file","verification_attempt_id":"va_1"},"data":{"x":[1,2]}}` + "\n")
	file := filepath.Join(t.TempDir(), "payload.json")
	if err := os.WriteFile(file, payload, 0o600); err != nil {
		t.Fatal(err)
	}

	p := mustPlan(t, sendOptions{URL: g.url, PayloadFile: file})
	req, status, _ := sendOnce(t, p)
	if status != http.StatusOK {
		t.Fatalf("got %d", status)
	}
	if got := req.Header.Get(kayle.HeaderEvent); got != "verification.attempt.failed" {
		t.Errorf("%s = %q, want the payload's type", kayle.HeaderEvent, got)
	}
	fwd := g.lastForwarded(t)
	if !bytes.Equal(fwd.body, payload) || fwd.header.Get(kayle.HeaderEventID) != "evt_from_file" {
		t.Errorf("forwarded %s %s, want the file as is", fwd.header.Get(kayle.HeaderEventID), fwd.body)
	}

	// --type with --payload sets only the unsigned header, which the gateway overwrites
	p = mustPlan(t, sendOptions{URL: g.url, PayloadFile: file, EventType: "forged.type"})
	req, status, _ = sendOnce(t, p)
	if status != http.StatusOK || req.Header.Get(kayle.HeaderEvent) != "forged.type" {
		t.Fatalf("got %d with %s %q", status, kayle.HeaderEvent, req.Header.Get(kayle.HeaderEvent))
	}
	if got := g.lastForwarded(t).header.Get(kayle.HeaderEvent); got != "verification.attempt.failed" {
		t.Errorf("forwarded %s = %q, want the decrypted type", kayle.HeaderEvent, got)
	}
}

func TestSendCommandKeyFiles(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, false)
	priv, _, err := kayle.LoadPrivateKeyFile(sendDefaultKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	der, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pubPEM := write("pub.pem", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	jwk := func(kid string) []byte {
		data, err := json.Marshal(jose.JSONWebKey{Key: &priv.PublicKey, KeyID: kid, Algorithm: "RSA-OAEP-256", Use: "enc"})
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	demoJWK := write("demo.jwk", jwk("demo"))
	otherJWK := write("other.jwk", jwk("other"))

	for _, tc := range []struct {
		name    string
		opts    sendOptions
		wantKID any // in the JWE header; nil for none
		status  int
	}{
		{"public PEM", sendOptions{KeyFile: pubPEM}, "demo", http.StatusOK},
		{"JWK kid", sendOptions{KeyFile: demoJWK}, "demo", http.StatusOK},
		{"JWK with a kid the gateway lacks", sendOptions{KeyFile: otherJWK}, "other", http.StatusInternalServerError},
		{"--kid beats the JWK", sendOptions{KeyFile: otherJWK, KID: "demo"}, "demo", http.StatusOK},
		{"no kid", sendOptions{OmitKID: true}, nil, http.StatusOK},
		{"KAYLE_KEY_ID", sendOptions{}, "from-env", http.StatusInternalServerError},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "KAYLE_KEY_ID" {
				t.Setenv("KAYLE_KEY_ID", "from-env")
			}
			tc.opts.URL = g.url
			p := mustPlan(t, tc.opts)
			if got := jweHeader(t, p.body)["kid"]; got != tc.wantKID {
				t.Errorf("kid = %v, want %v", got, tc.wantKID)
			}
			if _, status, _ := sendOnce(t, p); status != tc.status {
				t.Errorf("got %d, want %d", status, tc.status)
			}
		})
	}
	if got := g.lastForwarded(t).header.Get(kayle.HeaderKeyID); got != sendDefaultKID {
		t.Errorf("a kid-less delivery was decrypted with %q", got)
	}
}

// A key that is not the demo key and holds no kid is refused, naming --kid:
// sending "demo" would only get a 500. $KAYLE_KEY_ID names the kid of
// $KAYLE_KEY_FILE only, never of a --key.
func TestSendCommandKidOfAnotherKey(t *testing.T) {
	clearKayleEnv(t)
	otherPEM, _ := newKeyFile(t)

	for _, env := range []string{"", "k-env"} {
		t.Setenv("KAYLE_KEY_ID", env)
		_, err := newSendPlan(sendOptions{KeyFile: otherPEM, URL: "http://127.0.0.1:1/"})
		if err == nil || !strings.Contains(err.Error(), "--kid") || !strings.Contains(err.Error(), otherPEM) {
			t.Errorf("KAYLE_KEY_ID=%q: a kid-less key that is not the demo's: %v, want a refusal naming the file and --kid", env, err)
		}
	}

	p := mustPlan(t, sendOptions{KeyFile: otherPEM, KID: "k2", URL: "http://127.0.0.1:1/"})
	if got := jweHeader(t, p.body)["kid"]; got != "k2" {
		t.Errorf("--kid k2: kid %v", got)
	}
	t.Setenv("KAYLE_KEY_FILE", otherPEM)
	t.Setenv("KAYLE_KEY_ID", "k-env")
	p = mustPlan(t, sendOptions{URL: "http://127.0.0.1:1/"})
	if got := jweHeader(t, p.body)["kid"]; got != "k-env" {
		t.Errorf("KAYLE_KEY_FILE with KAYLE_KEY_ID: kid %v, want k-env", got)
	}
	t.Setenv("KAYLE_KEY_ID", "")
	if _, err := newSendPlan(sendOptions{URL: "http://127.0.0.1:1/"}); err == nil || !strings.Contains(err.Error(), "--kid") {
		t.Errorf("KAYLE_KEY_FILE without KAYLE_KEY_ID: %v, want a refusal naming --kid", err)
	}
}

// parseSendFlags runs the real flag set and the checks newSendPlan makes.
func parseSendFlags(args ...string) (sendOptions, error) {
	cmd := newSendCommand()
	if err := cmd.ParseFlags(args); err != nil {
		return sendOptions{}, err
	}
	if err := cmd.ValidateArgs(cmd.Flags().Args()); err != nil {
		return sendOptions{}, err
	}
	o, err := sendOptionsFromFlags(caddycmd.Flags{FlagSet: cmd.Flags()})
	if err != nil {
		return o, err
	}
	_, err = newSendPlan(o)
	return o, err
}

func TestSendCommandFlagErrors(t *testing.T) {
	clearKayleEnv(t)
	payload := filepath.Join(t.TempDir(), "p.json")
	if err := os.WriteFile(payload, []byte(`{}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--repeat", "0"}, "--repeat must be at least 1"},
		{[]string{"--repeat", "1001"}, "--repeat must be between 1 and 1000"},
		{[]string{"--repeat", "many"}, "invalid argument"},
		{[]string{"--enc", "A512GCM"}, `--enc "A512GCM"`},
		{[]string{"--corrupt", "everything"}, `--corrupt "everything": must be one of body, ciphertext, kid, signature, timestamp`},
		{[]string{"--corrupt", ""}, "--corrupt needs one of"},
		{[]string{"--url", "ftp://localhost/"}, `--url "ftp://localhost/"`},
		{[]string{"--url", "localhost:8080"}, "must be an http:// or https:// URL"},
		{[]string{"--secret", "whsec_0123456789abcdef", "--secret-file", sendDefaultSecretFile}, "not both"},
		{[]string{"--secret", ""}, "--secret must not be empty"},
		{[]string{"--event-id", ""}, "--event-id must not be empty"},
		{[]string{"--event-id", "evt\n1"}, "--event-id"},
		{[]string{"--type", ""}, "--type"},
		{[]string{"--payload", payload, "--event-id", "evt_1"}, "--event-id applies to the built-in samples"},
		{[]string{"--payload", filepath.Join(t.TempDir(), "missing.json")}, "no such file"},
		{[]string{"--key", filepath.Join(t.TempDir(), "missing.pem")}, "no such file"},
		{[]string{"--key", sendDefaultSecretFile}, "neither PEM nor JSON"},
		{[]string{"--time-offset", "10"}, "invalid argument"},
		{[]string{"stray-argument"}, "unknown command"},
	} {
		_, err := parseSendFlags(tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to contain %q", tc.args, err, tc.want)
		}
	}
}

func TestSendCommandFlagValues(t *testing.T) {
	clearKayleEnv(t)
	o, err := parseSendFlags()
	if err != nil {
		t.Fatal(err)
	}
	if o.EventType != defaultEventType || o.Enc != "A256GCM" || o.Repeat != 1 || o.OmitKID || o.URL != "" {
		t.Errorf("defaults = %+v", o)
	}
	p := mustPlan(t, o)
	if p.url != "http://localhost:8080/" || p.kid != sendDefaultKID || p.enc != jose.A256GCM {
		t.Errorf("default plan: url %s kid %s enc %s", p.url, p.kid, p.enc)
	}

	payload := filepath.Join(t.TempDir(), "p.json")
	if err := os.WriteFile(payload, []byte(`{"type":"a.b","metadata":{"event_id":"evt_1"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	o, err = parseSendFlags("--time-offset", "-10m", "--kid", "", "--payload", payload, "-n", "3",
		"--secret", "whsec_0123456789abcdef", "--print-payload")
	if err != nil {
		t.Fatal(err)
	}
	if o.TimeOffset != -10*time.Minute || !o.OmitKID || o.EventType != "" || o.Repeat != 3 || !o.PrintPayload {
		t.Errorf("parsed %+v", o)
	}

	t.Setenv("KAYLE_LISTEN_PORT", "9999")
	if p := mustPlan(t, sendOptions{}); p.url != "http://localhost:9999/" {
		t.Errorf("KAYLE_LISTEN_PORT: url %s", p.url)
	}
}

func TestSendCommandSecretFileTrim(t *testing.T) {
	clearKayleEnv(t)
	dir := t.TempDir()
	for content, want := range map[string]string{
		"whsec_abc\n":     "whsec_abc",
		"whsec_abc\r\n":   "whsec_abc",
		"whsec_abc":       "whsec_abc",
		"whsec_abc\n\n":   "whsec_abc\n", // as Caddy's {file.*}: one line ending only
		" whsec_abc \n":   " whsec_abc ",
		"whsec_\nabc\n":   "whsec_\nabc",
		"whsec_abc\r\r\n": "whsec_abc\r",
	} {
		path := filepath.Join(dir, "secret")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := loadSecret(sendOptions{SecretFile: path})
		if err != nil || string(got) != want {
			t.Errorf("%q: got %q, %v; want %q", content, got, err, want)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "empty"), []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadSecret(sendOptions{SecretFile: filepath.Join(dir, "empty")}); err == nil {
		t.Error("an empty secret file was accepted")
	}
}

func TestSendCommandMissingDemoFiles(t *testing.T) {
	clearKayleEnv(t)
	t.Chdir(t.TempDir())
	_, err := newSendPlan(sendOptions{})
	if err == nil || !strings.Contains(err.Error(), "run from the repository root or pass --secret-file or --secret") {
		t.Errorf("error %v", err)
	}
	_, err = newSendPlan(sendOptions{Secret: "whsec_0123456789abcdef"})
	if err == nil || !strings.Contains(err.Error(), "run from the repository root or pass --key") {
		t.Errorf("error %v", err)
	}
}

func TestSendCommandConnectionError(t *testing.T) {
	clearKayleEnv(t)
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close() // nothing listens there now
	err := runSend(context.Background(), sendOptions{URL: url}, cmdIO{out: io.Discard, notes: io.Discard})
	if err == nil || !strings.Contains(err.Error(), "is the gateway listening at "+url) || strings.Contains(err.Error(), "Caddyfile.example") {
		t.Errorf("with --url: error %v; want a hint naming that URL, not the demo", err)
	}
	// without --url, the default address is the demo's: the hint names it
	t.Setenv("KAYLE_LISTEN_PORT", url[strings.LastIndexByte(url, ':')+1:])
	err = runSend(context.Background(), sendOptions{}, cmdIO{out: io.Discard, notes: io.Discard})
	if err == nil || !strings.Contains(err.Error(), "is the gateway running? go run ./cmd/caddy run --config Caddyfile.example") {
		t.Errorf("without --url: error %v", err)
	}
}

func TestSendCommandCorruptGotAnotherAnswer(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, true)
	var out bytes.Buffer
	// a sound body "corrupted" only by a kid: against a gateway holding no
	// such key it is a 500, as expected; a signature corruption against a
	// gateway that forwards anything would be a failure
	err := runSend(context.Background(), sendOptions{URL: g.url, Corrupt: "kid"}, cmdIO{out: &out, notes: io.Discard})
	if err != nil {
		t.Fatalf("--corrupt kid: %v\n%s", err, out.String())
	}
	open := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok") }))
	defer open.Close()
	err = runSend(context.Background(), sendOptions{URL: open.URL, Corrupt: "signature"}, cmdIO{out: &out, notes: io.Discard})
	if err == nil || !strings.Contains(err.Error(), "1 of 1 responses were not the 400 that --corrupt signature must get") {
		t.Errorf("a forged delivery answered 200: error %v, want a failure naming the expected 400", err)
	}
}

func TestSendCommandRefusalReasonShown(t *testing.T) {
	clearKayleEnv(t)
	g := newSendGateway(t, true)
	var out bytes.Buffer
	err := runSend(context.Background(), sendOptions{URL: g.url, Secret: "whsec_not-the-gateways-secret"}, cmdIO{out: &out, notes: io.Discard})
	if err == nil {
		t.Fatal("a wrong secret did not fail the command")
	}
	if !strings.Contains(out.String(), kayle.HeaderRefused+": signature_mismatch") {
		t.Errorf("output does not say the signature did not match:\n%s", out.String())
	}
	if strings.Contains(out.String(), "not-the-gateways-secret") {
		t.Errorf("output repeats the secret:\n%s", out.String())
	}
}

func TestSendCommandConfigMaterial(t *testing.T) {
	clearKayleEnv(t)
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "k7.pem")
	if err := runKeygen(keygenOptions{Bits: 2048, KID: "k7", Out: dir}, cmdIO{out: io.Discard, notes: io.Discard}); err != nil {
		t.Fatal(err)
	}
	secretFile := filepath.Join(dir, "secret.txt")
	const secret = "whsec_config-material-secret-0123456789"
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "Caddyfile")
	caddyfile := ":0 {\n\tkayle_webhook {\n\t\tsigning_secret {file." + secretFile + "}\n\t\tdecryption_key k7 " + keyFile + "\n\t\tdedupe off\n\t}\n\trespond 200\n}\n"
	if err := os.WriteFile(config, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	p := mustPlan(t, sendOptions{Config: config, URL: "http://localhost:1/"})
	if string(p.secret) != secret {
		t.Errorf("secret from the config: %d bytes, want the configured %d", len(p.secret), len(secret))
	}
	if p.kid != "k7" {
		t.Errorf("kid %q, want the configured k7", p.kid)
	}
	if !strings.HasPrefix(p.from, "secret, key, kid: from "+config) {
		t.Errorf("the plan says %q of where its material came from", p.from)
	}
	key, _, err := kayle.LoadPrivateKeyFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	plaintext, kid, err := (func() ([]byte, string, error) {
		var kr kayle.KeyRing
		if err := kr.Add("k7", key); err != nil {
			return nil, "", err
		}
		return kr.Decrypt(p.body)
	})()
	if err != nil || kid != "k7" || !bytes.Equal(plaintext, p.payload) {
		t.Errorf("the body does not open with the configured key: kid %q, %v", kid, err)
	}
	// explicit flags still win
	if p := mustPlan(t, sendOptions{Config: config, URL: "http://localhost:1/", KID: "other"}); p.kid != "other" || !strings.HasPrefix(p.from, "secret, key: from ") {
		t.Errorf("--kid other beside --config: kid %q, %q", p.kid, p.from)
	}
	if p := mustPlan(t, sendOptions{Config: config, URL: "http://localhost:1/", Secret: "whsec_given_on_the_command_line", KeyFile: demoKeyFile}); p.from != "" {
		t.Errorf("--secret and --key beside --config: the plan still says %q", p.from)
	}
	if _, err := newSendPlan(sendOptions{Config: filepath.Join(dir, "missing")}); err == nil {
		t.Error("a missing --config was accepted")
	}
}

func TestKayleCommandRegistered(t *testing.T) {
	clearKayleEnv(t)
	kayle, ok := caddycmd.Commands()["kayle"]
	if !ok {
		t.Fatal("the kayle command is not registered")
	}
	// as caddycmd builds it
	root := &cobra.Command{Use: kayle.Name + " " + kayle.Usage, Short: kayle.Short, Long: kayle.Long}
	kayle.CobraFunc(root)

	var help bytes.Buffer
	root.SetOut(&help)
	root.SetErr(&help)
	root.SetArgs([]string{})
	if err := root.Execute(); err != nil {
		t.Fatalf("bare kayle: %v", err)
	}
	if !strings.Contains(help.String(), "send ") || !strings.Contains(help.String(), "Sends a genuine Kayle delivery") {
		t.Errorf("bare kayle does not list send:\n%s", help.String())
	}

	// the whole path: flags → request → exit status
	g := newSendGateway(t, false)
	root.SetArgs([]string{"send", "--url", g.url, "--repeat", "2", "--enc", "A128GCM"})
	if err := root.Execute(); err != nil {
		t.Fatalf("kayle send: %v", err)
	}
	if _, forwarded := g.counts(); forwarded != 2 {
		t.Errorf("forwarded %d, want 2", forwarded)
	}
	root.SetArgs([]string{"send", "--url", g.url, "--corrupt", "signature"})
	if err := root.Execute(); err != nil {
		t.Errorf("a corruption refused as expected failed the command: %v", err)
	}
	// a fresh command: cobra keeps flag values from one Execute to the next
	root = &cobra.Command{Use: kayle.Name + " " + kayle.Usage, Short: kayle.Short, Long: kayle.Long}
	kayle.CobraFunc(root)
	root.SetOut(io.Discard)
	root.SetErr(io.Discard)
	root.SetArgs([]string{"send", "--url", g.url, "--secret", "whsec_not-the-gateways-secret"})
	if err := root.Execute(); err == nil {
		t.Error("a genuine delivery the gateway refused did not fail the command")
	}
}

// jweHeader decodes the protected header of a compact JWE.
func jweHeader(t *testing.T, jwe []byte) map[string]any {
	t.Helper()
	first, _, _ := strings.Cut(string(jwe), ".")
	raw, err := base64.RawURLEncoding.DecodeString(first)
	if err != nil {
		t.Fatalf("JWE header: %v", err)
	}
	var h map[string]any
	if err := json.Unmarshal(raw, &h); err != nil {
		t.Fatalf("JWE header: %v", err)
	}
	return h
}

func TestSendPrintsTheGatewaysMarkers(t *testing.T) {
	for _, name := range []string{kayle.HeaderQueued, kayle.HeaderDuplicate, kayle.HeaderIgnored, kayle.HeaderRefused} {
		var out bytes.Buffer
		resp := &http.Response{Proto: "HTTP/1.1", Status: "202 Accepted", StatusCode: 202,
			Header: http.Header{name: {"true"}}, Body: io.NopCloser(strings.NewReader(`{"status":"queued"}`))}
		if status := printResponse(&out, resp); status != 202 || !strings.Contains(out.String(), name+": true") {
			t.Errorf("%s not printed (status %d):\n%s", name, status, out.String())
		}
	}
}
