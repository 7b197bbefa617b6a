package kayle

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/go-jose/go-jose/v4"
)

// The only algorithms a Kayle delivery may use; go-jose rejects anything else
// while parsing, before any key is touched.
var (
	allowedKeyAlgorithms     = []jose.KeyAlgorithm{jose.RSA_OAEP_256}
	allowedContentEncryption = []jose.ContentEncryption{jose.A128GCM, jose.A192GCM, jose.A256GCM}
)

// Decryption failures, told apart because they call for different answers:
// ErrUnknownKeyID is our misconfiguration (the sender is authenticated), the
// others are deliveries that can never be used.
var (
	ErrNotJWE       = errors.New("body is not a compact JWE with RSA-OAEP-256 and A128GCM, A192GCM or A256GCM")
	ErrUnknownKeyID = errors.New("JWE is encrypted to a key id this gateway holds no private key for")
	ErrDecrypt      = errors.New("JWE does not decrypt with the private key(s) tried (wrong key, or tampered ciphertext)")
)

// Key is one private key and the kid Kayle knows it by.
type Key struct {
	KID     string
	Private *rsa.PrivateKey
}

// KeyRing holds the private keys, in configuration order, looked up by kid.
type KeyRing struct {
	Keys    []Key
	byKID   map[string]*rsa.PrivateKey
	headers *headerCache // made by add
}

// joseHeader is what decrypt needs of a protected header go-jose accepted.
type joseHeader struct {
	kid       string
	keySize   int // of the content key, by enc
	zip, crit bool
	// aad is AES-GCM's additional data: the protected header as go-jose
	// authenticates it, its canonical base64 (the part as sent, from any
	// encoder). Shared by every delivery with this header: read only.
	aad []byte
}

// headerCache keeps go-jose's verdict on the protected headers it accepted,
// by their bytes. Kayle sends the same few headers (one per kid and enc)
// with every delivery, and only signed deliveries are decrypted; it is
// bounded all the same. go-jose's JSON parse of the header is, after RSA,
// the largest part of the gateway's own work per delivery (BENCHMARKS.md).
type headerCache struct {
	byBytes sync.Map // string(protected header part) -> joseHeader
	size    atomic.Int32
}

// The cache's bounds: Kayle's headers are about 100 bytes.
const (
	maxCachedHeaders   = 64
	maxCachedHeaderLen = 512
)

func (kr *KeyRing) Add(kid string, key *rsa.PrivateKey) error {
	if kid == "" {
		return errors.New("a decryption key needs a key id (kid)")
	}
	if _, dup := kr.byKID[kid]; dup {
		return fmt.Errorf("two decryption keys have the key id %q", kid)
	}
	if kr.byKID == nil {
		kr.byKID = make(map[string]*rsa.PrivateKey)
		kr.headers = &headerCache{}
	}
	kr.byKID[kid] = key
	kr.Keys = append(kr.Keys, Key{KID: kid, Private: key})
	return nil
}

// Decrypt parses body as a compact JWE restricted to Kayle's algorithms and
// decrypts it with the key its kid names, or with each key in turn when it
// names none. It returns the plaintext and the kid of the key that worked.
//
// go-jose parses and checks the protected header (once per distinct
// header); the small parts are decoded here, and the ciphertext is decoded
// once, into a buffer that AES-GCM then decrypts in place. (go-jose's own
// Decrypt makes three copies of it: decoded, joined to the tag, and the
// plaintext.)
func (kr *KeyRing) Decrypt(body []byte) (plaintext []byte, kid string, err error) {
	parts, ok := compactParts(body)
	if !ok {
		return nil, "", fmt.Errorf("%w: not five dot-separated parts", ErrNotJWE)
	}
	header, err := kr.header(parts)
	if err != nil {
		return nil, "", fmt.Errorf("%w: %v", ErrNotJWE, err)
	}
	// Kayle does not compress; go-jose would inflate up to ten times the body
	if header.zip {
		return nil, "", fmt.Errorf("%w: compressed (zip) JWEs are not accepted", ErrNotJWE)
	}
	// go-jose decoded these too when it parsed the header; not when the
	// header's verdict came from the cache
	b64 := base64.RawURLEncoding
	wrapped, err := b64.AppendDecode(nil, parts[1])
	if err != nil {
		return nil, "", fmt.Errorf("%w: encrypted key: %v", ErrNotJWE, err)
	}
	iv, err := b64.AppendDecode(nil, parts[2])
	if err != nil {
		return nil, "", fmt.Errorf("%w: iv: %v", ErrNotJWE, err)
	}
	sealed, tagLen, err := decodeSealed(parts[3], parts[4])
	if err != nil {
		return nil, "", fmt.Errorf("%w: %v", ErrNotJWE, err)
	}
	keys := kr.Keys
	if kid = header.kid; kid != "" {
		key, ok := kr.byKID[kid]
		if !ok {
			return nil, kid, ErrUnknownKeyID
		}
		keys = []Key{{KID: kid, Private: key}}
	}
	// No critical extension is understood here (go-jose's Decrypt refuses any too)
	if header.crit {
		return nil, kid, ErrDecrypt
	}
	for _, k := range keys {
		// a wrong key fails OAEP's padding check; a tampered key or content
		// passes it with negligible chance, so the first key that unwraps is
		// the one (the in-place Open below cannot be retried)
		cek, err := unwrapKey(wrapped, k.Private, header.keySize)
		if err != nil {
			continue
		}
		if plaintext, err = openSealed(cek, header.aad, iv, sealed, tagLen); err != nil {
			return nil, kid, ErrDecrypt
		}
		return plaintext, k.KID, nil
	}
	return nil, kid, ErrDecrypt
}

// header returns go-jose's verdict on the JWE's protected header: from the
// cache, or by parsing the same JWE with an empty ciphertext (go-jose
// checks the allowlists and types, and decodes the small parts, not the big
// one). ParseEncryptedCompact, not ParseEncrypted: the latter strips
// whitespace from the whole input byte by byte first.
func (kr *KeyRing) header(parts [5][]byte) (joseHeader, error) {
	if kr.headers != nil {
		if cached, ok := kr.headers.byBytes.Load(string(parts[0])); ok {
			return cached.(joseHeader), nil
		}
	}
	headerOnly := string(parts[0]) + "." + string(parts[1]) + "." + string(parts[2]) + ".." + string(parts[4])
	obj, err := jose.ParseEncryptedCompact(headerOnly, allowedKeyAlgorithms, allowedContentEncryption)
	if err != nil {
		return joseHeader{}, err
	}
	enc, _ := obj.Header.ExtraHeaders["enc"].(string)
	_, zip := obj.Header.ExtraHeaders["zip"]
	raw, err := base64.RawURLEncoding.AppendDecode(nil, parts[0])
	if err != nil {
		return joseHeader{}, err // cannot happen: go-jose decoded it
	}
	header := joseHeader{kid: obj.Header.KeyID, keySize: contentKeySize[enc], zip: zip, crit: hasCrit(raw),
		aad: base64.RawURLEncoding.AppendEncode(nil, raw)}
	if c := kr.headers; c != nil && len(parts[0]) <= maxCachedHeaderLen && c.size.Load() < maxCachedHeaders {
		if _, loaded := c.byBytes.LoadOrStore(string(parts[0]), header); !loaded {
			c.size.Add(1)
		}
	}
	return header, nil
}

// hasCrit reports whether the decoded protected header go-jose accepted
// names a "crit" member, as go-jose's Decrypt checks it: by its presence,
// so also "crit": null, which go-jose's ExtraHeaders leaves out.
func hasCrit(raw []byte) bool {
	var members map[string]json.RawMessage
	if json.Unmarshal(raw, &members) != nil {
		return true
	}
	_, crit := members["crit"]
	return crit
}

// contentKeySize is the AES key length each allowed enc needs.
var contentKeySize = map[string]int{
	string(jose.A128GCM): 16,
	string(jose.A192GCM): 24,
	string(jose.A256GCM): 32,
}

// compactParts splits a compact serialization into its five parts, as views
// of body.
func compactParts(body []byte) (parts [5][]byte, ok bool) {
	rest := body
	for i := range 4 {
		var found bool
		parts[i], rest, found = bytes.Cut(rest, []byte{'.'})
		if !found {
			return parts, false
		}
	}
	parts[4] = rest
	return parts, bytes.IndexByte(rest, '.') < 0
}

// decodeSealed decodes the ciphertext and the tag after it into one buffer,
// the form AES-GCM opens, and says how long the tag was.
func decodeSealed(ciphertext, tag []byte) (sealed []byte, tagLen int, err error) {
	b64 := base64.RawURLEncoding
	sealed = make([]byte, b64.DecodedLen(len(ciphertext)), b64.DecodedLen(len(ciphertext))+b64.DecodedLen(len(tag)))
	n, err := b64.Decode(sealed, ciphertext)
	if err != nil {
		return nil, 0, err
	}
	sealed, err = b64.AppendDecode(sealed[:n], tag)
	return sealed, len(sealed) - n, err
}

// unwrapKey decrypts the content key with RSA-OAEP-256 (SHA-256, empty label).
func unwrapKey(wrapped []byte, key *rsa.PrivateKey, keySize int) ([]byte, error) {
	cek, err := rsa.DecryptOAEP(sha256.New(), nil, key, wrapped, nil)
	if err != nil {
		return nil, err
	}
	if len(cek) != keySize {
		return nil, ErrDecrypt
	}
	return cek, nil
}

// openSealed checks and decrypts sealed in place with AES-GCM.
func openSealed(cek, aad, iv, sealed []byte, tagLen int) ([]byte, error) {
	block, err := aes.NewCipher(cek)
	if err != nil {
		return nil, err
	}
	gcm, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	if len(iv) != gcm.NonceSize() || tagLen != gcm.Overhead() {
		return nil, ErrDecrypt
	}
	return gcm.Open(sealed[:0], iv, sealed, aad)
}
