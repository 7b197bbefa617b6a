package caddytest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/go-jose/go-jose/v4"
)

// exampleVariables are every variable Caddyfile.example reads, plus the
// acknowledgement the handler reads from Caddy's environment.
var exampleVariables = []string{
	"KAYLE_SIGNING_SECRET_FILE", "KAYLE_KEY_ID", "KAYLE_KEY_FILE",
	"KAYLE_BACKEND", "KAYLE_BIND", "KAYLE_LISTEN_PORT", "KAYLE_DEMO_PUBLIC",
}

// example runs the repository's Caddyfile.example in the in-process Caddy.
type example struct {
	h           *harness
	gatewayPort int
	backendPort int // where the demo backend (:8081 in the file) is moved
	caddyLog    string
	accessLog   string
}

// newExample moves the test into the repository root, where the file's
// relative paths to testdata/demo resolve, as they do for `go run
// ./cmd/caddy run --config Caddyfile.example` on a fresh clone.
func newExample(t *testing.T) *example {
	h := newHarness(t)
	t.Chdir("..")
	logs := h.tempDir()
	return &example{
		h:           h,
		gatewayPort: mustFreePort(t),
		backendPort: mustFreePort(t),
		caddyLog:    filepath.Join(logs, "caddy.log"),
		accessLog:   filepath.Join(logs, "access.log"),
	}
}

// load adapts Caddyfile.example as `caddy run` or `caddy reload` would in
// an environment holding exactly env among the file's variables, then
// loads it. The gateway's port and the demo backend's are moved to free
// ones (this machine is shared), the admin endpoint stays the harness's,
// and the logs go to files. It returns the error of adapting or loading.
func (e *example) load(env map[string]string) error {
	t := e.h.t
	t.Helper()
	for _, name := range exampleVariables {
		t.Setenv(name, "") // restored after the test
		os.Unsetenv(name)
	}
	for name, value := range env {
		t.Setenv(name, value)
	}
	os.Setenv("KAYLE_LISTEN_PORT", fmt.Sprint(e.gatewayPort))
	if _, ok := env["KAYLE_BACKEND"]; !ok {
		// the file's default, localhost:8081, moved with the demo backend
		os.Setenv("KAYLE_BACKEND", fmt.Sprintf("localhost:%d", e.backendPort))
	}

	body, err := os.ReadFile("Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": "Caddyfile.example"})
	if err != nil {
		return err
	}
	var cfg map[string]any
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["admin"] = map[string]any{"listen": fmt.Sprintf("localhost:%d", adminPort), "config": map[string]any{"persist": false}}
	logging, _ := cfg["logging"].(map[string]any)
	if logging == nil {
		logging = map[string]any{}
		cfg["logging"] = logging
	}
	logs, _ := logging["logs"].(map[string]any)
	if logs == nil {
		logs = map[string]any{}
		logging["logs"] = logs
	}
	for name := range logs {
		if name != "default" {
			logs[name].(map[string]any)["writer"] = map[string]any{"output": "file", "filename": e.accessLog}
		}
	}
	defaultLog, _ := logs["default"].(map[string]any)
	if defaultLog == nil {
		defaultLog = map[string]any{}
		logs["default"] = defaultLog
	}
	defaultLog["writer"] = map[string]any{"output": "file", "filename": e.caddyLog}
	defaultLog["encoder"] = map[string]any{"format": "json"}
	servers := cfg["apps"].(map[string]any)["http"].(map[string]any)["servers"].(map[string]any)
	for _, srv := range servers {
		listen := srv.(map[string]any)["listen"].([]any)
		for i, addr := range listen {
			listen[i] = strings.Replace(addr.(string), ":8081", fmt.Sprintf(":%d", e.backendPort), 1)
		}
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}

	err = postConfig(raw)
	e.h.tc.Client.CloseIdleConnections()
	return err
}

func (e *example) url() string { return fmt.Sprintf("http://127.0.0.1:%d/", e.gatewayPort) }

// demoWarnings returns the WARN lines of the Caddy log that name the demo
// material.
func (e *example) demoWarnings() []map[string]any {
	data, err := os.ReadFile(e.caddyLog)
	if err != nil && !os.IsNotExist(err) {
		e.h.t.Fatal(err)
	}
	var warns []map[string]any
	for line := range strings.SplitSeq(string(data), "\n") {
		var entry map[string]any
		if json.Unmarshal([]byte(line), &entry) != nil {
			continue
		}
		if entry["level"] == "warn" && strings.Contains(fmt.Sprint(entry["msg"]), "published DEMO") {
			warns = append(warns, entry)
		}
	}
	return warns
}

// ownMaterial is a secret and key that are not the demo's (the repository's
// test vectors, testdata/vectors), as a real deployment's variables would
// name them.
func ownMaterial(t *testing.T) (secretFile, keyFile string) {
	t.Helper()
	secretFile, err := filepath.Abs("../testdata/vectors/secret.txt")
	if err != nil {
		t.Fatal(err)
	}
	keyFile, err = filepath.Abs("../testdata/vectors/keys/k1.pkcs8.pem")
	if err != nil {
		t.Fatal(err)
	}
	return secretFile, keyFile
}

// The one-command demo still works, and says at start that it runs on the
// published material; a delivery shows up in the access log.
func TestExampleDemoRunsWithAWarning(t *testing.T) {
	e := newExample(t)
	if err := e.load(nil); err != nil {
		t.Fatalf("the demo does not start: %v", err)
	}
	warns := e.demoWarnings()
	if len(warns) != 1 {
		t.Fatalf("%d WARN lines name the demo material, want 1:\n%s", len(warns), readFile(t, e.caddyLog))
	}
	if msg := fmt.Sprint(warns[0]["msg"]); !strings.Contains(msg, "testdata/demo") || !strings.Contains(msg, "anyone can sign deliveries") {
		t.Errorf("the WARN does not say what is at stake: %q", msg)
	}
	if fmt.Sprint(warns[0]["demo_material"]) != `[signing secret #1 decryption key "demo"]` {
		t.Errorf("the WARN names %v, want the secret and the key", warns[0]["demo_material"])
	}

	ev := newEvent(t, nil)
	_, body := e.h.expect(deliver(t, e.url(), ev), http.StatusOK)
	if !bytes.Contains(body, []byte(`"demo_backend_received"`)) || !bytes.Contains(body, []byte(ev.id)) {
		t.Errorf("the demo backend did not answer with the event: %s", truncate(body))
	}
	// the file's bare `log` writes access lines to the default log; a
	// delivery's line is written when its handler ends, just after the answer
	var logged string
	for range 100 {
		logged = ""
		for _, path := range []string{e.caddyLog, e.accessLog} {
			if data, err := os.ReadFile(path); err == nil {
				logged += string(data)
			}
		}
		if strings.Contains(logged, `"kayle_event_id":"`+ev.id+`"`) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.h.stop()
	if !strings.Contains(logged, `"logger":"http.log.access`) || !strings.Contains(logged, `"kayle_event_id":"`+ev.id+`"`) {
		t.Errorf("no access-log line shows the delivery:\n%s", logged)
	}
}

// Whichever of the material variables is unset or misspelled, the gateway
// refuses to start instead of putting the demo's material beside the user's.
func TestExamplePartialVariablesAreRefused(t *testing.T) {
	secret, key := ownMaterial(t)
	cases := map[string]struct {
		env  map[string]string
		want string
	}{
		"secret variable misspelled":          {map[string]string{"KAYLE_SIGNING_SECRET_FIEL": secret, "KAYLE_KEY_ID": "k1", "KAYLE_KEY_FILE": key}, "mix of the published DEMO material"},
		"key file variable unset":             {map[string]string{"KAYLE_SIGNING_SECRET_FILE": secret, "KAYLE_KEY_ID": "k1"}, "mix of the published DEMO material"},
		"key id variable unset":               {map[string]string{"KAYLE_SIGNING_SECRET_FILE": secret, "KAYLE_KEY_FILE": key}, "KAYLE_KEY_ID is probably unset"},
		"material unset on a public listener": {map[string]string{"KAYLE_BIND": "0.0.0.0"}, "not loopback-only"},
	}
	e := newExample(t)
	for name, c := range cases {
		os.Unsetenv("KAYLE_SIGNING_SECRET_FIEL")
		err := e.load(c.env)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want a refusal containing %q", name, err, c.want)
		}
	}
	if warns := e.demoWarnings(); len(warns) != 0 {
		t.Errorf("a refused config ran with the demo material: %v", warns)
	}
}

// A real deployment starts silently; a reload from a shell without its
// variables falls back to the demo on loopback only, named in a WARN; and
// the demo backend refuses a delivery opened with the user's own key, so a
// forgotten KAYLE_BACKEND is a retry at Kayle, never a lost event.
func TestExampleOwnMaterialAndAReloadWithoutIt(t *testing.T) {
	secret, key := ownMaterial(t)
	e := newExample(t)
	own := map[string]string{"KAYLE_SIGNING_SECRET_FILE": secret, "KAYLE_KEY_ID": "k1", "KAYLE_KEY_FILE": key}
	if err := e.load(own); err != nil {
		t.Fatalf("own material refused: %v", err)
	}
	if warns := e.demoWarnings(); len(warns) != 0 {
		t.Errorf("own material named as the demo's: %v", warns)
	}

	pub, _, err := kayle.LoadPublicKeyFile(key)
	if err != nil {
		t.Fatal(err)
	}
	secretBytes, err := os.ReadFile(secret)
	if err != nil {
		t.Fatal(err)
	}
	ev := newEvent(t, nil)
	jwe, err := kayle.EncryptDelivery(ev.payload, pub, "k1", jose.A256GCM)
	if err != nil {
		t.Fatal(err)
	}
	req := deliveryRequest(t, e.url(), jwe, bytes.TrimSpace(secretBytes), time.Now(), ev.typ)
	if _, body := e.h.expect(req, http.StatusServiceUnavailable); !bytes.Contains(body, []byte("KAYLE_BACKEND")) {
		t.Errorf("the demo backend's refusal does not say what to set: %s", truncate(body))
	}

	if err := e.load(nil); err != nil {
		t.Fatalf("reload without the variables: %v", err)
	}
	warns := e.demoWarnings()
	if len(warns) != 1 {
		t.Fatalf("%d WARN lines after the reload, want 1", len(warns))
	}
	if fmt.Sprint(warns[0]["listen"]) != fmt.Sprintf("[127.0.0.1:%d [::1]:%d]", e.gatewayPort, e.gatewayPort) {
		t.Errorf("the demo listens on %v, want loopback only", warns[0]["listen"])
	}
}
