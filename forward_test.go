package kaylewebhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
)

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

// checkStandardWebhook verifies a request as a Standard Webhooks receiver
// does: any v1 value in webhook-signature made with key over
// id.timestamp.body.
func checkStandardWebhook(h http.Header, body, key []byte) bool {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(h.Get("webhook-id") + "." + h.Get("webhook-timestamp") + "."))
	mac.Write(body)
	want := mac.Sum(nil)
	for value := range strings.FieldsSeq(h.Get("webhook-signature")) {
		version, encoded, _ := strings.Cut(value, ",")
		got, err := base64.StdEncoding.DecodeString(encoded)
		if version == "v1" && err == nil && hmac.Equal(got, want) {
			return true
		}
	}
	return false
}

func TestForwardIsSignedForTheBackend(t *testing.T) {
	oldKey := []byte("old forward key, 24 bytes or more")
	newKey := []byte("new forward key, 24 bytes or more")
	otherKey := []byte("a key the gateway does not have")
	t.Setenv("KAYLE_TEST_FORWARD_SECRET", "whsec_"+base64.StdEncoding.EncodeToString(newKey))
	clock := newTestClock(time.Unix(1780000000, 0))
	h := newTestHandler(t, func(h *Handler) {
		h.now = clock.Now
		h.ForwardSignatureSecrets = []string{
			"whsec_" + base64.StdEncoding.EncodeToString(oldKey),
			"{env.KAYLE_TEST_FORWARD_SECRET}",
		}
	})
	backend := &testBackend{}
	req := makeDelivery(t, eventPayload("evt_signed"), clock.Now())
	// a forged signature made with a key of the attacker's own must not survive
	forged := http.Header{"Webhook-Id": {"evt_signed"}, "Webhook-Timestamp": {"1780000000"}}
	forged.Set("Webhook-Signature", standardwebhooks.Signature([][]byte{otherKey}, "evt_signed", "1780000000", eventPayload("evt_signed")))
	for name, values := range forged {
		req.Header[name] = values
	}
	req.Header["webhook_signature"] = []string{"v1,Zm9yZ2Vk"}
	clock.Advance(2 * time.Second) // the forward is signed when it leaves, not when Kayle signed
	res := serve(h, req, backend)
	if res.Status != http.StatusOK || backend.Calls() != 1 {
		t.Fatalf("status %d, %d forwards, %v", res.Status, backend.Calls(), res.Err)
	}
	got := backend.Request(0)
	if id := got.Header.Get("webhook-id"); id != "evt_signed" {
		t.Errorf("webhook-id %q", id)
	}
	if ts := got.Header.Get("webhook-timestamp"); ts != strconv.FormatInt(clock.Now().Unix(), 10) {
		t.Errorf("webhook-timestamp %q, want the time of the forward", ts)
	}
	if n := len(strings.Fields(got.Header.Get("webhook-signature"))); n != 2 {
		t.Errorf("webhook-signature has %d values, want one per secret: %q", n, got.Header.Get("webhook-signature"))
	}
	for name, key := range map[string][]byte{"old": oldKey, "new": newKey} {
		if !checkStandardWebhook(got.Header, got.Body, key) {
			t.Errorf("a receiver with the %s secret refuses the forward", name)
		}
	}
	if checkStandardWebhook(got.Header, got.Body, otherKey) {
		t.Error("the attacker's webhook-signature reached the backend")
	}
	//lint:ignore SA1008 the non-canonical name is the attack: net/http keeps it as sent
	if _, ok := got.Header["webhook_signature"]; ok {
		t.Error("an inbound webhook_signature reached the backend")
	}
	tampered := append([]byte(nil), got.Body...)
	tampered[len(tampered)-2] ^= 1
	if checkStandardWebhook(got.Header, tampered, newKey) {
		t.Error("a changed body still verifies")
	}
}
