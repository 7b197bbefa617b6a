// Package caddytest holds integration tests that run the kayle_webhook
// handler inside Caddy: an in-process Caddy (one per test binary, driven
// through its admin API) for most tests, and two real Caddy processes built
// from ./cmd/caddy for the multi-instance dedupe test.
//
// In-process configs are loaded with our own POST /load instead of caddytest's
// InitServer, because InitServer skips the calling test under `go test
// -short`, and only the multi-process test may be skipped there. Caddyfiles
// are adapted in the test binary, so that every site gets a connection
// counter (siteconns_test.go) before it is loaded. Requests go through
// caddytest's Tester.
package caddytest

import (
	// the plugin, registered with Caddy for the in-process configs
	_ "github.com/caddy-kayle-webhook/caddy-kayle-webhook"

	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	ctest "github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/go-jose/go-jose/v4"
)

// The demo material, published with the source (testdata/demo/README.md).
const (
	demoKID = kayletest.DemoKID
)

var (
	// adminPort is the in-process Caddy's admin port, picked at start-up.
	adminPort int
	// demo holds what a test needs to act as Kayle.
	demo kayletest.Demo
	// scratch is removed when the test binary ends (the caddy binary lives there).
	scratch string
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	var err error
	scratch, err = os.MkdirTemp("", "kayle-caddytest-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(scratch)
	// Caddy keeps its data and config under these; never touch the user's
	// (HOME is left alone: moving it would move the Go module cache)
	for _, name := range []string{"XDG_DATA_HOME", "XDG_CONFIG_HOME"} {
		dir := filepath.Join(scratch, strings.ToLower(name))
		if err := os.MkdirAll(dir, 0o700); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		os.Setenv(name, dir)
	}
	if demo, err = kayletest.LoadDemo(); err != nil {
		fmt.Fprintln(os.Stderr, "loading the demo material:", err)
		return 1
	}

	// start the in-process Caddy with an admin endpoint only; each test
	// loads its own Caddyfile through it, as caddytest does
	if adminPort, err = freePort(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	initial := fmt.Sprintf(`{"admin":{"listen":"localhost:%d","config":{"persist":false}}}`, adminPort)
	if err := caddy.Load([]byte(initial), true); err != nil {
		fmt.Fprintln(os.Stderr, "starting the in-process Caddy:", err)
		return 1
	}
	defer func() { _ = caddy.Stop() }()
	return m.Run()
}

// freePort asks the kernel for a free loopback TCP port and releases it.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func mustFreePort(t testing.TB) int {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// gateway describes one Caddy site: kayle_webhook then reverse_proxy.
type gateway struct {
	adminPort   int
	port        int
	storage     string // global file_system storage folder
	backend     string // host:port of the reverse_proxy upstream
	globalExtra string // more global options
	siteExtra   string // more site directives
	kayleExtra  string // more kayle_webhook options
	material    string // signing_secret and decryption_key lines; default: the demo's
	proxyExtra  string // reverse_proxy subdirectives

	// queue mode, when set; the site then needs no reverse_proxy (an
	// empty backend writes none)
	queue *queueBlock
}

// queueBlock is a kayle_webhook queue block: the queue forwards through
// reverse_proxy to backend.
type queueBlock struct {
	backend     string // host:port
	proxyExtra  string // the forward reverse_proxy's subdirectives
	horizon     string // Caddy durations; empty: the default
	maxBackoff  string
	concurrency int // 0: the default
}

func (q *queueBlock) write(b *strings.Builder) {
	fmt.Fprintf(b, "\t\tqueue {\n\t\t\tforward {\n\t\t\t\treverse_proxy %s {\n", q.backend)
	b.WriteString(q.proxyExtra)
	b.WriteString("\t\t\t\t}\n\t\t\t}\n")
	if q.horizon != "" {
		fmt.Fprintf(b, "\t\t\thorizon %s\n", q.horizon)
	}
	if q.maxBackoff != "" {
		fmt.Fprintf(b, "\t\t\tmax_backoff %s\n", q.maxBackoff)
	}
	if q.concurrency != 0 {
		fmt.Fprintf(b, "\t\t\tconcurrency %d\n", q.concurrency)
	}
	b.WriteString("\t\t}\n")
}

func (g gateway) caddyfile() string {
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin localhost:%d\n\tpersist_config off\n\tstorage file_system %q\n", g.adminPort, g.storage)
	b.WriteString(g.globalExtra)
	fmt.Fprintf(&b, "}\n\nhttp://127.0.0.1:%d {\n\tbind 127.0.0.1\n", g.port)
	b.WriteString(g.siteExtra)
	b.WriteString("\tkayle_webhook {\n")
	if g.material != "" {
		b.WriteString(g.material)
	} else {
		fmt.Fprintf(&b, "\t\tsigning_secret %q\n\t\tdecryption_key %s %q\n", "{file."+demo.SecretPath+"}", demoKID, demo.KeyPath)
	}
	b.WriteString(g.kayleExtra)
	if g.queue != nil {
		g.queue.write(&b)
	}
	b.WriteString("\t}\n")
	if g.backend != "" {
		fmt.Fprintf(&b, "\treverse_proxy %s {\n", g.backend)
		b.WriteString(g.proxyExtra)
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func (g gateway) url() string { return fmt.Sprintf("http://127.0.0.1:%d/kayle/webhook", g.port) }

// harness drives the in-process Caddy for one test.
type harness struct {
	t   *testing.T
	tc  *ctest.Tester
	dir string // removed after the sites stopped
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	tc := ctest.NewTester(t).WithDefaultOverrides(ctest.Config{
		AdminPort:          adminPort,
		TestRequestTimeout: 30 * time.Second,
		LoadRequestTimeout: 30 * time.Second,
	})
	h := &harness{t: t, tc: tc, dir: t.TempDir()}
	// registered after t.TempDir, so it runs first: leave no site running
	// (nor writing to the folders) once the test ends
	t.Cleanup(h.stop)
	return h
}

// sub is h for the subtest t.
func (h *harness) sub(t *testing.T) *harness {
	return &harness{t: t, tc: h.tc, dir: h.dir}
}

// tempDir is a fresh folder that outlives the test's sites.
func (h *harness) tempDir() string {
	h.t.Helper()
	dir, err := os.MkdirTemp(h.dir, "")
	if err != nil {
		h.t.Fatal(err)
	}
	return dir
}

// gateway returns a site on a fresh port in front of backend, with a
// storage folder of its own.
func (h *harness) gateway(be *backend) gateway {
	return gateway{
		adminPort: adminPort,
		port:      mustFreePort(h.t),
		storage:   h.tempDir(),
		backend:   be.hostPort(),
	}
}

// load runs a Caddyfile in the in-process Caddy. It returns once the config
// runs (the admin API answers /load after the apps started). A reload is
// forced, so loading the same config twice really restarts it.
func (h *harness) load(caddyfile string) {
	h.t.Helper()
	if err := loadConfig(caddyfile); err != nil {
		h.t.Fatalf("loading the config: %v\n%s", err, caddyfile)
	}
	// connections to the previous config's servers are gone
	h.tc.Client.CloseIdleConnections()
}

// stop loads a config with no apps: every site stops, the handlers'
// Cleanup runs, and stop returns once no request to them is still running.
func (h *harness) stop() {
	h.t.Helper()
	if err := loadConfig(fmt.Sprintf("{\n\tadmin localhost:%d\n\tpersist_config off\n}\n", adminPort)); err != nil {
		h.t.Errorf("stopping the sites: %v", err)
	}
	h.tc.Client.CloseIdleConnections()
	if err := waitSiteConnsClosed(15 * time.Second); err != nil {
		h.t.Error(err)
	}
}

func loadConfig(caddyfile string) error {
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		return err
	}
	return postConfig(adapted)
}

// postConfig loads a JSON config through the admin API's /load, with every
// site's connections counted (siteconns_test.go).
func postConfig(config []byte) error {
	config, err := countSiteConns(config)
	if err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodPost, fmt.Sprintf("http://localhost:%d/load", adminPort), bytes.NewReader(config))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Cache-Control", "must-revalidate") // reload even when unchanged
	// the admin server restarts with each load: a pooled connection to the
	// previous one may be reset under a POST, which is not retried
	req.Close = true
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("admin /load answered %d: %s", resp.StatusCode, body)
	}
	return nil
}

// do sends req and returns the status, headers and body of the answer.
func (h *harness) do(req *http.Request) (*http.Response, []byte) {
	h.t.Helper()
	resp, err := h.tc.Client.Do(req)
	if err != nil {
		h.t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		h.t.Fatalf("reading the answer to %s %s: %v", req.Method, req.URL, err)
	}
	return resp, body
}

// expect sends req and fails the test unless the answer has status.
func (h *harness) expect(req *http.Request, status int) (*http.Response, []byte) {
	h.t.Helper()
	resp, body := h.do(req)
	if resp.StatusCode != status {
		h.t.Fatalf("%s %s: status %d, want %d; body %q", req.Method, req.URL, resp.StatusCode, status, truncate(body))
	}
	return resp, body
}

func truncate(b []byte) string {
	if len(b) > 300 {
		return string(b[:300]) + "…"
	}
	return string(b)
}

// event is one Kayle event: its id and the plaintext Kayle encrypts.
type event struct {
	id      string
	typ     string
	payload []byte
}

// newEvent makes a verification.session.succeeded event with a fresh id.
// extraClaims are added to (or replace) the default claims.
func newEvent(t testing.TB, extraClaims map[string]any) event {
	t.Helper()
	id := "evt_" + randomHex(t, 12)
	claims := map[string]any{
		"age_over_18":   true,
		"date_of_birth": "1995-04-12",
		"family_name":   "Curie",
		"given_names":   "Marie",
	}
	for k, v := range extraClaims {
		claims[k] = v
	}
	keys := make([]string, 0, len(claims))
	for k := range claims {
		keys = append(keys, k)
	}
	payload, err := json.Marshal(map[string]any{
		"type": "verification.session.succeeded",
		"metadata": map[string]any{
			"contract_version":        1,
			"event_id":                id,
			"verification_session_id": "vs_" + randomHex(t, 12),
		},
		"data": map[string]any{
			"claims":              claims,
			"selected_field_keys": keys,
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return event{id: id, typ: "verification.session.succeeded", payload: payload}
}

func randomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// encrypt makes a delivery body as Kayle does: a fresh JWE to the demo key.
func encrypt(t testing.TB, payload []byte) []byte {
	t.Helper()
	body, err := kayle.EncryptDelivery(payload, demo.Pub, demoKID, jose.A256GCM)
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// deliveryRequest is a delivery of body to url, signed with secret at signedAt.
// An empty secret sends no signature header.
func deliveryRequest(t testing.TB, url string, body, secret []byte, signedAt time.Time, eventType string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/jose")
	if len(secret) > 0 {
		req.Header.Set(kayle.SignatureHeader, kayle.SignatureHeaderValue(secret, signedAt, body))
	}
	req.Header.Set(kayle.HeaderDeliveryID, "whd_"+randomHex(t, 8))
	req.Header.Set(kayle.HeaderEvent, eventType)
	return req
}

// deliver is a genuine delivery of ev: freshly encrypted, signed now.
func deliver(t testing.TB, url string, ev event) *http.Request {
	t.Helper()
	return deliveryRequest(t, url, encrypt(t, ev.payload), demo.Secret, time.Now(), ev.typ)
}

// received is one request as the backend saw it.
type received struct {
	Method           string
	Header           http.Header
	Body             []byte
	ContentLength    int64
	TransferEncoding []string
}

// backend is the user's application behind the gateway: it records every
// request and answers through respond (200 {"received":true} by default).
type backend struct {
	srv *httptest.Server

	mu      sync.Mutex
	reqs    []received
	byEvent map[string]int
	// respond answers the request; n is how many requests with this
	// X-Kayle-Event-Id the backend has seen, this one included.
	respond func(w http.ResponseWriter, r *http.Request, n int)
}

func newBackend(t testing.TB) *backend {
	be := &backend{byEvent: make(map[string]int)}
	be.srv = httptest.NewServer(http.HandlerFunc(be.serveHTTP))
	t.Cleanup(be.srv.Close)
	return be
}

func (be *backend) serveHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rec := received{
		Method:           r.Method,
		Header:           r.Header.Clone(),
		Body:             body,
		ContentLength:    r.ContentLength,
		TransferEncoding: r.TransferEncoding,
	}
	be.mu.Lock()
	be.reqs = append(be.reqs, rec)
	id := r.Header.Get(kayle.HeaderEventID)
	be.byEvent[id]++
	n := be.byEvent[id]
	respond := be.respond
	be.mu.Unlock()
	if respond != nil {
		respond(w, r, n)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(w, `{"received":true}`)
}

func (be *backend) hostPort() string { return strings.TrimPrefix(be.srv.URL, "http://") }

func (be *backend) requests() []received {
	be.mu.Lock()
	defer be.mu.Unlock()
	return append([]received(nil), be.reqs...)
}

func (be *backend) count(eventID string) int {
	be.mu.Lock()
	defer be.mu.Unlock()
	return be.byEvent[eventID]
}

func (be *backend) total() int {
	be.mu.Lock()
	defer be.mu.Unlock()
	return len(be.reqs)
}

func itoa(n int) string { return strconv.Itoa(n) }
