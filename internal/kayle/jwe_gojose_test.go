package kayle

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
	"github.com/go-jose/go-jose/v4"
)

// goJoseDecrypt is the reference decrypt takes its answers from: go-jose
// parses and decrypts the whole JWE.
func goJoseDecrypt(kr *KeyRing, body []byte) ([]byte, string, error) {
	obj, err := jose.ParseEncryptedCompact(string(body), allowedKeyAlgorithms, allowedContentEncryption)
	if err != nil {
		return nil, "", ErrNotJWE
	}
	if _, compressed := obj.Header.ExtraHeaders["zip"]; compressed {
		return nil, "", ErrNotJWE
	}
	if kid := obj.Header.KeyID; kid != "" {
		key, ok := kr.byKID[kid]
		if !ok {
			return nil, kid, ErrUnknownKeyID
		}
		plaintext, err := obj.Decrypt(key)
		if err != nil {
			return nil, kid, ErrDecrypt
		}
		return plaintext, kid, nil
	}
	for _, k := range kr.Keys {
		if plaintext, err := obj.Decrypt(k.Private); err == nil {
			return plaintext, k.KID, nil
		}
	}
	return nil, "", ErrDecrypt
}

var otherKey = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) })

// twoKeyRing holds the demo key and another, so a JWE without kid is tried
// with a wrong key first.
func twoKeyRing(t testing.TB) (*KeyRing, *rsa.PrivateKey) {
	t.Helper()
	other, err := otherKey()
	if err != nil {
		t.Fatal(err)
	}
	demo, err := kayletest.LoadDemoKey()
	if err != nil {
		t.Fatal(err)
	}
	kr := &KeyRing{}
	if err := kr.Add("other", other); err != nil {
		t.Fatal(err)
	}
	if err := kr.Add(kayletest.DemoKID, demo); err != nil {
		t.Fatal(err)
	}
	return kr, demo
}

// decryptCorpus is genuine deliveries (each enc, with and without kid, an
// unknown kid, extra headers) and every way of breaking one that matters.
func decryptCorpus(t testing.TB) [][]byte {
	_, demo := twoKeyRing(t)
	seal := func(enc jose.ContentEncryption, kid string, extra map[jose.HeaderKey]any) string {
		return sealJWE(t, &demo.PublicKey, enc, kid, extra)
	}
	genuine := seal(jose.A256GCM, kayletest.DemoKID, nil)
	p := strings.Split(genuine, ".")
	join := func(parts ...string) []byte { return []byte(strings.Join(parts, ".")) }
	corpus := [][]byte{
		[]byte(genuine),
		[]byte(seal(jose.A128GCM, kayletest.DemoKID, nil)),
		[]byte(seal(jose.A192GCM, kayletest.DemoKID, nil)),
		[]byte(seal(jose.A256GCM, "", nil)),
		[]byte(seal(jose.A256GCM, "nobody", nil)),
		[]byte(seal(jose.A256GCM, kayletest.DemoKID, map[jose.HeaderKey]any{"crit": []string{"exp"}, "exp": 1})),
		[]byte(seal(jose.A256GCM, "nobody", map[jose.HeaderKey]any{"crit": []string{"exp"}, "exp": 1})),
		[]byte(seal(jose.A256GCM, kayletest.DemoKID, map[jose.HeaderKey]any{"crit": nil})),
		[]byte(seal(jose.A256GCM, kayletest.DemoKID, map[jose.HeaderKey]any{"zip": "DEF"})),
		[]byte(seal(jose.A256GCM, kayletest.DemoKID, map[jose.HeaderKey]any{"x": map[string]any{"y": 1}})),
		join(p[0], p[1], p[2], "", p[4]),
		join(p[0], p[1], p[2], p[3], p[4]+"AA"),
		join(p[0], p[1], p[2], p[3], p[4][:20]),
		join(p[0], p[1], p[2]+"AAAA", p[3], p[4]),
		join(p[0], p[1]+"!", p[2], p[3], p[4]),
		join(p[0], p[1], p[2]+"!", p[3], p[4]),
		join(p[0], p[1], p[2], p[3]+"!", p[4]),
		join(p[0], p[1], p[2], p[3][:len(p[3])-1], p[4]),
		join(p[0], p[1][:len(p[1])-4], p[2], p[3], p[4]),
		join(p[0]+"\n", p[1], p[2], p[3], p[4]),
		join(p[0], p[1], p[2], p[3][:10]+"\r\n"+p[3][10:], p[4]),
		join(p[0], p[1], p[2], p[3], p[4][:10]+"\n"+p[4][10:]),
		join(p[0], p[1], p[2], p[3], p[4], ""),
		join(p[0], p[1], p[2], p[3]),
		[]byte(genuine + "."),
		[]byte("...."),
		nil,
	}
	return corpus
}

// sealJWE encrypts a payload to pub with go-jose, compact.
func sealJWE(t testing.TB, pub *rsa.PublicKey, enc jose.ContentEncryption, kid string, extra map[jose.HeaderKey]any) string {
	t.Helper()
	opts := &jose.EncrypterOptions{ExtraHeaders: extra}
	e, err := jose.NewEncrypter(enc, jose.Recipient{Algorithm: jose.RSA_OAEP_256, Key: pub, KeyID: kid}, opts)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := e.Encrypt(kayletest.EventPayload("evt_corpus"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// cachedHeaders counts the header cache's entries.
func cachedHeaders(kr *KeyRing) int {
	n := 0
	kr.headers.byBytes.Range(func(any, any) bool { n++; return true })
	return n
}

// TestDecryptMatchesGoJose: on genuine, broken and odd JWEs, decrypt
// answers what go-jose's own parse and Decrypt answer: the same plaintext
// and kid, or a failure of the same kind (an unknown kid is a 500, any
// other failure a 422). The second pass meets every header go-jose accepted
// in the first in the cache: the answers must not change.
func TestDecryptMatchesGoJose(t *testing.T) {
	kr, _ := twoKeyRing(t)
	for pass := range 2 {
		for i, body := range decryptCorpus(t) {
			sameAsGoJose(t, kr, body, i)
			if _, _, err := kr.Decrypt(body); i < 4 && err != nil {
				t.Errorf("pass %d, genuine #%d: %v", pass+1, i, err) // the first four: each enc, and no kid
			}
		}
	}
	if n := kr.headers.size.Load(); n == 0 || n > maxCachedHeaders {
		t.Errorf("%d headers cached, want some and at most %d", n, maxCachedHeaders)
	}
}

func FuzzDecryptMatchesGoJose(f *testing.F) {
	for _, body := range decryptCorpus(f) {
		f.Add(body)
	}
	kr, _ := twoKeyRing(f)
	f.Fuzz(func(t *testing.T, body []byte) { sameAsGoJose(t, kr, body, 0) })
}

func sameAsGoJose(t *testing.T, kr *KeyRing, body []byte, i int) {
	t.Helper()
	want, wantKID, wantErr := goJoseDecrypt(kr, body)
	got, gotKID, gotErr := kr.Decrypt(bytes.Clone(body))
	if (gotErr == nil) != (wantErr == nil) || !bytes.Equal(got, want) || gotKID != wantKID ||
		errors.Is(gotErr, ErrUnknownKeyID) != errors.Is(wantErr, ErrUnknownKeyID) ||
		errors.Is(gotErr, ErrNotJWE) != errors.Is(wantErr, ErrNotJWE) {
		t.Errorf("#%d: decrypt gave kid %q, %d bytes, %v; go-jose kid %q, %d bytes, %v", i, gotKID, len(got), gotErr, wantKID, len(want), wantErr)
	}
}

// TestHeaderCacheBounded: however many distinct headers arrive, at most
// maxCachedHeaders verdicts are kept, and every delivery still decrypts.
func TestHeaderCacheBounded(t *testing.T) {
	kr, demo := twoKeyRing(t)
	for i := range maxCachedHeaders + 36 {
		s := sealJWE(t, &demo.PublicKey, jose.A256GCM, kayletest.DemoKID, map[jose.HeaderKey]any{"x": i})
		if _, kid, err := kr.Decrypt([]byte(s)); err != nil || kid != kayletest.DemoKID {
			t.Fatalf("header #%d: kid %q, %v", i, kid, err)
		}
	}
	if stored := cachedHeaders(kr); stored != maxCachedHeaders {
		t.Errorf("%d headers cached, want %d", stored, maxCachedHeaders)
	}
}

// TestHeaderCacheConcurrentFirstDeliveries: many first deliveries of one
// header at once take one cache entry, counted once.
func TestHeaderCacheConcurrentFirstDeliveries(t *testing.T) {
	kr, _ := twoKeyRing(t)
	body := decryptCorpus(t)[0]
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			if _, _, err := kr.Decrypt(bytes.Clone(body)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if stored, n := cachedHeaders(kr), kr.headers.size.Load(); stored != 1 || n != 1 {
		t.Errorf("%d entries, counted %d; want 1 and 1", stored, n)
	}
}
