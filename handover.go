package kaylewebhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sync"

	"github.com/caddyserver/certmagic"
)

// A reload cleans up the old config's modules while its forwards may still
// be in flight (Caddy does not wait for them), in no fixed order: a storage
// module such as Redis's closes its client, and the old forward's record
// write would fail, so Kayle's next retry would be forwarded again. So a
// deduper whose storage call fails looks for its successor, the deduper of
// a newer config that keeps the same records (same storage, same prefix:
// storageIdentity), and makes the call through it instead.
var liveDedupers = struct {
	sync.Mutex
	generations uint64
	byIdentity  map[string][]*deduper // oldest first
}{byIdentity: make(map[string][]*deduper)}

// storageIdentity names a storage's records without its connections:
// file_system by its folder; a storage the handler configures by its type
// and its JSON config (two Redis servers are two identities); the global
// storage by its type.
func storageIdentity(storage certmagic.Storage, config json.RawMessage, prefix string) string {
	if fs, ok := storage.(*certmagic.FileStorage); ok {
		return "file_system " + fs.Path + " " + prefix
	}
	if config == nil {
		return fmt.Sprintf("%T global %s", storage, prefix)
	}
	// hashed: the config may hold a password
	return fmt.Sprintf("%T %s %s", storage, hashHex(string(config))[:32], prefix)
}

// register makes d a successor for the older dedupers of its records.
func (d *deduper) register() {
	liveDedupers.Lock()
	defer liveDedupers.Unlock()
	liveDedupers.generations++
	d.generation = liveDedupers.generations
	d.identity = storageIdentity(d.storage, d.storageConfig, d.prefix)
	liveDedupers.byIdentity[d.identity] = append(liveDedupers.byIdentity[d.identity], d)
}

// retire removes d from the successors; its forwards in flight go on.
func (d *deduper) retire() {
	d.retired.Store(true)
	liveDedupers.Lock()
	defer liveDedupers.Unlock()
	list := liveDedupers.byIdentity[d.identity]
	for i, other := range list {
		if other == d {
			list = append(list[:i:i], list[i+1:]...)
			break
		}
	}
	if len(list) == 0 {
		delete(liveDedupers.byIdentity, d.identity)
	} else {
		liveDedupers.byIdentity[d.identity] = list
	}
}

// successor is the newest live deduper provisioned after d for d's
// records, or nil.
func (d *deduper) successor() *deduper {
	if d.generation == 0 {
		return nil // never registered (tests, commands)
	}
	liveDedupers.Lock()
	defer liveDedupers.Unlock()
	list := liveDedupers.byIdentity[d.identity]
	if n := len(list); n > 0 && list[n-1].generation > d.generation {
		return list[n-1]
	}
	return nil
}

// load reads key, through the successor's storage if d's fails.
func (d *deduper) load(ctx context.Context, key string) ([]byte, error) {
	data, err := d.storage.Load(ctx, key)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		if next := d.successor(); next != nil {
			return next.storage.Load(ctx, key)
		}
	}
	return data, err
}

// store writes key, through the successor's storage if d's fails.
func (d *deduper) store(ctx context.Context, key string, data []byte) error {
	err := d.storage.Store(ctx, key, data)
	if err != nil {
		if next := d.successor(); next != nil {
			return next.storage.Store(ctx, key, data)
		}
	}
	return err
}
