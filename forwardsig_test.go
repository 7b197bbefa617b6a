package kaylewebhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The known-answer example the Standard Webhooks specification and its
// reference libraries publish: a backend's library accepts our signature
// only if the key decoding, the signed content and the encoding all match.
func TestForwardSignatureKnownAnswer(t *testing.T) {
	key, err := standardwebhooks.ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		t.Fatal(err)
	}
	got := standardwebhooks.Signature([][]byte{key}, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", []byte(`{"test": 2432232314}`))
	if want := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

func TestParseForwardSecretRefuses(t *testing.T) {
	const payload = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	for name, secret := range map[string]string{
		"no prefix":      payload,
		"other prefix":   "whsex_" + payload,
		"prefix only":    "whsec_",
		"not base64":     "whsec_" + payload[:20] + "!!!!" + payload[24:],
		"url alphabet":   "whsec_" + strings.Repeat("_-", 16),
		"short key":      "whsec_" + base64.StdEncoding.EncodeToString([]byte("sixteen byte key")),
		"internal space": "whsec_" + payload[:16] + " " + payload[16:],
	} {
		_, err := standardwebhooks.ParseSecret(secret)
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if strings.Contains(err.Error(), payload[:16]) {
			t.Errorf("%s: the error quotes the secret: %v", name, err)
		}
	}
	// padding is optional
	unpadded := "whsec_" + base64.RawStdEncoding.EncodeToString([]byte("twenty-five bytes of key!"))
	if _, err := standardwebhooks.ParseSecret(unpadded); err != nil {
		t.Errorf("unpadded secret refused: %v", err)
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

// Without forward_signature a backend sees no webhook-* header at all: an
// inbound one would pass for the gateway's.
func TestInboundWebhookHeadersDroppedWhenUnsigned(t *testing.T) {
	h := newTestHandler(t)
	backend := &testBackend{}
	req := makeDelivery(t, eventPayload("evt_unsigned"), time.Now())
	req.Header.Set("Webhook-Id", "evt_unsigned")
	req.Header.Set("Webhook-Timestamp", "1780000000")
	req.Header.Set("Webhook-Signature", "v1,Zm9yZ2Vk")
	req.Header["webhook_id"] = []string{"evt_unsigned"}
	res := serve(h, req, backend)
	if res.Status != http.StatusOK || backend.Calls() != 1 {
		t.Fatalf("status %d, %d forwards, %v", res.Status, backend.Calls(), res.Err)
	}
	for name := range backend.Request(0).Header {
		if standardwebhooks.IsHeader(name) {
			t.Errorf("inbound %s reached the backend", name)
		}
	}
}

func TestForwardSignatureCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser("kayle_webhook {\n signing_secret s\n forward_signature {env.NEW}\n forward_signature whsec_old\n}")
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(h.ForwardSignatureSecrets, "|"); got != "{env.NEW}|whsec_old" {
		t.Errorf("secrets %q", got)
	}
	const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	for _, line := range []string{"forward_signature", "forward_signature " + secret + " " + secret} {
		d := caddyfile.NewTestDispenser("kayle_webhook {\n" + line + "\n}")
		err := new(Handler).UnmarshalCaddyfile(d)
		if err == nil {
			t.Errorf("%q accepted", line)
		} else if strings.Contains(err.Error(), secret) {
			t.Errorf("the error repeats the secret: %v", err)
		}
	}
}
