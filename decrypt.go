package kaylewebhook

import (
	"crypto/rsa"
	"errors"
	"fmt"
	"unsafe"

	"github.com/go-jose/go-jose/v4"
)

// The only algorithms a Kayle delivery may use; go-jose rejects anything else
// while parsing, before any key is touched.
var (
	allowedKeyAlgorithms     = []jose.KeyAlgorithm{jose.RSA_OAEP_256}
	allowedContentEncryption = []jose.ContentEncryption{jose.A128GCM, jose.A192GCM, jose.A256GCM}
)

// Decryption failures, told apart because they call for different answers:
// errUnknownKeyID is our misconfiguration (the sender is authenticated), the
// others are deliveries that can never be used.
var (
	errNotJWE       = errors.New("body is not a compact JWE with RSA-OAEP-256 and A128GCM, A192GCM or A256GCM")
	errUnknownKeyID = errors.New("JWE is encrypted to a key id this gateway holds no private key for")
	errDecrypt      = errors.New("JWE does not decrypt with the private key(s) tried (wrong key, or tampered ciphertext)")
)

// decryptionKey is one private key and the kid Kayle knows it by.
type decryptionKey struct {
	kid string
	key *rsa.PrivateKey
}

// keyRing holds the private keys, in configuration order, looked up by kid.
type keyRing struct {
	keys  []decryptionKey
	byKID map[string]*rsa.PrivateKey
}

func (kr *keyRing) add(kid string, key *rsa.PrivateKey) error {
	if kid == "" {
		return errors.New("a decryption key needs a key id (kid)")
	}
	if _, dup := kr.byKID[kid]; dup {
		return fmt.Errorf("two decryption keys have the key id %q", kid)
	}
	if kr.byKID == nil {
		kr.byKID = make(map[string]*rsa.PrivateKey)
	}
	kr.byKID[kid] = key
	kr.keys = append(kr.keys, decryptionKey{kid: kid, key: key})
	return nil
}

// decrypt parses body as a compact JWE restricted to Kayle's algorithms and
// decrypts it with the key its kid names, or with each key in turn when it
// names none. It returns the plaintext and the kid of the key that worked.
func (kr *keyRing) decrypt(body []byte) (plaintext []byte, kid string, err error) {
	if len(body) == 0 {
		return nil, "", fmt.Errorf("%w: empty body", errNotJWE)
	}
	// ParseEncryptedCompact, not ParseEncrypted: the latter strips whitespace
	// from the whole input byte by byte first, which costs more than the RSA.
	// The body is viewed as a string, not copied (a 1.4 MB body was copied
	// whole): the parser only base64-decodes its parts into new slices and
	// keeps none of it, and nothing writes to the body.
	obj, err := jose.ParseEncryptedCompact(unsafe.String(&body[0], len(body)), allowedKeyAlgorithms, allowedContentEncryption)
	if err != nil {
		return nil, "", fmt.Errorf("%w: %v", errNotJWE, err)
	}
	// Kayle does not compress; go-jose would inflate up to ten times the body
	if _, compressed := obj.Header.ExtraHeaders["zip"]; compressed {
		return nil, "", fmt.Errorf("%w: compressed (zip) JWEs are not accepted", errNotJWE)
	}
	if kid = obj.Header.KeyID; kid != "" {
		key, ok := kr.byKID[kid]
		if !ok {
			return nil, kid, errUnknownKeyID
		}
		plaintext, err = obj.Decrypt(key)
		if err != nil {
			return nil, kid, errDecrypt
		}
		return plaintext, kid, nil
	}
	for _, k := range kr.keys {
		if plaintext, err = obj.Decrypt(k.key); err == nil {
			return plaintext, k.kid, nil
		}
	}
	return nil, "", errDecrypt
}
