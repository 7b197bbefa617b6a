package kayle

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/go-jose/go-jose/v4"
)

// MinRSABits is the smallest key Kayle accepts for registration.
const MinRSABits = 2048

// LoadPrivateKeyFile reads one RSA private key: PEM (PKCS#8 or PKCS#1) or a
// JWK. The kid in a JWK, if any, is returned so a mismatch can be refused.
func LoadPrivateKeyFile(path string) (key *rsa.PrivateKey, jwkKID string, err error) {
	data, jwk, err := ReadKeyFile(path)
	if err != nil {
		return nil, "", err
	}
	if jwk != nil {
		key, err := privateKeyFromJWK(*jwk)
		if err != nil {
			return nil, "", fmt.Errorf("%s: %v", path, err)
		}
		return key, jwk.KeyID, nil
	}
	key, err = parsePrivateKeyPEM(data)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %v", path, err)
	}
	return key, "", nil
}

// ReadKeyFile reads a key file and, when it is JSON, parses it as a JWK.
func ReadKeyFile(path string) (data []byte, jwk *jose.JSONWebKey, err error) {
	data, err = os.ReadFile(path)
	if err != nil || !isJSON(data) {
		return data, nil, err
	}
	jwk = new(jose.JSONWebKey)
	if err := json.Unmarshal(data, jwk); err != nil {
		return nil, nil, fmt.Errorf("%s: not a valid JWK: %v", path, jsonErrorWithoutInput(err))
	}
	return data, jwk, nil
}

// LoadJWKSFile reads a JWKS of RSA private keys; every key must carry a kid.
func LoadJWKSFile(path string) ([]Key, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(data, &set); err != nil {
		return nil, fmt.Errorf("%s: not a valid JWKS: %v", path, jsonErrorWithoutInput(err))
	}
	if len(set.Keys) == 0 {
		return nil, fmt.Errorf("%s: the JWKS holds no keys", path)
	}
	keys := make([]Key, 0, len(set.Keys))
	for i, jwk := range set.Keys {
		if jwk.KeyID == "" {
			return nil, fmt.Errorf("%s: key #%d has no kid", path, i+1)
		}
		key, err := privateKeyFromJWK(jwk)
		if err != nil {
			return nil, fmt.Errorf("%s: key %q: %v", path, jwk.KeyID, err)
		}
		keys = append(keys, Key{KID: jwk.KeyID, Private: key})
	}
	return keys, nil
}

func privateKeyFromJWK(jwk jose.JSONWebKey) (*rsa.PrivateKey, error) {
	if jwk.Use != "" && jwk.Use != "enc" {
		return nil, fmt.Errorf("key use is %q, not \"enc\"", jwk.Use)
	}
	if jwk.Algorithm != "" && jwk.Algorithm != string(jose.RSA_OAEP_256) {
		return nil, fmt.Errorf("key alg is %q, not %q", jwk.Algorithm, jose.RSA_OAEP_256)
	}
	switch k := jwk.Key.(type) {
	case *rsa.PrivateKey:
		return checkRSAKey(k)
	case *rsa.PublicKey:
		return nil, errors.New("this is a public key; the gateway needs the private key")
	default:
		return nil, fmt.Errorf("not an RSA key (%T)", jwk.Key)
	}
}

func parsePrivateKeyPEM(data []byte) (*rsa.PrivateKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("neither PEM nor JSON")
	}
	switch block.Type {
	case "RSA PRIVATE KEY":
		key, err := x509.ParsePKCS1PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("bad PKCS#1 key: %v", err)
		}
		return checkRSAKey(key)
	case "PRIVATE KEY":
		parsed, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("bad PKCS#8 key: %v", err)
		}
		key, ok := parsed.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("not an RSA key (%T)", parsed)
		}
		return checkRSAKey(key)
	case "PUBLIC KEY", "RSA PUBLIC KEY":
		return nil, errors.New("this is a public key; the gateway needs the private key")
	case "ENCRYPTED PRIVATE KEY":
		return nil, errors.New("encrypted PEM keys are not supported; decrypt it with openssl first")
	default:
		return nil, fmt.Errorf("PEM block %q is not a private key", block.Type)
	}
}

func checkRSAKey(key *rsa.PrivateKey) (*rsa.PrivateKey, error) {
	if bits := key.N.BitLen(); bits < MinRSABits {
		return nil, fmt.Errorf("RSA key is %d bits; at least %d are required", bits, MinRSABits)
	}
	if err := key.Validate(); err != nil {
		return nil, fmt.Errorf("invalid RSA key: %v", err)
	}
	key.Precompute()
	return key, nil
}

func isJSON(data []byte) bool {
	return strings.HasPrefix(strings.TrimSpace(string(data)), "{")
}

// jsonErrorWithoutInput keeps key material out of error messages: a JSON
// syntax error quotes the offending character, so only its offset is kept.
func jsonErrorWithoutInput(err error) error {
	var syntax *json.SyntaxError
	if errors.As(err, &syntax) {
		return fmt.Errorf("JSON syntax error at byte %d", syntax.Offset)
	}
	return errors.New("JSON does not describe a key")
}

// LoadPublicKeyFile reads the RSA public key to encrypt a delivery to: a
// public key (PEM "PUBLIC KEY" or "RSA PUBLIC KEY", or a JWK) or a private
// key (PEM or JWK), whose public half is used. A JWK's kid is returned.
func LoadPublicKeyFile(path string) (pub *rsa.PublicKey, jwkKID string, err error) {
	data, jwk, err := ReadKeyFile(path)
	if err != nil {
		return nil, "", err
	}
	if jwk != nil {
		switch k := jwk.Key.(type) {
		case *rsa.PublicKey:
			return k, jwk.KeyID, nil
		case *rsa.PrivateKey:
			return &k.PublicKey, jwk.KeyID, nil
		default:
			return nil, "", fmt.Errorf("%s: not an RSA key (%T)", path, jwk.Key)
		}
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, "", fmt.Errorf("%s: neither PEM nor JSON", path)
	}
	switch block.Type {
	case "PUBLIC KEY":
		parsed, err := x509.ParsePKIXPublicKey(block.Bytes)
		if err != nil {
			return nil, "", fmt.Errorf("%s: bad public key: %v", path, err)
		}
		k, ok := parsed.(*rsa.PublicKey)
		if !ok {
			return nil, "", fmt.Errorf("%s: not an RSA key (%T)", path, parsed)
		}
		return k, "", nil
	case "RSA PUBLIC KEY":
		k, err := x509.ParsePKCS1PublicKey(block.Bytes)
		if err != nil {
			return nil, "", fmt.Errorf("%s: bad PKCS#1 public key: %v", path, err)
		}
		return k, "", nil
	}
	priv, err := parsePrivateKeyPEM(data)
	if err != nil {
		return nil, "", fmt.Errorf("%s: %v", path, err)
	}
	return &priv.PublicKey, "", nil
}
