package storagetest

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	// the storage modules, loaded in-process by openStorage
	_ "github.com/caddyserver/caddy/v2/modules/filestorage"
	_ "github.com/pberkel/caddy-storage-redis"

	_ "github.com/caddy-kayle-webhook/caddy-kayle-webhook/storagetest/natskvstorage"
	_ "github.com/caddy-kayle-webhook/caddy-kayle-webhook/storagetest/pglockstorage"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/storagetest/servers"
)

// storageRow is one storage of the matrix, with the server behind it.
type storageRow struct {
	name string
	// module is the storage module's name (caddy.storage.<module>), and
	// moduleJSON its config, for opening it in the test process.
	module, moduleJSON string
	// caddyfile is the global `storage` option's value the gateways run.
	caddyfile string
	// lockTTL is how long the module's own storage lock outlives a holder
	// that stopped renewing it.
	lockTTL time.Duration
	// stop makes the storage unavailable to the gateways as a stopped
	// server does; restart brings it back with its data.
	stop, restart func(t testing.TB)
	// pause and resume freeze and thaw the server (nil: there is none).
	pause, resume func(t testing.TB)
	// backdate sets the time the storage reports for key (Stat's Modified),
	// as if it had been written at: the sweep trusts a recent one without
	// reading the record.
	backdate func(t testing.TB, key string, at time.Time)
}

// rows lists the matrix's storages. Each starts its own server, so rows run
// in parallel.
var rows = []struct {
	name  string
	start func(t *testing.T) *storageRow
}{
	{"file_system", fileSystemRow},
	{"redis", redisRow},
	{"postgresql (pglock)", pglockRow},
	{"nats (kv)", natsRow},
}

// fileSystemRow is Caddy's built-in storage on a folder both gateways share
// (as on a shared disk). It has no server: "stopped" is the folder gone
// (an unmounted share), and there is nothing to freeze.
func fileSystemRow(t *testing.T) *storageRow {
	dir := t.TempDir()
	root := filepath.Join(dir, "storage")
	if err := os.Mkdir(root, 0o700); err != nil {
		t.Fatal(err)
	}
	moduleJSON, _ := json.Marshal(map[string]any{"root": root})
	away := filepath.Join(dir, "away")
	return &storageRow{
		name:       "file_system",
		module:     "file_system",
		moduleJSON: string(moduleJSON),
		caddyfile:  fmt.Sprintf("file_system %q", root),
		// certmagic's file lock is stale 10 s after its last refresh
		lockTTL: 10 * time.Second,
		stop: func(t testing.TB) {
			// a file in its place: no lock file, record or folder can be made
			if err := os.Rename(root, away); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(root, []byte("the share is not mounted\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		},
		restart: func(t testing.TB) {
			if err := os.Remove(root); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(away, root); err != nil {
				t.Fatal(err)
			}
		},
		backdate: func(t testing.TB, key string, at time.Time) {
			if err := os.Chtimes(filepath.Join(root, filepath.FromSlash(key)), at, at); err != nil {
				t.Fatal(err)
			}
		},
	}
}

// redisKeyPrefix is the module's default key_prefix, under which it keeps
// every key.
const redisKeyPrefix = "caddy"

// redisRow is github.com/pberkel/caddy-storage-redis on redis-server. Its
// lock is a redislock key with a 5 s TTL, refreshed every 3 s by the holder.
func redisRow(t *testing.T) *storageRow {
	srv := servers.StartRedis(t)
	addr := srv.Addr
	moduleJSON, _ := json.Marshal(map[string]any{"address": []string{addr}})
	return &storageRow{
		name:       "redis",
		module:     "redis",
		moduleJSON: string(moduleJSON),
		caddyfile:  fmt.Sprintf("redis {\n\t\taddress %s\n\t}", addr),
		lockTTL:    5 * time.Second,
		stop:       srv.Stop,
		restart:    srv.Start,
		pause:      srv.Pause,
		resume:     srv.Resume,
		backdate: func(t testing.TB, key string, at time.Time) {
			// the module keeps each value as JSON with its "modified" time
			client := redis.NewClient(&redis.Options{Addr: addr})
			defer client.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			rawKey := path.Join(redisKeyPrefix, key)
			raw, err := client.Get(ctx, rawKey).Bytes()
			if err != nil {
				t.Fatalf("reading %s from Redis: %v", rawKey, err)
			}
			var value map[string]any
			if err := json.Unmarshal(raw, &value); err != nil {
				t.Fatalf("%s in Redis is not the module's JSON: %v", rawKey, err)
			}
			if _, ok := value["modified"]; !ok {
				t.Fatalf("%s in Redis has no modified time: %s", rawKey, raw)
			}
			value["modified"] = at
			raw, _ = json.Marshal(value)
			if err := client.Set(ctx, rawKey, raw, 0).Err(); err != nil {
				t.Fatalf("writing %s to Redis: %v", rawKey, err)
			}
		},
	}
}

// pglockRow is PostgreSQL through cirello.io/pglock, locked as
// dmarcwise/caddy-storage-postgresql locks (whose module this machine's
// module proxy does not serve): a 20 s lease renewed while the Lock call's
// context lives, a dead holder's lock stolen only by one Lock call that
// watched it for a whole lease, Cleanup releasing every held lock.
func pglockRow(t *testing.T) *storageRow {
	srv := servers.StartPostgres(t)
	moduleJSON, _ := json.Marshal(map[string]any{"connection_string": srv.ConnString})
	return &storageRow{
		name:       "postgresql (pglock)",
		module:     "kayle_test_pglock",
		moduleJSON: string(moduleJSON),
		caddyfile:  fmt.Sprintf("kayle_test_pglock %q", srv.ConnString),
		lockTTL:    20 * time.Second,
		stop:       srv.Stop,
		restart:    srv.Start,
		pause:      srv.Pause,
		resume:     srv.Resume,
		backdate: func(t testing.TB, key string, at time.Time) {
			// the module keeps the database's time of each write
			db, err := sql.Open("pgx", srv.ConnString)
			if err != nil {
				t.Fatal(err)
			}
			defer db.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			res, err := db.ExecContext(ctx, "UPDATE kayle_test_objects SET modified = $1 WHERE key = $2", at, key)
			if n, _ := res.RowsAffected(); err != nil || n != 1 {
				t.Fatalf("backdating %s in PostgreSQL: %v (%d rows)", key, err, n)
			}
		},
	}
}

// natsRow is NATS JetStream key-value, locked as HeavyHorst/certmagic-nats
// locks (whose module this machine's module proxy does not serve): a lock
// key created if absent, expiring 5 min after it was taken by the holder's
// clock, never renewed, deleted by Unlock whoever holds it.
func natsRow(t *testing.T) *storageRow {
	srv := servers.StartNATS(t)
	const bucket = "kayle"
	srv.CreateBucket(t, bucket, 0)
	moduleJSON, _ := json.Marshal(map[string]any{"url": srv.URL, "bucket": bucket})
	return &storageRow{
		name:       "nats (kv)",
		module:     "kayle_test_natskv",
		moduleJSON: string(moduleJSON),
		caddyfile:  fmt.Sprintf("kayle_test_natskv %s %s", srv.URL, bucket),
		lockTTL:    5 * time.Minute,
		stop:       srv.Stop,
		restart:    srv.Start,
		pause:      srv.Pause,
		resume:     srv.Resume,
		// nil: a key's time is the server's, when it was written
	}
}
