package kaylewebhook

import (
	"bytes"
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// The fingerprints in demo.go are those of the files in testdata/demo, so a
// regenerated demo key or secret cannot silently escape recognition.
func TestDemoFingerprintsMatchTestdata(t *testing.T) {
	key, err := demoKey()
	if err != nil {
		t.Fatal(err)
	}
	if !kayle.IsDemoKey(&key.PublicKey) {
		t.Error("the key in testdata/demo is not recognized: update demoModulusSHA256")
	}
	raw, err := os.ReadFile(demoSecretFile)
	if err != nil {
		t.Fatal(err)
	}
	if !kayle.IsDemoSecret(raw) || !kayle.IsDemoSecret([]byte(demoSecret(t))) {
		t.Error("the secret in testdata/demo is not recognized: update demoSecretHMACKey")
	}

	other, _, err := kayle.LoadPrivateKeyFile(filepath.Join(vectorsDir, "keys/k1.pkcs8.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if kayle.IsDemoKey(&other.PublicKey) || kayle.IsDemoSecret([]byte(demoSecret(t)+"x")) {
		t.Error("material of one's own is taken for the demo's")
	}
}

func TestLoopbackOnly(t *testing.T) {
	t.Setenv("KAYLE_TEST_LISTEN_HOST", "0.0.0.0")
	cases := map[string]struct {
		listen []string
		want   bool
	}{
		"Caddyfile.example's demo":  {[]string{"127.0.0.1:8080", "[::1]:8080"}, true},
		"localhost":                 {[]string{"localhost:8080"}, true},
		"tcp network prefix":        {[]string{"tcp/127.0.0.2:8080"}, true},
		"unix socket":               {[]string{"unix//run/caddy/kayle.sock"}, true},
		"every interface":           {[]string{":8080"}, false},
		"0.0.0.0":                   {[]string{"0.0.0.0:8080"}, false},
		"[::]":                      {[]string{"[::]:8080"}, false},
		"one public among loopback": {[]string{"127.0.0.1:8080", "192.0.2.7:8080"}, false},
		"host name":                 {[]string{"kayle.example.com:443"}, false},
		"placeholder to public":     {[]string{"{env.KAYLE_TEST_LISTEN_HOST}:8080"}, false},
		"socket activation":         {[]string{"fd/3"}, false},
		"none":                      {nil, false},
	}
	for name, c := range cases {
		if got := loopbackOnly(c.listen); got != c.want {
			t.Errorf("%s %q: loopbackOnly = %v, want %v", name, c.listen, got, c.want)
		}
	}
}

// ownKeyFile writes a fresh RSA-2048 key of "the user's own" as PEM.
func ownKeyFile(t *testing.T) string {
	t.Helper()
	path, _ := newKeyFile(t)
	return path
}

// checkDemo resolves h's secrets and keys as Provision does and runs the
// demo check as a handler of a server listening on listen (none: outside
// any server), with its log captured.
func checkDemo(t *testing.T, h *Handler, listen []string) (*observer.ObservedLogs, error) {
	t.Helper()
	repl := caddy.NewReplacer()
	if err := h.provisionSecrets(repl); err != nil {
		t.Fatal(err)
	}
	if err := h.provisionKeys(repl); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	h.setLogger(zap.New(core))
	parent := context.Background()
	if listen != nil {
		parent = context.WithValue(parent, caddyhttp.ServerCtxKey, &caddyhttp.Server{Listen: listen})
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: parent})
	t.Cleanup(cancel)
	return logs, h.checkDemoMaterial(ctx)
}

// demoWarnings are the WARN lines that name the demo material.
func demoWarnings(logs *observer.ObservedLogs) []observer.LoggedEntry {
	return logs.FilterLevelExact(zapcore.WarnLevel).FilterMessageSnippet("published DEMO").AllUntimed()
}

func TestDemoMaterialAloneIsNamedInAWarning(t *testing.T) {
	loopback := []string{"127.0.0.1:8080", "[::1]:8080"}
	for name, listen := range map[string][]string{"loopback listener": loopback, "outside a server": nil} {
		h := &Handler{
			SigningSecrets: []string{"{file." + demoSecretFile + "}"},
			DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
		}
		logs, err := checkDemo(t, h, listen)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		warns := demoWarnings(logs)
		if len(warns) != 1 {
			t.Fatalf("%s: %d WARN lines naming the demo material, want 1: %v", name, len(warns), logs.All())
		}
		fields := warns[0].ContextMap()
		named, _ := fields["demo_material"].([]any)
		if len(named) != 2 || named[0] != "signing secret #1" || named[1] != `decryption key "demo"` {
			t.Errorf("%s: the WARN names %v, want the secret and the key", name, fields["demo_material"])
		}
		if !strings.Contains(warns[0].Message, "anyone can sign deliveries") {
			t.Errorf("%s: the WARN does not say what is at stake: %q", name, warns[0].Message)
		}
	}
}

// Each variable of Caddyfile.example falls back to the demo's value on its
// own; whichever one is missing, the handler refuses the mix.
func TestDemoMaterialBesideOwnIsRefused(t *testing.T) {
	ownKey := ownKeyFile(t)
	t.Setenv("KAYLE_TEST_OWN_SECRET", "whsec_my-own-secret-0123456789abcdef")
	const ownSecret = "{env.KAYLE_TEST_OWN_SECRET}"
	demoSecretRef := "{file." + demoSecretFile + "}"
	cases := map[string]struct {
		secrets []string
		keys    []KeyFile
		want    string
	}{
		"secret variable unset":          {[]string{demoSecretRef}, []KeyFile{{KeyID: "k1", File: ownKey}}, "signing secret #1) and material of your own (decryption key \"k1\")"},
		"key file variable unset":        {[]string{ownSecret}, []KeyFile{{KeyID: "k1", File: demoKeyFile}}, "(decryption key \"k1\") and material of your own (signing secret #1)"},
		"both variables unset, kid set":  {[]string{demoSecretRef}, []KeyFile{{KeyID: "k1", File: demoKeyFile}}, ""},
		"key id variable unset":          {[]string{ownSecret}, []KeyFile{{KeyID: demoKID, File: ownKey}}, "KAYLE_KEY_ID is probably unset"},
		"demo secret kept in a rotation": {[]string{ownSecret, demoSecretRef}, []KeyFile{{KeyID: "k1", File: ownKey}}, "signing secret #2"},
		"demo key kept in a rotation":    {[]string{ownSecret}, []KeyFile{{KeyID: "k1", File: ownKey}, {KeyID: demoKID, File: demoKeyFile}}, `(decryption key "demo") and material of your own`},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			h := &Handler{SigningSecrets: c.secrets, DecryptionKeys: c.keys}
			logs, err := checkDemo(t, h, []string{"127.0.0.1:8080"})
			if c.want == "" {
				// all demo (under another kid): not a mix, but named
				if err != nil || len(demoWarnings(logs)) != 1 {
					t.Fatalf("err %v, %d demo WARN lines, want none and 1", err, len(demoWarnings(logs)))
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want a refusal containing %q", err, c.want)
			}
			if strings.Contains(err.Error(), "my-own-secret") || strings.Contains(err.Error(), demoSecret(t)) {
				t.Errorf("the refusal reveals a secret: %v", err)
			}
		})
	}
}

func TestOwnMaterialIsNotWarnedAbout(t *testing.T) {
	t.Setenv("KAYLE_TEST_OWN_SECRET", "whsec_my-own-secret-0123456789abcdef")
	h := &Handler{
		SigningSecrets: []string{"{env.KAYLE_TEST_OWN_SECRET}"},
		DecryptionKeys: []KeyFile{{KeyID: "k1", File: ownKeyFile(t)}},
	}
	logs, err := checkDemo(t, h, []string{":443"})
	if err != nil || logs.Len() != 0 {
		t.Fatalf("err %v, log %v: own material on a public listener must pass silently", err, logs.All())
	}
}

// The demo material on a listener reachable from elsewhere (a reload from a
// shell without the variables, a copied config) is refused, unless Caddy's
// environment acknowledges it; then it runs, named in the WARN.
func TestDemoMaterialOnAPublicListener(t *testing.T) {
	demoHandler := func() *Handler {
		return &Handler{
			SigningSecrets: []string{"{file." + demoSecretFile + "}"},
			DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
		}
	}
	for _, listen := range [][]string{{":8080"}, {"0.0.0.0:8080"}, {"127.0.0.1:8080", "[::]:8080"}} {
		t.Setenv(demoPublicEnv, "")
		logs, err := checkDemo(t, demoHandler(), listen)
		if err == nil || !strings.Contains(err.Error(), "not loopback-only") || !strings.Contains(err.Error(), demoPublicEnv+"=1") {
			t.Errorf("%q: got %v, want a refusal that says how to acknowledge it", listen, err)
		}
		if logs.Len() != 0 {
			t.Errorf("%q: a refused config logged %v", listen, logs.All())
		}

		t.Setenv(demoPublicEnv, "1")
		logs, err = checkDemo(t, demoHandler(), listen)
		if err != nil {
			t.Fatalf("%q acknowledged: %v", listen, err)
		}
		warns := demoWarnings(logs)
		if len(warns) != 1 || warns[0].ContextMap()["public_acknowledged"] != true {
			t.Errorf("%q acknowledged: WARN lines %v, want one saying it is public by choice", listen, warns)
		}
	}
}

// A {$VAR} whose variable is unset leaves its line short of an argument;
// the error says so instead of only counting arguments.
func TestUnsetVariableInCaddyfile(t *testing.T) {
	// NewTestDispenser expands {$…} from the environment, as caddy adapt does
	t.Setenv("KAYLE_TEST_UNSET", "")
	os.Unsetenv("KAYLE_TEST_UNSET")
	cases := map[string]string{
		"secret":            "signing_secret {$KAYLE_TEST_UNSET}",
		"quoted secret":     `signing_secret "{$KAYLE_TEST_UNSET}"`,
		"kid and file":      "decryption_key {$KAYLE_TEST_UNSET} {$KAYLE_TEST_UNSET}",
		"file":              "decryption_key k1 {$KAYLE_TEST_UNSET}",
		"quoted kid":        `decryption_key "{$KAYLE_TEST_UNSET}" /etc/kayle/k1.pem`,
		"jwks file":         "decryption_keys {$KAYLE_TEST_UNSET}",
		"quoted jwks file":  `decryption_keys "{$KAYLE_TEST_UNSET}"`,
		"secret in file ph": "signing_secret {file.{$KAYLE_TEST_UNSET}}",
	}
	for name, line := range cases {
		d := caddyfile.NewTestDispenser("kayle_webhook {\n" + line + "\n}")
		h := new(Handler)
		err := h.UnmarshalCaddyfile(d)
		if name == "secret in file ph" {
			// still one argument, {file.}: Provision refuses it
			if err != nil || len(h.SigningSecrets) != 1 {
				t.Fatalf("%s: %v", name, err)
			}
			if err := h.provisionSecrets(caddy.NewReplacer()); err == nil || !strings.Contains(err.Error(), "unset env var") {
				t.Errorf("%s: provisioning says %v, want a hint at an unset variable", name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), "empty") || !strings.Contains(err.Error(), "environment variable ({$VAR})") {
			t.Errorf("%s: got %v, want an error naming an empty value and an unset variable", name, err)
		}
	}
}

// TestDemoSecretIsRecognizedAsHMACUsesIt: the demo secret is recognized by
// the key HMAC-SHA256 makes of it, so a secret that signs exactly as the
// demo secret (the demo secret plus NULs, which HMAC's zero padding erases)
// is the demo secret to the demo check too, should it ever get past the
// refusal of control bytes (h.secrets set here directly, as a command or a
// later change might). A secret that signs otherwise is not.
func TestDemoSecretIsRecognizedAsHMACUsesIt(t *testing.T) {
	demo := demoSecret(t)
	mac := func(secret string) []byte { return kayle.SignatureMAC([]byte(secret), "1780000000", []byte("body")) }
	ownKey := ownKeyFile(t)
	for name, secret := range map[string]string{
		"one NUL":           demo + "\x00",
		"NULs to the block": demo + strings.Repeat("\x00", sha256.BlockSize-len(demo)),
	} {
		if !bytes.Equal(mac(secret), mac(demo)) {
			t.Fatalf("%s: the test's premise: it signs as the demo secret", name)
		}
		if !kayle.IsDemoSecret([]byte(secret)) {
			t.Errorf("%s: not recognized as the demo secret", name)
		}
		h := &Handler{DecryptionKeys: []KeyFile{{KeyID: "k1", File: ownKey}}}
		if err := h.provisionKeys(caddy.NewReplacer()); err != nil {
			t.Fatal(err)
		}
		h.secrets = [][]byte{[]byte("whsec_own_secret_0123456789abcdef0123"), []byte(secret)}
		h.setLogger(zap.NewNop())
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.WithValue(context.Background(), caddyhttp.ServerCtxKey, &caddyhttp.Server{Listen: []string{":8443"}})})
		err := h.checkDemoMaterial(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "(signing secret #2) and material of your own") {
			t.Errorf("%s beside material of one's own on a public listener: %v, want the mix refused", name, err)
		}
	}
	for name, secret := range map[string]string{
		"one NUL past the block": demo + strings.Repeat("\x00", sha256.BlockSize-len(demo)+1), // hashed: another key
		"a 0x01 after it":        demo + "\x01",
		"a byte short":           demo[:len(demo)-1],
	} {
		if bytes.Equal(mac(secret), mac(demo)) {
			t.Fatalf("%s: the test's premise: it signs otherwise", name)
		}
		if kayle.IsDemoSecret([]byte(secret)) {
			t.Errorf("%s: taken for the demo secret", name)
		}
	}
	// a secret longer than the block is keyed by its SHA-256: the two sign alike
	long := []byte(strings.Repeat("whsec_long_", 8))
	hashed := sha256.Sum256(long)
	if !bytes.Equal(kayle.SignatureMAC(long, "1", nil), kayle.SignatureMAC(hashed[:], "1", nil)) || kayle.HMACKeyFingerprint(long) != kayle.HMACKeyFingerprint(hashed[:]) {
		t.Error("a long secret and its SHA-256 sign alike but have two fingerprints")
	}
}
