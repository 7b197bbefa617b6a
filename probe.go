package kaylewebhook

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

const (
	// probeWait is how long the probe's second Lock on its held name may
	// wait: a Lock that excludes is still waiting then.
	probeWait = 250 * time.Millisecond
	// probeLockTimeout bounds the probe's first Lock: a storage that is
	// down at start is not judged (deliveries get 503 until it is back).
	probeLockTimeout = 10 * time.Second
)

// errNoExclusion: a storage's Lock let a second caller take a held lock.
var errNoExclusion = errors.New("a second Lock (or TryLock) of a held lock name succeeded: this storage's lock does not exclude, so dedupe cannot forward each event once")

// probedStorages remembers the storages found to exclude, by identity, so
// a reload does not probe again.
var probedStorages sync.Map

// probeExclusion checks, before dedupe relies on it, that the storage's
// Lock excludes: it holds a lock of its own and tries to take it again.
// It cannot see a race that shows only under concurrency (a read-then-write
// lock), nor a Lock that succeeds only after a long wait.
func probeExclusion(storage certmagic.Storage, identity string, logger *zap.Logger) error {
	if _, ok := storage.(*certmagic.FileStorage); ok {
		return nil // certmagic's own: an O_EXCL lock file (read and tested here)
	}
	if _, ok := probedStorages.Load(identity); ok {
		return nil
	}
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	name := "kayle_webhook_probe_" + hex.EncodeToString(nonce[:])

	holdCtx, release := context.WithTimeout(context.Background(), probeLockTimeout+storageTimeout)
	defer release()
	first := make(chan error, 1)
	go func() { first <- storage.Lock(holdCtx, name) }()
	select {
	case err := <-first:
		if err != nil {
			logger.Warn("could not probe the dedupe storage's lock at start; it is judged when it answers",
				zap.String("storage", fmt.Sprintf("%T", storage)), zap.Error(err))
			return nil
		}
	case <-time.After(probeLockTimeout):
		release()
		go func() {
			if <-first == nil {
				unlockQuietly(storage, name)
			}
		}()
		logger.Warn("could not probe the dedupe storage's lock at start: Lock did not answer",
			zap.String("storage", fmt.Sprintf("%T", storage)), zap.Duration("waited", probeLockTimeout))
		return nil
	}
	defer unlockQuietly(storage, name)

	secondCtx, cancel := context.WithTimeout(context.Background(), probeWait)
	defer cancel()
	if err := storage.Lock(secondCtx, name); err == nil {
		return errNoExclusion
	}
	if tl, ok := storage.(certmagic.TryLocker); ok {
		tryCtx, cancel := context.WithTimeout(context.Background(), probeWait)
		defer cancel()
		if ok, err := tl.TryLock(tryCtx, name); ok && err == nil {
			return errNoExclusion
		}
	}
	probedStorages.Store(identity, true)
	return nil
}

func unlockQuietly(storage certmagic.Storage, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), storageTimeout)
	defer cancel()
	_ = storage.Unlock(ctx, name)
}
