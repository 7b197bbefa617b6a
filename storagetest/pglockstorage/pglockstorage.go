// Package pglockstorage is a test stand-in for the Caddy storage module
// github.com/dmarcwise/caddy-storage-postgresql (commit 34e4b04), which this
// workplace's module proxy does not serve. It is written from that module's
// documented behaviour, not its source, and keeps what matters to a lock
// user exactly as it is there:
//
//   - Lock(ctx, name) is cirello.io/pglock's AcquireContext with the caller's
//     ctx: the heartbeat (every 5 s) runs on a child of ctx and stops when
//     ctx ends; a held lock is retried once a lease (20 s) later; a row
//     whose holder died is taken only by one Acquire call that saw the same
//     record version a whole lease earlier.
//   - Unlock of a name this instance holds no lock on is an error; of a lock
//     lost meanwhile, nil.
//   - Cleanup (a Caddy reload or stop) releases every lock still held and
//     closes the pool, in-flight holders or not.
//
// Values live in one flat table (key, value, modified) rather than
// dmarcwise's parent/name rows; Modified is the database's clock, as there.
package pglockstorage

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"time"

	"cirello.io/pglock"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	_ "github.com/jackc/pgx/v5/stdlib" // the "pgx" database/sql driver
	"go.uber.org/zap"
)

const (
	objectsTable = "kayle_test_objects"
	locksTable   = "kayle_test_locks" // pglock adds the sequence <table>_rvn
	// ddlLockID serialises table creation across instances starting at
	// once: concurrent CREATE … IF NOT EXISTS can fail on PostgreSQL's
	// catalog. (Start-up robustness only; dmarcwise does not guard it.)
	ddlLockID = 0x6b61796c65 // "kayle"
	// provisionLimit bounds connecting and creating the tables.
	provisionLimit = 30 * time.Second
)

func init() {
	caddy.RegisterModule(new(Storage))
}

// Storage is a certmagic.Storage on PostgreSQL with pglock's locks.
type Storage struct {
	// ConnectionString is a libpq/pgx connection string or URL; Caddy
	// placeholders such as {env.PG_DSN} are replaced.
	ConnectionString string `json:"connection_string,omitempty"`

	logger *zap.Logger
	db     *sql.DB
	locker *pglock.Client

	mu     sync.Mutex
	locks  map[string]*pglock.Lock // by name: what Unlock may release
	closed bool
}

// Interface guards
var (
	_ caddy.Provisioner      = (*Storage)(nil)
	_ caddy.StorageConverter = (*Storage)(nil)
	_ caddy.CleanerUpper     = (*Storage)(nil)
	_ caddyfile.Unmarshaler  = (*Storage)(nil)
	_ certmagic.Storage      = (*Storage)(nil)
)

// CaddyModule returns the Caddy module information.
func (*Storage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.kayle_test_pglock",
		New: func() caddy.Module { return new(Storage) },
	}
}

// UnmarshalCaddyfile sets up the storage from Caddyfile tokens:
//
//	kayle_test_pglock [<connection_string>] {
//		connection_string <connection_string>
//	}
func (s *Storage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name
	if d.NextArg() {
		s.ConnectionString = d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "connection_string":
			if !d.NextArg() {
				return d.ArgErr()
			}
			s.ConnectionString = d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized subdirective %q", d.Val())
		}
	}
	return nil
}

// Provision opens the pool and creates the tables if they are missing.
func (s *Storage) Provision(ctx caddy.Context) error {
	s.logger = ctx.Logger()
	s.locks = make(map[string]*pglock.Lock)
	cs := caddy.NewReplacer().ReplaceAll(s.ConnectionString, "")
	if cs == "" {
		return errors.New("kayle_test_pglock: connection_string is required")
	}
	db, err := sql.Open("pgx", cs)
	if err != nil {
		return fmt.Errorf("kayle_test_pglock: %w", err)
	}
	// dmarcwise's pool settings
	db.SetMaxOpenConns(10)
	db.SetMaxIdleConns(3)
	db.SetConnMaxIdleTime(time.Hour)

	// The owner is informational in pglock (exclusion is by record
	// version); dmarcwise sets it to Caddy's instance ID.
	id, err := caddy.InstanceID()
	if err != nil {
		db.Close()
		return fmt.Errorf("kayle_test_pglock: instance ID: %w", err)
	}
	// pglock's defaults, which dmarcwise keeps: lease 20 s, heartbeat 5 s.
	locker, err := pglock.UnsafeNew(db,
		pglock.WithCustomTable(locksTable),
		pglock.WithOwner(id.String()),
		pglock.WithLeaseDuration(pglock.DefaultLeaseDuration),
		pglock.WithHeartbeatFrequency(pglock.DefaultHeartbeatFrequency),
	)
	if err != nil {
		db.Close()
		return fmt.Errorf("kayle_test_pglock: %w", err)
	}
	pctx, cancel := context.WithTimeout(ctx, provisionLimit)
	defer cancel()
	if err := createTables(pctx, db, locker); err != nil {
		db.Close()
		return fmt.Errorf("kayle_test_pglock: creating the tables: %w", err)
	}
	s.db, s.locker = db, locker
	return nil
}

func createTables(ctx context.Context, db *sql.DB, locker *pglock.Client) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `SELECT pg_advisory_lock($1)`, ddlLockID); err != nil {
		return err
	}
	defer func() {
		// a fresh ctx: the lock must go even if ctx ended meanwhile
		uctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, _ = conn.ExecContext(uctx, `SELECT pg_advisory_unlock($1)`, ddlLockID)
	}()
	if err := locker.TryCreateTable(); err != nil {
		return err
	}
	_, err = conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS `+objectsTable+` (
		key      text        PRIMARY KEY,
		value    bytea       NOT NULL,
		modified timestamptz NOT NULL DEFAULT now()
	)`)
	return err
}

// CertMagicStorage returns the storage itself.
func (s *Storage) CertMagicStorage() (certmagic.Storage, error) { return s, nil }

// Cleanup runs when Caddy unloads the config (reload or stop): it releases
// every lock still held, whoever is in its critical section, and closes
// the pool, as dmarcwise does. Later Unlocks return nil; other calls fail.
func (s *Storage) Cleanup() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	held := s.locks
	s.locks = nil
	s.mu.Unlock()
	if len(held) > 0 {
		// a reload with forwards in flight: they lose their locks now
		s.logger.Info("cleanup releases locks still held", zap.Int("locks", len(held)))
	}
	for _, l := range held {
		_ = l.Close() // pglock's Release with a background context
	}
	if s.db != nil {
		return s.db.Close()
	}
	return nil
}

var errClosed = errors.New("kayle_test_pglock: storage is cleaned up, no new locks")

// Lock waits for the named lock with pglock's AcquireContext on ctx, which
// also carries the heartbeat: when ctx ends, heartbeats stop and the lock
// lapses (after its 20 s lease) although it was never released.
func (s *Storage) Lock(ctx context.Context, name string) error {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return errClosed
	}
	l, err := s.locker.AcquireContext(ctx, name)
	if err != nil {
		return fmt.Errorf("kayle_test_pglock: could not acquire lock %q: %w", name, err)
	}
	s.mu.Lock()
	if s.closed {
		// cleaned up while waiting: give the lock back, as dmarcwise does
		s.mu.Unlock()
		_ = s.locker.ReleaseContext(ctx, l)
		return errClosed
	}
	s.locks[name] = l
	s.mu.Unlock()
	return nil
}

// Unlock releases the named lock with pglock's ReleaseContext on ctx (a
// cancelled ctx fails and leaves the row). A name this instance holds no
// lock on is an error; a lock lost meanwhile (stolen after its heartbeat
// stopped) returns nil; after Cleanup, nil.
func (s *Storage) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	l, ok := s.locks[name]
	delete(s.locks, name)
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("kayle_test_pglock: unlock of %q, which this instance has not locked", name)
	}
	if err := s.locker.ReleaseContext(ctx, l); err != nil && !errors.Is(err, pglock.ErrLockAlreadyReleased) {
		return fmt.Errorf("kayle_test_pglock: could not release lock %q: %w", name, err)
	}
	return nil
}

// Store writes value at key; Modified becomes the database's now().
func (s *Storage) Store(ctx context.Context, key string, value []byte) error {
	if value == nil {
		value = []byte{} // the column is NOT NULL; certmagic allows empty values
	}
	_, err := s.db.ExecContext(ctx, `INSERT INTO `+objectsTable+` (key, value, modified)
		VALUES ($1, $2, now())
		ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, modified = now()`, key, value)
	return err
}

// Load reads key's value; a missing key is fs.ErrNotExist, a failed query
// its error.
func (s *Storage) Load(ctx context.Context, key string) ([]byte, error) {
	var value []byte
	err := s.db.QueryRowContext(ctx, `SELECT value FROM `+objectsTable+` WHERE key = $1`, key).Scan(&value)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fs.ErrNotExist
	}
	return value, err
}

// Delete removes key and everything under key/ (as dmarcwise does); a
// missing key is no error.
func (s *Storage) Delete(ctx context.Context, key string) error {
	_, err := s.db.ExecContext(ctx, `DELETE FROM `+objectsTable+`
		WHERE key = $1 OR starts_with(key, $1 || '/')`, key)
	return err
}

// Exists reports whether key is a value or a directory holding one; a
// failed query reads as false.
func (s *Storage) Exists(ctx context.Context, key string) bool {
	var ok bool
	err := s.db.QueryRowContext(ctx, `SELECT EXISTS (SELECT 1 FROM `+objectsTable+`
		WHERE key = $1 OR starts_with(key, $1 || '/'))`, key).Scan(&ok)
	return err == nil && ok
}

// List returns the keys directly under dir (values and directories), or
// with recursive every key below it, directories included.
func (s *Storage) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	dir = strings.Trim(dir, "/")
	prefix := ""
	if dir != "" {
		prefix = dir + "/"
	}
	rows, err := s.db.QueryContext(ctx, `SELECT key FROM `+objectsTable+`
		WHERE starts_with(key, $1) ORDER BY key`, prefix)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	seen := make(map[string]bool)
	var keys []string
	add := func(k string) {
		if !seen[k] {
			seen[k] = true
			keys = append(keys, k)
		}
	}
	for rows.Next() {
		var key string
		if err := rows.Scan(&key); err != nil {
			return nil, err
		}
		rest := strings.TrimPrefix(key, prefix)
		if rest == "" {
			continue
		}
		parts := strings.Split(rest, "/")
		if !recursive {
			add(prefix + parts[0])
			continue
		}
		for i := range parts {
			add(prefix + strings.Join(parts[:i+1], "/"))
		}
	}
	return keys, rows.Err()
}

// Stat describes key: a value (terminal, with its size and the database
// time it was stored), or a directory holding values (Modified: the
// newest); missing is fs.ErrNotExist.
func (s *Storage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	var size int64
	var modified time.Time
	err := s.db.QueryRowContext(ctx, `SELECT octet_length(value), modified FROM `+objectsTable+`
		WHERE key = $1`, key).Scan(&size, &modified)
	if err == nil {
		return certmagic.KeyInfo{Key: key, Modified: modified, Size: size, IsTerminal: true}, nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return certmagic.KeyInfo{}, err
	}
	var newest sql.NullTime
	err = s.db.QueryRowContext(ctx, `SELECT max(modified) FROM `+objectsTable+`
		WHERE starts_with(key, $1 || '/')`, key).Scan(&newest)
	if err != nil {
		return certmagic.KeyInfo{}, err
	}
	if !newest.Valid {
		return certmagic.KeyInfo{}, fs.ErrNotExist
	}
	return certmagic.KeyInfo{Key: key, Modified: newest.Time}, nil
}

// String names the storage in Caddy's logs, without the connection string
// (it may hold a password).
func (s *Storage) String() string { return "kayle_test_pglock" }
