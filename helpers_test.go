package kaylewebhook

// Shared test helpers for the package's tests. A typical handler test:
//
//	clock := newTestClock(time.Now())
//	h := newTestHandler(t, func(h *Handler) { h.now = clock.Now })
//	backend := &testBackend{}
//	res := serve(h, makeDelivery(t, eventPayload("evt_1"), clock.Now()), backend)
//	// res.Status: what the client got; res.Rec: the response; res.Err: the
//	// error ServeHTTP returned; res.Repl: the request's placeholders;
//	// backend.Calls(), backend.Request(0): what the next handler saw.
//
// Everything uses the published demo material in testdata/demo (kid "demo",
// RSA-2048, the demo signing secret), and each handler gets its own
// file_system storage under t.TempDir(): tests never touch Caddy's global
// storage, which a bare caddy.Context does not have (ctx.Storage() panics).

import (
	// the tests load the file_system storage module by name, as a config would
	_ "github.com/caddyserver/caddy/v2/modules/filestorage"

	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/go-jose/go-jose/v4"
)

// The published demo material (testdata/demo/README.md) and the sample
// payload, shared with the other packages' tests.
const demoKID = kayletest.DemoKID

var (
	demoKeyFile    = kayletest.DemoKeyFile
	demoSecretFile = kayletest.DemoSecretFile
	demoSecret     = kayletest.DemoSecret
	demoKey        = kayletest.LoadDemoKey
	demoPublicKey  = kayletest.DemoPublicKey
	eventPayload   = kayletest.EventPayload
)

// fileStorageJSON is a StorageRaw value selecting Caddy's file_system storage
// rooted at root, as a JSON config would.
func fileStorageJSON(root string) json.RawMessage {
	return json.RawMessage(`{"module":"file_system","root":` + strconv.Quote(root) + `}`)
}

// newTestHandler returns a provisioned and validated Handler with the demo
// secret and key and a file_system storage in a fresh t.TempDir(). Each
// configure func may change the Handler before Provision (set h.now for a
// test clock, h.DedupeDisabled, h.StorageRaw, ...). The handler's context
// is cancelled and Cleanup called when the test ends.
func newTestHandler(t testing.TB, configure ...func(*Handler)) *Handler {
	t.Helper()
	h := &Handler{
		SigningSecrets: []string{demoSecret(t)},
		DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
		StorageRaw:     fileStorageJSON(t.TempDir()),
	}
	for _, f := range configure {
		f(h)
	}
	if err := provisionTestHandler(t, h); err != nil {
		t.Fatalf("provisioning the handler: %v", err)
	}
	return h
}

// provisionTestHandler provisions and validates h in a fresh caddy.Context
// (no global config, so give h a StorageRaw unless dedupe is off) and
// returns the first error, for tests of configurations that must be refused.
func provisionTestHandler(t testing.TB, h *Handler) error {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(func() {
		cancel() // stops the sweeper
		_ = h.Cleanup()
	})
	if err := h.Provision(ctx); err != nil {
		return err
	}
	return h.Validate()
}

// signDelivery makes a delivery body as Kayle does (payload encrypted to the
// demo key with A256GCM, kid "demo") and its X-Kayle-Signature value, made
// with the demo secret at signedAt. Requests built from them with
// deliveryRequest are copies of one delivery.
func signDelivery(t testing.TB, payload []byte, signedAt time.Time) (body []byte, signatureHeader string) {
	t.Helper()
	body, err := kayle.EncryptDelivery(payload, demoPublicKey(t), demoKID, jose.A256GCM)
	if err != nil {
		t.Fatal(err)
	}
	return body, kayle.SignatureHeaderValue([]byte(demoSecret(t)), signedAt, body)
}

// deliveryRequest is a POST of body with Kayle's headers. It has no replacer
// yet: serve adds one, as Caddy's server does.
func deliveryRequest(body []byte, signatureHeader string) *http.Request {
	req := httptest.NewRequest(http.MethodPost, "/kayle", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/jose")
	req.Header.Set(kayle.SignatureHeader, signatureHeader)
	req.Header.Set(kayle.HeaderDeliveryID, "whd_test")
	req.Header.Set(kayle.HeaderEvent, "verification.session.succeeded")
	return req
}

// makeDelivery is deliveryRequest(signDelivery(...)): one genuine delivery
// of payload, signed at signedAt.
func makeDelivery(t testing.TB, payload []byte, signedAt time.Time) *http.Request {
	t.Helper()
	return deliveryRequest(signDelivery(t, payload, signedAt))
}

// prepareTestRequest gives r the context Caddy's server gives a request (a
// replacer, vars, extra log fields) and returns the replacer.
func prepareTestRequest(r *http.Request, w http.ResponseWriter) (*http.Request, *caddy.Replacer) {
	repl := caddy.NewReplacer()
	return caddyhttp.PrepareRequest(r, repl, w, nil), repl
}

// served is the outcome of serve.
type served struct {
	Rec  *httptest.ResponseRecorder
	Err  error           // what ServeHTTP returned
	Repl *caddy.Replacer // the request's placeholders after ServeHTTP
	// Status is what the client gets: the error's status when ServeHTTP
	// returned a caddyhttp.HandlerError (500 for any other error, as Caddy
	// answers), else the status written.
	Status int
}

// testWaitBound bounds the waits in tests: it only turns a hang (a lock
// never released) into a failure; nothing waits on it in a passing run.
const testWaitBound = time.Minute

// serve runs one request through h as Caddy's server would, with next as the
// rest of the route. A request without a deadline gets testWaitBound, so a
// copy stuck on a dedupe lock ends with a 503 instead of hanging the suite.
// It is safe to call from many goroutines at once.
func serve(h caddyhttp.MiddlewareHandler, r *http.Request, next caddyhttp.Handler) served {
	if _, ok := r.Context().Deadline(); !ok {
		ctx, cancel := context.WithTimeout(r.Context(), testWaitBound)
		defer cancel()
		r = r.WithContext(ctx)
	}
	rec := httptest.NewRecorder()
	r, repl := prepareTestRequest(r, rec)
	err := h.ServeHTTP(rec, r, next)
	return servedFrom(rec, err, repl)
}

// servedFrom is what the client got: the recorded answer, or the status of
// the error Caddy would answer.
func servedFrom(rec *httptest.ResponseRecorder, err error, repl *caddy.Replacer) served {
	res := served{Rec: rec, Err: err, Repl: repl, Status: rec.Code}
	if err != nil {
		res.Status = http.StatusInternalServerError
		if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok && he.StatusCode != 0 {
			res.Status = he.StatusCode
		}
	}
	return res
}

// forwarded is one request the testBackend received.
type forwarded struct {
	Header http.Header
	Body   []byte
}

// testBackend is a next handler standing in for the user's backend. It
// records every request and answers with Respond, or 200 "ok" when Respond
// is nil. Respond gets the 0-based call number; it may write an answer or
// return an error as reverse_proxy does (caddyhttp.Error(502, ...)). Safe
// for concurrent use.
type testBackend struct {
	Respond func(call int, w http.ResponseWriter, r *http.Request) error

	mu       sync.Mutex
	requests []forwarded
}

func (b *testBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return caddyhttp.Error(http.StatusBadGateway, err)
	}
	b.mu.Lock()
	call := len(b.requests)
	b.requests = append(b.requests, forwarded{Header: r.Header.Clone(), Body: body})
	b.mu.Unlock()
	if b.Respond != nil {
		return b.Respond(call, w, r)
	}
	_, err = io.WriteString(w, "ok")
	return err
}

// Calls is how many requests the backend received.
func (b *testBackend) Calls() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.requests)
}

// Request is the i-th request the backend received.
func (b *testBackend) Request(i int) forwarded {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.requests[i]
}

// respondStatus is a testBackend.Respond answering status to every call.
func respondStatus(status int) func(int, http.ResponseWriter, *http.Request) error {
	return func(_ int, w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(status)
		return nil
	}
}

// testClock is a settable clock for Handler.now and deduper.now, so tests
// move time instead of sleeping. Safe for concurrent use.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func newTestClock(start time.Time) *testClock { return &testClock{now: start} }

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func (c *testClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

// newKeyFile writes a fresh RSA-2048 private key as PKCS#8 PEM in a
// temporary folder, and returns the file's path and the key.
func newKeyFile(t testing.TB) (string, *rsa.PrivateKey) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path, key
}
