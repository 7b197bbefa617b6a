package kayle

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
)

func BenchmarkParseEventLarge(b *testing.B) {
	plaintext, err := os.ReadFile(filepath.Join(kayletest.VectorsDir, "bodies/05-succeeded-large-image.json"))
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(plaintext)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseEvent(plaintext); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkVerifyLarge is the HMAC check of a face-image delivery as the
// handler makes it: the header parsed, the MACs keyed and pooled once.
func BenchmarkVerifyLarge(b *testing.B) {
	body, err := os.ReadFile(filepath.Join(kayletest.VectorsDir, "bodies/05-succeeded-large-image.jwe"))
	if err != nil {
		b.Fatal(err)
	}
	keys := NewMACKeys([][]byte{testSecret, testOldSecret})
	sig, err := ParseSignature(SignatureHeaderValue(testOldSecret, testNow, body))
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := sig.Verify(body, keys, testNow, time.Minute); err != nil {
			b.Fatal(err)
		}
	}
}
