package kaylewebhook

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/go-jose/go-jose/v4"
)

func TestJWKCommandEveryKeyFormat(t *testing.T) {
	key, err := demoKey()
	if err != nil {
		t.Fatal(err)
	}
	write := tempWriter(t)
	pemFile := func(name, typ string, der []byte, err error) string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return write(name, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}))
	}
	jwkFile := func(name string, k any, kid string) string {
		t.Helper()
		data, err := json.Marshal(jose.JSONWebKey{Key: k, KeyID: kid, Algorithm: "RSA-OAEP-256", Use: "enc"})
		if err != nil {
			t.Fatal(err)
		}
		return write(name, data)
	}
	pkcs8, err8 := x509.MarshalPKCS8PrivateKey(key)
	spki, errSPKI := x509.MarshalPKIXPublicKey(&key.PublicKey)

	for _, tc := range []struct {
		name    string
		file    string
		kid     string // --kid
		wantKID string
		private bool
	}{
		{"PKCS#8 private PEM", pemFile("pkcs8.pem", "PRIVATE KEY", pkcs8, err8), "k1", "k1", true},
		{"PKCS#1 private PEM", pemFile("pkcs1.pem", "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key), nil), "k1", "k1", true},
		{"SPKI public PEM", pemFile("spki.pem", "PUBLIC KEY", spki, errSPKI), "k1", "k1", false},
		{"PKCS#1 public PEM", pemFile("pkcs1pub.pem", "RSA PUBLIC KEY", x509.MarshalPKCS1PublicKey(&key.PublicKey), nil), "k1", "k1", false},
		{"private JWK, its kid", jwkFile("priv.jwk", key, "kj"), "", "kj", true},
		{"private JWK, --kid agrees", jwkFile("priv2.jwk", key, "kj"), "kj", "kj", true},
		{"public JWK, its kid", jwkFile("pub.jwk", &key.PublicKey, "kp"), "", "kp", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b testIO
			if err := runJWK(tc.file, tc.kid, b.io("")); err != nil {
				t.Fatal(err)
			}
			checkPublicJWK(t, b.out.Bytes(), &key.PublicKey, tc.wantKID)
			abs, _ := filepath.Abs(tc.file)
			line := caddyfileLine(tc.wantKID, abs)
			if got := strings.Contains(b.notes.String(), line); got != tc.private {
				t.Errorf("Caddyfile line %q in the notes: %v, want %v:\n%s", line, got, tc.private, b.notes.String())
			}
		})
	}
}

func TestJWKCommandRefusals(t *testing.T) {
	key, err := demoKey()
	if err != nil {
		t.Fatal(err)
	}
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	write := tempWriter(t)
	jwk := func(k any, kid, alg, use string) []byte {
		data, err := json.Marshal(jose.JSONWebKey{Key: k, KeyID: kid, Algorithm: alg, Use: use})
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	smallPub, _ := x509.MarshalPKIXPublicKey(&small.PublicKey)

	for _, tc := range []struct {
		name, file, kid, want string
	}{
		{"PEM without --kid", demoKeyFile, "", "--kid"},
		{"--kid against the JWK's kid", write("kj.jwk", jwk(key, "kj", "", "")), "other", `says kid "kj"`},
		{"1024-bit public key", write("small.pem", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: smallPub})), "k1", "at least 2048"},
		{"signing JWK", write("sig.jwk", jwk(key, "ks", "", "sig")), "", `"sig"`},
		{"RSA1_5 JWK", write("rsa15.jwk", jwk(key, "kr", "RSA1_5", "")), "", "RSA1_5"},
		{"not a key", write("junk.txt", []byte("hello\n")), "k1", "neither PEM nor JSON"},
		{"missing file", filepath.Join(t.TempDir(), "absent.pem"), "k1", "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b testIO
			err := runJWK(tc.file, tc.kid, b.io(""))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			if b.out.Len() > 0 {
				t.Errorf("printed after refusing: %s", b.out.String())
			}
		})
	}
}

// tempWriter returns a function that writes a file into a fresh temporary
// folder and returns its path.
func tempWriter(t *testing.T) func(name string, data []byte) string {
	dir := t.TempDir()
	return func(name string, data []byte) string {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
}
