// Package kayletest holds the test material every package of the module
// shares: the published demo key and secret (testdata/demo/README.md), the
// repository's own test vectors, and sample payloads. Tests only.
package kayletest

import (
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// DemoKID is the kid the demo key is registered under.
const DemoKID = "demo"

// Root is the repository's root folder, wherever the test runs from.
var Root = func() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}()

// Path is a path below the repository's root.
func Path(elem ...string) string { return filepath.Join(append([]string{Root}, elem...)...) }

// The demo material's files and the repository's vector set.
var (
	DemoKeyFile    = Path("testdata", "demo", "demo-key.pem")
	DemoSecretFile = Path("testdata", "demo", "demo-secret.txt")
	VectorsDir     = Path("testdata", "vectors")
)

// DemoSecret is the demo signing secret, as the handler reads it.
func DemoSecret(t testing.TB) string {
	t.Helper()
	data, err := os.ReadFile(DemoSecretFile)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(data))
}

// LoadDemoKey reads DemoKeyFile, once.
var LoadDemoKey = sync.OnceValues(func() (*rsa.PrivateKey, error) {
	data, err := os.ReadFile(DemoKeyFile)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("demo key: no PEM block")
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	rsaKey, ok := key.(*rsa.PrivateKey)
	if !ok {
		return nil, errors.New("demo key: not RSA")
	}
	return rsaKey, nil
})

// DemoKey is testdata/demo/demo-key.pem (kid "demo").
func DemoKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	key, err := LoadDemoKey()
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// DemoPublicKey is the public half of DemoKey.
func DemoPublicKey(t testing.TB) *rsa.PublicKey { return &DemoKey(t).PublicKey }

// EventPayload is the plaintext of a verification.session.succeeded event
// with the given metadata.event_id.
func EventPayload(eventID string) []byte {
	payload, err := json.Marshal(map[string]any{
		"type": "verification.session.succeeded",
		"metadata": map[string]any{
			"contract_version":        1,
			"event_id":                eventID,
			"verification_session_id": "vs_test",
		},
		"data": map[string]any{
			"claims":              map[string]any{"age_over_18": true},
			"selected_field_keys": []string{"age_over_18"},
		},
	})
	if err != nil {
		panic(err)
	}
	return payload
}
