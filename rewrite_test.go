package kaylewebhook

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
)

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
