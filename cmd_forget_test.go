package kaylewebhook

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// kayleBlock is a kayle_webhook block with the demo material and extra
// options, as a config file the commands read would hold it.
func kayleBlock(t *testing.T, extra string) string {
	t.Helper()
	key, err := filepath.Abs(demoKeyFile)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := filepath.Abs(demoSecretFile)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("kayle_webhook {\n\tsigning_secret {file.%s}\n\tdecryption_key demo %s\n%s\n}\n", secret, key, extra)
}

// writeConfig writes a Caddyfile named so that caddy's loader adapts it
// without --adapter, and returns its path.
func writeConfig(t *testing.T, caddyfile string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(path, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// After forget, the next copy of a delivered event reaches the backend again
// with no duplicate header; before it, and for other events, copies are
// duplicates. The handler keeps its records in the storage the config names.
func TestForgetCommandLetsTheEventThroughAgain(t *testing.T) {
	for _, where := range []string{"global storage", "handler storage"} {
		t.Run(where, func(t *testing.T) {
			root := t.TempDir()
			h := newTestHandler(t, func(h *Handler) { h.StorageRaw = fileStorageJSON(root) })
			backend := &testBackend{}
			deliver := func(id string) served {
				return serve(h, makeDelivery(t, eventPayload(id), time.Now()), backend)
			}
			for _, id := range []string{"evt_replayed", "evt_other"} {
				if res := deliver(id); res.Status != http.StatusOK {
					t.Fatalf("%s: %d", id, res.Status)
				}
				if res := deliver(id); res.Rec.Header().Get(kayle.HeaderDuplicate) != "true" {
					t.Fatalf("%s was not a duplicate before forget", id)
				}
			}

			config := fmt.Sprintf("{\n\tstorage file_system %q\n}\nhttp://127.0.0.1:9 {\n%s}\n", root, kayleBlock(t, ""))
			if where == "handler storage" {
				// the handler's own storage wins over the global one
				config = fmt.Sprintf("{\n\tstorage file_system %q\n}\nhttp://127.0.0.1:9 {\n%s}\n",
					t.TempDir(), kayleBlock(t, fmt.Sprintf("\tstorage file_system %q", root)))
			}
			var b testIO
			err := runForget(context.Background(), forgetOptions{Config: writeConfig(t, config), EventIDs: []string{"evt_replayed", "evt_never_seen"}}, b.io(""))
			if err != nil {
				t.Fatal(err)
			}
			out := b.out.String()
			for _, want := range []string{"forgot     evt_replayed\n", "not found  evt_never_seen\n", root} {
				if !strings.Contains(out, want) {
					t.Errorf("output lacks %q:\n%s", want, out)
				}
			}

			calls := backend.Calls()
			res := deliver("evt_replayed")
			if res.Status != http.StatusOK || res.Rec.Header().Get(kayle.HeaderDuplicate) != "" || backend.Calls() != calls+1 {
				t.Fatalf("after forget: %d, %s %q, backend calls %d→%d; want it forwarded",
					res.Status, kayle.HeaderDuplicate, res.Rec.Header().Get(kayle.HeaderDuplicate), calls, backend.Calls())
			}
			if res := deliver("evt_replayed"); res.Rec.Header().Get(kayle.HeaderDuplicate) != "true" {
				t.Error("the replay forwarded after forget was not remembered again")
			}
			if res := deliver("evt_other"); res.Rec.Header().Get(kayle.HeaderDuplicate) != "true" {
				t.Error("forget of one event let another through")
			}
		})
	}
}

// Handlers are found wherever the http app nests them; several with
// different prefixes need --prefix, and the error lists them.
func TestForgetCommandPicksTheHandler(t *testing.T) {
	config := writeConfig(t, fmt.Sprintf(`{
	storage file_system %q
}
http://127.0.0.1:9 {
	handle /a {
		%s	}
	route /b {
		%s	}
	handle /c {
		%s	}
}
http://127.0.0.1:10 {
	%s}
`, t.TempDir(),
		kayleBlock(t, "\tdedupe_prefix kayle/a"),
		kayleBlock(t, "\tdedupe_prefix kayle/b"),
		kayleBlock(t, "\tdedupe_prefix /kayle/a/"), // the same records as /a
		kayleBlock(t, "\tdedupe off")))

	var b testIO
	err := runForget(context.Background(), forgetOptions{Config: config, EventIDs: []string{"evt_1"}}, b.io(""))
	if err == nil {
		t.Fatal("an ambiguous config was accepted")
	}
	for _, want := range []string{"--prefix kayle/a ", "--prefix kayle/b "} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("the error does not list %q:\n%v", want, err)
		}
	}
	if strings.Count(err.Error(), "--prefix kayle/a ") != 1 {
		t.Errorf("two handlers sharing records are listed twice:\n%v", err)
	}
	if b.out.Len() > 0 {
		t.Errorf("forgot something anyway:\n%s", b.out.String())
	}

	for _, prefix := range []string{"kayle/b", "/kayle/a"} {
		b = testIO{}
		if err := runForget(context.Background(), forgetOptions{Config: config, Prefix: prefix, EventIDs: []string{"evt_1"}}, b.io("")); err != nil {
			t.Fatalf("--prefix %s: %v", prefix, err)
		}
		if want := "under " + strings.Trim(prefix, "/") + " in"; !strings.Contains(b.out.String(), want) {
			t.Errorf("--prefix %s: output lacks %q:\n%s", prefix, want, b.out.String())
		}
	}

	err = runForget(context.Background(), forgetOptions{Config: config, Prefix: "kayle/zzz", EventIDs: []string{"evt_1"}}, b.io(""))
	if err == nil || !strings.Contains(err.Error(), "kayle/zzz") || !strings.Contains(err.Error(), "--prefix kayle/b") {
		t.Errorf("an unknown --prefix: %v, want an error listing the prefixes", err)
	}
}

func TestForgetCommandRefusals(t *testing.T) {
	storage := t.TempDir()
	for _, tc := range []struct {
		name   string
		config string // a Caddyfile; "" for no file
		ids    []string
		want   string
	}{
		{"no config", "", []string{"evt_1"}, "--config is required"},
		{"no event id", "http://127.0.0.1:9 {\n" + kayleBlock(t, "") + "}\n", nil, "at least one event id"},
		{"empty event id", "http://127.0.0.1:9 {\n" + kayleBlock(t, "") + "}\n", []string{""}, "empty"},
		{"no handler", fmt.Sprintf("{\n\tstorage file_system %q\n}\nhttp://127.0.0.1:9 {\n\trespond ok\n}\n", storage), []string{"evt_1"}, "no kayle_webhook handler"},
		{"dedupe off", "http://127.0.0.1:9 {\n" + kayleBlock(t, "\tdedupe off") + "}\n", []string{"evt_1"}, "dedupe is off"},
		{"bad config", "http://127.0.0.1:9 {\n\tkayle_webhook {\n", []string{"evt_1"}, "Caddyfile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := forgetOptions{EventIDs: tc.ids}
			if tc.config != "" {
				o.Config = writeConfig(t, tc.config)
			}
			var b testIO
			err := runForget(context.Background(), o, b.io(""))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// lockSignal is a storage that reports Lock calls before making them (the
// first ones: a waiter retries Lock every poll, and nobody reads the later
// reports).
type lockSignal struct {
	certmagic.Storage
	locking chan string
}

func (s lockSignal) Lock(ctx context.Context, name string) error {
	select {
	case s.locking <- name:
	default:
	}
	return s.Storage.Lock(ctx, name)
}

// forget waits for the event's storage lock: a forward in flight (holding
// it) writes its record, and forget then deletes that record. Without the
// lock, forget would find nothing and the forward's record would stay.
func TestDeduperForgetWaitsForAForwardInFlight(t *testing.T) {
	fs0 := &certmagic.FileStorage{Path: t.TempDir()}
	storage := lockSignal{Storage: fs0, locking: make(chan string, 1)}
	d := newDeduper(storage, defaultDedupePrefix, defaultDedupeWindow, zap.NewNop(), time.Now)
	eventHash, recordKey, lockName := d.eventKeys("evt_in_flight")

	ctx, cancel := context.WithTimeout(context.Background(), testWaitBound)
	defer cancel()
	// the gateway's forward: lock held, record not written yet
	if err := fs0.Lock(ctx, lockName); err != nil {
		t.Fatal(err)
	}
	type result struct {
		found bool
		err   error
	}
	done := make(chan result, 1)
	go func() {
		found, err := d.forget(ctx, "evt_in_flight")
		done <- result{found, err}
	}()
	select {
	case got := <-storage.locking:
		if got != lockName {
			t.Fatalf("forget locked %q, want the event's lock %q", got, lockName)
		}
	case res := <-done:
		t.Fatalf("forget ended (found %v, %v) without taking the event's lock", res.found, res.err)
	}
	// the backend answered 2xx: the forward writes its record, then unlocks
	if err := d.commit(ctx, recordKey, record{EventSHA256: eventHash}, http.StatusOK); err != nil {
		t.Fatal(err)
	}
	if err := fs0.Unlock(ctx, lockName); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil || !res.found {
		t.Fatalf("forget: found %v, %v; want the in-flight forward's record found", res.found, res.err)
	}
	if _, err := fs0.Stat(ctx, recordKey); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the record is still there after forget (%v)", err)
	}
	if d.held[lockName] != 0 {
		t.Error("forget kept the event's lock")
	}
	// the lock is free again
	lockCtx, cancelLock := context.WithTimeout(ctx, testWaitBound)
	defer cancelLock()
	if err := fs0.Lock(lockCtx, lockName); err != nil {
		t.Fatalf("the lock was not released: %v", err)
	}
	_ = fs0.Unlock(ctx, lockName)

	// an event with no record
	found, err := d.forget(ctx, "evt_never")
	if err != nil || found {
		t.Errorf("forget of an unknown event: %v, %v", found, err)
	}
}

// A JSON config is read as is, with handlers nested anywhere in the http
// app (here a subroute in a server's error routes); a Caddyfile under
// another name is read with --adapter.
func TestForgetCommandConfigFormats(t *testing.T) {
	root := t.TempDir()
	key, _ := filepath.Abs(demoKeyFile)
	jsonConfig := fmt.Sprintf(`{
  "storage": {"module": "file_system", "root": %q},
  "apps": {"http": {"servers": {"gw": {
    "listen": [":9"],
    "errors": {"routes": [{"handle": [{"handler": "subroute", "routes": [{"handle": [
      {"handler": "kayle_webhook", "signing_secrets": ["whsec_0123456789abcdef0123"],
       "decryption_keys": [{"kid": "demo", "file": %q}], "dedupe_prefix": "kayle/errors"}
    ]}]}]}]}
  }}}}
}`, root, key)
	jsonFile := filepath.Join(t.TempDir(), "gateway.json")
	if err := os.WriteFile(jsonFile, []byte(jsonConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	var b testIO
	if err := runForget(context.Background(), forgetOptions{Config: jsonFile, EventIDs: []string{"evt_1"}}, b.io("")); err != nil {
		t.Fatal(err)
	}
	if want := "under kayle/errors in the global storage FileStorage:" + root; !strings.Contains(b.out.String(), want) {
		t.Errorf("output lacks %q:\n%s", want, b.out.String())
	}

	conf := filepath.Join(t.TempDir(), "gateway.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("{\n\tstorage file_system %q\n}\nhttp://127.0.0.1:9 {\n%s}\n", root, kayleBlock(t, ""))), 0o600); err != nil {
		t.Fatal(err)
	}
	b = testIO{}
	if err := runForget(context.Background(), forgetOptions{Config: conf, Adapter: "caddyfile", EventIDs: []string{"evt_1"}}, b.io("")); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.out.String(), "under kayle_webhook/events") {
		t.Errorf("--adapter caddyfile: %s", b.out.String())
	}
}
