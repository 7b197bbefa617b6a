package kayle

import "strings"

// Headers the backend receives. Only the gateway sets them: any incoming
// X-Kayle-* header but X-Kayle-Delivery-Id is removed first, and so is any
// incoming webhook-* header (the gateway's forward signature, package standardwebhooks).
const (
	HeaderEventID            = "X-Kayle-Event-Id"
	HeaderEventType          = "X-Kayle-Event-Type"
	HeaderSessionID          = "X-Kayle-Session-Id"
	HeaderContractVersion    = "X-Kayle-Contract-Version"
	HeaderKeyID              = "X-Kayle-Key-Id"
	HeaderSignatureTimestamp = "X-Kayle-Signature-Timestamp"
	HeaderVerified           = "X-Kayle-Verified"
	HeaderDuplicate          = "X-Kayle-Duplicate"
	// HeaderIgnored marks the answer to a delivery whose type is not in the
	// events allowlist: acknowledged so Kayle stops retrying, never forwarded.
	HeaderIgnored = "X-Kayle-Ignored"
	// HeaderQueued marks the 202 answer to a delivery the queue stored, to
	// be forwarded from there.
	HeaderQueued = "X-Kayle-Queued"
	// HeaderRefused carries, on every refusal the gateway answers itself, one
	// fixed word saying why (signature_mismatch, jwe_invalid, …): never a
	// secret or a byte of the delivery.
	HeaderRefused = "X-Kayle-Refused"
	// HeaderEvent is Kayle's own unsigned type header; the gateway overwrites
	// it with the decrypted type so a backend reading it is not misled.
	HeaderEvent = "X-Kayle-Event"
	// HeaderDeliveryID is Kayle's per-attempt id. It is not signed, so it is
	// passed through as information only.
	HeaderDeliveryID = "X-Kayle-Delivery-Id"
)

// IsGatewayHeader reports whether an incoming header must be dropped: every
// X-Kayle-* header but the informative delivery id. Case and '_' for '-' are
// folded, since CGI-style backends read X_Kayle_Event_Id as X-Kayle-Event-Id
// and a name net/http cannot canonicalize arrives as sent.
func IsGatewayHeader(name string) bool {
	if len(name) < len("x-kayle-") {
		return false
	}
	folded := strings.ToLower(strings.ReplaceAll(name, "_", "-"))
	return strings.HasPrefix(folded, "x-kayle-") && name != HeaderDeliveryID
}
