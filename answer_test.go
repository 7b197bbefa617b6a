package kaylewebhook

import (
	"bytes"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/go-jose/go-jose/v4"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// A flood of forged deliveries is counted one by one but logged at most
// rejectLogBurst times a second: an attacker cannot flood the logs, nor
// make each refusal cost a log line.
func TestRejectionsLoggedSampledCountedAll(t *testing.T) {
	h := newTestHandler(t)
	core, logs := observer.New(zapcore.InfoLevel)
	h.setLogger(zap.New(core))
	before := counterValue(t, requestsTotal.WithLabelValues("rejected_signature"))

	const forged = 200
	body, _ := signDelivery(t, eventPayload("evt_forged_flood"), time.Now())
	forgedSig := kayle.SignatureHeaderValue([]byte("whsec_the_attackers_own_secret_0123"), time.Now(), body)
	began := time.Now()
	for range forged {
		if res := serve(h, deliveryRequest(body, forgedSig), &testBackend{}); res.Status != http.StatusBadRequest {
			t.Fatalf("forged delivery answered %d, want 400", res.Status)
		}
	}
	seconds := int(time.Since(began)/time.Second) + 2 // the sampler's ticks the loop may span
	if got := counterValue(t, requestsTotal.WithLabelValues("rejected_signature")) - before; got != forged {
		t.Errorf("counted %v refusals, want %d", got, forged)
	}
	lines := logs.FilterMessage("rejected delivery").Len()
	if lines == 0 || lines > seconds*rejectLogBurst {
		t.Errorf("%d refusal log lines for %d forged deliveries in under %d s; want between 1 and %d", lines, forged, seconds, seconds*rejectLogBurst)
	}
}

// Every refusal the gateway answers itself names its reason in
// X-Kayle-Refused, one fixed word, so an operator testing a setup (kayle
// send) sees why; a forwarded delivery carries none.
func TestRefusalsCarryTheirReason(t *testing.T) {
	now := time.Now()
	genuine, sig := signDelivery(t, eventPayload("evt_reasons"), now)
	signed := func(body []byte) *http.Request {
		return deliveryRequest(body, kayle.SignatureHeaderValue([]byte(demoSecret(t)), now, body))
	}
	unknownKID, err := kayle.EncryptDelivery(eventPayload("evt_unknown_kid"), demoPublicKey(t), "k-not-configured", jose.A256GCM)
	if err != nil {
		t.Fatal(err)
	}
	notJSON, err := kayle.EncryptDelivery([]byte("not json"), demoPublicKey(t), demoKID, jose.A256GCM)
	if err != nil {
		t.Fatal(err)
	}
	get := deliveryRequest(genuine, sig)
	get.Method = http.MethodGet
	noSig := deliveryRequest(genuine, sig)
	noSig.Header.Del(kayle.SignatureHeader)
	for _, c := range []struct {
		name   string
		req    *http.Request
		status int
		reason string
	}{
		{"GET", get, http.StatusMethodNotAllowed, "method_not_allowed"},
		{"no signature", noSig, http.StatusBadRequest, "signature_missing"},
		{"malformed signature", deliveryRequest(genuine, "t=now,v1=zz"), http.StatusBadRequest, "signature_malformed"},
		{"other secret", deliveryRequest(genuine, kayle.SignatureHeaderValue([]byte("whsec_an_attackers_secret_0123456"), now, genuine)), http.StatusBadRequest, "signature_mismatch"},
		{"stale", deliveryRequest(genuine, kayle.SignatureHeaderValue([]byte(demoSecret(t)), now.Add(-10*time.Minute), genuine)), http.StatusBadRequest, "signature_expired"},
		{"too large", signed(bytes.Repeat([]byte("a"), 2048)), http.StatusRequestEntityTooLarge, "body_too_large"},
		{"not a JWE", signed([]byte("not.a.jwe")), http.StatusUnprocessableEntity, "jwe_invalid"},
		{"not JSON", signed(notJSON), http.StatusUnprocessableEntity, "payload_invalid"},
		{"unknown kid", signed(unknownKID), http.StatusInternalServerError, "unknown_kid"},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newTestHandler(t, func(h *Handler) { h.MaxBodySize = 1500 })
			backend := &testBackend{}
			res := serve(h, c.req, backend)
			if res.Status != c.status || backend.Calls() != 0 {
				t.Fatalf("status %d, %d forwards; want %d and none", res.Status, backend.Calls(), c.status)
			}
			if got := res.Rec.Header().Get(kayle.HeaderRefused); got != c.reason {
				t.Errorf("%s = %q, want %q", kayle.HeaderRefused, got, c.reason)
			}
		})
	}
	t.Run("forwarded", func(t *testing.T) {
		h := newTestHandler(t)
		res := serve(h, deliveryRequest(genuine, sig), &testBackend{})
		if res.Status != http.StatusOK || res.Rec.Header().Get(kayle.HeaderRefused) != "" {
			t.Errorf("status %d, %s %q; want 200 and none", res.Status, kayle.HeaderRefused, res.Rec.Header().Get(kayle.HeaderRefused))
		}
	})
	t.Run("storage down", func(t *testing.T) {
		h := newTestHandler(t)
		st := newMemStorage()
		st.fail("Lock", errInjected)
		h.dedupe = newTestDeduper(st, newTestClock(now))
		res := serve(h, deliveryRequest(genuine, sig), &testBackend{})
		if res.Status != http.StatusServiceUnavailable || res.Rec.Header().Get(kayle.HeaderRefused) != "storage_unavailable" {
			t.Errorf("status %d, %s %q; want 503 and storage_unavailable", res.Status, kayle.HeaderRefused, res.Rec.Header().Get(kayle.HeaderRefused))
		}
	})
}
