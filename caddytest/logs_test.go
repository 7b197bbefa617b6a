package caddytest

import (
	"bytes"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// With Caddy at debug level and an access log, nothing decrypted reaches a
// log or the storage: not on a forward, a duplicate, or a refused payload.
// The event id does reach the logs (it is how an operator traces an event),
// and the signing secret appears nowhere.
func TestNoPlaintextInLogsOrStorage(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	logs := h.tempDir()
	caddyLog := filepath.Join(logs, "caddy.log")
	accessLog := filepath.Join(logs, "access.log")
	gw.globalExtra = "\tdebug\n\tlog {\n\t\toutput file " + quote(caddyLog) + "\n\t\tformat json\n\t}\n"
	gw.siteExtra = "\tlog {\n\t\toutput file " + quote(accessLog) + "\n\t\tformat json\n\t}\n"
	h.load(gw.caddyfile())

	// distinctive values that exist only inside the encrypted payloads
	secrets := []string{"Quillfeather", "Zenobia-Augusta", "1987-06-05", "kdid_doc_5b1e9f0c", "SELFIEJPEGBYTES0123"}
	claims := map[string]any{
		"family_name":       secrets[0],
		"given_names":       secrets[1],
		"date_of_birth":     secrets[2],
		"kayle_document_id": secrets[3],
		"portrait":          secrets[4],
	}
	ev := newEvent(t, claims)
	h.expectForwarded(deliver(t, gw.url(), ev))
	h.expectDuplicate(deliver(t, gw.url(), ev), ev.id)

	// signed payloads the gateway refuses after decrypting them (422): the
	// log says why without quoting them
	refused := [][]byte{
		// no event id
		[]byte(`{"type":"verification.session.succeeded","metadata":{"contract_version":1},"data":{"claims":{"family_name":"` + secrets[0] + `"}}}`),
		// an event id of the wrong JSON type
		[]byte(`{"type":"verification.session.succeeded","metadata":{"event_id":["` + secrets[1] + `"]},"data":{}}`),
		// not JSON
		[]byte(`family_name=` + secrets[0] + `&date_of_birth=` + secrets[2]),
		// trailing data after the object
		[]byte(`{"metadata":{"event_id":"evt_trailing"}} {"given_names":"` + secrets[1] + `"}`),
	}
	for _, payload := range refused {
		req := deliveryRequest(t, gw.url(), encrypt(t, payload), demo.secret, time.Now(), "verification.session.succeeded")
		h.expect(req, http.StatusUnprocessableEntity)
	}
	if n := be.total(); n != 1 {
		t.Fatalf("backend got %d requests, want 1", n)
	}

	// stopping waits for the requests in flight, so every log line is written
	h.stop()
	caddyOut := readFile(t, caddyLog)
	accessOut := readFile(t, accessLog)
	all := caddyOut + accessOut

	// the test means something only if the handler logged at debug level
	if !strings.Contains(caddyOut, `"logger":"http.handlers.kayle_webhook"`) || !strings.Contains(caddyOut, `"level":"debug"`) {
		t.Fatalf("the Caddy log has no debug line of the handler:\n%s", caddyOut)
	}
	if !strings.Contains(caddyOut, ev.id) {
		t.Errorf("the Caddy log never names the event id %s", ev.id)
	}
	if !strings.Contains(accessOut, ev.id) {
		t.Errorf("the access log never names the event id %s", ev.id)
	}
	for _, s := range secrets {
		if strings.Contains(all, s) {
			t.Errorf("a log contains the plaintext value %q", s)
		}
	}
	if strings.Contains(all, string(demo.secret)) {
		t.Error("a log contains the signing secret")
	}
	if t.Failed() {
		t.Logf("Caddy log:\n%s\naccess log:\n%s", caddyOut, accessOut)
	}

	// the dedupe records
	forbidden := append(slices.Clone(secrets), string(demo.secret))
	var files int
	err := filepath.WalkDir(gw.storage, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		files++
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, s := range forbidden {
			if bytes.Contains(data, []byte(s)) {
				t.Errorf("storage file %s contains %q", path, s)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files == 0 {
		t.Error("the storage holds no file: was the event remembered?")
	}
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func quote(s string) string { return `"` + s + `"` }
