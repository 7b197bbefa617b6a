package kaylewebhook

import (
	"bytes"
	"context"
	"crypto/rsa"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// labeledCount reads one counter of a vec, e.g. labeledCount(t, requestsTotal, "ignored").
func labeledCount(t testing.TB, vec *prometheus.CounterVec, label string) float64 {
	t.Helper()
	var m dto.Metric
	if err := vec.WithLabelValues(label).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func histogramCount(t testing.TB, phase string) uint64 {
	t.Helper()
	var m dto.Metric
	if err := phaseSeconds.WithLabelValues(phase).(prometheus.Metric).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

func typedPayload(eventID, typ string) []byte {
	var p map[string]any
	if err := json.Unmarshal(eventPayload(eventID), &p); err != nil {
		panic(err)
	}
	p["type"] = typ
	out, err := json.Marshal(p)
	if err != nil {
		panic(err)
	}
	return out
}

// A type outside the allowlist is acknowledged, not forwarded and not
// remembered: once the allowlist admits it, a replay reaches the backend.
func TestEventsAllowlist(t *testing.T) {
	storage := fileStorageJSON(t.TempDir())
	h := newTestHandler(t, func(h *Handler) {
		h.StorageRaw = storage
		h.Events = []string{"verification.session.succeeded", "verification.session.expired"}
	})
	backend := &testBackend{}
	ignoredBefore := labeledCount(t, requestsTotal, "ignored")

	failed := typedPayload("evt_failed_1", "verification.session.failed")
	res := serve(h, makeDelivery(t, failed, time.Now()), backend)
	if res.Status != http.StatusOK || res.Err != nil {
		t.Fatalf("ignored type: status %d, %v", res.Status, res.Err)
	}
	if got := res.Rec.Header().Get(HeaderIgnored); got != "true" {
		t.Errorf("%s: %q", HeaderIgnored, got)
	}
	if !strings.Contains(res.Rec.Body.String(), `"status":"ignored"`) || !strings.Contains(res.Rec.Body.String(), "evt_failed_1") {
		t.Errorf("body %q", res.Rec.Body.String())
	}
	if backend.Calls() != 0 {
		t.Fatalf("an ignored type was forwarded")
	}
	if got := labeledCount(t, requestsTotal, "ignored") - ignoredBefore; got != 1 {
		t.Errorf("requests_total{outcome=ignored} grew by %v, want 1", got)
	}

	for _, typ := range h.Events {
		res := serve(h, makeDelivery(t, typedPayload("evt_"+typ, typ), time.Now()), backend)
		if res.Status != http.StatusOK || res.Rec.Header().Get(HeaderIgnored) != "" {
			t.Errorf("%s: status %d, ignored %q", typ, res.Status, res.Rec.Header().Get(HeaderIgnored))
		}
	}
	if backend.Calls() != 2 {
		t.Fatalf("%d forwards of allowed types, want 2", backend.Calls())
	}

	// the same storage, no allowlist: the ignored event was not remembered
	all := newTestHandler(t, func(h *Handler) { h.StorageRaw = storage })
	res = serve(all, makeDelivery(t, failed, time.Now()), backend)
	if res.Status != http.StatusOK || res.Rec.Header().Get(kayle.HeaderDuplicate) != "" || backend.Calls() != 3 {
		t.Errorf("replay after the allowlist changed: status %d, duplicate %q, %d forwards",
			res.Status, res.Rec.Header().Get(kayle.HeaderDuplicate), backend.Calls())
	}
}

// An allowlist is checked only on verified deliveries: a forged one of an
// ignored type is still a 400, not a 200 that would tell its sender anything.
func TestEventsAllowlistAfterVerification(t *testing.T) {
	h := newTestHandler(t, func(h *Handler) { h.Events = []string{"verification.session.succeeded"} })
	body, _ := signDelivery(t, typedPayload("evt_f", "verification.session.failed"), time.Now())
	forged := deliveryRequest(body, kayle.SignatureHeaderValue([]byte("whsec_attacker_guess_000000000"), time.Now(), body))
	if res := serve(h, forged, &testBackend{}); res.Status != http.StatusBadRequest {
		t.Errorf("forged delivery of an ignored type: %d", res.Status)
	}
}

func TestEventsCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser("kayle_webhook {\n signing_secret s\n events verification.session.succeeded verification.session.failed\n events verification.session.expired\n}")
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(h.Events, " "); got != "verification.session.succeeded verification.session.failed verification.session.expired" {
		t.Errorf("events %q", got)
	}
	if err := new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser("kayle_webhook {\n events\n}")); err == nil {
		t.Error("events without a type accepted")
	}
	err := provisionTestHandler(t, &Handler{
		SigningSecrets: []string{demoSecret(t)},
		DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
		DedupeDisabled: true,
		Events:         []string{""},
	})
	if err == nil || !strings.Contains(err.Error(), "events") {
		t.Errorf("an empty event type: %v", err)
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

// The metrics name the kid that opened each delivery and the position of
// the secret that matched, and time each phase; a configured key or secret
// that nothing uses shows as 0.
func TestKeyAndSecretMetrics(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	// not the demo material, which may not be mixed with other material
	const newSecret, oldSecret = "whsec_the_new_secret_not_yet_used_0", "whsec_the_old_secret_still_in_use_0"
	h := &Handler{
		// a delivery signed with the old secret matches position 2
		SigningSecrets: []string{newSecret, oldSecret},
		DecryptionJWKS: []string{vectorsDir + "/keys/private.jwks.json"}, // k1 and k2
		DedupeDisabled: true,
	}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	families, err := ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, mf := range families {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				seen[mf.GetName()+"/"+l.GetName()+"="+l.GetValue()] = true
			}
		}
	}
	for _, want := range []string{
		"caddy_kayle_webhook_key_uses_total/kid=k1",
		"caddy_kayle_webhook_key_uses_total/kid=k2",
		"caddy_kayle_webhook_signing_secret_matches_total/position=1",
		"caddy_kayle_webhook_signing_secret_matches_total/position=2",
	} {
		if !seen[want] {
			t.Errorf("%s is not shown before any delivery", want)
		}
	}

	k1Before, k2Before := labeledCount(t, keyUsesTotal, "k1"), labeledCount(t, keyUsesTotal, "k2")
	pos1Before, pos2Before := labeledCount(t, secretMatchesTotal, "1"), labeledCount(t, secretMatchesTotal, "2")
	phasesBefore := map[string]uint64{}
	for _, p := range []string{phaseVerify, phaseDecrypt, phaseForward} {
		phasesBefore[p] = histogramCount(t, p)
	}
	keys, err := kayle.LoadJWKSFile(vectorsDir + "/keys/private.jwks.json")
	if err != nil {
		t.Fatal(err)
	}
	var k2 *rsa.PublicKey
	for _, k := range keys {
		if k.KID == "k2" {
			k2 = &k.Private.PublicKey
		}
	}
	backend := &testBackend{}
	for i := range 3 {
		body, err := kayle.EncryptDelivery(eventPayload("evt_metrics_"+strconv.Itoa(i)), k2, "k2", jose.A256GCM)
		if err != nil {
			t.Fatal(err)
		}
		res := serve(h, deliveryRequest(body, kayle.SignatureHeaderValue([]byte(oldSecret), time.Now(), body)), backend)
		if res.Status != http.StatusOK {
			t.Fatalf("status %d: %v", res.Status, res.Err)
		}
	}
	if got := labeledCount(t, keyUsesTotal, "k2") - k2Before; got != 3 {
		t.Errorf("key_uses_total{kid=k2} grew by %v, want 3", got)
	}
	if got := labeledCount(t, keyUsesTotal, "k1") - k1Before; got != 0 {
		t.Errorf("key_uses_total{kid=k1} grew by %v, want 0", got)
	}
	if got := labeledCount(t, secretMatchesTotal, "2") - pos2Before; got != 3 {
		t.Errorf("signing_secret_matches_total{position=2} grew by %v, want 3", got)
	}
	if got := labeledCount(t, secretMatchesTotal, "1") - pos1Before; got != 0 {
		t.Errorf("signing_secret_matches_total{position=1} grew by %v, want 0", got)
	}
	for p, before := range phasesBefore {
		if got := histogramCount(t, p) - before; got != 3 {
			t.Errorf("phase_duration_seconds{phase=%s} has %d more samples, want 3", p, got)
		}
	}
}

// With dedupe on, the dedupe_storage phase is timed once per delivery,
// forwarded or duplicate.
func TestDedupePhaseTimed(t *testing.T) {
	h := newTestHandler(t)
	before, forwardBefore := histogramCount(t, phaseDedupeStorage), histogramCount(t, phaseForward)
	backend := &testBackend{}
	payload := eventPayload("evt_phase")
	for range 2 {
		if res := serve(h, makeDelivery(t, payload, time.Now()), backend); res.Status != http.StatusOK {
			t.Fatalf("status %d: %v", res.Status, res.Err)
		}
	}
	if got := histogramCount(t, phaseDedupeStorage) - before; got != 2 {
		t.Errorf("dedupe_storage samples: %d, want 2", got)
	}
	if got := histogramCount(t, phaseForward) - forwardBefore; got != 1 {
		t.Errorf("forward samples: %d, want 1 (the duplicate is not forwarded)", got)
	}
}
