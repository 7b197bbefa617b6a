package kaylewebhook

import (
	"crypto/rsa"
	"fmt"

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
