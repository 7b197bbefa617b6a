package storagetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/storagetest/servers"
)

// gatewayProc is one gateway instance: the built Caddy running a Caddyfile
// with the row's global storage, kayle_webhook with the demo material, and
// reverse_proxy to the test's backend.
type gatewayProc struct {
	*kayletest.Process
	bin       string
	dir       string
	config    string // the Caddyfile's path
	adminAddr string
	url       string
	env       []string // the process's, for the commands run beside it
}

// gatewayConfig is what a gateway's Caddyfile is made of, beyond the demo
// material.
type gatewayConfig struct {
	storage string // the global storage option's value (the row's)
	backend string // host:port the route's reverse_proxy forwards to
	// prefix is kayle_webhook's dedupe_prefix ("": its default): clusters
	// that run at once on one storage keep apart.
	prefix string
	// queue turns on queue mode (nil: off).
	queue *queueConfig
}

// queueConfig is kayle_webhook's queue block. The queue delivers through
// its own forward routes, to the same backend as the route's reverse_proxy
// (which queue mode never reaches).
type queueConfig struct {
	maxBackoff time.Duration // 0: the default
}

func gatewayCaddyfile(adminAddr string, port int, cfg gatewayConfig) string {
	var opts strings.Builder
	if cfg.prefix != "" {
		fmt.Fprintf(&opts, "\t\tdedupe_prefix %s\n", cfg.prefix)
	}
	if q := cfg.queue; q != nil {
		fmt.Fprintf(&opts, "\t\tqueue {\n\t\t\tforward {\n\t\t\t\treverse_proxy %s\n\t\t\t}\n", cfg.backend)
		if q.maxBackoff != 0 {
			fmt.Fprintf(&opts, "\t\t\tmax_backoff %s\n", q.maxBackoff)
		}
		opts.WriteString("\t\t}\n")
	}
	return fmt.Sprintf(`{
	admin %s
	persist_config off
	storage %s
}

http://127.0.0.1:%d {
	bind 127.0.0.1
	kayle_webhook {
		signing_secret "{file.%s}"
		decryption_key %s %q
%s	}
	reverse_proxy %s
}
`, adminAddr, cfg.storage, port, demo.SecretPath, demoKID, demo.KeyPath, opts.String(), cfg.backend)
}

// startGateway runs one gateway (see waitReady). It is killed
// when the test ends, and its output logged if the test failed.
func startGateway(t *testing.T, bin, name string, cfg gatewayConfig) *gatewayProc {
	t.Helper()
	dir := t.TempDir()
	port := servers.FreePort(t)
	g := &gatewayProc{
		bin:       bin,
		dir:       dir,
		config:    filepath.Join(dir, "Caddyfile"),
		adminAddr: fmt.Sprintf("127.0.0.1:%d", servers.FreePort(t)),
		url:       fmt.Sprintf("http://127.0.0.1:%d/kayle/webhook", port),
	}
	if err := os.WriteFile(g.config, []byte(gatewayCaddyfile(g.adminAddr, port, cfg)), 0o600); err != nil {
		t.Fatal(err)
	}
	g.Process = kayletest.StartCaddy(t, bin, name, dir, g.config)
	g.env = g.Cmd.Env
	return g
}

// waitReady polls until the kayle_webhook route answers.
func (g *gatewayProc) waitReady(t *testing.T) { g.WaitReady(t, g.url) }

// kill ends the gateway with SIGKILL, as the OOM killer would: none of its
// own cleanup runs. It returns once the process died.
func (g *gatewayProc) kill(t *testing.T) {
	t.Helper()
	if err := g.Cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-g.Exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not die within 10 s of SIGKILL", g.Name)
	}
}

// metric reads one series of the gateway's Prometheus metrics (Caddy's
// admin endpoint); 0 when the gateway has not made it yet.
func (g *gatewayProc) metric(t *testing.T, series string) float64 {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://" + g.adminAddr + "/metrics")
	if err != nil {
		t.Fatalf("%s's metrics: %v", g.Name, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("%s's metrics: %d, %v", g.Name, resp.StatusCode, err)
	}
	for line := range strings.Lines(string(body)) {
		if value, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			v, err := strconv.ParseFloat(value, 64)
			if err != nil {
				t.Fatalf("%s's metric %s: %q", g.Name, series, line)
			}
			return v
		}
	}
	return 0
}

// command runs a caddy subcommand as an operator on the gateway's machine
// would (same environment), bounded by limit.
func (g *gatewayProc) command(limit time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, g.bin, args...)
	cmd.Dir = g.dir
	cmd.Env = g.env
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("still running after %s: %w", limit, err)
	}
	return string(out), err
}

// event is one Kayle event: its id and the plaintext Kayle encrypts.
type event struct {
	id      string
	payload []byte
}

const eventType = "verification.session.succeeded"

func newEvent(t testing.TB) event {
	t.Helper()
	id := "evt_" + randomHex(t, 12)
	payload, err := json.Marshal(map[string]any{
		"type": eventType,
		"metadata": map[string]any{
			"contract_version":        1,
			"event_id":                id,
			"verification_session_id": "vs_" + randomHex(t, 12),
		},
		"data": map[string]any{
			"claims":              map[string]any{"age_over_18": true},
			"selected_field_keys": []string{"age_over_18"},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return event{id: id, payload: payload}
}

func randomHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// delivery is a genuine delivery of ev to url, as Kayle makes each attempt:
// freshly encrypted to the demo key, signed now.
func delivery(t testing.TB, url string, ev event) *http.Request {
	t.Helper()
	body, err := kayle.EncryptDelivery(ev.payload, demo.Pub, demoKID, jose.A256GCM)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/jose")
	req.Header.Set(kayle.SignatureHeader, kayle.SignatureHeaderValue(demo.Secret, time.Now(), body))
	req.Header.Set(kayle.HeaderDeliveryID, "whd_"+randomHex(t, 8))
	req.Header.Set(kayle.HeaderEvent, eventType)
	return req
}

// answer is what a delivery got back.
type answer struct {
	status    int
	duplicate bool
	queued    bool // 202 with X-Kayle-Queued: true
	body      string
	err       error
	took      time.Duration
}

func (a answer) String() string {
	switch {
	case a.err != nil:
		return fmt.Sprintf("no answer after %s (%v)", a.took.Round(time.Millisecond), a.err)
	case a.duplicate:
		return fmt.Sprintf("%d duplicate after %s", a.status, a.took.Round(time.Millisecond))
	case a.queued:
		return fmt.Sprintf("%d queued after %s", a.status, a.took.Round(time.Millisecond))
	default:
		return fmt.Sprintf("%d after %s: %q", a.status, a.took.Round(time.Millisecond), truncate(a.body))
	}
}

// forwarded: the backend's 2xx, not the gateway's duplicate acknowledgement.
func (a answer) forwarded() bool { return a.err == nil && a.status/100 == 2 && !a.duplicate }

func (a answer) isDuplicate() bool { return a.err == nil && a.status == http.StatusOK && a.duplicate }

// isQueued: 202, X-Kayle-Queued: true and {"status":"queued","event_id":…}
// naming ev.
func (a answer) isQueued(ev event) bool {
	var body struct {
		Status  string `json:"status"`
		EventID string `json:"event_id"`
	}
	return a.err == nil && a.status == http.StatusAccepted && a.queued &&
		json.Unmarshal([]byte(a.body), &body) == nil && body.Status == "queued" && body.EventID == ev.id
}

func truncate(s string) string {
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}

// kayle sends deliveries with the patience the brief gives a retry: it
// waits up to a minute for each answer.
func newKayle(t *testing.T) *http.Client {
	c := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

func send(c *http.Client, req *http.Request) answer {
	began := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return answer{err: err, took: time.Since(began)}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return answer{
		status:    resp.StatusCode,
		duplicate: resp.Header.Get(kayle.HeaderDuplicate) == "true",
		queued:    resp.Header.Get(kayle.HeaderQueued) == "true",
		body:      string(body),
		err:       err,
		took:      time.Since(began),
	}
}

// sendAsync sends req on its own goroutine; the channel gets the answer.
func sendAsync(c *http.Client, req *http.Request) <-chan answer {
	ch := make(chan answer, 1)
	go func() { ch <- send(c, req) }()
	return ch
}

// await waits for an answer sent with sendAsync, at most limit.
func await(t *testing.T, what string, ch <-chan answer, limit time.Duration) answer {
	t.Helper()
	select {
	case a := <-ch:
		return a
	case <-time.After(limit):
		t.Fatalf("%s: no answer within %s", what, limit)
		return answer{}
	}
}

// backend is the user's application: it counts what it receives per event
// id and answers through respond (200 at once by default).
type backend struct {
	srv  *httptest.Server
	port *switchedListener
	done chan struct{} // closed at the end of the test: hung answers return

	mu      sync.Mutex
	byEvent map[string]int
	// respond answers the n-th request (from 1) with this event id
	respond responder
}

// responder answers the n-th request (from 1) the backend got with r's
// event id.
type responder func(be *backend, w http.ResponseWriter, r *http.Request, n int)

func newBackend(t *testing.T, respond responder) *backend {
	t.Helper()
	be := &backend{byEvent: make(map[string]int), respond: respond, done: make(chan struct{})}
	be.srv = httptest.NewUnstartedServer(http.HandlerFunc(be.serveHTTP))
	be.port = &switchedListener{Listener: be.srv.Listener}
	be.srv.Listener = be.port
	be.srv.Start()
	t.Cleanup(func() {
		close(be.done)
		be.srv.Close()
	})
	return be
}

// switchedListener is the backend's port. While down it closes each
// connection as soon as it is accepted, as the port of a crashed backend
// behind a load balancer does: the gateway's forward fails before any
// request is read, and nothing is counted.
type switchedListener struct {
	net.Listener
	down    atomic.Bool
	refused atomic.Int64 // connections closed while down
}

func (l *switchedListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil || !l.down.Load() {
			return conn, err
		}
		l.refused.Add(1)
		conn.Close()
	}
}

func (be *backend) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if _, err := io.Copy(io.Discard, r.Body); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	id := r.Header.Get(kayle.HeaderEventID)
	be.mu.Lock()
	be.byEvent[id]++
	n := be.byEvent[id]
	be.mu.Unlock()
	if be.respond != nil {
		be.respond(be, w, r, n)
		return
	}
	ok(w)
}

func ok(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = io.WriteString(w, `{"received":true}`)
}

// hold keeps a request for d, or until the gateway gives up on it or the
// test ends; it reports whether it held for the whole of d.
func (be *backend) hold(r *http.Request, d time.Duration) bool {
	select {
	case <-time.After(d):
		return true
	case <-r.Context().Done():
	case <-be.done:
	}
	return false
}

func (be *backend) hostPort() string { return strings.TrimPrefix(be.srv.URL, "http://") }

func (be *backend) count(eventID string) int {
	be.mu.Lock()
	defer be.mu.Unlock()
	return be.byEvent[eventID]
}

func (be *backend) total() int {
	be.mu.Lock()
	defer be.mu.Unlock()
	n := 0
	for _, c := range be.byEvent {
		n += c
	}
	return n
}
