package kaylewebhook

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

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
	if got := res.Rec.Header().Get(kayle.HeaderIgnored); got != "true" {
		t.Errorf("%s: %q", kayle.HeaderIgnored, got)
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
		if res.Status != http.StatusOK || res.Rec.Header().Get(kayle.HeaderIgnored) != "" {
			t.Errorf("%s: status %d, ignored %q", typ, res.Status, res.Rec.Header().Get(kayle.HeaderIgnored))
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

// The allowlist matches a type exactly: not by letter case, not by prefix.
// A backend switching on the type must never receive one it did not list.
func TestEventsAllowlistIsExact(t *testing.T) {
	h := newTestHandler(t, func(h *Handler) { h.Events = []string{"verification.session.succeeded"} })
	backend := &testBackend{}
	for _, typ := range []string{"Verification.Session.Succeeded", "VERIFICATION.SESSION.SUCCEEDED", "verification.session", "verification.session.succeeded.v2"} {
		res := serve(h, makeDelivery(t, typedPayload("evt_"+typ, typ), time.Now()), backend)
		if res.Status != http.StatusOK || res.Rec.Header().Get(kayle.HeaderIgnored) != "true" {
			t.Errorf("type %q: status %d, %s %q; want it ignored", typ, res.Status, kayle.HeaderIgnored, res.Rec.Header().Get(kayle.HeaderIgnored))
		}
	}
	if backend.Calls() != 0 {
		t.Errorf("%d near-matches forwarded, want none", backend.Calls())
	}
}
