package kaylewebhook

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`kayle_webhook {
		signing_secret {env.KAYLE_SECRET}
		signing_secret "whsec_old secret with spaces"
		decryption_key k1 /keys/k1.pem
		decryption_key k2 {env.KEY2}
		decryption_keys /keys/set.jwks
		tolerance 2m
		max_body_size 1MiB
		dedupe_window 10d
		dedupe_prefix kayle/prod
		storage file_system /var/lib/kayle
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(h)
	want := `{"signing_secrets":["{env.KAYLE_SECRET}","whsec_old secret with spaces"],` +
		`"decryption_keys":[{"kid":"k1","file":"/keys/k1.pem"},{"kid":"k2","file":"{env.KEY2}"}],` +
		`"decryption_jwks":["/keys/set.jwks"],"tolerance":120000000000,"max_body_size":1048576,` +
		`"dedupe_window":864000000000000,"dedupe_prefix":"kayle/prod",` +
		`"storage":{"module":"file_system","root":"/var/lib/kayle"}}`
	if string(got) != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}

	d = caddyfile.NewTestDispenser("kayle_webhook {\n signing_secret s\n dedupe off\n}")
	h = Handler{}
	if err := h.UnmarshalCaddyfile(d); err != nil || !h.DedupeDisabled {
		t.Errorf("dedupe off: %v %v", h.DedupeDisabled, err)
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	const secret = "whsec_TopSecretValue1234567890"
	cases := map[string]string{
		"secret twice on a line": "signing_secret " + secret + " " + secret,
		"secret missing":         "signing_secret",
		"key one arg":            "decryption_key k1",
		"key three args":         "decryption_key k1 a b",
		"jwks no arg":            "decryption_keys",
		"bad tolerance":          "tolerance soon",
		"bad size":               "max_body_size lots",
		"zero size":              "max_body_size 0",
		"dedupe maybe":           "dedupe maybe",
		"unknown option":         "signing_secrets " + secret,
		"unknown storage":        "storage nowhere",
	}
	for name, line := range cases {
		d := caddyfile.NewTestDispenser("kayle_webhook {\n" + line + "\n}")
		var h Handler
		err := h.UnmarshalCaddyfile(d)
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if strings.Contains(err.Error(), secret) && name != "unknown option" {
			t.Errorf("%s: the error repeats the secret: %v", name, err)
		}
	}
	d := caddyfile.NewTestDispenser("kayle_webhook extra {\n}")
	if err := new(Handler).UnmarshalCaddyfile(d); err == nil {
		t.Error("an argument after the directive was accepted")
	}
}

// adaptKayleBlock adapts a site whose kayle_webhook block holds lines, with
// Caddy's Caddyfile adapter, and returns the handler's JSON and what the
// parser logged at WARN.
func adaptKayleBlock(t *testing.T, lines string) (json.RawMessage, *observer.ObservedLogs, error) {
	t.Helper()
	core, logs := observer.New(zapcore.WarnLevel)
	caddyfileLog = func() *zap.Logger { return zap.New(core) }
	t.Cleanup(func() { caddyfileLog = caddy.Log })
	caddyfile := "http://127.0.0.1:8080 {\n\tkayle_webhook {\n\t\tsigning_secret {env.KAYLE_SECRET}\n" + lines + "\t}\n}\n"
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return nil, logs, err
	}
	if handler := findKayleHandler(adapted); handler != nil {
		return handler, logs, nil
	}
	t.Fatalf("no kayle_webhook handler in %s", adapted)
	return nil, nil, nil
}

// findKayleHandler returns the first kayle_webhook handler in a JSON config,
// wherever it is nested (the site's subroute).
func findKayleHandler(raw json.RawMessage) json.RawMessage {
	var obj map[string]json.RawMessage
	if json.Unmarshal(raw, &obj) == nil {
		if string(obj["handler"]) == `"kayle_webhook"` {
			return raw
		}
		for _, v := range obj {
			if found := findKayleHandler(v); found != nil {
				return found
			}
		}
		return nil
	}
	var arr []json.RawMessage
	if json.Unmarshal(raw, &arr) == nil {
		for _, v := range arr {
			if found := findKayleHandler(v); found != nil {
				return found
			}
		}
	}
	return nil
}

// TestCaddyfileDecryptionJWKS: the Caddyfile names a JWKS file
// decryption_jwks, as JSON does. Its old Caddyfile name, decryption_keys
// (in JSON the decryption_key lines), still works, and logs a WARN with the
// file and line where the Caddyfile is adapted: the adapted JSON is the
// same, so nothing later could tell.
func TestCaddyfileDecryptionJWKS(t *testing.T) {
	jwks := filepath.Join(vectorsDir, "keys/private.jwks.json")
	handler, logs, err := adaptKayleBlock(t, "\t\tdedupe off\n\t\tdecryption_jwks "+jwks+"\n")
	if err != nil {
		t.Fatal(err)
	}
	if want := `"decryption_jwks":[` + jsonString(jwks) + `]`; !bytes.Contains(handler, []byte(want)) {
		t.Errorf("decryption_jwks adapts to %s, want %s", handler, want)
	}
	if logs.Len() != 0 {
		t.Errorf("decryption_jwks logged %v", logs.All())
	}
	t.Setenv("KAYLE_SECRET", "whsec_own_secret_0123456789abcdef0123") // the demo's would be refused beside k1
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(handler, &fields); err != nil {
		t.Fatal(err)
	}
	delete(fields, "handler") // the module's name, which Caddy reads before loading it
	config, _ := json.Marshal(fields)
	if _, err := loadJSONHandler(t, string(config)); err != nil {
		t.Errorf("the adapted handler does not load: %v", err)
	}

	old, logs, err := adaptKayleBlock(t, "\t\tdedupe off\n\t\tdecryption_keys "+jwks+"\n")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(old, handler) {
		t.Errorf("decryption_keys <file> adapts to %s, decryption_jwks to %s", old, handler)
	}
	warns := logs.FilterMessageSnippet("use decryption_jwks").AllUntimed()
	if len(warns) != 1 {
		t.Fatalf("decryption_keys <file>: WARN lines %v, want one saying to use decryption_jwks", logs.All())
	}
	if f := warns[0].ContextMap(); f["file"] != "Caddyfile" || f["line"] != int64(5) {
		t.Errorf("the WARN points at %v:%v, want Caddyfile:5", f["file"], f["line"])
	}

	for _, line := range []string{"decryption_jwks", "decryption_jwks a.jwks b.jwks", "decryption_jwks \"\""} {
		if _, _, err := adaptKayleBlock(t, "\t\t"+line+"\n"); err == nil || !strings.Contains(err.Error(), "decryption_jwks takes one argument") {
			t.Errorf("%s: %v", line, err)
		}
	}
}

// TestCaddyfileMaxBodySizeRange: the Caddyfile parser refuses the sizes
// Validate refuses, with the same words, at the line.
func TestCaddyfileMaxBodySizeRange(t *testing.T) {
	for _, size := range []string{"0", "2GiB", "1073741825", "9EiB"} {
		_, _, err := adaptKayleBlock(t, "\t\tmax_body_size "+size+"\n")
		if err == nil || !strings.Contains(err.Error(), "max_body_size (JSON max_body_size) is "+size+";") || !strings.Contains(err.Error(), "Caddyfile:4") {
			t.Errorf("max_body_size %s: %v", size, err)
		}
	}
	handler, _, err := adaptKayleBlock(t, "\t\tmax_body_size 1GiB\n")
	if err != nil || !bytes.Contains(handler, []byte(`"max_body_size":1073741824`)) {
		t.Errorf("max_body_size 1GiB: %s %v", handler, err)
	}
}

func TestEventsCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser("kayle_webhook {\n signing_secret s\n events verification.session.succeeded verification.session.failed\n events verification.session.expired\n}")
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(h.Events, " "); got != "verification.session.succeeded verification.session.failed verification.session.expired" {
		t.Errorf("events %q", got)
	}
	if err := new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser("kayle_webhook {\n events\n}")); err == nil {
		t.Error("events without a type accepted")
	}
	err := provisionTestHandler(t, &Handler{
		SigningSecrets: []string{demoSecret(t)},
		DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
		DedupeDisabled: true,
		Events:         []string{""},
	})
	if err == nil || !strings.Contains(err.Error(), "events") {
		t.Errorf("an empty event type: %v", err)
	}
}

func TestForwardSignatureCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser("kayle_webhook {\n signing_secret s\n forward_signature {env.NEW}\n forward_signature whsec_old\n}")
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(h.ForwardSignatureSecrets, "|"); got != "{env.NEW}|whsec_old" {
		t.Errorf("secrets %q", got)
	}
	const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	for _, line := range []string{"forward_signature", "forward_signature " + secret + " " + secret} {
		d := caddyfile.NewTestDispenser("kayle_webhook {\n" + line + "\n}")
		err := new(Handler).UnmarshalCaddyfile(d)
		if err == nil {
			t.Errorf("%q accepted", line)
		} else if strings.Contains(err.Error(), secret) {
			t.Errorf("the error repeats the secret: %v", err)
		}
	}
}
