package kayle

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	testSecret    = []byte("whsec_AiUCRMWM9a5VCUKOHx8Zibn6tUw5lZ7h")
	testOldSecret = []byte("whsec_CmJi039ggAxOteoB3XuqBN-a6ptW68cu")
	testBody      = []byte("eyJhbGciOiJSU0EtT0FFUC0yNTYifQ.a.b.c.d")
	testNow       = time.Unix(1780000000, 0)
)

func TestParseSignature(t *testing.T) {
	mac := strings.Repeat("ab", 32)
	good := []struct {
		header string
		unix   int64
		v1s    int
	}{
		{"t=1780000000,v1=" + mac, 1780000000, 1},
		{"v1=" + mac + ",t=1780000000", 1780000000, 1},           // reordered
		{"t=1780000000, v1=" + mac, 1780000000, 1},               // space after comma
		{"t=1780000000,v1=" + mac + ",v1=" + mac, 1780000000, 2}, // rotation
		{"t=1780000000,v0=zz,v1=" + mac + ",v2=x", 1780000000, 1},
		{"t=1780000000,v1=" + strings.ToUpper(mac), 1780000000, 1},
	}
	for _, g := range good {
		sig, err := ParseSignature(g.header)
		if err != nil {
			t.Errorf("%q: %v", g.header, err)
			continue
		}
		if sig.Unix != g.unix || len(sig.V1) != g.v1s {
			t.Errorf("%q: got t=%d and %d v1", g.header, sig.Unix, len(sig.V1))
		}
	}
	bad := []string{
		"",
		"garbage",
		"t=1780000000",
		"v1=" + mac,
		"t=abc,v1=" + mac,
		"t=-1780000000,v1=" + mac,
		"t=+1780000000,v1=" + mac,
		"t=1780000000.5,v1=" + mac,
		"t= 1780000000,v1=" + mac,
		"t=,v1=" + mac,
		"t=1780000000,t=1780000001,v1=" + mac, // two t: which did the MAC cover?
		"t=1780000000,v1=zz",
		"t=1780000000,v1=" + mac[:63],        // truncated
		"t=1780000000,v1=" + mac + "a",       // one too many
		"t=1780000000,v1=" + mac[:62] + "zz", // not hex
		"t=1780000000,v1",                    // no '='
		"t=1780000000,,v1=" + mac,            // empty field
		"t=99999999999999999999,v1=" + mac,   // overflow
		"t=1780000000,v1=" + mac + strings.Repeat(",v1="+mac, maxV1Signatures),      // too many
		"t=1780000000,v1=" + mac + "," + strings.Repeat("x", maxSignatureHeaderLen), // huge
	}
	for _, h := range bad {
		if _, err := ParseSignature(h); err == nil {
			t.Errorf("accepted %q", h)
		}
	}
}

func TestVerifySignature(t *testing.T) {
	secrets := [][]byte{testSecret}
	header := SignatureHeaderValue(testSecret, testNow, testBody)
	if _, err := VerifySignature(header, testBody, secrets, testNow, 5*time.Minute); err != nil {
		t.Fatalf("genuine signature refused: %v", err)
	}

	t.Run("rotation", func(t *testing.T) {
		old := SignatureHeaderValue(testOldSecret, testNow, testBody)
		if _, err := VerifySignature(old, testBody, [][]byte{testSecret, testOldSecret}, testNow, 5*time.Minute); err != nil {
			t.Errorf("old secret refused while configured: %v", err)
		}
		if _, err := VerifySignature(old, testBody, secrets, testNow, 5*time.Minute); !errors.Is(err, ErrSignatureInvalid) {
			t.Errorf("old secret accepted after rotation ended: %v", err)
		}
		// one forged v1 beside a valid one is fine: one match is enough
		both := header + ",v1=" + strings.Repeat("00", 32)
		if _, err := VerifySignature(both, testBody, secrets, testNow, 5*time.Minute); err != nil {
			t.Errorf("valid v1 beside a wrong one refused: %v", err)
		}
	})

	attacks := map[string]struct {
		header string
		body   []byte
	}{
		"tampered body":           {header, append([]byte("x"), testBody...)},
		"truncated body":          {header, testBody[:len(testBody)-1]},
		"empty body":              {header, nil},
		"body with newline":       {header, append(append([]byte{}, testBody...), '\n')},
		"t changed":               {strings.Replace(header, "t=1780000000", "t=1780000001", 1), testBody},
		"leading zero t":          {strings.Replace(header, "t=1780000000", "t=01780000000", 1), testBody},
		"mac of another secret":   {SignatureHeaderValue([]byte("whsec_attacker_secret_000000000"), testNow, testBody), testBody},
		"mac without timestamp":   {"t=1780000000,v1=" + rawMACHex(testSecret, testBody), testBody},
		"empty secret mac":        {SignatureHeaderValue(nil, testNow, testBody), testBody},
		"signature of other body": {SignatureHeaderValue(testSecret, testNow, []byte("other")), testBody},
	}
	for name, a := range attacks {
		if _, err := VerifySignature(a.header, a.body, secrets, testNow, 5*time.Minute); !errors.Is(err, ErrSignatureInvalid) {
			t.Errorf("%s: got %v, want errSignatureInvalid", name, err)
		}
	}

	t.Run("tolerance both ways", func(t *testing.T) {
		for _, offset := range []time.Duration{-5 * time.Minute, 5 * time.Minute, 0} {
			h := SignatureHeaderValue(testSecret, testNow.Add(offset), testBody)
			if _, err := VerifySignature(h, testBody, secrets, testNow, 5*time.Minute); err != nil {
				t.Errorf("offset %s refused: %v", offset, err)
			}
		}
		for _, offset := range []time.Duration{-5*time.Minute - time.Second, 5*time.Minute + time.Second, -24 * time.Hour} {
			h := SignatureHeaderValue(testSecret, testNow.Add(offset), testBody)
			if _, err := VerifySignature(h, testBody, secrets, testNow, 5*time.Minute); err == nil {
				t.Errorf("offset %s accepted", offset)
			}
		}
	})
}

// rawMACHex is HMAC-SHA256(secret, body) with no "t." prefix: a MAC an
// attacker might hope the gateway accepts.
func rawMACHex(secret, body []byte) string {
	mac := hmac.New(sha256.New, secret)
	mac.Write(body)
	return hex.EncodeToString(mac.Sum(nil))
}

// FuzzParseSignature: the parser never panics, and whatever it accepts has
// one t of digits and 1..maxV1Signatures MACs of 32 bytes.
func FuzzParseSignature(f *testing.F) {
	f.Add("t=1780000000,v1=" + strings.Repeat("ab", 32))
	f.Add("t=1780000000,v1=" + strings.Repeat("ab", 32) + ",v1=" + strings.Repeat("cd", 32))
	f.Add("v1=00")
	f.Add("t=abc,v1=00")
	f.Add("garbage")
	f.Add("t=1,v0=1,v1=" + strings.Repeat("0", 64) + ",")
	f.Fuzz(func(t *testing.T, header string) {
		sig, err := ParseSignature(header)
		if err != nil {
			return
		}
		if sig.Timestamp == "" || strings.Trim(sig.Timestamp, "0123456789") != "" {
			t.Fatalf("accepted t %q", sig.Timestamp)
		}
		if len(sig.V1) == 0 || len(sig.V1) > maxV1Signatures {
			t.Fatalf("accepted %d v1", len(sig.V1))
		}
		for _, mac := range sig.V1 {
			if len(mac) != 32 {
				t.Fatalf("accepted a %d-byte MAC", len(mac))
			}
		}
	})
}

// verify names the position of the secret that matched: the metrics tell an
// operator from it that an old secret can be retired.
func TestVerifyNamesTheMatchingSecret(t *testing.T) {
	secrets := [][]byte{testSecret, testOldSecret}
	for want, secret := range map[int][]byte{1: testSecret, 2: testOldSecret} {
		sig, err := ParseSignature(SignatureHeaderValue(secret, testNow, testBody))
		if err != nil {
			t.Fatal(err)
		}
		if got, err := sig.Verify(testBody, NewMACKeys(secrets), testNow, time.Minute); err != nil || got != want {
			t.Errorf("signed with secret #%d: position %d, %v", want, got, err)
		}
	}
	// a header carrying v1s of both: the first configured secret is named
	both := SignatureHeaderValue(testOldSecret, testNow, testBody) + "," +
		strings.SplitN(SignatureHeaderValue(testSecret, testNow, testBody), ",", 2)[1]
	sig, err := ParseSignature(both)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := sig.Verify(testBody, NewMACKeys(secrets), testNow, time.Minute); err != nil || got != 1 {
		t.Errorf("both secrets: position %d, %v", got, err)
	}
	if got, err := sig.Verify(testBody, NewMACKeys(secrets), testNow.Add(2*time.Minute), time.Minute); err == nil || got != 0 {
		t.Errorf("stale: position %d, %v", got, err)
	}
}

// The keyed HMACs are pooled and shared by concurrent requests: a MAC must
// never carry state from another request's body or secret, whatever the
// interleaving (the race detector watches the pool too).
func TestVerifyConcurrentPooledMACs(t *testing.T) {
	keys := NewMACKeys([][]byte{testSecret, testOldSecret})
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				body := []byte(strings.Repeat("b", (g*200+i)%700))
				secret, want := testSecret, 1
				if i%2 == 1 {
					secret, want = testOldSecret, 2
				}
				sig, err := ParseSignature(SignatureHeaderValue(secret, testNow, body))
				if err != nil {
					t.Error(err)
					return
				}
				if got, err := sig.Verify(body, keys, testNow, time.Minute); err != nil || got != want {
					t.Errorf("genuine: position %d, %v", got, err)
					return
				}
				// the same MAC over a body one byte longer must fail
				if _, err := sig.Verify(append(body, 'x'), keys, testNow, time.Minute); !errors.Is(err, ErrSignatureInvalid) {
					t.Errorf("a changed body verified: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
}

// The send and inspect commands and the gateway now share one MAC
// construction; check it against the protocol's definition, computed here
// with crypto/hmac alone: HMAC-SHA256(secret, t + "." + body), hex.
func TestSignatureMACIsTheProtocolsHMAC(t *testing.T) {
	mac := hmac.New(sha256.New, testSecret)
	mac.Write([]byte("1780000000.")) // the t as sent, then '.'
	mac.Write(testBody)
	want := "t=1780000000,v1=" + hex.EncodeToString(mac.Sum(nil))
	if got := SignatureHeaderValue(testSecret, time.Unix(1780000000, 0), testBody); got != want {
		t.Errorf("SignatureHeaderValue = %q, want %q", got, want)
	}
}
