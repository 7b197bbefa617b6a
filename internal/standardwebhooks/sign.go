package standardwebhooks

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// The Standard Webhooks (standardwebhooks.com) headers the gateway signs a
// forward with, so a backend across a network can check with its language's
// Standard Webhooks library that the request came through the gateway.
const (
	HeaderWebhookID        = "Webhook-Id"
	HeaderWebhookTimestamp = "Webhook-Timestamp"
	HeaderWebhookSignature = "Webhook-Signature"
)

const (
	forwardSecretPrefix = "whsec_"
	// minForwardKeyLen is the Standard Webhooks floor for a secret's key.
	minForwardKeyLen = 24
)

var errForwardSecretFormat = errors.New("is not whsec_ followed by base64 (a Standard Webhooks secret)")

// ParseSecret decodes a "whsec_<base64>" secret into its HMAC key.
// Its errors never quote the secret.
func ParseSecret(secret string) ([]byte, error) {
	encoded, ok := strings.CutPrefix(secret, forwardSecretPrefix)
	if !ok || encoded == "" {
		return nil, errForwardSecretFormat
	}
	// padding is optional: some generators leave it off
	key, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(encoded, "="))
	if err != nil {
		return nil, errForwardSecretFormat
	}
	if len(key) < minForwardKeyLen {
		return nil, fmt.Errorf("decodes to %d bytes; Standard Webhooks wants at least %d", len(key), minForwardKeyLen)
	}
	return key, nil
}

// Signature is the webhook-signature value: one "v1,<base64 MAC>"
// per key, space separated, each HMAC-SHA256(key, id.timestamp.body).
func Signature(keys [][]byte, id, timestamp string, body []byte) string {
	values := make([]string, len(keys))
	for i, key := range keys {
		mac := hmac.New(sha256.New, key)
		mac.Write([]byte(id))
		mac.Write([]byte{'.'})
		mac.Write([]byte(timestamp))
		mac.Write([]byte{'.'})
		mac.Write(body)
		values[i] = "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
	}
	return strings.Join(values, " ")
}

// Sign sets the Standard Webhooks headers for body, signed at now.
func Sign(h http.Header, keys [][]byte, eventID string, now time.Time, body []byte) {
	timestamp := strconv.FormatInt(now.Unix(), 10)
	h.Set(HeaderWebhookID, eventID)
	h.Set(HeaderWebhookTimestamp, timestamp)
	h.Set(HeaderWebhookSignature, Signature(keys, eventID, timestamp, body))
}

// IsHeader reports whether an incoming header must be
// dropped because it could pass for the gateway's signature: every
// webhook-* name, folded like isGatewayHeader.
func IsHeader(name string) bool {
	return len(name) >= len("webhook-") &&
		strings.EqualFold(strings.ReplaceAll(name[:len("webhook-")], "_", "-"), "webhook-")
}
