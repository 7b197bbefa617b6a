package natskvstorage

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io/fs"
	"reflect"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile" // the caddyfile adapter
	"github.com/nats-io/nats.go"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/storagetest/servers"
)

const bucket = "kayle"

// start runs a NATS server with the bucket made.
func start(t *testing.T) *servers.NATS {
	t.Helper()
	n := servers.StartNATS(t)
	n.CreateBucket(t, bucket, 0)
	return n
}

// open provisions a storage instance, as one Caddy process would; its
// connection is closed when the test ends.
func open(t *testing.T, url string, lockExpiry time.Duration) *Storage {
	t.Helper()
	s := &Storage{URL: url, Bucket: bucket, LockExpiry: caddy.Duration(lockExpiry)}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := s.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

type lockResult struct {
	err  error
	took time.Duration
}

func lockAsync(s *Storage, ctx context.Context, name string) <-chan lockResult {
	ch := make(chan lockResult, 1)
	start := time.Now()
	go func() {
		err := s.Lock(ctx, name)
		ch <- lockResult{err, time.Since(start)}
	}()
	return ch
}

// tryLock is Lock with a short deadline: nil means it took the lock.
func tryLock(s *Storage, name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	return s.Lock(ctx, name)
}

func TestCaddyfile(t *testing.T) {
	type config struct {
		url, bucket string
		expiry      caddy.Duration
	}
	for _, tc := range []struct {
		in   string
		want config
	}{
		{`kayle_test_natskv nats://127.0.0.1:4222 b`, config{"nats://127.0.0.1:4222", "b", 0}},
		{"kayle_test_natskv {\n\turl nats://127.0.0.1:4222\n\tbucket b\n\tlock_expiry 3s\n}",
			config{"nats://127.0.0.1:4222", "b", caddy.Duration(3 * time.Second)}},
	} {
		var s Storage
		if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in)); err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		if got := (config{s.URL, s.Bucket, s.LockExpiry}); got != tc.want {
			t.Errorf("%q: got %+v, want %+v", tc.in, got, tc.want)
		}
	}
	var s Storage
	if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser("kayle_test_natskv {\n\thosts x\n}")); err == nil {
		t.Error("an unknown subdirective was accepted")
	}
	if _, err := caddy.GetModule("caddy.storage.kayle_test_natskv"); err != nil {
		t.Error(err)
	}
}

func TestMissingBucket(t *testing.T) {
	t.Parallel()
	n := servers.StartNATS(t)
	s := &Storage{URL: n.URL, Bucket: "never_made"}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := s.Provision(ctx); err == nil {
		s.Close()
		t.Fatal("Provision with a missing bucket succeeded")
	}
}

// The global storage option adapts to the module's JSON.
func TestCaddyfileAdapts(t *testing.T) {
	in := "{\n\tstorage kayle_test_natskv {\n\t\turl nats://127.0.0.1:4222\n\t\tbucket kayle\n\t}\n}\n"
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(in), nil)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Storage json.RawMessage `json:"storage"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	if got, want := string(cfg.Storage), `{"bucket":"kayle","module":"kayle_test_natskv","url":"nats://127.0.0.1:4222"}`; got != want {
		t.Errorf("adapted storage %s, want %s", got, want)
	}
}

func TestStorageBasics(t *testing.T) {
	t.Parallel()
	n := start(t)
	s := open(t, n.URL, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if _, err := s.Load(ctx, "a/b/c.json"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing key: %v, want fs.ErrNotExist", err)
	}
	if _, err := s.Stat(ctx, "a/b/c.json"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Stat of a missing key: %v, want fs.ErrNotExist", err)
	}
	if s.Exists(ctx, "a/b/c.json") {
		t.Fatal("Exists of a missing key: true")
	}
	before := time.Now()
	for key, val := range map[string]string{"a/b/c.json": "c", "a/b/d": "dd", "a/e": "", "f": "f"} {
		if err := s.Store(ctx, key, []byte(val)); err != nil {
			t.Fatal(err)
		}
	}
	if v, err := s.Load(ctx, "a/b/c.json"); err != nil || string(v) != "c" {
		t.Fatalf("Load: %q, %v", v, err)
	}
	if v, err := s.Load(ctx, "a/e"); err != nil || len(v) != 0 {
		t.Fatalf("Load of an empty value: %q, %v", v, err)
	}
	if !s.Exists(ctx, "a/b/d") {
		t.Error("Exists of a stored key: false")
	}
	ki, err := s.Stat(ctx, "a/b/d")
	if err != nil || !ki.IsTerminal || ki.Size != 2 || ki.Key != "a/b/d" {
		t.Fatalf("Stat of a value: %+v, %v", ki, err)
	}
	// the server's clock: same machine here, so close to ours
	if d := ki.Modified.Sub(before); d < -2*time.Second || d > time.Minute {
		t.Errorf("Stat Modified %v, stored at about %v", ki.Modified, before)
	}
	if ki, err := s.Stat(ctx, "a/b"); err != nil || ki.IsTerminal {
		t.Errorf("Stat of a directory: %+v, %v", ki, err)
	}
	for _, tc := range []struct {
		dir       string
		recursive bool
		want      []string
	}{
		{"a", false, []string{"a/b", "a/e"}},
		{"a", true, []string{"a/b/c.json", "a/b/d", "a/e"}},
		{"", false, []string{"a", "f"}},
		{"nothing", false, nil},
	} {
		got, err := s.List(ctx, tc.dir, tc.recursive)
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("List(%q, %v) = %q, %v; want %q", tc.dir, tc.recursive, got, err, tc.want)
		}
	}
	if err := s.Delete(ctx, "a/b/d"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(ctx, "a/b/d"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load after Delete: %v", err)
	}
	if err := s.Delete(ctx, "never/stored"); err != nil {
		t.Errorf("Delete of a missing key: %v", err)
	}
}

// Two instances (two Caddy processes) exclude each other, and so do two
// calls in one; a waiter takes a released lock within its poll interval.
func TestLockExcludes(t *testing.T) {
	t.Parallel()
	n := start(t)
	a, b := open(t, n.URL, 0), open(t, n.URL, 0)
	bg := context.Background()
	const name = "kayle_webhook_event_x"

	if err := a.Lock(bg, name); err != nil {
		t.Fatal(err)
	}
	// HeavyHorst's fixed lifetime: the holder's clock plus 5 min
	raw, err := a.kv.Get(lockKeyPrefix + name)
	if err != nil {
		t.Fatal(err)
	}
	if exp := time.Unix(0, int64(binary.LittleEndian.Uint64(raw.Value()))); time.Until(exp) < 4*time.Minute || time.Until(exp) > 5*time.Minute {
		t.Errorf("the lock expires at %v, want 5 min from now", exp)
	}
	if err := tryLock(a, name); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a second Lock in the same instance: %v, want its deadline", err)
	}
	wctx, wcancel := context.WithTimeout(bg, 10*time.Second)
	defer wcancel()
	waiter := lockAsync(b, wctx, name)
	select {
	case r := <-waiter:
		t.Fatalf("the other instance's Lock returned %v while the lock was held", r.err)
	case <-time.After(time.Second):
	}
	released := time.Now()
	if err := a.Unlock(bg, name); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-waiter:
		if r.err != nil {
			t.Fatalf("the waiter: %v", r.err)
		}
		if d := time.Since(released); d > time.Second {
			t.Errorf("the waiter took the released lock after %v, want within its ~200 ms poll", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter did not take the released lock")
	}
	if err := tryLock(a, name); err == nil {
		t.Error("the first instance took the lock back while the waiter held it")
	}
	if err := b.Unlock(bg, name); err != nil {
		t.Fatal(err)
	}
	// a second Unlock expects the revision already deleted: an error
	if err := b.Unlock(bg, name); err == nil {
		t.Error("a second Unlock: nil, want a wrong-last-sequence error")
	}
}

// The lock lapses its expiry after acquisition although its holder is
// alive: nothing refreshes it. (lock_expiry shortens HeavyHorst's 5 min.)
func TestLockExpiresWithoutRefresh(t *testing.T) {
	t.Parallel()
	const expiry = 2 * time.Second
	n := start(t)
	a, b, c := open(t, n.URL, expiry), open(t, n.URL, expiry), open(t, n.URL, expiry)
	bg := context.Background()
	const name = "kayle_webhook_event_slow"

	if err := a.Lock(bg, name); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg, expiry+10*time.Second)
	defer cancel()
	r := <-lockAsync(b, ctx, name)
	if r.err != nil {
		t.Fatalf("the waiter: %v", r.err)
	}
	t.Logf("a live holder's lock was taken %v after it was acquired", r.took.Round(10*time.Millisecond))
	if r.took < expiry-100*time.Millisecond || r.took > expiry+time.Second {
		t.Errorf("taken after %v, want its expiry (%v) plus a poll", r.took, expiry)
	}
	if err := tryLock(c, name); err == nil {
		t.Error("a third instance took the lock the waiter just took")
	}
	// the old holder's Unlock expects its own revision, gone: an error,
	// and the new holder keeps the lock
	if err := a.Unlock(bg, name); err == nil {
		t.Error("the old holder's Unlock after the takeover: nil, want an error")
	}
	if err := tryLock(c, name); err == nil {
		t.Error("the old holder's Unlock freed the new holder's lock")
	}
	if err := b.Unlock(bg, name); err != nil {
		t.Fatal(err)
	}
}

// Unlock of a name this instance never locked deletes with revision 0,
// i.e. unconditionally: another holder's lock is gone and a third instance
// takes it at once.
func TestForeignUnlockDeletesTheLock(t *testing.T) {
	t.Parallel()
	n := start(t)
	a, b, c := open(t, n.URL, 0), open(t, n.URL, 0), open(t, n.URL, 0)
	bg := context.Background()
	const name = "kayle_webhook_event_y"

	if err := a.Lock(bg, name); err != nil {
		t.Fatal(err)
	}
	if err := b.Unlock(bg, name); err != nil {
		t.Fatalf("Unlock of another instance's lock: %v (HeavyHorst: nil, deleting it)", err)
	}
	if err := tryLock(c, name); err != nil {
		t.Fatalf("after the foreign Unlock a third instance's Lock: %v, want the lock at once", err)
	}
	if err := a.Unlock(bg, name); err == nil {
		t.Error("the first holder's Unlock after the third took the lock: nil, want an error")
	}
	if err := c.Unlock(bg, name); err != nil {
		t.Fatal(err)
	}
}

// ctx bounds only the sleeps between reads: an ended ctx still takes a
// free lock, and ends the wait for a held one within a poll.
func TestLockCtxBoundsOnlyTheWait(t *testing.T) {
	t.Parallel()
	n := start(t)
	a, b := open(t, n.URL, 0), open(t, n.URL, 0)
	bg := context.Background()
	done, cancel := context.WithCancel(bg)
	cancel()
	if err := a.Lock(done, "free"); err != nil {
		t.Fatalf("Lock of a free name with an ended ctx: %v (HeavyHorst: nil)", err)
	}
	start := time.Now()
	if err := b.Lock(done, "free"); !errors.Is(err, context.Canceled) {
		t.Fatalf("Lock of a held name with an ended ctx: %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("it returned after %v", d)
	}
	if err := a.Unlock(bg, "free"); err != nil {
		t.Fatal(err)
	}
}

// With the server stopped, Stat reports every key missing while Load and
// Lock fail, each after JetStream's 5 s request timeout whatever the ctx
// (the KV calls take none); after a restart the same instance works again
// (it reconnects).
func TestServerStopped(t *testing.T) {
	t.Parallel()
	n := start(t)
	s := open(t, n.URL, 0)
	bg := context.Background()
	if err := s.Store(bg, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	n.Stop(t)
	ctx, cancel := context.WithTimeout(bg, 30*time.Second)
	defer cancel()
	took := time.Now()
	if _, err := s.Stat(ctx, "k"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Stat with the server stopped: %v, want fs.ErrNotExist (HeavyHorst's mapping)", err)
	}
	t.Logf("Stat with the server stopped: fs.ErrNotExist after %v", time.Since(took).Round(time.Millisecond))
	took = time.Now()
	if _, err := s.Load(ctx, "k"); err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load with the server stopped: %v, want a non-ErrNotExist error", err)
	} else {
		t.Logf("Load with the server stopped: %v after %v", err, time.Since(took).Round(time.Millisecond))
	}
	short, scancel := context.WithTimeout(bg, time.Second)
	defer scancel()
	took = time.Now()
	err := s.Lock(short, "n")
	d := time.Since(took)
	t.Logf("Lock (1 s ctx) with the server stopped: %v after %v", err, d.Round(time.Millisecond))
	if err == nil {
		t.Error("Lock with the server stopped succeeded")
	}
	if d < 4*time.Second {
		t.Errorf("Lock returned after %v: its KV read ignores ctx and waits JetStream's 5 s", d)
	}
	n.Start(t)
	// the client reconnects within its 2 s reconnect wait
	deadline := time.Now().Add(10 * time.Second)
	for s.nc.Status() != nats.CONNECTED && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if v, err := s.Load(ctx, "k"); err != nil || string(v) != "v" {
		t.Fatalf("Load after the restart: %q, %v", v, err)
	}
	if err := s.Lock(ctx, "n"); err != nil {
		t.Fatal(err)
	}
	if err := s.Unlock(bg, "n"); err != nil {
		t.Fatal(err)
	}
}
