package kaylewebhook

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// claimValues are personal data in samplePayload's succeeded event: inspect
// prints none of them without --plaintext.
var claimValues = []string{"Curie", "Marie", "1995-04-12", "kdid_"}

// inspectDelivery is a captured delivery: a sample succeeded event to the
// demo key (kid "demo") and its signature with the demo secret at signedAt.
func inspectDelivery(t *testing.T, signedAt time.Time) (bodyFile, signature, eventID string) {
	t.Helper()
	eventID = "evt_inspect_" + kayle.RandomHex(4)
	payload, err := kayle.SamplePayload("verification.session.succeeded", eventID)
	if err != nil {
		t.Fatal(err)
	}
	body, sig := signDelivery(t, payload, signedAt)
	bodyFile = filepath.Join(t.TempDir(), "delivery.jwe")
	if err := os.WriteFile(bodyFile, body, 0o600); err != nil {
		t.Fatal(err)
	}
	return bodyFile, sig, eventID
}

func inspectConfig(t *testing.T, blocks ...string) string {
	t.Helper()
	var sites strings.Builder
	for i, block := range blocks {
		fmt.Fprintf(&sites, "http://127.0.0.1:%d {\n%s}\n", 9+i, block)
	}
	return writeConfig(t, sites.String())
}

// inspectNow is the clock inspect reads in these tests: deliveries are
// signed relative to it, so the reported distances are exact.
var inspectNow = time.Now().Truncate(time.Second)

func runInspectOut(t *testing.T, o inspectOptions, stdin string) (string, error) {
	t.Helper()
	var b testIO
	err := runInspect(o, inspectNow, b.io(stdin))
	return b.out.String(), err
}

func checkNoClaims(t *testing.T, out string) {
	t.Helper()
	for _, v := range claimValues {
		if strings.Contains(out, v) {
			t.Errorf("output holds the claim value %q:\n%s", v, out)
		}
	}
}

func TestInspectCommandAcceptedDelivery(t *testing.T) {
	body, sig, eventID := inspectDelivery(t, inspectNow.Add(-2*time.Minute))
	config := inspectConfig(t, kayleBlock(t, ""))

	out, err := runInspectOut(t, inspectOptions{Config: config, Signature: sig, Body: body}, "")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{
		`JWE header: kid "demo", alg "RSA-OAEP-256", enc "A256GCM"`,
		`key: opened by the key configured as kid "demo"`,
		"signature: matches signing secret #1 of 1; t is 2m0s ago, within the 5m0s tolerance",
		"event: id " + eventID + ", type verification.session.succeeded",
		"plaintext: not shown",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	checkNoClaims(t, out)

	// --plaintext, the body from stdin, the header pasted with its name
	data, err := os.ReadFile(body)
	if err != nil {
		t.Fatal(err)
	}
	out, err = runInspectOut(t, inspectOptions{Config: config, Signature: kayle.SignatureHeader + ": " + sig, Plaintext: true, Body: "-"}, string(data))
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range append([]string{"matches signing secret #1", "plaintext ("}, claimValues...) {
		if !strings.Contains(out, want) {
			t.Errorf("--plaintext output lacks %q:\n%s", want, out)
		}
	}

	// no --signature: the key and payload alone decide
	out, err = runInspectOut(t, inspectOptions{Config: config, Body: body}, "")
	if err != nil || strings.Contains(out, "signature:") {
		t.Errorf("without --signature: %v\n%s", err, out)
	}
}

// A secret matching in second position (a rotation) is named by position.
func TestInspectCommandNamesTheSecret(t *testing.T) {
	body, sig, _ := inspectDelivery(t, inspectNow)
	secret, _ := filepath.Abs(demoSecretFile)
	key, _ := filepath.Abs(demoKeyFile)
	block := fmt.Sprintf("kayle_webhook {\n\tsigning_secret whsec_the_new_secret_0123456789\n\tsigning_secret {file.%s}\n\tdecryption_key demo %s\n}\n", secret, key)
	out, err := runInspectOut(t, inspectOptions{Config: inspectConfig(t, block), Signature: sig, Body: body}, "")
	if err != nil || !strings.Contains(out, "matches signing secret #2 of 2") {
		t.Errorf("%v\n%s", err, out)
	}
}

func TestInspectCommandExplainsRefusals(t *testing.T) {
	body, sig, _ := inspectDelivery(t, inspectNow)
	stale, staleSig, _ := inspectDelivery(t, inspectNow.Add(-10*time.Minute))
	key, _ := filepath.Abs(demoKeyFile)

	otherKey, _ := newKeyFile(t)
	notJWE := filepath.Join(t.TempDir(), "not.jwe")
	if err := os.WriteFile(notJWE, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	wrongSecret := fmt.Sprintf("kayle_webhook {\n\tsigning_secret whsec_not_the_one_that_signed_it\n\tdecryption_key demo %s\n}\n", key)

	for _, tc := range []struct {
		name      string
		block     string
		body, sig string
		want      string
	}{
		{"wrong secret", wrongSecret, body, sig, "signature: matches none of the 1 configured signing secrets (the gateway answers 400)"},
		{"stale signature", kayleBlock(t, ""), stale, staleSig, "t is 10m0s ago, outside the 5m0s tolerance"},
		{"tampered signature", kayleBlock(t, ""), body, kayle.FlipLastHexDigit(sig), "matches none"},
		{"malformed signature", kayleBlock(t, ""), body, "v1=abc", "malformed X-Kayle-Signature"},
		{"kid not configured", strings.Replace(kayleBlock(t, ""), "decryption_key demo", "decryption_key k1", 1), body, sig,
			`key: no configured key has kid "demo" (configured: "k1"); the gateway answers 500`},
		{"another key under the kid", strings.Replace(kayleBlock(t, ""), key, otherKey, 1), body, sig,
			`the key configured as kid "demo" does not open it`},
		{"not a JWE", kayleBlock(t, ""), notJWE, "", "JWE header: none readable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runInspectOut(t, inspectOptions{Config: inspectConfig(t, tc.block), Signature: tc.sig, Body: tc.body}, "")
			if !errors.Is(err, errNotAccepted) {
				t.Errorf("got %v, want %v", err, errNotAccepted)
			}
			if !strings.Contains(out, tc.want) {
				t.Errorf("output lacks %q:\n%s", tc.want, out)
			}
			checkNoClaims(t, out)
		})
	}
}

// With several handlers each is reported; one that accepts is enough.
func TestInspectCommandSeveralHandlers(t *testing.T) {
	body, sig, _ := inspectDelivery(t, inspectNow)
	config := inspectConfig(t,
		strings.Replace(kayleBlock(t, "\tdedupe_prefix kayle/old"), "decryption_key demo", "decryption_key k0", 1),
		kayleBlock(t, "\tdedupe_prefix kayle/new"))
	out, err := runInspectOut(t, inspectOptions{Config: config, Signature: sig, Body: body}, "")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, want := range []string{"(dedupe_prefix kayle/old):", `no configured key has kid "demo"`, "(dedupe_prefix kayle/new):", `opened by the key configured as kid "demo"`} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestInspectCommandRefusals(t *testing.T) {
	body, _, _ := inspectDelivery(t, inspectNow)
	for _, tc := range []struct {
		name string
		o    inspectOptions
		want string
	}{
		{"no config", inspectOptions{Body: body}, "--config is required"},
		{"missing body", inspectOptions{Config: inspectConfig(t, kayleBlock(t, "")), Body: filepath.Join(t.TempDir(), "absent")}, "no such file"},
		{"unset secret placeholder", inspectOptions{Config: inspectConfig(t, strings.Replace(kayleBlock(t, ""), "{file.", "{file./nonexistent", 1)), Body: body}, "signing secret #1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := runInspectOut(t, tc.o, "")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}
