package kaylewebhook

import (
	"bytes"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// Headers the backend receives. Only the gateway sets them: any incoming
// X-Kayle-* header but X-Kayle-Delivery-Id is removed first, and so is any
// incoming webhook-* header (the gateway's forward signature, forwardsig.go).
const (
	HeaderEventID            = "X-Kayle-Event-Id"
	HeaderEventType          = "X-Kayle-Event-Type"
	HeaderSessionID          = "X-Kayle-Session-Id"
	HeaderContractVersion    = "X-Kayle-Contract-Version"
	HeaderKeyID              = "X-Kayle-Key-Id"
	HeaderSignatureTimestamp = "X-Kayle-Signature-Timestamp"
	HeaderVerified           = "X-Kayle-Verified"
	HeaderDuplicate          = "X-Kayle-Duplicate"
	// HeaderEvent is Kayle's own unsigned type header; the gateway overwrites
	// it with the decrypted type so a backend reading it is not misled.
	HeaderEvent = "X-Kayle-Event"
	// HeaderDeliveryID is Kayle's per-attempt id. It is not signed, so it is
	// passed through as information only.
	HeaderDeliveryID = "X-Kayle-Delivery-Id"
)

// isGatewayHeader reports whether an incoming header must be dropped: every
// X-Kayle-* header but the informative delivery id. Case and '_' for '-' are
// folded, since CGI-style backends read X_Kayle_Event_Id as X-Kayle-Event-Id
// and a name net/http cannot canonicalize arrives as sent.
func isGatewayHeader(name string) bool {
	if len(name) < len("x-kayle-") {
		return false
	}
	folded := strings.ToLower(strings.ReplaceAll(name, "_", "-"))
	return strings.HasPrefix(folded, "x-kayle-") && name != HeaderDeliveryID
}

// rewriteRequest turns the verified delivery into the plaintext request the
// next handler sees, and publishes the ids as placeholders.
func rewriteRequest(r *http.Request, repl *caddy.Replacer, plaintext []byte, ev event, kid, deliveryID string, sig signature) {
	for name := range r.Header {
		if isGatewayHeader(name) || isStandardWebhooksHeader(name) {
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

	h.Set(HeaderEventID, ev.ID)
	setIfPresent(h, HeaderEventType, ev.Type)
	setIfPresent(h, HeaderEvent, ev.Type)
	setIfPresent(h, HeaderSessionID, ev.SessionID)
	setIfPresent(h, HeaderContractVersion, ev.ContractVersion)
	setIfPresent(h, HeaderKeyID, kid)
	h.Set(HeaderSignatureTimestamp, sig.timestamp)
	h.Set(HeaderVerified, "true")
	// informative only; one value, and only one that is safe to log
	if deliveryID == "" {
		h.Del(HeaderDeliveryID)
	} else {
		h.Set(HeaderDeliveryID, deliveryID)
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
