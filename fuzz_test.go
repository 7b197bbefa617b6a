package kaylewebhook

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"go.uber.org/zap"
)

// FuzzHandler sends arbitrary bodies and headers through the whole handler,
// configured as the vectors' gateway. When sign is set the fuzzer's body is
// given a genuine signature, so the JWE, key and payload paths are explored
// too. Whatever comes in, the handler must not panic, must answer with one
// of its documented statuses, and may call next only with a verified,
// decrypted event and headers it set itself.
func FuzzHandler(f *testing.F) {
	m := loadVectors(f)
	for _, c := range m.Cases {
		body := readVectorFile(f, c.Request.BodyFile)
		f.Add(body, c.Request.Headers[kayle.SignatureHeader], c.Request.Headers[kayle.HeaderDeliveryID], false)
		f.Add(body, "", "whd_x", true)
	}
	secret, err := os.ReadFile(filepath.Join(vectorsDir, m.SecretFile))
	if err != nil {
		f.Fatal(err)
	}
	secret = bytes.TrimSpace(secret)
	now := time.Unix(m.Cases[0].Now, 0)
	h := vectorHandler(f, m, m.Cases[0], f.TempDir())
	h.dedupe = nil // storage is tested elsewhere; keep iterations fast
	h.setLogger(zap.NewNop())

	allowed := map[int]bool{
		http.StatusOK: true, http.StatusBadRequest: true, http.StatusMethodNotAllowed: true,
		http.StatusRequestEntityTooLarge: true, http.StatusUnprocessableEntity: true,
		http.StatusInternalServerError: true,
	}
	f.Fuzz(func(t *testing.T, body []byte, sigHeader, deliveryID string, sign bool) {
		if sign {
			sigHeader = kayle.SignatureHeaderValue(secret, now, body)
		}
		req := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
		req.Header.Set(kayle.SignatureHeader, sigHeader)
		req.Header.Set(kayle.HeaderDeliveryID, deliveryID)
		req.Header.Set(kayle.HeaderVerified, "spoofed")
		backend := &testBackend{}
		res := serve(h, req, backend)
		if !allowed[res.Status] {
			t.Fatalf("undocumented status %d: %v", res.Status, res.Err)
		}
		if backend.Calls() == 0 {
			if res.Status == http.StatusOK {
				t.Fatal("200 without forwarding")
			}
			return
		}
		if !sign && sigHeader != kayle.SignatureHeaderValue(secret, now, body) {
			// reaching next needs a valid signature; a random one must not
			if _, err := kayle.VerifySignature(sigHeader, body, [][]byte{secret}, now, 5*time.Minute); err != nil {
				t.Fatalf("forwarded with an invalid signature: %v", err)
			}
		}
		got := backend.Request(0)
		plaintext, _, err := h.keys.Decrypt(body)
		if err != nil || !bytes.Equal(got.Body, plaintext) {
			t.Fatal("forwarded body is not the decryption of the delivery")
		}
		ev, err := kayle.ParseEvent(plaintext)
		if err != nil || got.Header.Get(kayle.HeaderEventID) != ev.ID || got.Header.Get(kayle.HeaderVerified) != "true" {
			t.Fatalf("forwarded headers do not match the payload: %v", err)
		}
		for name := range got.Header {
			if strings.HasPrefix(name, "X-Kayle-") && strings.ContainsAny(got.Header.Get(name), "\r\n") {
				t.Fatalf("header %s carries a line break", name)
			}
		}
	})
}
