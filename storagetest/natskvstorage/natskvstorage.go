// Package natskvstorage is a test stand-in for the Caddy storage module
// github.com/HeavyHorst/certmagic-nats (commit b27fd6c), which this
// workplace's module proxy does not serve. It is written from that module's
// documented behaviour, not its source, and keeps what matters to a lock
// user exactly as it is there:
//
//   - The lock of name is the KV key "LOCK.<name>", taken with the bucket's
//     atomic Create. Its value is the holder's clock plus 5 min (8 bytes,
//     little-endian Unix nanoseconds), never refreshed: a live holder loses
//     it 5 min after acquiring it.
//   - A waiter reads the key every 50–201 ms (random); once the stored
//     expiry is past by the waiter's clock, it deletes that revision
//     (expecting it) and creates its own. ctx bounds only those sleeps: the
//     KV calls take none (each is bounded by JetStream's 5 s request
//     timeout), so a cancelled ctx still takes a free lock.
//   - Unlock deletes the lock key expecting the revision this instance last
//     recorded for it; for a name it never locked that is 0, which NATS
//     reads as "no expectation": the delete removes another holder's lock.
//     The recorded revisions are never forgotten.
//   - Stat reports a failed read as fs.ErrNotExist; Load returns it.
//   - No Cleanup: a reload leaves the old connection open and working.
//
// The bucket must exist (`nats kv add <bucket>`), as there.
package natskvstorage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"github.com/nats-io/nats.go"
)

const (
	// lockKeyPrefix: lock keys are not normalised like data keys.
	lockKeyPrefix = "LOCK."
	// defaultLockExpiry is HeavyHorst's fixed lock lifetime.
	defaultLockExpiry = 5 * time.Minute
	// HeavyHorst's retry sleep: 50 ms plus a random 0–151 ms.
	pollMin, pollJitter = 50 * time.Millisecond, 151 * time.Millisecond
)

func init() {
	caddy.RegisterModule(new(Storage))
}

// Storage is a certmagic.Storage on a JetStream key-value bucket.
type Storage struct {
	// URL is the NATS server (or a comma-separated list of them).
	URL string `json:"url,omitempty"`
	// Bucket is the existing KV bucket.
	Bucket string `json:"bucket,omitempty"`
	// LockExpiry replaces the fixed 5 min lock lifetime. A test knob only:
	// HeavyHorst has no such setting.
	LockExpiry caddy.Duration `json:"lock_expiry,omitempty"`

	nc *nats.Conn
	kv nats.KeyValue

	mu   sync.Mutex
	revs map[string]uint64 // lock key -> the revision Unlock expects
}

// Interface guards
var (
	_ caddy.Provisioner      = (*Storage)(nil)
	_ caddy.StorageConverter = (*Storage)(nil)
	_ caddyfile.Unmarshaler  = (*Storage)(nil)
	_ certmagic.Storage      = (*Storage)(nil)
)

// CaddyModule returns the Caddy module information.
func (*Storage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.kayle_test_natskv",
		New: func() caddy.Module { return new(Storage) },
	}
}

// UnmarshalCaddyfile sets up the storage from Caddyfile tokens:
//
//	kayle_test_natskv [<url> [<bucket>]] {
//		url         <url>
//		bucket      <bucket>
//		lock_expiry <duration>
//	}
func (s *Storage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module name
	if d.NextArg() {
		s.URL = d.Val()
		if d.NextArg() {
			s.Bucket = d.Val()
		}
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	for d.NextBlock(0) {
		opt := d.Val()
		if !d.NextArg() {
			return d.ArgErr()
		}
		val := d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
		switch opt {
		case "url":
			s.URL = val
		case "bucket":
			s.Bucket = val
		case "lock_expiry":
			dur, err := caddy.ParseDuration(val)
			if err != nil {
				return d.Errf("lock_expiry: %v", err)
			}
			s.LockExpiry = caddy.Duration(dur)
		default:
			return d.Errf("unrecognized subdirective %q", opt)
		}
	}
	return nil
}

// Provision connects and opens the bucket, which must exist.
func (s *Storage) Provision(caddy.Context) error {
	if s.URL == "" || s.Bucket == "" {
		return errors.New("kayle_test_natskv: url and bucket are required")
	}
	if s.LockExpiry == 0 {
		s.LockExpiry = caddy.Duration(defaultLockExpiry)
	}
	s.revs = make(map[string]uint64)
	// nats.go's defaults, as HeavyHorst's: reconnect every 2 s, give up
	// (for good) after 60 tries.
	nc, err := nats.Connect(s.URL, nats.Name("caddy kayle_test_natskv"))
	if err != nil {
		return fmt.Errorf("kayle_test_natskv: connecting to %s: %w", s.URL, err)
	}
	js, err := nc.JetStream(nats.PublishAsyncMaxPending(256))
	if err != nil {
		nc.Close()
		return fmt.Errorf("kayle_test_natskv: %w", err)
	}
	kv, err := js.KeyValue(s.Bucket)
	if err != nil {
		nc.Close()
		return fmt.Errorf("kayle_test_natskv: opening bucket %q (create it first: nats kv add %s): %w", s.Bucket, s.Bucket, err)
	}
	s.nc, s.kv = nc, kv
	return nil
}

// Close closes the connection. Caddy never calls it (HeavyHorst has no
// Cleanup, so the old config's storage keeps working after a reload);
// tests that open the storage themselves do.
func (s *Storage) Close() {
	if s.nc != nil {
		s.nc.Close()
	}
}

// CertMagicStorage returns the storage itself.
func (s *Storage) CertMagicStorage() (certmagic.Storage, error) { return s, nil }

// wrongSequence reports an expected-revision mismatch, i.e. a lost race
// for a lock key.
func wrongSequence(err error) bool {
	return errors.Is(err, nats.ErrKeyExists) || errors.Is(err, nats.ErrKeyRevisionMismatch) ||
		strings.Contains(err.Error(), "wrong last sequence")
}

// Lock takes the named lock, waiting while another holder's unexpired one
// is there. ctx is checked only while sleeping between reads.
func (s *Storage) Lock(ctx context.Context, name string) error {
	key := lockKeyPrefix + name
	for {
		entry, err := s.kv.Get(key)
		switch {
		case errors.Is(err, nats.ErrKeyNotFound):
			// free: try to create it below
		case err != nil:
			return err
		default:
			if len(entry.Value()) != 8 {
				return fmt.Errorf("kayle_test_natskv: lock %q holds %d bytes, not an expiry", key, len(entry.Value()))
			}
			expires := time.Unix(0, int64(binary.LittleEndian.Uint64(entry.Value())))
			if !time.Now().After(expires) {
				select {
				case <-time.After(pollMin + time.Duration(rand.Float64()*float64(pollJitter))):
					continue
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			// expired: remove exactly that revision, through Unlock as
			// HeavyHorst does (so it becomes the revision recorded)
			s.setRev(key, entry.Revision())
			if err := s.Unlock(ctx, name); err != nil {
				if wrongSequence(err) {
					continue // someone else replaced it first
				}
				return err
			}
		}
		value := binary.LittleEndian.AppendUint64(nil, uint64(time.Now().Add(time.Duration(s.LockExpiry)).UnixNano()))
		rev, err := s.kv.Create(key, value)
		if err != nil {
			if wrongSequence(err) {
				continue // created by another meanwhile: read again, no sleep
			}
			return err
		}
		s.setRev(key, rev)
		return nil
	}
}

// Unlock deletes the lock key expecting the revision recorded for it, and
// 0 (none: an unconditional delete) for a name this instance never locked.
// It does not forget the revision.
func (s *Storage) Unlock(_ context.Context, name string) error {
	key := lockKeyPrefix + name
	return s.kv.Delete(key, nats.LastRevision(s.rev(key)))
}

func (s *Storage) setRev(key string, rev uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.revs[key] = rev
}

func (s *Storage) rev(key string) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.revs[key]
}

// natsKey maps a storage key to a KV key: "/" separates levels in storage
// keys and "." in KV keys, so the two swap.
func natsKey(key string) string {
	return strings.Map(func(r rune) rune {
		switch r {
		case '/':
			return '.'
		case '.':
			return '/'
		}
		return r
	}, key)
}

// storageKey is natsKey's inverse (the swap is its own inverse).
func storageKey(key string) string { return natsKey(key) }

// Store writes value at key.
func (s *Storage) Store(_ context.Context, key string, value []byte) error {
	_, err := s.kv.Put(natsKey(key), value)
	return err
}

// Load reads key's value: missing is fs.ErrNotExist, a failed read its
// error.
func (s *Storage) Load(_ context.Context, key string) ([]byte, error) {
	entry, err := s.kv.Get(natsKey(key))
	if errors.Is(err, nats.ErrKeyNotFound) {
		return nil, fs.ErrNotExist
	}
	if err != nil {
		return nil, err
	}
	return entry.Value(), nil
}

// Delete marks key deleted (not what is under it); a missing key is no
// error.
func (s *Storage) Delete(_ context.Context, key string) error {
	return s.kv.Delete(natsKey(key))
}

// Exists reports whether key holds a value; a failed read is false.
func (s *Storage) Exists(_ context.Context, key string) bool {
	_, err := s.kv.Get(natsKey(key))
	return err == nil
}

// List returns the keys directly under dir (values and directories), or
// with recursive every value below it.
func (s *Storage) List(ctx context.Context, dir string, recursive bool) ([]string, error) {
	dir = strings.Trim(dir, "/")
	filter := ">"
	if dir != "" {
		filter = natsKey(dir) + ".>"
	}
	w, err := s.kv.Watch(filter, nats.IgnoreDeletes(), nats.MetaOnly(), nats.Context(ctx))
	if err != nil {
		return nil, err
	}
	defer func() { _ = w.Stop() }()
	var all []string
	for entry := range w.Updates() {
		if entry == nil {
			break // the initial values are all delivered
		}
		all = append(all, storageKey(entry.Key()))
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if recursive {
		sort.Strings(all)
		return all, nil
	}
	seen := make(map[string]bool)
	var keys []string
	for _, k := range all {
		rest := strings.TrimPrefix(k, dir+"/")
		if dir == "" {
			rest = k
		}
		child := path.Join(dir, strings.SplitN(rest, "/", 2)[0])
		if !seen[child] {
			seen[child] = true
			keys = append(keys, child)
		}
	}
	sort.Strings(keys)
	return keys, nil
}

// Stat describes key: a value (terminal; Modified is when its latest
// revision was written, by the server's clock), or a directory holding
// values. Missing, and any failed read, is fs.ErrNotExist.
func (s *Storage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	key = strings.TrimSuffix(key, "/")
	entry, err := s.kv.Get(natsKey(key))
	if err == nil {
		return certmagic.KeyInfo{Key: key, Modified: entry.Created(), Size: int64(len(entry.Value())), IsTerminal: true}, nil
	}
	if !errors.Is(err, nats.ErrKeyNotFound) {
		return certmagic.KeyInfo{}, fs.ErrNotExist
	}
	children, err := s.List(ctx, key, false)
	if err != nil || len(children) == 0 {
		return certmagic.KeyInfo{}, fs.ErrNotExist
	}
	return certmagic.KeyInfo{Key: key}, nil
}

// String names the storage in Caddy's logs.
func (s *Storage) String() string { return "kayle_test_natskv:" + s.Bucket }
