package kaylewebhook

import (
	"context"
	"sync"
)

// inProcessClaims serializes copies of one event inside this process. It is
// package-level so that handlers of the old and the new config share it
// during a reload.
var inProcessClaims = &keyedMutex{entries: make(map[string]*keyedEntry)}

type keyedMutex struct {
	mu      sync.Mutex
	entries map[string]*keyedEntry
}

type keyedEntry struct {
	token chan struct{} // holds one value while the key is claimed
	refs  int
}

// acquire waits until key is free or ctx ends; release must be called once.
func (k *keyedMutex) acquire(ctx context.Context, key string) (release func(), err error) {
	e := k.enter(key)
	select {
	case e.token <- struct{}{}:
		return k.releaser(key, e), nil
	case <-ctx.Done():
		k.drop(key, e)
		return nil, ctx.Err()
	}
}

// tryAcquire claims key if it is free now.
func (k *keyedMutex) tryAcquire(key string) (release func(), ok bool) {
	e := k.enter(key)
	select {
	case e.token <- struct{}{}:
		return k.releaser(key, e), true
	default:
		k.drop(key, e)
		return nil, false
	}
}

// enter finds or makes key's entry and counts one more user of it.
func (k *keyedMutex) enter(key string) *keyedEntry {
	k.mu.Lock()
	defer k.mu.Unlock()
	e := k.entries[key]
	if e == nil {
		e = &keyedEntry{token: make(chan struct{}, 1)}
		k.entries[key] = e
	}
	e.refs++
	return e
}

// releaser is the release of a claim of key taken through e.
func (k *keyedMutex) releaser(key string, e *keyedEntry) func() {
	return func() {
		<-e.token
		k.drop(key, e)
	}
}

func (k *keyedMutex) drop(key string, e *keyedEntry) {
	k.mu.Lock()
	if e.refs--; e.refs == 0 {
		delete(k.entries, key)
	}
	k.mu.Unlock()
}
