package kaylewebhook

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/go-jose/go-jose/v4"
)

// goJoseDecrypt is the reference decrypt takes its answers from: go-jose
// parses and decrypts the whole JWE.
func goJoseDecrypt(kr *keyRing, body []byte) ([]byte, string, error) {
	obj, err := jose.ParseEncryptedCompact(string(body), allowedKeyAlgorithms, allowedContentEncryption)
	if err != nil {
		return nil, "", errNotJWE
	}
	if _, compressed := obj.Header.ExtraHeaders["zip"]; compressed {
		return nil, "", errNotJWE
	}
	if kid := obj.Header.KeyID; kid != "" {
		key, ok := kr.byKID[kid]
		if !ok {
			return nil, kid, errUnknownKeyID
		}
		plaintext, err := obj.Decrypt(key)
		if err != nil {
			return nil, kid, errDecrypt
		}
		return plaintext, kid, nil
	}
	for _, k := range kr.keys {
		if plaintext, err := obj.Decrypt(k.key); err == nil {
			return plaintext, k.kid, nil
		}
	}
	return nil, "", errDecrypt
}

var otherKey = sync.OnceValues(func() (*rsa.PrivateKey, error) { return rsa.GenerateKey(rand.Reader, 2048) })

// twoKeyRing holds the demo key and another, so a JWE without kid is tried
// with a wrong key first.
func twoKeyRing(t testing.TB) (*keyRing, *rsa.PrivateKey) {
	t.Helper()
	other, err := otherKey()
	if err != nil {
		t.Fatal(err)
	}
	demo, err := demoKey()
	if err != nil {
		t.Fatal(err)
	}
	kr := &keyRing{}
	if err := kr.add("other", other); err != nil {
		t.Fatal(err)
	}
	if err := kr.add(demoKID, demo); err != nil {
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
	genuine := seal(jose.A256GCM, demoKID, nil)
	p := strings.Split(genuine, ".")
	join := func(parts ...string) []byte { return []byte(strings.Join(parts, ".")) }
	corpus := [][]byte{
		[]byte(genuine),
		[]byte(seal(jose.A128GCM, demoKID, nil)),
		[]byte(seal(jose.A192GCM, demoKID, nil)),
		[]byte(seal(jose.A256GCM, "", nil)),
		[]byte(seal(jose.A256GCM, "nobody", nil)),
		[]byte(seal(jose.A256GCM, demoKID, map[jose.HeaderKey]any{"crit": []string{"exp"}, "exp": 1})),
		[]byte(seal(jose.A256GCM, "nobody", map[jose.HeaderKey]any{"crit": []string{"exp"}, "exp": 1})),
		[]byte(seal(jose.A256GCM, demoKID, map[jose.HeaderKey]any{"crit": nil})),
		[]byte(seal(jose.A256GCM, demoKID, map[jose.HeaderKey]any{"zip": "DEF"})),
		[]byte(seal(jose.A256GCM, demoKID, map[jose.HeaderKey]any{"x": map[string]any{"y": 1}})),
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
	obj, err := e.Encrypt(eventPayload("evt_corpus"))
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
func cachedHeaders(kr *keyRing) int {
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
			if _, _, err := kr.decrypt(body); i < 4 && err != nil {
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

func sameAsGoJose(t *testing.T, kr *keyRing, body []byte, i int) {
	t.Helper()
	want, wantKID, wantErr := goJoseDecrypt(kr, body)
	got, gotKID, gotErr := kr.decrypt(bytes.Clone(body))
	if (gotErr == nil) != (wantErr == nil) || !bytes.Equal(got, want) || gotKID != wantKID ||
		errors.Is(gotErr, errUnknownKeyID) != errors.Is(wantErr, errUnknownKeyID) ||
		errors.Is(gotErr, errNotJWE) != errors.Is(wantErr, errNotJWE) {
		t.Errorf("#%d: decrypt gave kid %q, %d bytes, %v; go-jose kid %q, %d bytes, %v", i, gotKID, len(got), gotErr, wantKID, len(want), wantErr)
	}
}

// TestHeaderCacheBounded: however many distinct headers arrive, at most
// maxCachedHeaders verdicts are kept, and every delivery still decrypts.
func TestHeaderCacheBounded(t *testing.T) {
	kr, demo := twoKeyRing(t)
	for i := range maxCachedHeaders + 36 {
		s := sealJWE(t, &demo.PublicKey, jose.A256GCM, demoKID, map[jose.HeaderKey]any{"x": i})
		if _, kid, err := kr.decrypt([]byte(s)); err != nil || kid != demoKID {
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
			if _, _, err := kr.decrypt(bytes.Clone(body)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if stored, n := cachedHeaders(kr), kr.headers.size.Load(); stored != 1 || n != 1 {
		t.Errorf("%d entries, counted %d; want 1 and 1", stored, n)
	}
}
