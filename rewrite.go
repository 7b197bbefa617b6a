package kaylewebhook

import (
	"bytes"
	"io"
	"net/http"
	"strconv"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2"
)

// rewriteRequest turns the verified delivery into the plaintext request the
// next handler sees, and publishes the ids as placeholders.
func rewriteRequest(r *http.Request, repl *caddy.Replacer, plaintext []byte, ev kayle.Event, kid, deliveryID string, sig kayle.Signature) {
	for name := range r.Header {
		if kayle.IsGatewayHeader(name) || standardwebhooks.IsHeader(name) {
			delete(r.Header, name)
		}
	}
	h := r.Header
	// the body is no longer the one the encoding headers described
	h.Del("Content-Encoding")
	h.Del("Transfer-Encoding")
	h.Del("Expect") // the body is here already; a 100 Continue would reach Kayle
	// reverse_proxy would drop the headers Connection names (ours included)
	// and could turn the forward into an upgraded tunnel
	h.Del("Connection")
	h.Del("Upgrade")
	r.TransferEncoding = nil
	r.Trailer = nil
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(plaintext)))
	// reverse_proxy drops a body whose ContentLength is 0 (caddy issue 6545)
	r.ContentLength = int64(len(plaintext))
	r.Body = io.NopCloser(bytes.NewReader(plaintext))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(plaintext)), nil }

	h.Set(kayle.HeaderEventID, ev.ID)
	setIfPresent(h, kayle.HeaderEventType, ev.Type)
	setIfPresent(h, kayle.HeaderEvent, ev.Type)
	setIfPresent(h, kayle.HeaderSessionID, ev.SessionID)
	setIfPresent(h, kayle.HeaderContractVersion, ev.ContractVersion)
	setIfPresent(h, kayle.HeaderKeyID, kid)
	h.Set(kayle.HeaderSignatureTimestamp, sig.Timestamp)
	h.Set(kayle.HeaderVerified, "true")
	// informative only; one value, and only one that is safe to log
	if deliveryID == "" {
		h.Del(kayle.HeaderDeliveryID)
	} else {
		h.Set(kayle.HeaderDeliveryID, deliveryID)
	}

	repl.Set("http.kayle.event_id", ev.ID)
	repl.Set("http.kayle.event_type", ev.Type)
	repl.Set("http.kayle.session_id", ev.SessionID)
	repl.Set("http.kayle.key_id", kid)
	repl.Set("http.kayle.duplicate", false)
}

func setIfPresent(h http.Header, name, value string) {
	if value != "" {
		h.Set(name, value)
	}
}
