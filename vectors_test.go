package kaylewebhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// The delivery vectors: requests made by an independent implementation
// (panva/jose on Node.js), with the outcome the gateway must give each.
// vectorsDir is the repository's own set, made by testdata/vectors/make.mjs
// with test-only keys and secrets; every test that needs a vector key, secret
// or body reads it. sharedVectorsDir is a second set, made apart from this
// repository, that the vector tests run as well when it sits beside the
// module root. Both have the same manifest and file layout.
const (
	vectorsDir       = "testdata/vectors"
	sharedVectorsDir = "../shared/vectors"
)

type vectorManifest struct {
	dir        string            // the set's folder; the manifest's paths are relative to it
	SecretFile string            `json:"secret_file"`
	Keys       map[string]string `json:"keys"`
	OtherKeys  []string          `json:"other_key_files"`
	Cases      []vectorCase      `json:"cases"`
}

type vectorCase struct {
	Name    string `json:"name"`
	Now     int64  `json:"now"`
	Request struct {
		Method   string            `json:"method"`
		Headers  map[string]string `json:"headers"`
		BodyFile string            `json:"body_file"`
	} `json:"request"`
	Expect struct {
		Outcome       string `json:"outcome"`
		Status        *int   `json:"status"`
		EventID       string `json:"event_id"`
		EventType     string `json:"event_type"`
		SessionID     string `json:"session_id"`
		PlaintextFile string `json:"plaintext_file"`
	} `json:"expect"`
	Config *struct {
		Secrets []string `json:"secrets"`
	} `json:"config"`
}

// vectorSetDirs returns the sets the vector tests run, by subtest name: the
// repository's always, and the shared one when its folder exists (then it
// must be complete). Its absence is logged, not silent.
func vectorSetDirs(t testing.TB) map[string]string {
	t.Helper()
	sets := map[string]string{"repository": vectorsDir}
	switch _, err := os.Stat(sharedVectorsDir); {
	case err == nil:
		sets["shared"] = sharedVectorsDir
	case errors.Is(err, fs.ErrNotExist):
		t.Logf("%s is absent (beside the module root): running the repository's vectors only", sharedVectorsDir)
	default:
		t.Fatalf("%s: %v", sharedVectorsDir, err)
	}
	return sets
}

// loadVectors reads the repository's set.
func loadVectors(t testing.TB) vectorManifest {
	t.Helper()
	return loadVectorSet(t, vectorsDir)
}

func loadVectorSet(t testing.TB, dir string) vectorManifest {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, "cases.json"))
	if err != nil {
		t.Fatalf("reading the test vectors' manifest: %v", err)
	}
	var m vectorManifest
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatalf("parsing %s/cases.json: %v", dir, err)
	}
	if len(m.Cases) == 0 {
		t.Fatalf("%s/cases.json has no cases", dir)
	}
	m.dir = dir
	return m
}

// path is a file of the set, by its manifest path.
func (m vectorManifest) path(name string) string { return filepath.Join(m.dir, name) }

func (m vectorManifest) read(t testing.TB, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(m.path(name))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// readVectorFile reads a file of the repository's set.
func readVectorFile(t testing.TB, name string) []byte {
	t.Helper()
	return vectorManifest{dir: vectorsDir}.read(t, name)
}

// vectorHandler provisions a Handler as the manifest describes a case's
// gateway: keys k1 and k2, the case's secrets, the clock pinned to now, and
// dedupe on file_system storage under root.
func vectorHandler(t testing.TB, m vectorManifest, c vectorCase, root string) *Handler {
	t.Helper()
	secretFiles := []string{m.SecretFile}
	if c.Config != nil && len(c.Config.Secrets) > 0 {
		secretFiles = c.Config.Secrets
	}
	h := &Handler{
		StorageRaw: json.RawMessage(`{"module":"file_system","root":` + strconv.Quote(root) + `}`),
		now:        func() time.Time { return time.Unix(c.Now, 0) },
	}
	for _, f := range secretFiles {
		h.SigningSecrets = append(h.SigningSecrets, "{file."+m.path(f)+"}")
	}
	for _, kid := range []string{"k1", "k2"} {
		h.DecryptionKeys = append(h.DecryptionKeys, KeyFile{KeyID: kid, File: m.path(m.Keys[kid])})
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("provision: %v", err)
	}
	if err := h.Validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	t.Cleanup(func() { _ = h.Cleanup() })
	return h
}

// serveVector runs one request through h (as Caddy would, see serve) to a
// backend answering 204, and reports the client's status and what the
// backend saw, if it was called.
func serveVector(t testing.TB, h *Handler, req *http.Request) (int, *forwarded, *caddy.Replacer) {
	t.Helper()
	backend := &testBackend{Respond: respondStatus(http.StatusNoContent)}
	res := serve(h, req, backend)
	if res.Err != nil {
		if _, ok := res.Err.(caddyhttp.HandlerError); !ok { // handle_errors asserts the type directly
			t.Fatalf("error is %T, not a caddyhttp.HandlerError: %v", res.Err, res.Err)
		}
	}
	switch backend.Calls() {
	case 0:
		return res.Status, nil, res.Repl
	case 1:
		seen := backend.Request(0)
		return res.Status, &seen, res.Repl
	}
	t.Fatalf("the backend was called %d times", backend.Calls())
	return 0, nil, nil
}

func vectorRequest(t testing.TB, m vectorManifest, c vectorCase) *http.Request {
	body := m.read(t, c.Request.BodyFile)
	req := httptest.NewRequest(c.Request.Method, "/kayle", bytes.NewReader(body))
	for k, v := range c.Request.Headers {
		req.Header.Set(k, v)
	}
	return req
}

// TestVectors runs every case of each vector set through the handler.
func TestVectors(t *testing.T) {
	for set, dir := range vectorSetDirs(t) {
		t.Run(set, func(t *testing.T) {
			m := loadVectorSet(t, dir)
			for _, c := range m.Cases {
				t.Run(c.Name, func(t *testing.T) { runVectorCase(t, m, c) })
			}
		})
	}
}

func runVectorCase(t *testing.T, m vectorManifest, c vectorCase) {
	root := t.TempDir()
	h := vectorHandler(t, m, c, root)
	status, seen, repl := serveVector(t, h, vectorRequest(t, m, c))

	switch c.Expect.Outcome {
	case "forward":
		if seen == nil {
			t.Fatalf("not forwarded: status %d", status)
		}
		assertForwarded(t, m, c, seen, repl)
		if status != http.StatusNoContent {
			t.Errorf("client got %d, want the backend's 204", status)
		}
	case "reject":
		if seen != nil {
			t.Fatalf("forwarded a delivery that must be rejected (status %d)", status)
		}
		if status >= 200 && status < 300 {
			t.Fatalf("status %d, want non-2xx", status)
		}
		if c.Expect.Status != nil && status != *c.Expect.Status {
			t.Fatalf("status %d, want %d", status, *c.Expect.Status)
		}
	case "forward_or_reject":
		if seen != nil {
			assertForwarded(t, m, c, seen, repl)
		}
		assertOnlyUnderPrefix(t, root, defaultDedupePrefix)
	default:
		t.Fatalf("unknown outcome %q", c.Expect.Outcome)
	}
}

func assertForwarded(t *testing.T, m vectorManifest, c vectorCase, seen *forwarded, repl *caddy.Replacer) {
	t.Helper()
	if c.Expect.PlaintextFile != "" {
		want := m.read(t, c.Expect.PlaintextFile)
		if !bytes.Equal(seen.Body, want) {
			t.Errorf("forwarded body differs from %s (%d bytes, want %d)", c.Expect.PlaintextFile, len(seen.Body), len(want))
		}
		if seen.Header.Get("Content-Length") != strconv.Itoa(len(want)) {
			t.Errorf("Content-Length %q, want %d", seen.Header.Get("Content-Length"), len(want))
		}
	}
	sentT := strings.TrimPrefix(strings.Split(c.Request.Headers["X-Kayle-Signature"], ",")[0], "t=")
	want := map[string]string{
		"Content-Type":                 "application/json",
		kayle.HeaderEventID:            c.Expect.EventID,
		kayle.HeaderEventType:          c.Expect.EventType,
		kayle.HeaderEvent:              c.Expect.EventType,
		kayle.HeaderSessionID:          c.Expect.SessionID,
		kayle.HeaderVerified:           "true",
		kayle.HeaderSignatureTimestamp: sentT,
		kayle.HeaderDeliveryID:         c.Request.Headers[kayle.HeaderDeliveryID],
		kayle.SignatureHeader:          "",
	}
	if c.Expect.EventType == "" {
		delete(want, kayle.HeaderEventType)
		delete(want, kayle.HeaderEvent)
	}
	if c.Expect.SessionID == "" {
		delete(want, kayle.HeaderSessionID)
	}
	for name, value := range want {
		if got := seen.Header.Values(name); value == "" && len(got) != 0 || value != "" && (len(got) != 1 || got[0] != value) {
			t.Errorf("%s: got %q, want %q", name, got, value)
		}
	}
	// the kid in the JWE header, or for a JWE without one, a key we hold
	if kids := seen.Header.Values(kayle.HeaderKeyID); len(kids) != 1 || kids[0] != "k1" && kids[0] != "k2" {
		t.Errorf("%s: %q", kayle.HeaderKeyID, kids)
	}
	// and no other gateway header of the request, in any spelling (case, '_'
	// for '-'), reached the backend: those the gateway sets are checked
	// above, or replaced by it; the others must be gone. Folded here, not by
	// the gateway's code.
	setByGateway := map[string]bool{
		kayle.HeaderEventID: true, kayle.HeaderEventType: true, kayle.HeaderEvent: true, kayle.HeaderSessionID: true, kayle.HeaderContractVersion: true,
		kayle.HeaderKeyID: true, kayle.HeaderSignatureTimestamp: true, kayle.HeaderVerified: true, kayle.HeaderDeliveryID: true,
	}
	for name := range c.Request.Headers {
		canonical := http.CanonicalHeaderKey(name)
		if setByGateway[canonical] || !strings.HasPrefix(strings.ToLower(strings.ReplaceAll(name, "_", "-")), "x-kayle-") {
			continue
		}
		if got := seen.Header.Values(canonical); len(got) != 0 {
			t.Errorf("the request's %s reached the backend: %q", name, got)
		}
	}
	if ph, _ := repl.GetString("http.kayle.event_id"); ph != c.Expect.EventID {
		t.Errorf("{http.kayle.event_id} = %q, want %q", ph, c.Expect.EventID)
	}
}

// assertOnlyUnderPrefix checks that the storage holds nothing outside the
// dedupe prefix but certmagic's locks.
func assertOnlyUnderPrefix(t *testing.T, root, prefix string) {
	t.Helper()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		rel = filepath.ToSlash(rel)
		if !strings.HasPrefix(rel, prefix+"/") && !strings.HasPrefix(rel, "locks/") {
			t.Errorf("storage file outside the prefix: %s", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// and nothing beside the storage root
	if entries, _ := os.ReadDir(filepath.Dir(root)); len(entries) != 1 {
		t.Errorf("files written beside the storage root: %v", entries)
	}
}

// TestVectorsOtherKeyFormats decrypts the k1 and k2 cases of each vector set
// with the keys loaded from every other file format the sets ship.
func TestVectorsOtherKeyFormats(t *testing.T) {
	for set, dir := range vectorSetDirs(t) {
		t.Run(set, func(t *testing.T) { testVectorsOtherKeyFormats(t, loadVectorSet(t, dir)) })
	}
}

func testVectorsOtherKeyFormats(t *testing.T, m vectorManifest) {
	byName := map[string]vectorCase{}
	for _, c := range m.Cases {
		byName[c.Name] = c
	}
	configs := map[string]func(h *Handler){
		"pkcs1+jwk": func(h *Handler) {
			h.DecryptionKeys = []KeyFile{
				{KeyID: "k1", File: m.path("keys/k1.pkcs1.pem")},
				{KeyID: "k2", File: m.path("keys/k2.private.jwk.json")},
			}
		},
		"jwks": func(h *Handler) {
			h.DecryptionKeys = nil
			h.DecryptionJWKS = []string{m.path("keys/private.jwks.json")}
		},
	}
	for name, configure := range configs {
		for _, caseName := range []string{"succeeded-a256gcm-k1", "cancelled-a192gcm-k2", "no-kid"} {
			t.Run(name+"/"+caseName, func(t *testing.T) {
				c, ok := byName[caseName]
				if !ok {
					t.Fatalf("%s/cases.json has no case %q", m.dir, caseName)
				}
				h := &Handler{
					SigningSecrets: []string{"{file." + m.path(m.SecretFile) + "}"},
					DedupeDisabled: true,
					now:            func() time.Time { return time.Unix(c.Now, 0) },
				}
				configure(h)
				ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
				defer cancel()
				if err := h.Provision(ctx); err != nil {
					t.Fatal(err)
				}
				status, seen, repl := serveVector(t, h, vectorRequest(t, m, c))
				if seen == nil {
					t.Fatalf("not forwarded: %d", status)
				}
				assertForwarded(t, m, c, seen, repl)
			})
		}
	}
}
