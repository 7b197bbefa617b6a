package kayle

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/go-jose/go-jose/v4"
)

// EncryptDelivery makes a delivery body as Kayle does: the payload encrypted
// to pub with RSA-OAEP-256 and enc, as a compact JWE whose protected header
// carries kid (none when kid is empty). Sign it with SignatureHeaderValue.
// The kayle send command and the tests use it; the gateway never encrypts.
func EncryptDelivery(payload []byte, pub *rsa.PublicKey, kid string, enc jose.ContentEncryption) ([]byte, error) {
	recipient := jose.Recipient{Algorithm: jose.RSA_OAEP_256, Key: pub, KeyID: kid}
	encrypter, err := jose.NewEncrypter(enc, recipient, nil)
	if err != nil {
		return nil, fmt.Errorf("making encrypter: %v", err)
	}
	obj, err := encrypter.Encrypt(payload)
	if err != nil {
		return nil, fmt.Errorf("encrypting: %v", err)
	}
	compact, err := obj.CompactSerialize()
	if err != nil {
		return nil, err
	}
	return []byte(compact), nil
}

// SamplePayload is a plaintext shaped as Kayle's for eventType, with obviously
// fictitious personal data.
func SamplePayload(eventType, eventID string) ([]byte, error) {
	type metadata struct {
		ContractVersion int    `json:"contract_version"`
		EventID         string `json:"event_id"`
		SessionID       string `json:"verification_session_id"`
	}
	var data map[string]any
	switch eventType {
	case "verification.session.succeeded":
		data = map[string]any{
			"claims": map[string]any{
				"age_over_18":       true,
				"date_of_birth":     "1995-04-12",
				"family_name":       "Curie",
				"given_names":       "Marie",
				"kayle_document_id": "kdid_" + RandomHex(12),
			},
			"selected_field_keys": []string{"age_over_18", "date_of_birth", "family_name", "given_names", "kayle_document_id"},
		}
	case "verification.session.failed":
		data = map[string]any{"failure_code": "liveness_failed", "nfc_tries_used": 1, "liveness_tries_used": 3}
	case "verification.session.cancelled":
		data = map[string]any{"outcome": "not_verified", "reason": "cancelled", "nfc_tries_used": 0, "liveness_tries_used": 1}
	default: // expired, and types this tool does not know: Kayle adds new ones
		data = map[string]any{}
	}
	return json.Marshal(struct {
		Type     string         `json:"type"`
		Metadata metadata       `json:"metadata"`
		Data     map[string]any `json:"data"`
	}{eventType, metadata{1, eventID, "vs_" + RandomHex(12)}, data})
}

// FlipCiphertextByte changes one byte of the JWE ciphertext (the 4th part),
// decoding and re-encoding so the part stays valid base64url and the change
// is a real one (not in the last character's padding bits).
func FlipCiphertextByte(jwe []byte) ([]byte, error) {
	parts := strings.Split(string(jwe), ".")
	if len(parts) != 5 {
		return nil, errors.New("the JWE does not have 5 parts")
	}
	ct, err := base64.RawURLEncoding.DecodeString(parts[3])
	if err != nil {
		return nil, err
	}
	if len(ct) == 0 {
		return nil, errors.New("--corrupt ciphertext: the payload is empty, so there is no ciphertext to corrupt")
	}
	ct[len(ct)/2] ^= 0x01
	parts[3] = base64.RawURLEncoding.EncodeToString(ct)
	return []byte(strings.Join(parts, ".")), nil
}

// FlipLastHexDigit changes the last character of a signature header (a v1
// hex digit) to another lowercase hex digit: still well formed, now wrong.
func FlipLastHexDigit(header string) string {
	const digits = "0123456789abcdef"
	last := len(header) - 1
	i := strings.IndexByte(digits, header[last])
	return header[:last] + string(digits[i^1])
}

// RandomHex is n random bytes in hex: fresh ids for samples and kids.
func RandomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return hex.EncodeToString(b)
}
