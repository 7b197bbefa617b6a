package kayle

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
	"github.com/go-jose/go-jose/v4"
)

func writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func pemFile(t *testing.T, blockType string, der []byte) string {
	return writeFile(t, "key.pem", pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der}))
}

func jwkFile(t *testing.T, jwk jose.JSONWebKey) string {
	t.Helper()
	data, err := json.Marshal(jwk)
	if err != nil {
		t.Fatal(err)
	}
	return writeFile(t, "key.jwk.json", data)
}

func TestLoadPrivateKeyFileFormats(t *testing.T) {
	demo, err := kayletest.LoadDemoKey()
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(demo)
	files := map[string]string{
		"pkcs8 pem":        pemFile(t, "PRIVATE KEY", pkcs8),
		"pkcs1 pem":        pemFile(t, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(demo)),
		"jwk":              jwkFile(t, jose.JSONWebKey{Key: demo, KeyID: "demo", Algorithm: "RSA-OAEP-256", Use: "enc"}),
		"vectors pkcs8":    filepath.Join(kayletest.VectorsDir, "keys/k1.pkcs8.pem"),
		"vectors pkcs1":    filepath.Join(kayletest.VectorsDir, "keys/k1.pkcs1.pem"),
		"vectors jwk 3072": filepath.Join(kayletest.VectorsDir, "keys/k2.private.jwk.json"),
	}
	for name, path := range files {
		key, _, err := LoadPrivateKeyFile(path)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if key.N.BitLen() < MinRSABits {
			t.Errorf("%s: %d bits", name, key.N.BitLen())
		}
	}
	if _, kid, _ := LoadPrivateKeyFile(files["jwk"]); kid != "demo" {
		t.Errorf("JWK kid %q, want demo", kid)
	}
	keys, err := LoadJWKSFile(filepath.Join(kayletest.VectorsDir, "keys/private.jwks.json"))
	if err != nil || len(keys) != 2 || keys[0].KID != "k1" || keys[1].KID != "k2" {
		t.Errorf("JWKS: %v %v", keys, err)
	}
}

func TestLoadPrivateKeyFileRefuses(t *testing.T) {
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	smallPKCS8, _ := x509.MarshalPKCS8PrivateKey(small)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecPKCS8, _ := x509.MarshalPKCS8PrivateKey(ec)
	demo, _ := kayletest.LoadDemoKey()
	pubDER, _ := x509.MarshalPKIXPublicKey(&demo.PublicKey)
	corrupt := *demo
	corrupt.D = new(big.Int).Add(demo.D, big.NewInt(2))
	corrupt.Precomputed = rsa.PrecomputedValues{}

	cases := map[string]struct {
		path string
		want string
	}{
		"missing file":         {filepath.Join(t.TempDir(), "nope.pem"), "no such file"},
		"small key":            {pemFile(t, "PRIVATE KEY", smallPKCS8), "1024 bits"},
		"ec key":               {pemFile(t, "PRIVATE KEY", ecPKCS8), "not an RSA key"},
		"public pem":           {pemFile(t, "PUBLIC KEY", pubDER), "public key"},
		"public jwk":           {filepath.Join(kayletest.VectorsDir, "keys/k1.public.jwk.json"), "public key"},
		"encrypted pem":        {pemFile(t, "ENCRYPTED PRIVATE KEY", []byte{1, 2, 3}), "encrypted"},
		"certificate":          {pemFile(t, "CERTIFICATE", []byte{1, 2, 3}), "not a private key"},
		"garbage":              {writeFile(t, "k", []byte("hello")), "neither PEM nor JSON"},
		"truncated pkcs1":      {pemFile(t, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(demo)[:100]), "bad PKCS#1"},
		"bad json":             {writeFile(t, "k.json", []byte(`{"kty":"RSA",`)), "not a valid JWK"},
		"jwk for signing":      {jwkFile(t, jose.JSONWebKey{Key: demo, KeyID: "x", Use: "sig"}), "use"},
		"jwk other alg":        {jwkFile(t, jose.JSONWebKey{Key: demo, KeyID: "x", Algorithm: "RSA1_5"}), "alg"},
		"inconsistent rsa key": {pemFile(t, "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(&corrupt)), "bad PKCS#1"},
	}
	for name, c := range cases {
		_, _, err := LoadPrivateKeyFile(c.path)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error containing %q", name, err, c.want)
		}
	}
}

func TestLoadJWKSRefuses(t *testing.T) {
	demo, _ := kayletest.LoadDemoKey()
	noKID, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: demo}}})
	public, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &demo.PublicKey, KeyID: "p"}}})
	cases := map[string]struct {
		data []byte
		want string
	}{
		"empty set":  {[]byte(`{"keys":[]}`), "no keys"},
		"no kid":     {noKID, "no kid"},
		"public key": {public, "public key"},
		"not json":   {[]byte("keys"), "not a valid JWKS"},
	}
	for name, c := range cases {
		if _, err := LoadJWKSFile(writeFile(t, "set.json", c.data)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want %q", name, err, c.want)
		}
	}
}

// A key file's bytes must not reach an error message: a JSON syntax error
// would otherwise quote the character it stopped at.
func TestKeyErrorsDoNotQuoteTheFile(t *testing.T) {
	path := writeFile(t, "k.json", []byte(`{"kty":"RSA","d":"SECRETMATERIAL"Z}`))
	_, _, err := LoadPrivateKeyFile(path)
	if err == nil || strings.Contains(err.Error(), "'Z'") || strings.Contains(err.Error(), "SECRET") {
		t.Fatalf("error quotes the key file: %v", err)
	}
}

func TestLoadPublicKeyFile(t *testing.T) {
	demo, _ := kayletest.LoadDemoKey()
	pubDER, _ := x509.MarshalPKIXPublicKey(&demo.PublicKey)
	for name, path := range map[string]string{
		"private pem": kayletest.DemoKeyFile,
		"spki pem":    pemFile(t, "PUBLIC KEY", pubDER),
		"pkcs1 pem":   pemFile(t, "RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(&demo.PublicKey)),
		"public jwk":  jwkFile(t, jose.JSONWebKey{Key: &demo.PublicKey, KeyID: "demo"}),
		"private jwk": jwkFile(t, jose.JSONWebKey{Key: demo, KeyID: "demo"}),
	} {
		pub, _, err := LoadPublicKeyFile(path)
		if err != nil || !pub.Equal(&demo.PublicKey) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, kid, err := LoadPublicKeyFile(filepath.Join(kayletest.VectorsDir, "keys/k1.public.jwk.json")); err != nil || kid != "k1" {
		t.Errorf("vectors k1 JWK: kid %q, %v", kid, err)
	}
}
