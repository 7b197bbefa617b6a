package caddytest

import (
	"bufio"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// exampleBackend is one of the receivers in examples/, as a user runs it.
type exampleBackend struct {
	name string
	// command checks that the runtime is installed (failing the test with what
	// to install) and returns the command line that serves on port.
	command func(t *testing.T, port int) []string
}

var exampleBackends = []exampleBackend{
	{"python", func(t *testing.T, port int) []string {
		return []string{lookPath(t, "python3", "Debian's python3 (apt-get install -y python3)"), "receiver.py"}
	}},
	{"node", func(t *testing.T, port int) []string {
		node := lookPath(t, "node", "Node.js (apt-get install -y nodejs npm)")
		requireNodeModules(t)
		return []string{node, "receiver.js"}
	}},
	{"go", func(t *testing.T, port int) []string { return []string{buildGoExample(t)} }},
	{"php", func(t *testing.T, port int) []string {
		php := lookPath(t, "php", "PHP's command line (apt-get install -y php-cli)")
		return []string{php, "-S", fmt.Sprintf("127.0.0.1:%d", port), "receiver.php"}
	}},
}

// lookPath finds a runtime an example needs, or fails the test naming it:
// the examples are tested in CI, where .ci/run installs them, never skipped.
func lookPath(t *testing.T, file, install string) string {
	t.Helper()
	path, err := exec.LookPath(file)
	if err != nil {
		t.Fatalf("%s is not installed: install %s, as .ci/run does", file, install)
	}
	return path
}

func requireNodeModules(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("../examples/node/node_modules/standardwebhooks/package.json"); err != nil {
		t.Fatalf("the npm package standardwebhooks is not installed: run `npm ci` in examples/node, as .ci/run does (%v)", err)
	}
}

var (
	goExampleOnce sync.Once
	goExampleBin  string
	goExampleErr  error
)

// buildGoExample builds examples/go, a module of its own, once per test binary.
func buildGoExample(t *testing.T) string {
	t.Helper()
	goExampleOnce.Do(func() {
		bin := filepath.Join(scratch, "kayle-example-go")
		cmd := exec.Command("go", "build", "-o", bin, ".")
		cmd.Dir = "../examples/go"
		if out, err := cmd.CombinedOutput(); err != nil {
			goExampleErr = fmt.Errorf("go build in examples/go: %v\n%s", err, out)
			return
		}
		goExampleBin = bin
	})
	if goExampleErr != nil {
		t.Fatal(goExampleErr)
	}
	return goExampleBin
}

// exampleProcess is one example backend running on a loopback port.
type exampleProcess struct {
	url       string
	processed string // the file it appends one JSON line to per processed event
}

// startExample runs ex with secret as its forward secret until the test ends,
// and returns once it accepts connections.
func startExample(t *testing.T, ex exampleBackend, secret string) *exampleProcess {
	t.Helper()
	port := mustFreePort(t)
	args := ex.command(t, port)
	dir := t.TempDir()
	p := &exampleProcess{
		url:       fmt.Sprintf("http://127.0.0.1:%d", port),
		processed: filepath.Join(dir, "processed.jsonl"),
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = filepath.Join("..", "examples", ex.name)
	cmd.Env = append(os.Environ(),
		"PORT="+itoa(port),
		"KAYLE_FORWARD_SECRET="+secret,
		"KAYLE_PROCESSED_LOG="+p.processed,
		"KAYLE_STATE_DIR="+filepath.Join(dir, "state"),
	)
	out := new(kayletest.SyncBuffer)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the %s example: %v", ex.name, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("----- output of the %s example (%v) -----\n%s", ex.name, waitErr, out.String())
		}
	})
	deadline := time.Now().Add(time.Minute)
	for {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		if err == nil {
			conn.Close()
			return p
		}
		select {
		case <-exited:
			t.Fatalf("the %s example exited before it listened: %v\n%s", ex.name, waitErr, out.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("the %s example not listening after a minute: %v", ex.name, err)
		}
	}
}

// processedEvent is one line of an example's record.
type processedEvent struct {
	EventID string `json:"event_id"`
	Type    string `json:"type"`
	Status  string `json:"status"`
}

func (p *exampleProcess) processedEvents(t *testing.T) []processedEvent {
	t.Helper()
	raw, err := os.ReadFile(p.processed)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var events []processedEvent
	lines := bufio.NewScanner(bytes.NewReader(raw))
	for lines.Scan() {
		var ev processedEvent
		if err := json.Unmarshal(lines.Bytes(), &ev); err != nil {
			t.Fatalf("a line of the record is not JSON: %q", lines.Text())
		}
		events = append(events, ev)
	}
	return events
}

// newForwardSecret makes a Standard Webhooks secret, whsec_<base64 of 32 bytes>.
func newForwardSecret(t testing.TB) (secret string, key []byte) {
	t.Helper()
	key = make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		t.Fatal(err)
	}
	return "whsec_" + base64.StdEncoding.EncodeToString(key), key
}

// signStandardWebhook sets the Standard Webhooks headers on h as a signer
// with key would, for the tests' own hand-made requests.
func signStandardWebhook(h http.Header, key []byte, id string, at time.Time, body []byte) {
	timestamp := strconv.FormatInt(at.Unix(), 10)
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + timestamp + "."))
	mac.Write(body)
	h.Set("webhook-id", id)
	h.Set("webhook-timestamp", timestamp)
	h.Set("webhook-signature", "v1,"+base64.StdEncoding.EncodeToString(mac.Sum(nil)))
}

// sessionEvent is a Kayle event of type typ with a fresh id and the data
// Kayle sends with that type.
func sessionEvent(t testing.TB, typ string) event {
	t.Helper()
	ev := newEvent(t, nil)
	var payload map[string]any
	if err := json.Unmarshal(ev.payload, &payload); err != nil {
		t.Fatal(err)
	}
	payload["type"] = typ
	switch typ {
	case "verification.session.failed":
		payload["data"] = map[string]any{"failure_code": "liveness_failed", "nfc_tries_used": 1, "liveness_tries_used": 3}
	case "verification.session.expired":
		payload["data"] = map[string]any{}
	case "verification.session.cancelled":
		payload["data"] = map[string]any{"outcome": "not_verified", "reason": "cancelled"}
	}
	raw, err := json.Marshal(payload)
	if err != nil {
		t.Fatal(err)
	}
	return event{id: ev.id, typ: typ, payload: raw}
}

// forwardSignatureLines are the kayle_webhook options of a gateway that signs
// its forwards with every secret, in order (a rotation when several).
func forwardSignatureLines(secrets ...string) string {
	var b strings.Builder
	for _, s := range secrets {
		fmt.Fprintf(&b, "\t\tforward_signature %s\n", s)
	}
	return b.String()
}

// captureForward runs ev through a gateway signing with secrets and returns
// the request its backend received: a genuine signed forward.
func captureForward(h *harness, ev event, secrets ...string) received {
	h.t.Helper()
	be := newBackend(h.t)
	gw := h.gateway(be)
	gw.kayleExtra = forwardSignatureLines(secrets...)
	h.load(gw.caddyfile())
	h.expect(deliver(h.t, gw.url(), ev), http.StatusOK)
	reqs := be.requests()
	if len(reqs) != 1 {
		h.t.Fatalf("the backend received %d requests, want 1", len(reqs))
	}
	if reqs[0].Header.Get(standardwebhooks.HeaderWebhookSignature) == "" {
		h.t.Fatal("the forward carries no webhook-signature")
	}
	return reqs[0]
}

// replay is rec sent again as is to url, after edit changes it.
func replay(t testing.TB, url string, rec received, edit func(h http.Header, body []byte) []byte) *http.Request {
	t.Helper()
	header := rec.Header.Clone()
	body := bytes.Clone(rec.Body)
	if edit != nil {
		body = edit(header, body)
	}
	req, err := http.NewRequest(http.MethodPost, url+"/kayle/webhook", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	header.Del("Content-Length")
	req.Header = header
	return req
}

// deliverAtOnce sends n copies of ev to url at the same moment and returns
// the status field of each 200 answer ("error" for any other answer).
func deliverAtOnce(h *harness, url string, ev event, n int) []string {
	h.t.Helper()
	reqs := make([]*http.Request, n)
	for i := range reqs {
		reqs[i] = deliver(h.t, url, ev)
	}
	answers := make([]string, n)
	var wg sync.WaitGroup
	for i, req := range reqs {
		wg.Go(func() {
			answers[i] = "error"
			resp, err := h.tc.Client.Do(req)
			if err != nil {
				return
			}
			defer resp.Body.Close()
			var answer struct{ Status string }
			if resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&answer) == nil {
				answers[i] = answer.Status
			}
		})
	}
	wg.Wait()
	return answers
}

// answerStatus is the "status" field of an example's JSON answer.
func answerStatus(t testing.TB, body []byte) string {
	t.Helper()
	var answer struct{ Status string }
	if err := json.Unmarshal(body, &answer); err != nil {
		t.Fatalf("the answer is not the example's JSON: %q", truncate(body))
	}
	return answer.Status
}

// Each example backend, behind a real gateway that signs its forwards,
// processes every genuine event once, by its type, keeps its own
// idempotency (the gateway's dedupe is off), and refuses a forward that was
// changed, replayed under another id, stale or signed with another secret.
func TestExampleBackends(t *testing.T) {
	h := newHarness(t)
	secret, key := newForwardSecret(t)
	// the gateway also signs with another secret, as during a rotation
	// that the backend has not caught up with yet
	other, otherKey := newForwardSecret(t)
	for _, ex := range exampleBackends {
		t.Run(ex.name, func(t *testing.T) {
			h := h.sub(t)
			p := startExample(t, ex, secret)

			// a forward as the gateway signs it, to alter below
			captured := captureForward(h, newEvent(t, nil), other, secret)
			capturedID := captured.Header.Get(kayle.HeaderEventID)
			refuse := map[string]struct {
				edit   func(h http.Header, body []byte) []byte
				status int
			}{
				"body changed": {func(_ http.Header, body []byte) []byte {
					return bytes.Replace(body, []byte("Curie"), []byte("Curia"), 1)
				}, http.StatusUnauthorized},
				"replayed under another event id": {func(h http.Header, body []byte) []byte {
					h.Set(kayle.HeaderEventID, "evt_"+randomHex(t, 12))
					return body
				}, http.StatusUnauthorized},
				"signed with the other secret only": {func(h http.Header, body []byte) []byte {
					signStandardWebhook(h, otherKey, capturedID, time.Now(), body)
					return body
				}, http.StatusUnauthorized},
				"unsigned": {func(h http.Header, body []byte) []byte {
					h.Del("webhook-id")
					h.Del("webhook-timestamp")
					h.Del("webhook-signature")
					return body
				}, http.StatusUnauthorized},
				"signed 10 minutes ago": {func(h http.Header, body []byte) []byte {
					signStandardWebhook(h, key, capturedID, time.Now().Add(-10*time.Minute), body)
					return body
				}, http.StatusUnauthorized},
				"signed 10 minutes ahead": {func(h http.Header, body []byte) []byte {
					signStandardWebhook(h, key, capturedID, time.Now().Add(10*time.Minute), body)
					return body
				}, http.StatusUnauthorized},
				"signed, not JSON": {func(h http.Header, _ []byte) []byte {
					body := []byte(`{"type":"verification.session.succeeded"`)
					signStandardWebhook(h, key, capturedID, time.Now(), body)
					return body
				}, http.StatusBadRequest},
				"signed, no type": {func(h http.Header, _ []byte) []byte {
					body := []byte(`{"metadata":{"event_id":"` + capturedID + `"}}`)
					signStandardWebhook(h, key, capturedID, time.Now(), body)
					return body
				}, http.StatusBadRequest},
			}
			for name, c := range refuse {
				resp, body := h.do(replay(t, p.url, captured, c.edit))
				if resp.StatusCode != c.status {
					t.Errorf("%s: status %d, want %d; body %q", name, resp.StatusCode, c.status, truncate(body))
				}
			}
			// unaltered, the captured forward is processed, once
			_, body := h.expect(replay(t, p.url, captured, nil), http.StatusOK)
			if got := answerStatus(t, body); got != "verified" {
				t.Errorf("the captured forward: answer %q, want verified", got)
			}
			_, body = h.expect(replay(t, p.url, captured, nil), http.StatusOK)
			if got := answerStatus(t, body); got != "duplicate" {
				t.Errorf("the captured forward again: answer %q, want duplicate", got)
			}

			// genuine deliveries through a gateway in front of the example
			gw := gateway{adminPort: adminPort, port: mustFreePort(t), storage: h.tempDir(),
				backend:    strings.TrimPrefix(p.url, "http://"),
				kayleExtra: "\t\tdedupe off\n" + forwardSignatureLines(other, secret)}
			h.load(gw.caddyfile())
			want := []processedEvent{{capturedID, "verification.session.succeeded", "verified"}}
			var first event
			for i, c := range []struct{ typ, status string }{
				{"verification.session.succeeded", "verified"},
				{"verification.session.failed", "failed"},
				{"verification.session.expired", "expired"},
				{"verification.session.cancelled", "cancelled"},
				{"verification.attempt.succeeded", "ignored"}, // a type it does not know
			} {
				ev := sessionEvent(t, c.typ)
				if i == 0 {
					first = ev
				}
				_, body := h.expect(deliver(t, gw.url(), ev), http.StatusOK)
				if got := answerStatus(t, body); got != c.status {
					t.Errorf("%s: answer %q, want %q", c.typ, got, c.status)
				}
				want = append(want, processedEvent{ev.id, c.typ, c.status})
			}
			// Kayle's retry of the first event: the gateway forwards it (dedupe
			// off), the example acknowledges it without processing it again
			resp, body := h.expect(deliver(t, gw.url(), first), http.StatusOK)
			if got := answerStatus(t, body); got != "duplicate" {
				t.Errorf("the first event again: answer %q, want duplicate", got)
			}
			if resp.Header.Get(kayle.HeaderDuplicate) != "" {
				t.Error("the gateway answered the retry itself: its dedupe is not off")
			}
			// copies of one event arriving together (racing retries): one is
			// processed, the others are acknowledged as duplicates
			racing := sessionEvent(t, "verification.session.expired")
			answers := deliverAtOnce(h, gw.url(), racing, 4)
			slices.Sort(answers)
			if !slices.Equal(answers, []string{"duplicate", "duplicate", "duplicate", "expired"}) {
				t.Errorf("4 copies at once: answers %q, want one expired, 3 duplicates", answers)
			}
			want = append(want, processedEvent{racing.id, racing.typ, "expired"})

			got := p.processedEvents(t)
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("the example processed\n%v\nwant\n%v", got, want)
			}
		})
	}
}

// The npm package standardwebhooks, an implementation that is not ours,
// verifies the gateway's signature on a genuine forward, with either secret
// of a rotation, and refuses it once its body or id is changed.
func TestForwardSignatureVerifiedByNPMStandardWebhooks(t *testing.T) {
	node := lookPath(t, "node", "Node.js (apt-get install -y nodejs npm)")
	requireNodeModules(t)
	h := newHarness(t)
	oldSecret, _ := newForwardSecret(t)
	newSecret, _ := newForwardSecret(t)
	fwd := captureForward(h, newEvent(t, nil), newSecret, oldSecret)

	type check struct {
		Secret  string            `json:"secret"`
		Headers map[string]string `json:"headers"`
		Body    string            `json:"body"`
	}
	headers := func(edit func(map[string]string)) map[string]string {
		m := make(map[string]string)
		for name := range fwd.Header {
			m[strings.ToLower(name)] = fwd.Header.Get(name)
		}
		if edit != nil {
			edit(m)
		}
		return m
	}
	body := string(fwd.Body)
	checks := []struct {
		name  string
		check check
		want  string
	}{
		{"as forwarded, the new secret", check{newSecret, headers(nil), body}, "ok"},
		{"as forwarded, the old secret", check{oldSecret, headers(nil), body}, "ok"},
		{"body changed", check{newSecret, headers(nil), strings.Replace(body, "Marie", "Maria", 1)}, "WebhookVerificationError"},
		{"body extended", check{newSecret, headers(nil), body + " "}, "WebhookVerificationError"},
		{"webhook-id changed", check{newSecret, headers(func(m map[string]string) { m["webhook-id"] = "evt_" + randomHex(t, 12) }), body}, "WebhookVerificationError"},
		{"another secret", check{"whsec_" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)), headers(nil), body}, "WebhookVerificationError"},
	}
	input := make([]check, len(checks))
	for i, c := range checks {
		input[i] = c.check
	}
	stdin, err := json.Marshal(input)
	if err != nil {
		t.Fatal(err)
	}
	// one line per check: "ok" or the name of the error verify threw
	const script = `
const { Webhook } = require("standardwebhooks");
for (const c of JSON.parse(require("node:fs").readFileSync(0, "utf8"))) {
  try { new Webhook(c.secret).verify(c.body, c.headers); console.log("ok"); }
  catch (err) { console.log(err.name); }
}`
	cmd := exec.Command(node, "-e", script)
	cmd.Dir = "../examples/node" // where its node_modules are
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v\n%s", err, stderr.String())
	}
	results := strings.Fields(string(out))
	if len(results) != len(checks) {
		t.Fatalf("node printed %q for %d checks", out, len(checks))
	}
	for i, c := range checks {
		if results[i] != c.want {
			t.Errorf("%s: standardwebhooks said %s, want %s", c.name, results[i], c.want)
		}
	}
}

// examples/Caddyfile, the demo gateway the example READMEs start, adapts,
// signs its forwards and sends them where the examples listen.
func TestExamplesCaddyfileAdapts(t *testing.T) {
	raw, err := os.ReadFile("../examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(raw, map[string]any{"filename": "examples/Caddyfile"})
	if err != nil {
		t.Fatalf("adapting examples/Caddyfile: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("warnings: %v", warnings)
	}
	for _, want := range []string{`"forward_signature_secrets":["{env.KAYLE_FORWARD_SECRET}"]`, `"dial":"localhost:9000"`} {
		if !strings.Contains(string(adapted), want) {
			t.Errorf("the adapted config has no %s:\n%s", want, adapted)
		}
	}
}
