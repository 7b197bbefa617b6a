package kaylewebhook

import (
	"bytes"
	"crypto/rsa"
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/go-jose/go-jose/v4"
)

// testIO captures a subcommand's output.
type testIO struct {
	out, notes bytes.Buffer
}

func (b *testIO) io(in string) cmdIO {
	return cmdIO{in: strings.NewReader(in), out: &b.out, notes: &b.notes}
}

// checkPublicJWK checks out is one public JWK exactly as Kayle's key
// registration takes it, for pub under kid, and nothing private.
func checkPublicJWK(t *testing.T, out []byte, pub *rsa.PublicKey, kid string) {
	t.Helper()
	var fields map[string]any
	if err := json.Unmarshal(out, &fields); err != nil {
		t.Fatalf("output is not one JSON object: %v\n%s", err, out)
	}
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	slices.Sort(names)
	if want := []string{"alg", "e", "kid", "kty", "n", "use"}; !slices.Equal(names, want) {
		t.Errorf("JWK members %v, want exactly %v (no d, p, q, dp, dq, qi)", names, want)
	}
	if fields["kty"] != "RSA" || fields["alg"] != "RSA-OAEP-256" || fields["use"] != "enc" || fields["kid"] != kid {
		t.Errorf("JWK %v: want kty RSA, alg RSA-OAEP-256, use enc, kid %q", fields, kid)
	}
	// an independent reading of it (go-jose's) is the same public key
	var jwk jose.JSONWebKey
	if err := json.Unmarshal(out, &jwk); err != nil {
		t.Fatalf("go-jose cannot read the JWK: %v", err)
	}
	got, ok := jwk.Key.(*rsa.PublicKey)
	if !ok || !jwk.IsPublic() || !got.Equal(pub) {
		t.Errorf("the JWK is %T, not the public half of the key", jwk.Key)
	}
}

func TestKeygenCommandWritesKeyAndPrintsJWK(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys") // made by keygen
	var b testIO
	if err := runKeygen(keygenOptions{Bits: 2048, KID: "k1", Out: dir}, b.io("")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "k1.pem")
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if mode := info.Mode().Perm(); mode != 0o600 {
		t.Errorf("key file mode %o, want 600", mode)
	}
	pemData, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(pemData, []byte("-----BEGIN PRIVATE KEY-----\n")) {
		t.Errorf("key file is not a PKCS#8 PEM: %.40q", pemData)
	}
	// the gateway reads it, and the JWK is its public half
	key, _, err := kayle.LoadPrivateKeyFile(path)
	if err != nil {
		t.Fatalf("the gateway cannot load the key: %v", err)
	}
	if bits := key.N.BitLen(); bits != 2048 {
		t.Errorf("key is %d bits", bits)
	}
	checkPublicJWK(t, b.out.Bytes(), &key.PublicKey, "k1")

	abs, _ := filepath.Abs(path)
	if want := "\tdecryption_key k1 " + abs + "\n"; !strings.Contains(b.notes.String(), want) {
		t.Errorf("notes lack the Caddyfile line %q:\n%s", want, b.notes.String())
	}
	if strings.Contains(b.out.String(), "decryption_key") {
		t.Error("the Caddyfile line went to stdout with the JWK")
	}

	// that Caddyfile line provisions a handler that opens deliveries made
	// to the printed JWK
	var jwk jose.JSONWebKey
	if err := json.Unmarshal(b.out.Bytes(), &jwk); err != nil {
		t.Fatal(err)
	}
	h := newTestHandler(t, func(h *Handler) {
		h.SigningSecrets = []string{"whsec_not_the_demo_secret_0123456789"} // the demo's would be refused beside k1
		h.DecryptionKeys = []KeyFile{{KeyID: "k1", File: abs}}
	})
	body, err := kayle.EncryptDelivery(eventPayload("evt_keygen"), jwk.Key.(*rsa.PublicKey), jwk.KeyID, jose.A256GCM)
	if err != nil {
		t.Fatal(err)
	}
	if _, kid, err := h.keys.Decrypt(body); err != nil || kid != "k1" {
		t.Errorf("a delivery to the printed JWK: kid %q, %v", kid, err)
	}
}

func TestKeygenCommandDefaults(t *testing.T) {
	dir := t.TempDir()
	var b testIO
	if err := runKeygen(keygenOptions{Out: dir}, b.io("")); err != nil {
		t.Fatal(err)
	}
	var printed struct{ Kid string }
	if err := json.Unmarshal(b.out.Bytes(), &printed); err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^k[0-9]{8}-[0-9a-f]{6}$`).MatchString(printed.Kid) {
		t.Errorf("generated kid %q, want k<date>-<6 hex>", printed.Kid)
	}
	key, _, err := kayle.LoadPrivateKeyFile(filepath.Join(dir, printed.Kid+".pem"))
	if err != nil {
		t.Fatalf("no key file named after the generated kid: %v", err)
	}
	if bits := key.N.BitLen(); bits != 4096 {
		t.Errorf("default key is %d bits, want 4096", bits)
	}
}

func TestKeygenCommandRefusals(t *testing.T) {
	dir := t.TempDir()
	existing := filepath.Join(dir, "k1.pem")
	const kept = "an existing key, not to be lost\n"
	if err := os.WriteFile(existing, []byte(kept), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts keygenOptions
		want string
	}{
		{"existing file", keygenOptions{Bits: 2048, KID: "k1", Out: dir}, "already exists"},
		{"1024 bits", keygenOptions{Bits: 1024, KID: "small", Out: dir}, "at least 2048"},
		{"2047 bits", keygenOptions{Bits: 2047, KID: "small", Out: dir}, "at least 2048"},
		{"negative bits", keygenOptions{Bits: -1, KID: "small", Out: dir}, "at least 2048"},
		{"huge", keygenOptions{Bits: 16384, KID: "huge", Out: dir}, "at most 8192"},
		{"kid with a slash", keygenOptions{Bits: 2048, KID: "../k1", Out: dir}, "--kid"},
		{"kid with a space", keygenOptions{Bits: 2048, KID: "my key", Out: dir}, "--kid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b testIO
			err := runKeygen(tc.opts, b.io(""))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			if b.out.Len() > 0 {
				t.Errorf("printed a JWK after refusing: %s", b.out.String())
			}
		})
	}
	if data, _ := os.ReadFile(existing); string(data) != kept {
		t.Errorf("the existing key file was changed: %q", data)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("refused runs left files: %v", entries)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "k1.pem")); !os.IsNotExist(err) {
		t.Errorf("--kid ../k1 wrote outside --out: %v", err)
	}

	// a file appearing between the check and the write is not overwritten
	if err := writeNewFile(existing, []byte("new")); err == nil || !strings.Contains(err.Error(), "already exists") {
		t.Errorf("writeNewFile over an existing file: %v", err)
	}
	if info, err := os.Stat(existing); err != nil || info.Mode().Type() != fs.FileMode(0) {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(existing); string(data) != kept {
		t.Errorf("writeNewFile changed an existing file: %q", data)
	}
}
