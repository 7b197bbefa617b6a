package kayle

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
	"github.com/go-jose/go-jose/v4"
)

func demoRing(t *testing.T) *KeyRing {
	t.Helper()
	key, err := kayletest.LoadDemoKey()
	if err != nil {
		t.Fatal(err)
	}
	kr := &KeyRing{}
	if err := kr.Add(kayletest.DemoKID, key); err != nil {
		t.Fatal(err)
	}
	return kr
}

func encryptTo(t *testing.T, payload []byte, pub *rsa.PublicKey, kid string, enc jose.ContentEncryption) string {
	t.Helper()
	body, err := EncryptDelivery(payload, pub, kid, enc)
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

func TestDecryptRoundTrip(t *testing.T) {
	kr := demoRing(t)
	payload := kayletest.EventPayload("evt_roundtrip")
	for _, enc := range allowedContentEncryption {
		plaintext, kid, err := kr.Decrypt([]byte(encryptTo(t, payload, kayletest.DemoPublicKey(t), kayletest.DemoKID, enc)))
		if err != nil || kid != kayletest.DemoKID || !bytes.Equal(plaintext, payload) {
			t.Errorf("%s: kid %q, %v", enc, kid, err)
		}
	}
}

func TestDecryptWithoutKIDTriesEachKey(t *testing.T) {
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	kr := &KeyRing{}
	demo, _ := kayletest.LoadDemoKey()
	if err := kr.Add("other", other); err != nil {
		t.Fatal(err)
	}
	if err := kr.Add(kayletest.DemoKID, demo); err != nil {
		t.Fatal(err)
	}
	payload := kayletest.EventPayload("evt_nokid")
	plaintext, kid, err := kr.Decrypt([]byte(encryptTo(t, payload, kayletest.DemoPublicKey(t), "", jose.A256GCM)))
	if err != nil || kid != kayletest.DemoKID || !bytes.Equal(plaintext, payload) {
		t.Fatalf("kid %q, %v", kid, err)
	}
	stranger, _ := rsa.GenerateKey(rand.Reader, 2048)
	if _, _, err := kr.Decrypt([]byte(encryptTo(t, payload, &stranger.PublicKey, "", jose.A256GCM))); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("a JWE for no key we hold: %v", err)
	}
}

func TestDecryptKeyring(t *testing.T) {
	kr := demoRing(t)
	demo, _ := kayletest.LoadDemoKey()
	if err := kr.Add(kayletest.DemoKID, demo); err == nil {
		t.Error("a repeated kid was accepted")
	}
	if err := kr.Add("", demo); err == nil {
		t.Error("an empty kid was accepted")
	}
	// a kid we hold no key for is our misconfiguration, told apart from a bad JWE
	body := encryptTo(t, kayletest.EventPayload("evt"), kayletest.DemoPublicKey(t), "k-new", jose.A256GCM)
	if _, kid, err := kr.Decrypt([]byte(body)); !errors.Is(err, ErrUnknownKeyID) || kid != "k-new" {
		t.Errorf("unknown kid: %q %v", kid, err)
	}
	// a kid naming a key that is not the one Kayle used: a decryption failure
	stranger, _ := rsa.GenerateKey(rand.Reader, 2048)
	body = encryptTo(t, kayletest.EventPayload("evt"), &stranger.PublicKey, kayletest.DemoKID, jose.A256GCM)
	if _, _, err := kr.Decrypt([]byte(body)); !errors.Is(err, ErrDecrypt) {
		t.Errorf("wrong key under our kid: %v", err)
	}
}

// TestDecryptAttacks feeds altered JWEs; none may decrypt.
func TestDecryptAttacks(t *testing.T) {
	kr := demoRing(t)
	genuine := encryptTo(t, kayletest.EventPayload("evt_attack"), kayletest.DemoPublicKey(t), kayletest.DemoKID, jose.A256GCM)
	parts := strings.Split(genuine, ".")
	if len(parts) != 5 {
		t.Fatalf("%d parts", len(parts))
	}
	join := func(p ...string) []byte { return []byte(strings.Join(p, ".")) }
	flip := func(s string, i int) string {
		raw, err := base64.RawURLEncoding.DecodeString(s)
		if err != nil {
			t.Fatal(err)
		}
		raw[i%len(raw)] ^= 1
		return base64.RawURLEncoding.EncodeToString(raw)
	}
	header := func(h string) string { return base64.RawURLEncoding.EncodeToString([]byte(h)) }

	attacks := map[string][]byte{
		"truncated":            []byte(genuine[:len(genuine)-10]),
		"four parts":           join(parts[:4]...),
		"six parts":            join(append(parts, "x")...),
		"reordered iv and tag": join(parts[0], parts[1], parts[4], parts[3], parts[2]),
		"reordered key and ct": join(parts[0], parts[3], parts[2], parts[1], parts[4]),
		"ciphertext bit":       join(parts[0], parts[1], parts[2], flip(parts[3], 7), parts[4]),
		"tag bit":              join(parts[0], parts[1], parts[2], parts[3], flip(parts[4], 0)),
		"iv bit":               join(parts[0], parts[1], flip(parts[2], 0), parts[3], parts[4]),
		"wrapped key bit":      join(parts[0], flip(parts[1], 100), parts[2], parts[3], parts[4]),
		"empty tag":            join(parts[0], parts[1], parts[2], parts[3], ""),
		"header swapped enc":   join(header(`{"alg":"RSA-OAEP-256","enc":"A128GCM","kid":"demo"}`), parts[1], parts[2], parts[3], parts[4]),
		"header with extra":    join(header(`{"alg":"RSA-OAEP-256","enc":"A256GCM","kid":"demo","x":1}`), parts[1], parts[2], parts[3], parts[4]),
		"alg none":             join(header(`{"alg":"none","enc":"A256GCM","kid":"demo"}`), parts[1], parts[2], parts[3], parts[4]),
		"alg dir":              join(header(`{"alg":"dir","enc":"A256GCM","kid":"demo"}`), "", parts[2], parts[3], parts[4]),
		"alg RSA1_5":           join(header(`{"alg":"RSA1_5","enc":"A256GCM","kid":"demo"}`), parts[1], parts[2], parts[3], parts[4]),
		"alg RSA-OAEP":         join(header(`{"alg":"RSA-OAEP","enc":"A256GCM","kid":"demo"}`), parts[1], parts[2], parts[3], parts[4]),
		"enc CBC-HS":           join(header(`{"alg":"RSA-OAEP-256","enc":"A128CBC-HS256","kid":"demo"}`), parts[1], parts[2], parts[3], parts[4]),
		"not base64":           join(parts[0], parts[1], "!!!", parts[3], parts[4]),
		"json serialization":   []byte(`{"protected":"` + parts[0] + `","encrypted_key":"` + parts[1] + `","iv":"` + parts[2] + `","ciphertext":"` + parts[3] + `","tag":"` + parts[4] + `"}`),
		"whitespace inside":    []byte(genuine[:20] + " \n" + genuine[20:]),
		"empty":                nil,
		"huge garbage":         bytes.Repeat([]byte("A"), 3<<20),
		"huge parts":           join(parts[0], parts[1], parts[2], strings.Repeat("A", 3<<20), parts[4]),
	}
	for name, body := range attacks {
		if plaintext, _, err := kr.Decrypt(body); err == nil {
			t.Errorf("%s: decrypted (%d bytes)", name, len(plaintext))
		}
	}
	// A key algorithm that wraps with a symmetric key made from our public key
	// (alg confusion) is refused while parsing, before any key is touched.
	for _, name := range []string{"alg none", "alg dir", "alg RSA1_5", "alg RSA-OAEP", "enc CBC-HS"} {
		if _, _, err := kr.Decrypt(attacks[name]); !errors.Is(err, ErrNotJWE) {
			t.Errorf("%s: %v, want errNotJWE", name, err)
		}
	}
}

func TestParseEvent(t *testing.T) {
	ev, err := ParseEvent([]byte(`{"type":"verification.attempt.failed","metadata":{"contract_version":2,"event_id":"evt_1","verification_session_id":"vs_1","verification_attempt_id":"va_1"},"data":{}}`))
	if err != nil || ev != (Event{ID: "evt_1", Type: "verification.attempt.failed", SessionID: "vs_1", ContractVersion: "2"}) {
		t.Fatalf("%+v %v", ev, err)
	}
	if ev, err := ParseEvent([]byte(`{"metadata":{"event_id":"evt_2"}}`)); err != nil || ev.ID != "evt_2" || ev.Type != "" {
		t.Errorf("minimal payload: %+v %v", ev, err)
	}
	bad := map[string]string{
		"not json":          `Marie Curie 1995-04-12`,
		"array":             `[{"metadata":{"event_id":"evt"}}]`,
		"string":            `"evt"`,
		"null":              `null`,
		"no metadata":       `{"type":"x"}`,
		"no event id":       `{"metadata":{"verification_session_id":"vs"}}`,
		"event id number":   `{"metadata":{"event_id":12}}`,
		"event id empty":    `{"metadata":{"event_id":""}}`,
		"event id newline":  `{"metadata":{"event_id":"evt\r\nX-Kayle-Verified: true"}}`,
		"event id too long": `{"metadata":{"event_id":"` + strings.Repeat("e", MaxIDLen+1) + `"}}`,
		"type with nul":     `{"type":"a\u0000b","metadata":{"event_id":"evt"}}`,
		"event id spaced":   `{"metadata":{"event_id":" evt "}}`,
		"event id blank":    `{"metadata":{"event_id":"   "}}`,
		"event id UTF-8":    `{"metadata":{"event_id":"évt"}}`,
		"session id NBSP":   `{"metadata":{"event_id":"evt","verification_session_id":"vs\u00a0"}}`,
		"trailing data":     `{"metadata":{"event_id":"evt"}} {"metadata":{"event_id":"evt2"}}`,
		"truncated":         `{"metadata":{"event_id":"evt"}`,
		"type is object":    `{"type":{"a":"Marie"},"metadata":{"event_id":"evt"}}`,
	}
	for name, payload := range bad {
		_, err := ParseEvent([]byte(payload))
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		// errors reach logs: they must never quote the plaintext
		for _, secret := range []string{"Marie", "Curie", "1995", "evt2", "X-Kayle"} {
			if strings.Contains(err.Error(), secret) {
				t.Errorf("%s: error quotes the plaintext: %v", name, err)
			}
		}
	}
}

// TestDecryptRefusesCompression: Kayle never compresses; a zip JWE (which
// go-jose would inflate to ten times its size) is refused before any RSA.
func TestDecryptRefusesCompression(t *testing.T) {
	encrypter, err := jose.NewEncrypter(jose.A256GCM,
		jose.Recipient{Algorithm: jose.RSA_OAEP_256, Key: kayletest.DemoPublicKey(t), KeyID: kayletest.DemoKID},
		&jose.EncrypterOptions{Compression: jose.DEFLATE})
	if err != nil {
		t.Fatal(err)
	}
	obj, err := encrypter.Encrypt(bytes.Repeat([]byte("A"), 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	compact, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := demoRing(t).Decrypt([]byte(compact)); !errors.Is(err, ErrNotJWE) {
		t.Fatalf("a compressed JWE: %v, want errNotJWE", err)
	}
}

// TestDecryptKeepsNothingOfTheBody: decrypt reads the body without copying
// it, so neither the plaintext nor anything decrypt returns may share its
// memory: wiping the body afterwards must change nothing.
func TestDecryptKeepsNothingOfTheBody(t *testing.T) {
	kr := demoRing(t)
	payload := kayletest.EventPayload("evt_no_alias")
	body := []byte(encryptTo(t, payload, kayletest.DemoPublicKey(t), kayletest.DemoKID, jose.A256GCM))
	plaintext, kid, err := kr.Decrypt(body)
	if err != nil {
		t.Fatal(err)
	}
	clear(body)
	if !bytes.Equal(plaintext, payload) || kid != kayletest.DemoKID {
		t.Fatalf("plaintext or kid changed with the body: %q", kid)
	}
	if _, _, err := kr.Decrypt(body); !errors.Is(err, ErrNotJWE) {
		t.Fatalf("a wiped body: %v", err)
	}
}
