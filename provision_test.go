package kaylewebhook

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"github.com/go-jose/go-jose/v4"
)

func TestProvisionDedupe(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		h := newTestHandler(t)
		if h.dedupe == nil {
			t.Fatal("dedupe is off by default")
		}
		if h.dedupe.window != 14*24*time.Hour {
			t.Errorf("default window = %s, want 14 days", h.dedupe.window)
		}
		if h.dedupe.prefix != "kayle_webhook/events" {
			t.Errorf("default prefix = %q", h.dedupe.prefix)
		}
	})

	for _, c := range []struct {
		window time.Duration
		ok     bool
	}{
		{time.Hour, false},
		{8*24*time.Hour - time.Second, false},
		{8 * 24 * time.Hour, true},
		{30 * 24 * time.Hour, true},
	} {
		t.Run("dedupe_window "+c.window.String(), func(t *testing.T) {
			h := &Handler{
				SigningSecrets: []string{demoSecret(t)},
				DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
				StorageRaw:     fileStorageJSON(t.TempDir()),
				DedupeWindow:   caddy.Duration(c.window),
			}
			err := provisionTestHandler(t, h)
			if c.ok && (err != nil || h.dedupe.window != c.window) {
				t.Errorf("window %s: %v, want it accepted", c.window, err)
			}
			if !c.ok && (err == nil || !strings.Contains(err.Error(), "8d")) {
				t.Errorf("window %s: error %v, want a refusal naming the 8d minimum", c.window, err)
			}
		})
	}

	for _, c := range []struct {
		prefix, want string // want "" means refused
	}{
		{"..", ""},
		{"../outside", ""},
		{"a/../../b", ""},
		{"a/../b", ""},
		{`a\..\b`, ""},
		{"/", ""},
		{"kayle/endpoint_a", "kayle/endpoint_a"},
		{"/kayle/endpoint_b/", "kayle/endpoint_b"},
	} {
		t.Run("dedupe_prefix "+c.prefix, func(t *testing.T) {
			h := &Handler{
				SigningSecrets: []string{demoSecret(t)},
				DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
				StorageRaw:     fileStorageJSON(t.TempDir()),
				DedupePrefix:   c.prefix,
			}
			err := provisionTestHandler(t, h)
			if c.want == "" && err == nil {
				t.Errorf("prefix %q accepted as %q, want refused", c.prefix, h.dedupe.prefix)
			}
			if c.want != "" && (err != nil || h.dedupe.prefix != c.want) {
				t.Errorf("prefix %q: %v, want %q", c.prefix, err, c.want)
			}
		})
	}

	t.Run("dedupe off forwards every copy", func(t *testing.T) {
		h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled = true; h.StorageRaw = nil })
		if h.dedupe != nil {
			t.Fatal("dedupe off still made a deduper")
		}
		backend := &testBackend{}
		body, sig := signDelivery(t, eventPayload("evt_no_dedupe"), time.Now())
		for range 3 {
			if res := serve(h, deliveryRequest(body, sig), backend); res.Status != http.StatusOK || res.Rec.Header().Get(kayle.HeaderDuplicate) != "" {
				t.Fatalf("status %d, %s %q", res.Status, kayle.HeaderDuplicate, res.Rec.Header().Get(kayle.HeaderDuplicate))
			}
		}
		if backend.Calls() != 3 {
			t.Errorf("backend got %d copies, want 3", backend.Calls())
		}
	})

	t.Run("storage module from JSON is used", func(t *testing.T) {
		root := t.TempDir()
		h := newTestHandler(t, func(h *Handler) {
			h.StorageRaw = json.RawMessage(`{"module":"file_system","root":` + strconv.Quote(root) + `}`)
			h.DedupePrefix = "endpoint_a"
		})
		if fsys, ok := h.dedupe.storage.(*certmagic.FileStorage); !ok || fsys.Path != root {
			t.Fatalf("storage = %#v, want file_system at %s", h.dedupe.storage, root)
		}
		res := serve(h, makeDelivery(t, eventPayload("evt_json_storage"), time.Now()), &testBackend{})
		if res.Status != http.StatusOK {
			t.Fatalf("status %d: %v", res.Status, res.Err)
		}
		_, key, _ := h.dedupe.eventKeys("evt_json_storage")
		if _, err := os.Stat(filepath.Join(root, filepath.FromSlash(key))); err != nil {
			t.Errorf("no record in the configured storage: %v", err)
		}
		if !strings.HasPrefix(key, "endpoint_a/") {
			t.Errorf("record key %q is not under the configured prefix", key)
		}
	})

	t.Run("unknown storage module refused", func(t *testing.T) {
		h := &Handler{
			SigningSecrets: []string{demoSecret(t)},
			DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
			StorageRaw:     json.RawMessage(`{"module":"no_such_storage"}`),
		}
		if err := provisionTestHandler(t, h); err == nil {
			t.Error("an unknown storage module was accepted")
		}
	})
}

func TestProvisionRefuses(t *testing.T) {
	t.Setenv("KAYLE_EMPTY_SECRET", "")
	t.Setenv("KAYLE_SHORT_SECRET", "shhh9")
	const leaked = "whsec_must_not_leak_0123456789"
	t.Setenv("KAYLE_LEAK", leaked)
	cases := map[string]struct {
		configure func(h *Handler)
		want      string
	}{
		"no secret":        {func(h *Handler) { h.SigningSecrets = nil }, "no signing_secret"},
		"unset env secret": {func(h *Handler) { h.SigningSecrets = []string{"{env.KAYLE_UNSET_FOR_TEST}"} }, "signing secret #1"},
		"empty env secret": {func(h *Handler) { h.SigningSecrets = []string{"{env.KAYLE_EMPTY_SECRET}"} }, "signing secret #1"},
		"short secret":     {func(h *Handler) { h.SigningSecrets = []string{"{env.KAYLE_SHORT_SECRET}"} }, "5 bytes"},
		"missing file":     {func(h *Handler) { h.SigningSecrets = []string{"{file./nonexistent/kayle}"} }, "signing secret #1"},
		"no key":           {func(h *Handler) { h.DecryptionKeys = nil }, "no decryption_key"},
		"unreadable key":   {func(h *Handler) { h.DecryptionKeys = []KeyFile{{KeyID: "a", File: "/nonexistent.pem"}} }, "no such file"},
		"duplicate kid": {func(h *Handler) {
			h.DecryptionKeys = append(h.DecryptionKeys, KeyFile{KeyID: demoKID, File: demoKeyFile})
		}, "two decryption keys"},
		"kid clash with jwks": {func(h *Handler) {
			h.DecryptionKeys = []KeyFile{{KeyID: "k1", File: demoKeyFile}}
			h.DecryptionJWKS = []string{vectorsDir + "/keys/private.jwks.json"}
		}, "two decryption keys"},
		"jwk kid mismatch": {func(h *Handler) {
			h.DecryptionKeys = []KeyFile{{KeyID: "k1", File: vectorsDir + "/keys/k2.private.jwk.json"}}
		}, `says kid "k2"`},
		"public key": {func(h *Handler) {
			h.DecryptionKeys = []KeyFile{{KeyID: "k1", File: vectorsDir + "/keys/k1.public.jwk.json"}}
		}, "public key"},
		"short window":    {func(h *Handler) { h.DedupeWindow = caddy.Duration(7 * 24 * time.Hour) }, "at least 8d"},
		"prefix escapes":  {func(h *Handler) { h.DedupePrefix = "../certificates" }, ".."},
		"negative size":   {func(h *Handler) { h.MaxBodySize = -1 }, "max_body_size"},
		"negative window": {func(h *Handler) { h.Tolerance = caddy.Duration(-time.Second) }, "tolerance"},
		"forward secret without whsec_": {func(h *Handler) {
			h.ForwardSignatureSecrets = []string{"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}
		}, "forward_signature secret #1 is not whsec_"},
		"forward secret not base64": {func(h *Handler) {
			h.ForwardSignatureSecrets = []string{"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", leaked}
		}, "forward_signature secret #2 is not whsec_"},
		"forward secret unset": {func(h *Handler) {
			h.ForwardSignatureSecrets = []string{"{env.KAYLE_UNSET_FOR_TEST}"}
		}, "forward_signature secret #1: a placeholder"},
		"leaky secret alone is fine, but a short one must not be echoed": {func(h *Handler) {
			h.SigningSecrets = []string{"{env.KAYLE_LEAK}", "{env.KAYLE_SHORT_SECRET}"}
		}, "signing secret #2"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			h := &Handler{
				SigningSecrets: []string{demoSecret(t)},
				DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
				StorageRaw:     fileStorageJSON(t.TempDir()),
			}
			c.configure(h)
			err := provisionTestHandler(t, h)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error containing %q", err, c.want)
			}
			for _, s := range []string{leaked, "shhh9", demoSecret(t)} {
				if strings.Contains(err.Error(), s) {
					t.Errorf("the error reveals a secret: %v", err)
				}
			}
		})
	}
}

func TestSecretFromPlaceholders(t *testing.T) {
	t.Setenv("KAYLE_TEST_SECRET", demoSecret(t))
	for _, secret := range []string{"{env.KAYLE_TEST_SECRET}", "{file." + demoSecretFile + "}"} {
		h := newTestHandler(t, func(h *Handler) { h.SigningSecrets = []string{secret} })
		backend := &testBackend{}
		res := serve(h, makeDelivery(t, eventPayload("evt_ph"), time.Now()), backend)
		if res.Status != http.StatusOK || backend.Calls() != 1 {
			t.Errorf("%s: status %d, %d forwards (%v)", secret, res.Status, backend.Calls(), res.Err)
		}
	}
}

// TestLiteralSecretWithBraceIsNotEchoed: a literal secret is read as a
// template; the refusal must not quote it.
func TestLiteralSecretWithBraceIsNotEchoed(t *testing.T) {
	const secret = "whsec_ab{cdSECRETxyz}0123456789"
	h := &Handler{
		SigningSecrets: []string{secret},
		DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
		DedupeDisabled: true,
	}
	err := provisionTestHandler(t, h)
	if err == nil {
		t.Fatal("accepted")
	}
	if strings.Contains(err.Error(), "SECRET") {
		t.Errorf("the error quotes the secret: %v", err)
	}
}

// loadJSONHandler loads a kayle_webhook handler from its JSON config as
// Caddy loads one (strict decoding, Provision, Validate), in a server
// listening on listen (none: outside any server), and returns it or the
// error Caddy would report.
func loadJSONHandler(t *testing.T, config string, listen ...string) (*Handler, error) {
	t.Helper()
	parent := context.Background()
	if listen != nil {
		parent = context.WithValue(parent, caddyhttp.ServerCtxKey, &caddyhttp.Server{Listen: listen})
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: parent})
	mod, err := ctx.LoadModuleByID("http.handlers.kayle_webhook", json.RawMessage(config))
	if err != nil {
		cancel()
		return nil, err
	}
	h := mod.(*Handler)
	t.Cleanup(func() {
		cancel()
		_ = h.Cleanup()
	})
	return h, nil
}

func jsonString(s string) string {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// TestSigningSecretWithControlByteIsRefused: a signing secret holding a
// control byte is refused when the config loads, without quoting it. HMAC
// pads a key with zero bytes, so the published demo secret plus a NUL
// ("…\u0000" in a JSON config) signs exactly as the demo secret; beside a
// secret and key of one's own on a public listener, it let anyone sign
// deliveries, with no refusal and no WARN.
func TestSigningSecretWithControlByteIsRefused(t *testing.T) {
	demo := demoSecret(t)
	if !bytes.Equal(kayle.SignatureMAC([]byte(demo), "1", []byte("x")), kayle.SignatureMAC([]byte(demo+"\x00"), "1", []byte("x"))) {
		t.Fatal("the test's premise: HMAC signs with the demo secret plus NUL as with the demo secret")
	}
	const own = "whsec_own_secret_0123456789abcdef0123"
	keyFile, key := newKeyFile(t)
	twoNewlines := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(twoNewlines, []byte(own+"\n\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KAYLE_TEST_SECRET_CR", own+"\r")
	cases := map[string]struct {
		secrets  []string
		position int // 1-based, of the refused secret
	}{
		"the demo secret plus NUL beside one's own": {[]string{own, demo + "\x00"}, 2},
		"NUL inside":                       {[]string{own[:10] + "\x00" + own[10:]}, 1},
		"tab":                              {[]string{own + "\t"}, 1},
		"DEL":                              {[]string{own + "\x7f"}, 1},
		"a file ending in two line breaks": {[]string{"{file." + twoNewlines + "}"}, 1}, // {file.} drops one
		"an env var ending in CR":          {[]string{"{env.KAYLE_TEST_SECRET_CR}"}, 1},
	}
	for name, c := range cases {
		quoted := make([]string, len(c.secrets))
		for i, s := range c.secrets {
			quoted[i] = jsonString(s)
		}
		config := `{"signing_secrets":[` + strings.Join(quoted, ",") + `],` +
			`"decryption_keys":[{"kid":"k-own","file":` + jsonString(keyFile) + `}],"dedupe_disabled":true}`
		h, err := loadJSONHandler(t, config, ":8443")
		if err == nil {
			// what the attacker gets: a delivery signed with the published secret
			payload := eventPayload("evt_forged_with_demo_secret")
			body, err := kayle.EncryptDelivery(payload, &key.PublicKey, "k-own", jose.A256GCM)
			if err != nil {
				t.Fatal(err)
			}
			backend := &testBackend{}
			serve(h, deliveryRequest(body, kayle.SignatureHeaderValue([]byte(demo), time.Now(), body)), backend)
			t.Errorf("%s: accepted (a delivery signed with the published demo secret: %d forwards)", name, backend.Calls())
			continue
		}
		want := fmt.Sprintf("signing secret #%d (signing_secret, JSON signing_secrets[%d]) holds a control byte", c.position, c.position-1)
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", name, err, want)
		}
		if strings.Contains(err.Error(), own[6:]) || strings.Contains(err.Error(), demo[6:]) {
			t.Errorf("%s: the error quotes a secret: %v", name, err)
		}
	}
}

// TestJSONConfigRangeChecks: a JSON config is held to the ranges a
// Caddyfile is (max_body_size's 1 B to 1 GiB was checked by the Caddyfile
// parser only, so JSON took 2 GiB or 1 TiB), each refusal names the JSON
// field, and a range is checked before the storage is opened.
func TestJSONConfigRangeChecks(t *testing.T) {
	base := func(root, extra string) string {
		return `{"signing_secrets":[` + jsonString(demoSecret(t)) + `],` +
			`"decryption_keys":[{"kid":"demo","file":` + jsonString(demoKeyFile) + `}],` +
			`"storage":{"module":"file_system","root":` + jsonString(root) + `}` + extra + `}`
	}
	refused := map[string]struct{ extra, want string }{
		"max_body_size 1GiB+1": {`,"max_body_size":1073741825`, "max_body_size (JSON max_body_size) is 1073741825 bytes; it must be between 1 byte and 1GiB"},
		"max_body_size 1TiB":   {`,"max_body_size":1099511627776`, "max_body_size (JSON max_body_size)"},
		"max_body_size -1":     {`,"max_body_size":-1`, "max_body_size (JSON max_body_size)"},
		"tolerance -1s":        {`,"tolerance":"-1s"`, "tolerance (JSON tolerance)"},
		"dedupe_window 7d":     {`,"dedupe_window":"7d"`, "dedupe_window (JSON dedupe_window) 168h0m0s is shorter"},
		"dedupe_window -14d":   {`,"dedupe_window":"-14d"`, "dedupe_window (JSON dedupe_window)"},
	}
	for name, c := range refused {
		root := t.TempDir()
		_, err := loadJSONHandler(t, base(root, c.extra))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, c.want)
		}
		if entries, _ := os.ReadDir(root); len(entries) != 0 {
			t.Errorf("%s: the storage was written before the refusal (%d entries)", name, len(entries))
		}
	}
	accepted := map[string]struct {
		extra string
		size  int64
	}{
		"max_body_size 1GiB":                  {`,"max_body_size":1073741824`, 1 << 30},
		"max_body_size 1":                     {`,"max_body_size":1`, 1},
		"max_body_size absent: the default":   {``, defaultMaxBodySize},
		"dedupe_window 7d with dedupe off":    {`,"dedupe_window":"7d","dedupe_disabled":true`, defaultMaxBodySize},
		"dedupe_window 8d, the least allowed": {`,"dedupe_window":"8d"`, defaultMaxBodySize},
	}
	for name, c := range accepted {
		h, err := loadJSONHandler(t, base(t.TempDir(), c.extra))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if h.MaxBodySize != c.size {
			t.Errorf("%s: max_body_size %d, want %d", name, h.MaxBodySize, c.size)
		}
	}
}

// TestConfigErrorsNameTheJSONField: a JSON config's author reads JSON field
// names; every refusal names the field it is about in JSON too.
func TestConfigErrorsNameTheJSONField(t *testing.T) {
	t.Setenv("KAYLE_TEST_SHORT", "short")
	secret := jsonString(demoSecret(t))
	key := `[{"kid":"demo","file":` + jsonString(demoKeyFile) + `}]`
	cases := map[string]struct{ config, want string }{
		"no secret":          {`{"decryption_keys":` + key + `,"dedupe_disabled":true}`, "no signing_secret (JSON signing_secrets) configured"},
		"short secret":       {`{"signing_secrets":["{env.KAYLE_TEST_SHORT}"],"decryption_keys":` + key + `,"dedupe_disabled":true}`, "(signing_secret, JSON signing_secrets[0]) is 5 bytes"},
		"unset placeholder":  {`{"signing_secrets":[` + secret + `,"{env.KAYLE_TEST_UNSET_X}"],"decryption_keys":` + key + `,"dedupe_disabled":true}`, "signing secret #2 (signing_secret, JSON signing_secrets[1]): a placeholder"},
		"no key":             {`{"signing_secrets":[` + secret + `],"dedupe_disabled":true}`, "no decryption_key (JSON decryption_keys) or decryption_jwks (JSON decryption_jwks) configured"},
		"unreadable key":     {`{"signing_secrets":[` + secret + `],"decryption_keys":[{"kid":"k9","file":"/nonexistent.pem"}],"dedupe_disabled":true}`, `decryption key "k9" (decryption_key, JSON decryption_keys[0])`},
		"duplicate kid":      {`{"signing_secrets":[` + secret + `],"decryption_keys":[{"kid":"demo","file":` + jsonString(demoKeyFile) + `},{"kid":"demo","file":` + jsonString(demoKeyFile) + `}],"dedupe_disabled":true}`, `(decryption_key, JSON decryption_keys[1]): two decryption keys`},
		"unreadable JWKS":    {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"decryption_jwks":["/nonexistent.jwks"],"dedupe_disabled":true}`, "decryption JWKS #1 (decryption_jwks, JSON decryption_jwks[0])"},
		"bad forward secret": {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"forward_signature_secrets":["whsec_x"],"dedupe_disabled":true}`, "(JSON forward_signature_secrets[0])"},
		"empty event type":   {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"events":[""],"dedupe_disabled":true}`, "(JSON events)"},
		"prefix escapes":     {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"storage":{"module":"file_system","root":` + jsonString(t.TempDir()) + `},"dedupe_prefix":"a/../.."}`, "(JSON dedupe_prefix)"},
		"unknown storage":    {`{"signing_secrets":[` + secret + `],"decryption_keys":` + key + `,"storage":{"module":"nowhere"}}`, "(storage, JSON storage)"},
	}
	for name, c := range cases {
		_, err := loadJSONHandler(t, c.config)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, c.want)
		}
	}
}
