package caddytest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// runKayle runs "caddy kayle <args>" as caddy does, in this process, and
// returns its stdout.
func runKayle(t *testing.T, args ...string) (string, error) {
	t.Helper()
	kayle, ok := caddycmd.Commands()["kayle"]
	if !ok {
		t.Fatal("the kayle command is not registered")
	}
	root := &cobra.Command{Use: kayle.Name + " " + kayle.Usage, Short: kayle.Short, Long: kayle.Long}
	kayle.CobraFunc(root)
	var out, notes bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&notes)
	root.SetArgs(args)
	err := root.Execute()
	if err != nil {
		t.Logf("caddy kayle %s: %v\n%s", strings.Join(args, " "), err, notes.String())
	}
	return out.String(), err
}

// joseSender installs testdata/jose-sender (panva's jose from npm) in a
// temporary folder and returns a function that makes a delivery with it: a
// Kayle sender that shares no code with this project. It needs node (20 or
// later) and npm with access to the npm registry.
func joseSender(t *testing.T) func(jwkFile, secretFile string, plaintext []byte) (signature string, body []byte) {
	t.Helper()
	dir := t.TempDir()
	for _, name := range []string{"package.json", "sender.mjs"} {
		data, err := os.ReadFile(filepath.Join("testdata", "jose-sender", name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	install := exec.Command("npm", "install", "--no-audit", "--no-fund", "--loglevel=error")
	install.Dir = dir
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("npm install in %s (this test needs node 20+ and npm): %v\n%s", dir, err, out)
	}
	return func(jwkFile, secretFile string, plaintext []byte) (string, []byte) {
		t.Helper()
		cmd := exec.Command("node", "sender.mjs", jwkFile, secretFile)
		cmd.Dir = dir
		cmd.Stdin = bytes.NewReader(plaintext)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("node sender.mjs: %v\n%s", err, stderr.String())
		}
		sig, body, ok := strings.Cut(strings.TrimSuffix(string(out), "\n"), "\n")
		if !ok {
			t.Fatalf("node sender.mjs printed %q", out)
		}
		return sig, []byte(body)
	}
}

// A key made by "caddy kayle keygen" works end to end: a delivery that an
// independent sender (panva's jose in node) encrypts to the JWK keygen
// printed is forwarded by a gateway using the key file keygen wrote.
func TestKeygenKeyOpensAnIndependentSendersDelivery(t *testing.T) {
	send := joseSender(t)
	h := newHarness(t)
	keys := h.tempDir()

	jwk, err := runKayle(t, "keygen", "--bits", "2048", "--kid", "k-2026", "--out", keys)
	if err != nil {
		t.Fatal(err)
	}
	var members map[string]any
	if err := json.Unmarshal([]byte(jwk), &members); err != nil {
		t.Fatalf("keygen's output is not a JWK: %v\n%s", err, jwk)
	}
	if _, private := members["d"]; private || members["kid"] != "k-2026" {
		t.Fatalf("keygen printed %v, want a public JWK with kid k-2026", members)
	}
	jwkFile := filepath.Join(h.tempDir(), "k-2026.jwk")
	if err := os.WriteFile(jwkFile, []byte(jwk), 0o600); err != nil {
		t.Fatal(err)
	}

	be := newBackend(t)
	gw := h.gateway(be)
	// the user's own secret beside the user's own key: the demo's would be
	// refused as a mix
	secretFile := filepath.Join(keys, "secret.txt")
	if err := os.WriteFile(secretFile, []byte("whsec_"+randomHex(t, 24)), 0o600); err != nil {
		t.Fatal(err)
	}
	gw.material = fmt.Sprintf("\t\tsigning_secret {file.%s}\n\t\tdecryption_key k-2026 %s\n", secretFile, filepath.Join(keys, "k-2026.pem"))
	h.load(gw.caddyfile())

	ev := newEvent(t, nil)
	sig, body := send(jwkFile, secretFile, ev.payload)
	req, err := http.NewRequest(http.MethodPost, gw.url(), bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/jose")
	req.Header.Set(kayle.SignatureHeader, sig)
	req.Header.Set(kayle.HeaderDeliveryID, "whd_"+randomHex(t, 8))
	h.expectForwarded(req)

	got := be.requests()
	if len(got) != 1 {
		t.Fatalf("the backend got %d requests, want 1", len(got))
	}
	if kid := got[0].Header.Get(kayle.HeaderKeyID); kid != "k-2026" {
		t.Errorf("opened with kid %q, want the keygen key k-2026", kid)
	}
	if !bytes.Equal(got[0].Body, ev.payload) {
		t.Errorf("the backend got %q, want the sender's plaintext", truncate(got[0].Body))
	}
}

// "caddy kayle forget" is how an operator's replay reaches the backend
// again: without it a later copy is a duplicate; after it, the next copy is
// forwarded with no duplicate header (and remembered again), other events
// stay remembered, and an unknown id is reported as not found.
func TestForgetLetsAReplayThrough(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	config := gw.caddyfile()
	h.load(config)
	configFile := filepath.Join(h.tempDir(), "Caddyfile")
	if err := os.WriteFile(configFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}

	replayed, other := newEvent(t, nil), newEvent(t, nil)
	for _, ev := range []event{replayed, other} {
		h.expectForwarded(deliver(t, gw.url(), ev))
		h.expectDuplicate(deliver(t, gw.url(), ev), ev.id)
	}

	out, err := runKayle(t, "forget", "--config", configFile, replayed.id, "evt_never_delivered")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"forgot     " + replayed.id + "\n", "not found  evt_never_delivered\n", gw.storage} {
		if !strings.Contains(out, want) {
			t.Errorf("forget's output lacks %q:\n%s", want, out)
		}
	}

	h.expectForwarded(deliver(t, gw.url(), replayed))
	if n := be.count(replayed.id); n != 2 {
		t.Errorf("the backend got the replayed event %d times, want 2", n)
	}
	h.expectDuplicate(deliver(t, gw.url(), replayed), replayed.id)
	h.expectDuplicate(deliver(t, gw.url(), other), other.id)
	if n := be.count(other.id); n != 1 {
		t.Errorf("the other event reached the backend %d times, want 1", n)
	}
}

// forget run while the gateway is forwarding the event waits for that
// forward to end, then forgets the record it wrote: the replay after it is
// forwarded.
func TestForgetDuringAForwardInFlight(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	be.respond = func(w http.ResponseWriter, r *http.Request, n int) {
		if n == 1 {
			entered <- struct{}{}
			<-release
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"received":true}`))
	}
	gw := h.gateway(be)
	config := gw.caddyfile()
	h.load(config)
	configFile := filepath.Join(h.tempDir(), "Caddyfile")
	if err := os.WriteFile(configFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}

	ev := newEvent(t, nil)
	forwarded := make(chan struct{})
	go func() {
		defer close(forwarded)
		resp, err := h.tc.Client.Do(deliver(t, gw.url(), ev))
		if err == nil {
			resp.Body.Close()
		}
	}()
	<-entered // the gateway holds the event's lock, its record not yet written

	forgot := make(chan string, 1)
	go func() {
		out, _ := runKayle(t, "forget", "--config", configFile, ev.id)
		forgot <- out
	}()
	// give forget time to reach the lock (a waiter polls every second);
	// the outcome below does not depend on it
	time.Sleep(1500 * time.Millisecond)
	close(release)
	<-forwarded
	if out := <-forgot; !strings.Contains(out, "forgot     "+ev.id) {
		t.Fatalf("forget during the forward: %s", out)
	}
	h.expectForwarded(deliver(t, gw.url(), ev))
	if n := be.count(ev.id); n != 2 {
		t.Errorf("the backend got the event %d times, want 2", n)
	}
}
