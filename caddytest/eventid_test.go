package caddytest

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// The event id a backend reads in X-Kayle-Event-Id, over a real connection,
// is the id the gateway deduplicated on, byte for byte; an id that could not
// arrive so (net/http trims surrounding spaces as it writes a header, and a
// backend reads non-ASCII bytes as Latin-1) is refused with 422 and not
// forwarded. Ids differing only by surrounding spaces would otherwise be two
// events to the dedupe and one to the backend.
func TestBackendSeesTheDedupeKeyByteForByte(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())

	payload := func(id string) []byte {
		p, err := json.Marshal(map[string]any{
			"type":     "verification.session.succeeded",
			"metadata": map[string]any{"event_id": id, "verification_session_id": "vs_1"},
			"data":     map[string]any{},
		})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	send := func(id string) *http.Request {
		return deliveryRequest(t, gw.url(), encrypt(t, payload(id)), demo.Secret, time.Now(), "verification.session.succeeded")
	}

	suffix := randomHex(t, 6)
	for _, id := range []string{
		" evt_" + suffix, "evt_" + suffix + " ", "   ", "\tevt_" + suffix,
		"evt_é_" + suffix, "evt_\u00a0" + suffix, "evt_\u2028" + suffix, "evt_\x7f" + suffix,
	} {
		h.expect(send(id), http.StatusUnprocessableEntity)
	}
	if n := be.total(); n != 0 {
		t.Fatalf("backend got %d requests for ids it could not receive byte for byte, want 0", n)
	}

	for _, id := range []string{"evt_" + suffix, "evt with inner spaces " + suffix, "evt_~!#$%&'*+-.^`|" + suffix} {
		h.expectForwarded(send(id))
		reqs := be.requests()
		if got := reqs[len(reqs)-1].Header.Values(kayle.HeaderEventID); len(got) != 1 || got[0] != id {
			t.Errorf("backend read %s %q, the gateway deduplicated on %q", kayle.HeaderEventID, got, id)
		}
		h.expectDuplicate(send(id), id)
	}
}
