package kaylewebhook

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"go.uber.org/zap"
)

// benchVector returns the handler the vectors configure and a request maker
// for one of their forwardable cases.
func benchVector(b *testing.B, name string) (*Handler, func() *http.Request, int) {
	m := loadVectors(b)
	for _, c := range m.Cases {
		if c.Name != name {
			continue
		}
		h := vectorHandler(b, m, c, b.TempDir())
		h.dedupe = nil
		h.setLogger(zap.NewNop())
		body := readVectorFile(b, c.Request.BodyFile)
		return h, func() *http.Request {
			req := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
			for k, v := range c.Request.Headers {
				req.Header.Set(k, v)
			}
			return req
		}, len(body)
	}
	b.Fatalf("no vector %q", name)
	return nil, nil, 0
}

// BenchmarkHandler is the whole request path without storage: read, verify,
// decrypt (RSA-2048), parse, rewrite. Compare with BenchmarkDecryptOnly: the
// difference is the gateway's own overhead.
func BenchmarkHandler(b *testing.B) {
	for _, name := range []string{"succeeded-a256gcm-k1", "succeeded-large-image"} {
		b.Run(name, func(b *testing.B) {
			h, newRequest, size := benchVector(b, name)
			next := &testBackend{Respond: respondStatus(http.StatusNoContent)}
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				next.requests = next.requests[:0]
				if res := serve(h, newRequest(), next); res.Status != http.StatusNoContent {
					b.Fatalf("status %d", res.Status)
				}
			}
		})
		b.Run(name+"/decrypt-only", func(b *testing.B) {
			h, _, size := benchVector(b, name)
			m := loadVectors(b)
			var body []byte
			for _, c := range m.Cases {
				if c.Name == name {
					body = readVectorFile(b, c.Request.BodyFile)
				}
			}
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := h.keys.Decrypt(body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRejectForged is a forged delivery's whole refusal: the header
// parse, the body read and the HMAC that fails. A flood of them must cost
// little beside Caddy's own handling of a request.
func BenchmarkRejectForged(b *testing.B) {
	keyFile, _ := newKeyFile(b) // material of its own: the demo's is announced with a WARN
	h := newTestHandler(b, func(h *Handler) {
		h.SigningSecrets = []string{"whsec_bench_0123456789abcdef0123456789ab"}
		h.DecryptionKeys = []KeyFile{{KeyID: "k-bench", File: keyFile}}
		h.DedupeDisabled, h.StorageRaw = true, nil
	})
	h.setLogger(zap.NewNop())
	body, _ := signDelivery(b, eventPayload("evt_forged"), time.Now())
	forgedHeader := kayle.SignatureHeaderValue([]byte("whsec_not_the_secret_0123456789ab"), time.Now(), body)
	next := &testBackend{}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		r, _ := prepareTestRequest(deliveryRequest(body, forgedHeader), nil)
		if err := h.ServeHTTP(httptest.NewRecorder(), r, next); err == nil {
			b.Fatal("a forged delivery was accepted")
		}
	}
}
