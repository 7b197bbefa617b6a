package pglockstorage

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"reflect"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile" // the caddyfile adapter

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/storagetest/servers"
)

// lease is pglock's lease (dmarcwise keeps the default): a held lock is
// retried once per lease, and a dead holder's taken after one.
const lease = 20 * time.Second

func TestMain(m *testing.M) {
	// caddy.InstanceID writes under Caddy's data folder: never the user's
	dir, err := os.MkdirTemp("", "kayle-pglock-caddy-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv("XDG_DATA_HOME", dir)
	os.Setenv("XDG_CONFIG_HOME", dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// open provisions a storage instance, as one Caddy process would; it is
// cleaned up when the test ends.
func open(t *testing.T, connString string) *Storage {
	t.Helper()
	s := &Storage{ConnectionString: connString}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if err := s.Provision(ctx); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = s.Cleanup()
		cancel()
	})
	return s
}

// lockRow reads a lock's row as pglock left it: its record version number
// (which each heartbeat changes) and whether the row is there.
func lockRow(t *testing.T, db *sql.DB, name string) (rvn int64, ok bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := db.QueryRowContext(ctx, `SELECT record_version_number FROM `+locksTable+` WHERE name = $1`, name).Scan(&rvn)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return rvn, true
}

func rawDB(t *testing.T, connString string) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", connString)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

// lockResult runs Lock in the background, reporting its error and how long
// it took.
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

func TestCaddyfile(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`kayle_test_pglock "host=127.0.0.1 port=5432"`, "host=127.0.0.1 port=5432"},
		{"kayle_test_pglock {\n\tconnection_string postgres://u@127.0.0.1/db\n}", "postgres://u@127.0.0.1/db"},
	} {
		var s Storage
		if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in)); err != nil {
			t.Fatalf("%q: %v", tc.in, err)
		}
		if s.ConnectionString != tc.want {
			t.Errorf("%q: connection_string %q, want %q", tc.in, s.ConnectionString, tc.want)
		}
	}
	var s Storage
	if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser("kayle_test_pglock {\n\tdsn x\n}")); err == nil {
		t.Error("an unknown subdirective was accepted")
	}
	if _, err := caddy.GetModule("caddy.storage.kayle_test_pglock"); err != nil {
		t.Error(err)
	}
}

// The global storage option adapts to the module's JSON.
func TestCaddyfileAdapts(t *testing.T) {
	in := "{\n\tstorage kayle_test_pglock {\n\t\tconnection_string \"host=127.0.0.1 port=5432 user=caddy\"\n\t}\n}\n"
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
	if got, want := string(cfg.Storage), `{"connection_string":"host=127.0.0.1 port=5432 user=caddy","module":"kayle_test_pglock"}`; got != want {
		t.Errorf("adapted storage %s, want %s", got, want)
	}
}

func TestStorageBasics(t *testing.T) {
	t.Parallel()
	pg := servers.StartPostgres(t)
	s := open(t, pg.ConnString)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	if _, err := s.Load(ctx, "a/b/c.json"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Load of a missing key: %v, want fs.ErrNotExist", err)
	}
	if _, err := s.Stat(ctx, "a/b/c.json"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Stat of a missing key: %v, want fs.ErrNotExist", err)
	}
	if s.Exists(ctx, "a") {
		t.Fatal("Exists of a missing key: true")
	}
	before := time.Now()
	for key, val := range map[string]string{"a/b/c.json": "c", "a/b/d": "dd", "a/e": "", "f": "f"} {
		if err := s.Store(ctx, key, []byte(val)); err != nil {
			t.Fatal(err)
		}
	}
	if v, err := s.Load(ctx, "a/b/d"); err != nil || string(v) != "dd" {
		t.Fatalf("Load: %q, %v", v, err)
	}
	if v, err := s.Load(ctx, "a/e"); err != nil || len(v) != 0 {
		t.Fatalf("Load of an empty value: %q, %v", v, err)
	}
	for _, key := range []string{"a/b/c.json", "a/b", "a", "f"} {
		if !s.Exists(ctx, key) {
			t.Errorf("Exists(%q): false", key)
		}
	}
	ki, err := s.Stat(ctx, "a/b/d")
	if err != nil || !ki.IsTerminal || ki.Size != 2 || ki.Key != "a/b/d" {
		t.Fatalf("Stat of a value: %+v, %v", ki, err)
	}
	// the database's clock: same machine here, so close to ours
	if d := ki.Modified.Sub(before); d < -2*time.Second || d > time.Minute {
		t.Errorf("Stat Modified %v, stored at about %v", ki.Modified, before)
	}
	if ki, err := s.Stat(ctx, "a/b"); err != nil || ki.IsTerminal {
		t.Fatalf("Stat of a directory: %+v, %v", ki, err)
	}
	time.Sleep(10 * time.Millisecond)
	if err := s.Store(ctx, "a/b/d", []byte("new")); err != nil {
		t.Fatal(err)
	}
	if ki2, err := s.Stat(ctx, "a/b/d"); err != nil || !ki2.Modified.After(ki.Modified) || ki2.Size != 3 {
		t.Errorf("Stat after overwriting: %+v (before %+v), %v", ki2, ki, err)
	}

	for _, tc := range []struct {
		dir       string
		recursive bool
		want      []string
	}{
		{"a", false, []string{"a/b", "a/e"}},
		{"a/", false, []string{"a/b", "a/e"}},
		{"a", true, []string{"a/b", "a/b/c.json", "a/b/d", "a/e"}},
		{"", false, []string{"a", "f"}},
		{"nothing", false, nil},
	} {
		got, err := s.List(ctx, tc.dir, tc.recursive)
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("List(%q, %v) = %q, %v; want %q", tc.dir, tc.recursive, got, err, tc.want)
		}
	}

	// Delete takes what is under the key too; a missing key is no error
	if err := s.Delete(ctx, "a/b"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(ctx, "a/b/c.json"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load after deleting its directory: %v", err)
	}
	if v, err := s.Load(ctx, "a/e"); err != nil || len(v) != 0 {
		t.Errorf("a sibling after Delete: %q, %v", v, err)
	}
	if err := s.Delete(ctx, "never/stored"); err != nil {
		t.Errorf("Delete of a missing key: %v", err)
	}
}

// Two instances (two Caddy processes) exclude each other, and so do two
// calls in one. A waiter retries once per lease, so it takes a released
// lock up to a lease after it began waiting.
func TestLockExcludes(t *testing.T) {
	t.Parallel()
	pg := servers.StartPostgres(t)
	a, b := open(t, pg.ConnString), open(t, pg.ConnString)
	bg := context.Background()
	const name = "kayle_webhook_event_x"

	if err := a.Lock(bg, name); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(bg, 300*time.Millisecond)
	start := time.Now()
	err := a.Lock(short, name)
	cancel()
	if err == nil || time.Since(start) > 5*time.Second {
		t.Fatalf("a second Lock in the same instance: %v after %v, want an error at its 300 ms deadline", err, time.Since(start))
	}
	if err := b.Unlock(bg, name); err == nil {
		t.Error("Unlock of a lock this instance does not hold: nil, want an error")
	}

	wctx, wcancel := context.WithTimeout(bg, lease+25*time.Second)
	defer wcancel()
	waiter := lockAsync(b, wctx, name)
	select {
	case r := <-waiter:
		t.Fatalf("the other instance's Lock returned %v while the lock was held", r.err)
	case <-time.After(2 * time.Second):
	}
	if err := a.Unlock(bg, name); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-waiter:
		if r.err != nil {
			t.Fatalf("the waiter: %v", r.err)
		}
		t.Logf("the waiter took the lock %v after it began waiting (released at 2 s)", r.took.Round(100*time.Millisecond))
		if r.took > lease+5*time.Second {
			t.Errorf("the waiter took %v, want about one lease (%v)", r.took, lease)
		}
	case <-time.After(lease + 20*time.Second):
		t.Fatal("the waiter did not take the released lock")
	}
	short, cancel = context.WithTimeout(bg, 300*time.Millisecond)
	err = a.Lock(short, name)
	cancel()
	if err == nil {
		t.Error("the first instance took the lock back while the waiter held it")
	}
	if err := b.Unlock(bg, name); err != nil {
		t.Fatal(err)
	}
}

// The heartbeat runs on the Lock call's ctx: once it is cancelled, the row
// is never refreshed again although nobody released it.
func TestCancelledLockCtxStopsHeartbeat(t *testing.T) {
	t.Parallel()
	pg := servers.StartPostgres(t)
	a := open(t, pg.ConnString)
	db := rawDB(t, pg.ConnString)
	bg := context.Background()

	if err := a.Lock(bg, "live"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(bg)
	if err := a.Lock(ctx, "cancelled"); err != nil {
		t.Fatal(err)
	}
	cancel()
	time.Sleep(time.Second) // a heartbeat already under way settles
	live0, _ := lockRow(t, db, "live")
	cancelled0, ok := lockRow(t, db, "cancelled")
	if !ok {
		t.Fatal("the cancelled-ctx lock's row is gone at once")
	}
	time.Sleep(pglockHeartbeat + 2*time.Second)
	if live1, _ := lockRow(t, db, "live"); live1 == live0 {
		t.Errorf("the live lock was not refreshed in %v (rvn %d)", pglockHeartbeat+2*time.Second, live0)
	}
	cancelled1, ok := lockRow(t, db, "cancelled")
	if !ok || cancelled1 != cancelled0 {
		t.Errorf("the cancelled-ctx lock: row there %v, rvn %d -> %d; want it kept and never refreshed", ok, cancelled0, cancelled1)
	}
	// Unlock succeeds; whether it also deletes the row depends on whether
	// pglock's heartbeat goroutine saw the cancelled context first (it then
	// marks the lock released in memory, and the row stays until stolen):
	// a race in pglock, not a promise either way
	if err := a.Unlock(bg, "cancelled"); err != nil {
		t.Fatal(err)
	}
	_, kept := lockRow(t, db, "cancelled")
	t.Logf("after Unlock of the cancelled-ctx lock its row is kept: %v", kept)
	if err := a.Unlock(bg, "live"); err != nil {
		t.Fatal(err)
	}
}

const pglockHeartbeat = 5 * time.Second

// A holder that died (no heartbeat, row left) is taken over only by one
// Lock call that watches the row for a whole lease; short calls never
// take it, however many.
func TestDeadHolderStolenByOneLongLock(t *testing.T) {
	t.Parallel()
	pg := servers.StartPostgres(t)
	dead, waiter, poller := open(t, pg.ConnString), open(t, pg.ConnString), open(t, pg.ConnString)
	db := rawDB(t, pg.ConnString)
	bg := context.Background()
	const name = "kayle_webhook_event_dead"

	hctx, die := context.WithCancel(bg)
	if err := dead.Lock(hctx, name); err != nil {
		t.Fatal(err)
	}
	die() // its heartbeat stops; the row stays, as after a SIGKILL
	time.Sleep(time.Second)
	deadRVN, _ := lockRow(t, db, name)

	wctx, wcancel := context.WithTimeout(bg, lease+25*time.Second)
	defer wcancel()
	long := lockAsync(waiter, wctx, name)
	polls, won := 0, 0
	var r lockResult
	deadline := time.Now().Add(lease + 20*time.Second)
wait:
	for {
		select {
		case r = <-long:
			break wait
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no takeover")
		}
		// the plugin's old way: a fresh 1 s Lock call per poll
		pctx, pcancel := context.WithTimeout(bg, time.Second)
		if poller.Lock(pctx, name) == nil {
			won++
			_ = poller.Unlock(bg, name)
		}
		pcancel()
		polls++
	}
	if r.err != nil {
		t.Fatalf("the long Lock: %v", r.err)
	}
	t.Logf("the long Lock took the dead holder's lock after %v; %d short polls meanwhile, %d won", r.took.Round(100*time.Millisecond), polls, won)
	if won != 0 {
		t.Errorf("%d of %d short Lock calls took the dead holder's lock", won, polls)
	}
	if r.took < lease-time.Second || r.took > lease+5*time.Second {
		t.Errorf("takeover after %v, want one lease (%v)", r.took, lease)
	}
	if rvn, ok := lockRow(t, db, name); !ok || rvn == deadRVN {
		t.Errorf("after the takeover the row is there %v with rvn %d (dead holder's %d)", ok, rvn, deadRVN)
	}
	// the dead instance, were it alive, unlocks its lost lock with nil
	// (and must not delete the new holder's row)
	if err := dead.Unlock(bg, name); err != nil {
		t.Errorf("Unlock of a lost lock: %v, want nil", err)
	}
	if _, ok := lockRow(t, db, name); !ok {
		t.Error("the old holder's Unlock deleted the new holder's lock")
	}
	if err := waiter.Unlock(bg, name); err != nil {
		t.Fatal(err)
	}
}

// Cleanup (a reload) releases the locks still held: another instance takes
// them at once, the old one's Unlock is nil, and it locks nothing more.
func TestCleanupReleasesHeldLocks(t *testing.T) {
	t.Parallel()
	pg := servers.StartPostgres(t)
	a, b := open(t, pg.ConnString), open(t, pg.ConnString)
	db := rawDB(t, pg.ConnString)
	bg := context.Background()

	if err := a.Lock(bg, "held"); err != nil {
		t.Fatal(err)
	}
	if err := a.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, ok := lockRow(t, db, "held"); ok {
		t.Fatal("Cleanup left the held lock's row")
	}
	ctx, cancel := context.WithTimeout(bg, 5*time.Second)
	defer cancel()
	if err := b.Lock(ctx, "held"); err != nil {
		t.Fatalf("another instance after Cleanup: %v", err)
	}
	if err := a.Unlock(bg, "held"); err != nil {
		t.Errorf("Unlock after Cleanup: %v, want nil", err)
	}
	if err := a.Lock(ctx, "other"); err == nil {
		t.Error("Lock after Cleanup succeeded")
	}
	if err := a.Store(ctx, "k", []byte("v")); err == nil {
		t.Error("Store after Cleanup succeeded")
	}
	if err := b.Unlock(bg, "held"); err != nil {
		t.Fatal(err)
	}
}

// A stopped server fails Lock at once (no wait), and the storage works
// again once it is back.
func TestServerStopped(t *testing.T) {
	t.Parallel()
	pg := servers.StartPostgres(t)
	s := open(t, pg.ConnString)
	bg := context.Background()
	if err := s.Store(bg, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	pg.Stop(t)
	ctx, cancel := context.WithTimeout(bg, 10*time.Second)
	defer cancel()
	start := time.Now()
	if err := s.Lock(ctx, "n"); err == nil {
		t.Fatal("Lock with the server stopped succeeded")
	} else {
		t.Logf("Lock with the server stopped: %v after %v", err, time.Since(start).Round(time.Millisecond))
	}
	if _, err := s.Load(ctx, "k"); err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load with the server stopped: %v, want a non-ErrNotExist error", err)
	}
	pg.Start(t)
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
