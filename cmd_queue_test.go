package kaylewebhook

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
	"github.com/caddyserver/certmagic"
	"github.com/go-jose/go-jose/v4"
)

// queueBlock is a kayle_webhook block with a queue and the given key lines
// (decryption_key demo … when keys is empty), as a gateway's config holds it.
func queueBlock(t *testing.T, keys, extra string) string {
	t.Helper()
	key, err := filepath.Abs(demoKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := filepath.Abs(demoSecretFile)
	if err != nil {
		t.Fatal(err)
	}
	if keys == "" {
		keys = "decryption_key demo " + key
	}
	return fmt.Sprintf("kayle_webhook {\n\tsigning_secret {file.%s}\n\t%s\n%s\n\tqueue {\n\t\tforward {\n\t\t\trespond 200\n\t\t}\n\t}\n}\n", secret, strings.ReplaceAll(keys, "{demo}", key), extra)
}

// queueConfig is a gateway config with one queued handler whose records are
// in the file_system storage at root.
func queueConfig(t *testing.T, root, keys string) string {
	t.Helper()
	return writeConfig(t, fmt.Sprintf("{\n\tstorage file_system %q\n}\nhttp://127.0.0.1:9 {\n%s}\n", root, queueBlock(t, keys, "")))
}

// runQueueCmd runs caddy kayle queue with the gateway's clock.
func (qt *adminQueue) runQueueCmd(config string, args ...string) (out, notes string, err error) {
	o := queueOptions{Config: config, now: qt.clock.Now}
	for _, a := range args {
		switch {
		case a == "--dead":
			o.Dead = true
		case o.Action == "":
			o.Action = a
		default:
			o.EventIDs = append(o.EventIDs, a)
		}
	}
	var b testIO
	err = runQueue(context.Background(), o, b.io(""))
	return b.out.String(), b.notes.String(), err
}

// lineOf is the line of out that names eventID, or "".
func lineOf(out, eventID string) string {
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, eventID+" ") {
			return line
		}
	}
	return ""
}

// The queue command against a running gateway's file_system storage: what
// list shows (and never shows), retry, drop, pause and resume.
func TestQueueCommand(t *testing.T) {
	root := t.TempDir()
	qt := newAdminQueue(t, &certmagic.FileStorage{Path: root})
	const a, b, c = "evt_qc_dead", "evt_qc_untried", "evt_qc_queued"
	qt.makeDeadAndQueued(t, a, b, c)
	config := queueConfig(t, root, "")

	out, notes, err := qt.runQueueCmd(config, "list")
	if err != nil {
		t.Fatalf("list: %v\n%s", err, out)
	}
	t.Logf("list:\n%s", out)
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if want := "queue under kayle_webhook/events/queue in the global storage FileStorage:" + root; lines[0] != want {
		t.Errorf("header %q, want %q", lines[0], want)
	}
	if !regexp.MustCompile(`^EVENT ID +TYPE +RECEIVED +ATTEMPTS +LAST STATUS +NEXT TRY`).MatchString(lines[1]) {
		t.Errorf("no column header: %q", lines[1])
	}
	line := lineOf(out, c)
	if !regexp.MustCompile(`^evt_qc_queued +verification\.session\.succeeded +2026-03-01T14:00:00Z +1 +503 +2026-03-01T14:00:0\dZ$`).MatchString(line) {
		t.Errorf("the queued event's line: %q\n%s", line, out)
	}
	if lineOf(out, a) != "" || lineOf(out, b) != "" {
		t.Errorf("list shows dead events:\n%s", out)
	}
	if want := "1 queued event; 2 dead (list them with --dead)"; lines[len(lines)-1] != want {
		t.Errorf("count line %q, want %q", lines[len(lines)-1], want)
	}
	if notes != "" {
		t.Errorf("notes: %s", notes)
	}
	// nothing of the delivery: no part of the JWE, the signature, a claim
	assertShowsNoDelivery(t, qt, out, c)

	out, _, err = qt.runQueueCmd(config, "list", "--dead")
	if err != nil {
		t.Fatalf("list --dead: %v\n%s", err, out)
	}
	t.Logf("list --dead:\n%s", out)
	if !regexp.MustCompile(`\nevt_qc_dead +verification\.session\.succeeded +2026-03-01T12:00:00Z +1 +503 +dead\nevt_qc_untried +verification\.session\.failed +2026-03-01T12:00:00Z +0 +- +dead\n2 dead events\n$`).MatchString(out) {
		t.Errorf("list --dead:\n%s", out)
	}
	if lineOf(out, c) != "" {
		t.Errorf("list --dead shows a queued event:\n%s", out)
	}
	assertShowsNoDelivery(t, qt, out, a)

	// drop: out of the queue, a later copy is a duplicate, forget forgets it
	out, _, err = qt.runQueueCmd(config, "drop", b)
	if err != nil || !strings.Contains(out, "\ndropped     evt_qc_untried (was dead, 0 tries; a later copy is answered as a duplicate)\n") {
		t.Fatalf("drop: %v\n%s", err, out)
	}
	assertDuplicate(t, qt.deliver(t, b, "verification.session.failed"), b)
	var fb testIO
	if err := runForget(context.Background(), forgetOptions{Config: config, EventIDs: []string{b}}, fb.io("")); err != nil || !strings.Contains(fb.out.String(), "forgot     "+b+"\n") {
		t.Errorf("forget of a dropped event: %v\n%s", err, fb.out.String())
	}

	// retry --dead revives the one left; retry of ids, one unknown
	qt.status.Store(http.StatusOK)
	switched := qt.backend.Calls()
	out, _, err = qt.runQueueCmd(config, "retry", "--dead")
	if err != nil || !strings.Contains(out, "\nrevived     evt_qc_dead (was dead after 1 try; due now, its horizon counting from now)\n1 of 1 dead event revived;") {
		t.Fatalf("retry --dead: %v\n%s", err, out)
	}
	out, _, err = qt.runQueueCmd(config, "retry", c, "evt_qc_never")
	if err == nil || err.Error() != "1 of 2 events were not retried" ||
		!strings.Contains(out, "\ndue now     evt_qc_queued (1 try so far)\n") ||
		!strings.Contains(out, "\nnot queued  evt_qc_never (no record: never queued here, or delivered and expired)\n") {
		t.Fatalf("retry: %v\n%s", err, out)
	}
	out, _, _ = qt.runQueueCmd(config, "list")
	if !regexp.MustCompile(`\nevt_qc_dead +\S+ +2026-03-01T12:00:00Z +0 +503 +2026-03-01T14:00:00Z \(due\) +retried 2026-03-01T14:00:00Z\n`).MatchString(out) {
		t.Errorf("the revived event's line:\n%s", out)
	}
	// the running gateway delivers them, each once
	qt.clock.Advance(3 * time.Second)
	waitUntil(t, "the retried events to be delivered", func() bool {
		return remembered(qt.h.dedupe, a) && remembered(qt.h.dedupe, c)
	})
	for _, id := range []string{a, c} {
		if got := qt.backendGot(id, switched); got != 1 {
			t.Errorf("the backend got %s %d times after the retry, want once", id, got)
		}
	}
	out, _, err = qt.runQueueCmd(config, "retry", a)
	if err == nil || !strings.Contains(out, "\nnot queued  evt_qc_dead (delivered 2026-03-01T14:00:03Z)\n") {
		t.Errorf("retry of a delivered event: %v\n%s", err, out)
	}
	out, _, err = qt.runQueueCmd(config, "retry", "--dead")
	if err != nil || !strings.HasSuffix(out, "\nno dead events\n") {
		t.Errorf("retry --dead with none: %v\n%s", err, out)
	}

	// pause and resume: the flag, and the running gateway reads it
	out, _, err = qt.runQueueCmd(config, "pause")
	if err != nil || !strings.HasSuffix(out, "\npaused: running gateways start no forward from their next poll (within a second); deliveries are still queued\n") {
		t.Fatalf("pause: %v\n%s", err, out)
	}
	waitUntil(t, "the gateway to read the pause", qt.paused)
	out, _, err = qt.runQueueCmd(config, "list")
	if err != nil || !regexp.MustCompile(`\nPAUSED \(paused 2026-03-01T14:00:03Z by .+\): nothing is forwarded until caddy kayle queue resume\nEVENT ID`).MatchString(out) {
		t.Errorf("list of a paused queue: %v\n%s", err, out)
	}
	if out, _, err = qt.runQueueCmd(config, "pause"); err != nil || !strings.Contains(out, "\nalready paused (paused 2026-03-01T14:00:03Z by ") {
		t.Errorf("pause again: %v\n%s", err, out)
	}
	out, _, err = qt.runQueueCmd(config, "resume")
	if err != nil || !strings.HasSuffix(out, "\nresumed: running gateways forward again from their next poll (within a second)\n") {
		t.Fatalf("resume: %v\n%s", err, out)
	}
	waitUntil(t, "the gateway to read the resume", func() bool { return !qt.paused() })
	if out, _, err = qt.runQueueCmd(config, "resume"); err != nil || !strings.HasSuffix(out, "\nnot paused: nothing to resume\n") {
		t.Errorf("resume again: %v\n%s", err, out)
	}
}

// assertShowsNoDelivery checks that out holds nothing of eventID's stored
// delivery: no segment of its JWE, nothing of its signature, no claim.
func assertShowsNoDelivery(t *testing.T, qt *adminQueue, out, eventID string) {
	t.Helper()
	rec := qt.record(t, eventID)
	if !rec.isQueued() {
		t.Fatalf("%s is not queued", eventID)
	}
	for i, segment := range strings.Split(rec.Queue.JWE, ".") {
		if len(segment) >= 8 && strings.Contains(out, segment[:8]) {
			t.Errorf("the output holds JWE segment #%d of %s:\n%s", i, eventID, out)
		}
	}
	for _, part := range strings.Split(rec.Queue.Signature, ",") {
		if strings.Contains(out, part) {
			t.Errorf("the output holds %q of the signature:\n%s", part, out)
		}
	}
	for _, s := range []string{secretClaim, "given_name", "claims", "vs_test", "whd_test"} {
		if strings.Contains(out, s) {
			t.Errorf("the output holds %q of the payload:\n%s", s, out)
		}
	}
}

// An event whose kid the config holds no key for is named, whether the
// keys come from decryption_key or a decryption_jwks file; a JWKS file
// that cannot be read is said once, and the listing goes on.
func TestQueueCommandNamesMissingKeys(t *testing.T) {
	root := t.TempDir()
	qt := newAdminQueue(t, &certmagic.FileStorage{Path: root})
	qt.enqueue(t, "evt_qk_1", "verification.session.succeeded")
	qt.enqueue(t, "evt_qk_2", "verification.session.succeeded")
	waitUntil(t, "the first try", func() bool {
		it := qt.item(t, "evt_qk_1")
		return it != nil && it.Attempts == 1
	})
	// another instance, whose config lacks the key, takes the second event
	// (the first instance is backing off) and cannot open it
	other := newAdminQueueOn(t, qt.storage.Storage, qt.clock, func(h *Handler) { h.DecryptionKeys = []KeyFile{{KeyID: "other", File: demoKeyFile}} })
	waitUntil(t, "the other instance to try the second event", func() bool { return qt.item(t, "evt_qk_2").LastError != "" })
	if n := other.backend.Calls(); n != 0 {
		t.Fatalf("an event that cannot be opened was forwarded %d times", n)
	}

	dir := t.TempDir()
	jwks, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: kayletest.DemoKey(t), KeyID: demoKID, Algorithm: "RSA-OAEP-256", Use: "enc"}}})
	if err != nil {
		t.Fatal(err)
	}
	jwksFile := filepath.Join(dir, "keys.jwks")
	if err := os.WriteFile(jwksFile, jwks, 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.jwks")

	for _, tc := range []struct {
		name, keys string
		missing    bool   // "key demo not configured" on every line
		note       string // in the notes, once
	}{
		{"decryption_key", "decryption_key demo {demo}", false, ""},
		{"another kid", "decryption_key other {demo}", true, ""},
		{"jwks", "decryption_key other {demo}\n\tdecryption_jwks " + jwksFile, false, ""},
		{"unreadable jwks", "decryption_key other {demo}\n\tdecryption_jwks " + missing, true, "decryption JWKS #1 (decryption_jwks, JSON decryption_jwks[0]) could not be read"},
		{"unknown placeholder", "decryption_key other {demo}\n\tdecryption_jwks {env.KAYLE_TEST_UNSET_VARIABLE}", true, "decryption JWKS #1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, notes, err := qt.runQueueCmd(queueConfig(t, root, tc.keys), "list")
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			t.Logf("list:\n%s", out)
			lastError := "last_error: its key demo is not configured: add its decryption_key"
			for _, id := range []string{"evt_qk_1", "evt_qk_2"} {
				line := lineOf(out, id)
				if line == "" {
					t.Errorf("%s is not listed:\n%s", id, out)
				}
				if got := strings.Contains(line, "  key demo not configured"); got != tc.missing {
					t.Errorf("%s: %q, want the missing key named: %v", id, line, tc.missing)
				}
				if got := strings.HasSuffix(line, lastError); got != (id == "evt_qk_2") {
					t.Errorf("%s: %q, want its last error: %v", id, line, id == "evt_qk_2")
				}
			}
			if !strings.HasSuffix(out, "\n2 queued events\n") {
				t.Errorf("count:\n%s", out)
			}
			if tc.note == "" && notes != "" || tc.note != "" && strings.Count(notes, tc.note) != 1 {
				t.Errorf("notes %q, want %q once", notes, tc.note)
			}
		})
	}
}

func TestQueueCommandRefusals(t *testing.T) {
	root := t.TempDir()
	withQueue := queueConfig(t, root, "")
	noQueue := writeConfig(t, fmt.Sprintf("{\n\tstorage file_system %q\n}\nhttp://127.0.0.1:9 {\n%s}\n", root, kayleBlock(t, "")))
	mixed := writeConfig(t, fmt.Sprintf("{\n\tstorage file_system %q\n}\nhttp://127.0.0.1:9 {\n\thandle /a {\n%s\t}\n\thandle /b {\n%s\t}\n\thandle /c {\n%s\t}\n}\n", root,
		queueBlock(t, "", "\tdedupe_prefix kayle/a"), queueBlock(t, "", "\tdedupe_prefix kayle/b"), kayleBlock(t, "\tdedupe_prefix kayle/plain")))
	for _, tc := range []struct {
		name   string
		o      queueOptions
		config string
		want   string
	}{
		{"no config", queueOptions{Action: "list"}, "", "--config is required"},
		{"no action", queueOptions{}, withQueue, "give an action"},
		{"unknown action", queueOptions{Action: "purge"}, withQueue, "unknown action purge"},
		{"retry nothing", queueOptions{Action: "retry"}, withQueue, "retry needs event ids"},
		{"retry both", queueOptions{Action: "retry", Dead: true, EventIDs: []string{"evt_1"}}, withQueue, "not both"},
		{"drop nothing", queueOptions{Action: "drop"}, withQueue, "drop needs event ids"},
		{"empty id", queueOptions{Action: "drop", EventIDs: []string{"evt_1", ""}}, withQueue, "an event id is empty"},
		{"list an id", queueOptions{Action: "list", EventIDs: []string{"evt_1"}}, withQueue, "list takes no event id"},
		{"pause an id", queueOptions{Action: "pause", EventIDs: []string{"evt_1"}}, withQueue, "pause takes no event id"},
		{"drop --dead", queueOptions{Action: "drop", Dead: true, EventIDs: []string{"evt_1"}}, withQueue, "--dead is for list and retry"},
		{"no queue", queueOptions{Action: "list"}, noQueue, "no kayle_webhook handler has a queue"},
		{"two queues", queueOptions{Action: "list"}, mixed, "pick one with --prefix: --prefix kayle/a (at"},
		{"prefix without a queue", queueOptions{Action: "list", Prefix: "kayle/plain"}, mixed, "the kayle_webhook handler with dedupe_prefix kayle/plain has no queue"},
		{"unknown prefix", queueOptions{Action: "list", Prefix: "kayle/zzz"}, mixed, "no kayle_webhook handler has dedupe_prefix kayle/zzz"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.o.Config = tc.config
			var b testIO
			err := runQueue(context.Background(), tc.o, b.io(""))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			if b.out.Len() > 0 {
				t.Errorf("it did something anyway:\n%s", b.out.String())
			}
		})
	}
	// --prefix picks one of several queues
	var b testIO
	if err := runQueue(context.Background(), queueOptions{Config: mixed, Prefix: "kayle/b", Action: "list"}, b.io("")); err != nil ||
		!strings.HasPrefix(b.out.String(), "queue under kayle/b/queue in ") || !strings.HasSuffix(b.out.String(), "\n0 queued events\n") {
		t.Errorf("--prefix kayle/b: %v\n%s", err, b.out.String())
	}
}

// Through cobra as caddy runs it: the action and ids as arguments, the
// flags before or after them, exit status 1 when an event was not queued.
func TestQueueCommandThroughCobra(t *testing.T) {
	root := t.TempDir()
	config := queueConfig(t, root, "")
	run := func(args ...string) (string, error) {
		cmd := kayleRoot(t)
		var out, notes bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetErr(&notes)
		cmd.SetArgs(append([]string{"queue"}, args...))
		err := cmd.Execute()
		return out.String(), err
	}
	if out, err := run("--config", config, "list", "--dead"); err != nil || !strings.HasSuffix(out, "\n0 dead events\n") {
		t.Errorf("list --dead: %v\n%s", err, out)
	}
	if out, err := run("pause", "--config", config); err != nil || !strings.Contains(out, "\npaused: ") {
		t.Errorf("pause: %v\n%s", err, out)
	}
	if !(&certmagic.FileStorage{Path: root}).Exists(context.Background(), "kayle_webhook/events/queue/paused") {
		t.Error("pause wrote no flag")
	}
	if out, err := run("--config", config, "list"); err != nil || !strings.Contains(out, "\nPAUSED (paused ") {
		t.Errorf("list: %v\n%s", err, out)
	}
	if out, err := run("-c", config, "resume"); err != nil || !strings.Contains(out, "\nresumed: ") {
		t.Errorf("resume: %v\n%s", err, out)
	}
	if out, err := run("--config", config, "drop", "evt_1"); err == nil || !strings.Contains(out, "\nnot queued  evt_1 (no record") {
		t.Errorf("drop of an unknown event: %v\n%s", err, out)
	}
	if _, err := run("--config", config); err == nil {
		t.Error("queue without an action did not fail")
	}
}
