package caddytest

import (
	"bytes"
	"encoding/json"
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
// log or the storage: not on a forward, a duplicate, an ignored type, or a
// refused payload. The ids do reach the logs (they are how an operator
// traces an event): each access-log line names the event, its type, the kid
// and the outcome. The signing secret appears nowhere.
func TestNoPlaintextInLogsOrStorage(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	logs := h.tempDir()
	caddyLog := filepath.Join(logs, "caddy.log")
	accessLog := filepath.Join(logs, "access.log")
	gw.globalExtra = "\tdebug\n\tlog {\n\t\toutput file " + quote(caddyLog) + "\n\t\tformat json\n\t}\n"
	gw.siteExtra = "\tlog {\n\t\toutput file " + quote(accessLog) + "\n\t\tformat json\n\t}\n"
	gw.kayleExtra = "\t\tevents verification.session.succeeded\n"
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

	// a type outside the events allowlist: acknowledged, never forwarded
	failed := event{id: "evt_failed_" + randomHex(t, 8), typ: "verification.session.failed"}
	failed.payload = []byte(`{"type":"verification.session.failed","metadata":{"event_id":"` + failed.id +
		`"},"data":{"failure_code":"selfie_face_mismatch","claims":{"family_name":"` + secrets[0] + `"}}}`)
	if resp, _ := h.expect(deliver(t, gw.url(), failed), http.StatusOK); resp.Header.Get("X-Kayle-Ignored") != "true" {
		t.Errorf("a type outside the allowlist was not answered as ignored")
	}

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
		req := deliveryRequest(t, gw.url(), encrypt(t, payload), demo.Secret, time.Now(), "verification.session.succeeded")
		h.expect(req, http.StatusUnprocessableEntity)
	}
	if n := be.total(); n != 1 {
		t.Fatalf("backend got %d requests, want 1", n)
	}

	// a delivery's access-log line is written when its handler ends, just
	// after the answer (the dedupe record is written in between): one line
	// per request, 2 + 1 + len(refused)
	waitForLines(t, accessLog, `"logger":"http.log.access`, 3+len(refused))
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
	if strings.Contains(all, string(demo.Secret)) {
		t.Error("a log contains the signing secret")
	}
	// one access-log line per delivery tells what became of it
	outcomes := map[string]int{}
	for _, entry := range accessEntries(t, accessOut) {
		outcome, _ := entry["kayle_outcome"].(string)
		outcomes[outcome]++
		id, _ := entry["kayle_event_id"].(string)
		switch outcome {
		case "forwarded", "duplicate", "ignored":
			want := map[string]string{"kayle_event_id": ev.id, "kayle_event_type": ev.typ, "kayle_kid": demoKID}
			if outcome == "ignored" {
				want["kayle_event_id"], want["kayle_event_type"] = failed.id, failed.typ
			}
			for field, value := range want {
				if entry[field] != value {
					t.Errorf("%s access-log line: %s = %v, want %q", outcome, field, entry[field], value)
				}
			}
		case "rejected_payload":
			if entry["kayle_kid"] != demoKID || id != "" {
				t.Errorf("refused payload's access-log line: kid %v, event id %q", entry["kayle_kid"], id)
			}
		}
	}
	for outcome, want := range map[string]int{"forwarded": 1, "duplicate": 1, "ignored": 1, "rejected_payload": len(refused)} {
		if outcomes[outcome] != want {
			t.Errorf("%d access-log lines with kayle_outcome %q, want %d (all: %v)", outcomes[outcome], outcome, want, outcomes)
		}
	}
	if t.Failed() {
		t.Logf("Caddy log:\n%s\naccess log:\n%s", caddyOut, accessOut)
	}

	// the dedupe records
	forbidden := append(slices.Clone(secrets), string(demo.Secret))
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

// waitForLines waits, for up to 5 s, until the file at path has n lines
// containing substr.
func waitForLines(t testing.TB, path, substr string, n int) {
	t.Helper()
	for range 100 {
		data, _ := os.ReadFile(path)
		if strings.Count(string(data), substr) >= n {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("%s: fewer than %d lines containing %s after 5 s", path, n, substr)
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// accessEntries parses a JSON access log, one entry per line.
func accessEntries(t testing.TB, log string) []map[string]any {
	t.Helper()
	var entries []map[string]any
	for line := range strings.Lines(log) {
		var entry map[string]any
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Fatalf("access-log line is not JSON: %v", err)
		}
		entries = append(entries, entry)
	}
	return entries
}

func quote(s string) string { return `"` + s + `"` }
