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
	// probeGrace is how long past its deadline the second Lock may take to
	// return, and TryLock to answer: file_system's TryLock takes up to 2 s.
	probeGrace = 3 * time.Second
)

// errIgnoresContext: a storage's Lock did not return when its context ended.
var errIgnoresContext = errors.New("a Lock of a held lock name did not return when its context ended: a copy waiting on this storage could never give up")

// errNoWait: a storage's Lock of a held name failed at once.
var errNoWait = errors.New("a Lock of a held lock name failed at once instead of waiting: every copy of an event delivered while another is forwarded would be refused, and such a lock (check, then write) does not exclude under concurrency")

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

	// The second try runs beside the probe: a Lock that ignores its
	// context (techknowlogick/certmagic-s3 spins for ever) must not hang
	// the config load, and would hang a copy's wait the same way.
	type answer struct{ granted, waited bool }
	second := make(chan answer, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), probeWait)
		defer cancel()
		began := time.Now()
		granted := storage.Lock(ctx, name) == nil
		waited := time.Since(began) >= probeWait/2
		if granted {
			// a lock the storage should not have granted, or (a Lock that
			// ignored its context) granted once the probe let go of it
			defer unlockQuietly(storage, name)
		}
		if tl, ok := storage.(certmagic.TryLocker); ok && !granted {
			tryCtx, cancel := context.WithTimeout(context.Background(), probeWait)
			defer cancel()
			ok, err := tl.TryLock(tryCtx, name)
			granted = ok && err == nil
		}
		second <- answer{granted, waited}
	}()
	select {
	case a := <-second:
		if a.granted {
			return errNoExclusion
		}
		if !a.waited {
			return errNoWait
		}
	case <-time.After(probeWait + probeGrace):
		return errIgnoresContext
	}
	probedStorages.Store(identity, true)
	return nil
}

func unlockQuietly(storage certmagic.Storage, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), storageTimeout)
	defer cancel()
	_ = storage.Unlock(ctx, name)
}
