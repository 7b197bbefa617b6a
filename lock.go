package kaylewebhook

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Lock timing, the same for every storage module. A storage lock alone
// cannot tell a dead holder from a slow one: certmagic's file_system lock,
// for one, is kept fresh by a goroutine that outlives Unlock by up to 5 s
// and adopts whatever lock file it then finds, another instance's included,
// so a holder killed at that moment leaves a lock that never goes stale.
// So each holder also shows it is alive in the event's own record (a lease
// with a random token), and a waiter that sees no sign of life for
// leaseStaleAfter releases the lock itself.
const (
	// leaseStaleAfter is how long a holder may give no sign of life before
	// a waiter takes its lock over: file_system's own stale time.
	leaseStaleAfter = 10 * time.Second
	// leaseFirstBeat is when a holder first writes its lease. Most forwards
	// end sooner and never write one, so a new event costs no extra write.
	leaseFirstBeat = time.Second
	// leaseBeatEvery is how often a holder renews its lease after that.
	leaseBeatEvery = 3 * time.Second
	// lockPollEvery is how often a waiter looks at the holder's lease.
	lockPollEvery = time.Second
	// lockWaitLimit bounds a copy's wait for an event's lock; then it
	// answers 503 and Kayle retries later.
	lockWaitLimit = 30 * time.Second
)

// errLockBusy: the lock was still held by a live holder when the wait ended.
var errLockBusy = errors.New("held by another copy that is still forwarding it")

// lockTiming is the lock timing a deduper uses (tests shorten it).
type lockTiming struct {
	staleAfter, firstBeat, beatEvery, pollEvery, waitLimit time.Duration
}

var defaultLockTiming = lockTiming{
	staleAfter: leaseStaleAfter,
	firstBeat:  leaseFirstBeat,
	beatEvery:  leaseBeatEvery,
	pollEvery:  lockPollEvery,
	waitLimit:  lockWaitLimit,
}

// heldLock is a storage lock this instance holds, with the token that
// proves, in the lease it writes, that it is this instance's.
type heldLock struct {
	d        *deduper
	name     string // the storage lock
	leaseKey string // where the lease is written: the event's record
	what     string // for logs: the event id, or "sweep"
	token    string
	lease    record // the fields every lease write carries
	// tookOver: this acquisition followed the takeover of a silent
	// holder's lock; the lease must then be written at once, so that other
	// waiters see a change and do not take this holder for the dead one.
	tookOver bool

	lost     atomic.Bool // another instance took it over
	stopBeat func()      // stops the heartbeat and waits for it
}

// acquire takes the storage lock name, whose lease lives at leaseKey. It
// returns the record found at leaseKey once the lock is held (nil: none).
// While it waits it reads that record: a fresh "delivered" record ends the
// wait at once (lock nil, record returned), and a holder that has given no
// sign of life for staleAfter is presumed dead and its lock released. ctx
// bounds the whole wait: errLockBusy when it ends with a live holder.
//
// Silence is measured on this instance's clock alone, from when it first
// saw the lease as it is now: the times written in leases come from other
// instances' clocks, which may be ahead or behind.
func (d *deduper) acquire(ctx context.Context, name, leaseKey, what string) (*heldLock, *record, error) {
	var seen *record // the lease found at the previous poll
	quietSince := d.now()
	tookOver := false
	for {
		pollCtx, cancel := context.WithTimeout(ctx, d.timing.pollEvery)
		err := d.lock(pollCtx, name)
		pollEnded := pollCtx.Err() != nil
		cancel()
		if err == nil {
			rec, err := d.loadRecord(ctx, leaseKey)
			if err != nil {
				d.unlock(name)
				return nil, nil, err
			}
			held := d.newHeldLock(name, leaseKey, what)
			held.tookOver = tookOver
			return held, rec, nil
		}
		if ctx.Err() != nil {
			return nil, nil, fmt.Errorf("the wait for the lock ended: %w", errLockBusy)
		}
		if !pollEnded {
			return nil, nil, err // the storage failed
		}
		rec, err := d.loadRecord(ctx, leaseKey)
		if err != nil {
			return nil, nil, err
		}
		if d.isDelivered(rec) {
			return nil, rec, nil
		}
		// Dead: the lease (or its absence) unchanged for staleAfter. A
		// live holder renews its lease every beatEvery, and writes its
		// first within firstBeat, or at once after a takeover.
		now := d.now()
		if !sameLease(rec, seen) {
			seen, quietSince = rec, now
			continue
		}
		if silent := now.Sub(quietSince); silent > d.timing.staleAfter {
			d.takeOver(name, what, silent)
			tookOver = true
			quietSince = now
		}
	}
}

// sameLease reports whether two reads of a lease found the same write.
func sameLease(a, b *record) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Holder == b.Holder && a.HeartbeatAt.Equal(b.HeartbeatAt)
}

// takeOver releases a lock whose holder is presumed dead. Storage Unlock
// checks no owner, which is what makes this possible; a storage whose
// Unlock does refuse keeps its own expiry as the only way out.
func (d *deduper) takeOver(name, what string, silent time.Duration) {
	d.logger.Warn("taking over a storage lock whose holder has shown no sign of life; it presumably crashed",
		zap.String("lock", name), zap.String("for", what), zap.Duration("silent_for", silent))
	ctx, cancel := context.WithTimeout(context.Background(), storageTimeout)
	defer cancel()
	if err := d.storage.Unlock(ctx, name); err != nil {
		d.logger.Warn("the storage refused to release the dead holder's lock; waiting for its own expiry",
			zap.String("lock", name), zap.Error(err))
	}
}

func (d *deduper) newHeldLock(name, leaseKey, what string) *heldLock {
	var token [16]byte
	_, _ = rand.Read(token[:])
	return &heldLock{
		d:        d,
		name:     name,
		leaseKey: leaseKey,
		what:     what,
		token:    hex.EncodeToString(token[:]),
		stopBeat: func() {},
	}
}

// loadRecord reads the record at key; nil when there is none, or when it
// cannot be parsed (forwarding again is safer than refusing the event).
func (d *deduper) loadRecord(ctx context.Context, key string) (*record, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	data, err := d.storage.Load(ctx, key)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var rec record
	if err := json.Unmarshal(data, &rec); err != nil || (rec.DeliveredAt.IsZero() && rec.HeartbeatAt.IsZero()) {
		d.logger.Warn("ignoring an unreadable dedupe record", zap.String("key", key))
		return nil, nil
	}
	return &rec, nil
}

// writeLease records that this holder is alive now.
func (l *heldLock) writeLease(ctx context.Context) error {
	lease := l.lease
	lease.Version = recordVersion
	lease.Holder = l.token
	lease.HeartbeatAt = l.d.now().UTC()
	data, err := json.Marshal(lease)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	return l.d.storage.Store(ctx, l.leaseKey, data)
}

// heartbeat renews the lease until stopped: first after firstDelay, then
// every beatEvery. Before each renewal it checks that the lease is still
// its own; if another instance has taken the lock over (this one stalled
// past staleAfter), it stops and the lock is left to the new holder.
func (l *heldLock) heartbeat(firstDelay time.Duration) {
	stop, done := make(chan struct{}), make(chan struct{})
	var once sync.Once
	l.stopBeat = func() {
		once.Do(func() { close(stop) })
		<-done
	}
	go func() {
		defer close(done)
		timer := time.NewTimer(firstDelay)
		defer timer.Stop()
		for {
			select {
			case <-stop:
				return
			case <-timer.C:
			}
			if !l.stillOurs() {
				l.lost.Store(true)
				l.d.logger.Error("another instance took over a lock this one held (this one stalled); it may forward the event too",
					zap.String("lock", l.name), zap.String("for", l.what))
				return
			}
			if err := l.writeLease(context.Background()); err != nil {
				l.d.logger.Warn("renewing a lock's lease", zap.String("lock", l.name), zap.Error(err))
			}
			timer.Reset(l.d.timing.beatEvery)
		}
	}()
}

// stillOurs reports whether the lease at leaseKey is absent or ours. A
// storage error is not proof of loss.
func (l *heldLock) stillOurs() bool {
	rec, err := l.d.loadRecord(context.Background(), l.leaseKey)
	return err != nil || rec == nil || rec.Holder == "" || rec.Holder == l.token
}

// settle stops the heartbeat and finds out whether the lock is still this
// instance's, before the holder writes its final record: it reads its
// lease, since storage Unlock checks no owner and would release the lock of
// an instance that took this one over. (Even a holder of under a second:
// a waiter may have watched the record for the stale time before this
// holder came.)
func (l *heldLock) settle() {
	l.stopBeat()
	if !l.lost.Load() && !l.stillOurs() {
		l.lost.Store(true)
	}
}

// release releases the storage lock unless another instance took it over.
func (l *heldLock) release() {
	l.stopBeat()
	if l.lost.Load() {
		l.d.forgetHeld(l.name)
		return
	}
	l.d.unlock(l.name)
}
