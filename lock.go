package kaylewebhook

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Lock timing, the same for every storage module. A storage lock alone
// cannot be trusted to tell a dead holder from a slow one, nor a live
// holder's lock from an expired one: certmagic's file_system lock is kept
// fresh by a goroutine that outlives Unlock and adopts the next holder's
// lock file, so a holder killed then leaves a lock that never goes stale;
// PostgreSQL's pglock frees a dead holder's lock only to a Lock call that
// watched it for 20 s; Redis and DynamoDB locks lapse under a live holder
// whose storage stalled past their TTL. So each holder also shows it is
// alive in the event's own record (a lease with a random token), and:
//   - a copy that wins the storage lock while another holder's lease is
//     alive waits, as if it had not won;
//   - a lease silent for leaseStaleAfter (on the waiter's own clock) is
//     taken over through a storage lock named after that very lease, so
//     among the waiters one takes it over, and no one ever releases a
//     storage lock it did not take.
const (
	// leaseStaleAfter is how long a holder may give no sign of life before
	// a waiter takes the event over.
	leaseStaleAfter = 10 * time.Second
	// leaseFirstBeat is when a holder first writes its lease. Most forwards
	// end sooner and never write one, so a new event costs no extra write.
	leaseFirstBeat = time.Second
	// leaseBeatEvery is how often a holder renews its lease after that.
	leaseBeatEvery = 3 * time.Second
	// lockPollEvery is how often a waiter looks at the holder's lease.
	lockPollEvery = time.Second
	// firstLookAfter is when a waiter whose Lock has not returned first
	// reads the record.
	firstLookAfter = 50 * time.Millisecond
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

// lockAttempt is one storage Lock call, made with a context that lives as
// long as the hold: some storage modules (pglock, DynamoDB) renew a lock
// only while the context of the Lock call that took it lives, and pglock
// frees a dead holder's lock only to a Lock call that keeps waiting.
type lockAttempt struct {
	d      *deduper
	name   string
	cancel context.CancelFunc
	result chan error // Lock's answer; taken once
	held   bool       // Lock succeeded and the answer was taken
}

func (d *deduper) startLock(name string) *lockAttempt {
	ctx, cancel := context.WithCancel(context.Background())
	a := &lockAttempt{d: d, name: name, cancel: cancel, result: make(chan error, 1)}
	go func() { a.result <- d.storage.Lock(ctx, name) }()
	return a
}

// took records that the attempt's Lock succeeded.
func (a *lockAttempt) took() {
	a.held = true
	a.d.countHeld(a.name, 1)
}

// end releases the lock if it was taken, or gives up the attempt: a Lock
// that still succeeds after that is released at once, unseen.
func (a *lockAttempt) end() {
	if a.held {
		a.held = false
		a.d.unlock(a.name)
		a.cancel()
		return
	}
	a.cancel()
	go func() {
		if err := <-a.result; err == nil {
			a.d.unlockStorage(a.name)
		}
	}()
}

// drop stops renewing a lock that was taken over from under this instance,
// without releasing it: it may be another instance's by now.
func (a *lockAttempt) drop() {
	if a.held {
		a.held = false
		a.d.countHeld(a.name, -1)
	}
	a.cancel()
}

// heldLock is what a holder holds: the storage lock of the event (or the
// sweep), and after a takeover the lock named after the dead holder's
// lease, with the token that proves, in the lease it writes, that it is
// this instance's.
type heldLock struct {
	d        *deduper
	locks    []*lockAttempt // each taken
	leaseKey string         // where the lease is written: the event's record
	what     string         // for logs: the event id, or "sweep"
	token    string
	lease    record // the fields every lease write carries
	// tookOver: this acquisition followed the takeover of a silent
	// holder's lease; the lease must then be written at once, so that
	// other waiters see a change and do not take this holder for the
	// dead one.
	tookOver bool

	lost     atomic.Bool // another instance took it over
	stopBeat func()      // stops the heartbeat and waits for it
}

// acquire takes the storage lock name, whose lease lives at leaseKey. It
// returns the record found at leaseKey once the event is this copy's
// (nil: none). While it waits it reads that record: a fresh "delivered"
// record ends the wait at once (lock nil, record returned), and a lease
// that stays unchanged for staleAfter is taken over. ctx bounds the whole
// wait: errLockBusy when it ends with a live holder.
//
// Silence is measured on this instance's clock alone, from when it first
// saw the lease as it is now, and only over reads the storage answered
// promptly: the times written in leases come from other instances'
// clocks, and a lease cannot be renewed while the storage stalls.
func (d *deduper) acquire(ctx context.Context, name, leaseKey, what string) (*heldLock, *record, error) {
	return d.acquireUntil(ctx, name, leaseKey, what, d.isDelivered)
}

// acquireUntil is acquire, whose wait ends at once on a record for which
// ends holds (acquire's: a fresh delivered record).
func (d *deduper) acquireUntil(ctx context.Context, name, leaseKey, what string, ends func(*record) bool) (*heldLock, *record, error) {
	return d.acquireWatched(ctx, name, leaseKey, what, ends, nil, d.now())
}

// acquireWatched is acquireUntil by a caller that has already watched the
// lease watched stay unchanged since quietSince, on this instance's clock:
// that silence counts, so a holder silent for staleAfter is taken over
// without a second watch of its own.
func (d *deduper) acquireWatched(ctx context.Context, name, leaseKey, what string, ends func(*record) bool, watched *record, quietSince time.Time) (*heldLock, *record, error) {
	event := d.startLock(name)
	var takeover *lockAttempt // for the lease in `seen`
	seen := watched           // the lease found at the previous read
	// the first look comes soon: a copy of an event delivered or queued
	// while another copy holds the lock is answered without waiting a poll
	poll := time.NewTimer(min(d.timing.pollEvery, firstLookAfter))
	defer poll.Stop()
	endAll := func() {
		event.end()
		if takeover != nil {
			takeover.end()
		}
	}
	// claim returns the event as this copy's, holding what it took.
	claim := func(rec *record, tookOver bool) (*heldLock, *record, error) {
		held := d.newHeldLock(leaseKey, what)
		held.tookOver = tookOver
		for _, a := range []*lockAttempt{event, takeover} {
			switch {
			case a == nil:
			case a.held:
				held.locks = append(held.locks, a)
			default:
				a.end()
			}
		}
		return held, rec, nil
	}
	// look reads the record and reports whether the event is free for a
	// copy that holds its storage lock; done: the wait is over (delivered,
	// or the storage failed).
	look := func() (rec *record, free, done bool, err error) {
		began := d.now()
		rec, err = d.loadRecord(ctx, leaseKey)
		if err != nil {
			return nil, false, true, err
		}
		if ends(rec) {
			return rec, true, true, nil
		}
		now := d.now()
		if !sameLease(rec, seen) || now.Sub(began) > d.timing.pollEvery {
			if !sameLease(rec, seen) && takeover != nil {
				takeover.end() // that lease changed: its holder is alive, or was taken over
				takeover = nil
			}
			seen, quietSince = rec, now
		}
		return rec, !isLiveLease(rec), false, nil
	}

	for {
		var eventResult, takeoverResult chan error
		if !event.held {
			eventResult = event.result
		}
		if takeover != nil && !takeover.held {
			takeoverResult = takeover.result
		}
		select {
		case err := <-eventResult:
			if err != nil {
				endAll()
				if ctx.Err() != nil {
					return nil, nil, fmt.Errorf("the wait for the lock ended: %w", errLockBusy)
				}
				return nil, nil, err // the storage failed
			}
			event.took()
			rec, free, done, err := look()
			if err != nil {
				endAll()
				return nil, nil, err
			}
			if free || done {
				// a delivered record too: the caller answers a duplicate,
				// and forget deletes it under the lock
				return claim(rec, false)
			}
			// another holder's lease is alive: its storage lock lapsed
			// under it (a storage stall, a TTL). Wait, as if not won.

		case err := <-takeoverResult:
			if err != nil {
				endAll()
				if ctx.Err() != nil {
					return nil, nil, fmt.Errorf("the wait for the lock ended: %w", errLockBusy)
				}
				return nil, nil, err
			}
			takeover.took()
			silentLease := seen
			rec, _, done, err := look()
			if done {
				endAll()
				return nil, rec, err
			}
			// still the silent lease, and no storage stall since
			silent := d.now().Sub(quietSince)
			if takeover != nil && silent <= d.timing.staleAfter {
				takeover.end()
				takeover = nil
			}
			if takeover != nil && sameLease(rec, silentLease) {
				d.logger.Warn("taking over an event whose holder has shown no sign of life; it presumably crashed",
					zap.String("lock", name), zap.String("for", what), zap.Duration("silent_for", silent))
				return claim(rec, true)
			}

		case <-poll.C:
			rec, free, done, err := look()
			if event.held && free && err == nil {
				return claim(rec, false)
			}
			if done {
				endAll()
				return nil, rec, err
			}
			if takeover == nil && d.now().Sub(quietSince) > d.timing.staleAfter {
				takeover = d.startLock(takeoverLockName(name, rec))
			}
			poll.Reset(d.timing.pollEvery)

		case <-ctx.Done():
			endAll()
			return nil, nil, fmt.Errorf("the wait for the lock ended: %w", errLockBusy)
		}
	}
}

// isLiveLease reports whether rec is a lease a holder may still be
// renewing: neither a delivery nor the mark of a holder that let go.
func isLiveLease(rec *record) bool {
	return rec != nil && rec.DeliveredAt.IsZero() && rec.Holder != "" && !rec.Released
}

// sameLease reports whether two reads of a record found the same write.
func sameLease(a, b *record) bool {
	if a == nil || b == nil {
		return a == b
	}
	return a.Holder == b.Holder && a.HeartbeatAt.Equal(b.HeartbeatAt) &&
		a.Released == b.Released && a.DeliveredAt.Equal(b.DeliveredAt)
}

// takeoverLockName names the storage lock that the waiters of a silent
// lease contend for: one per lease write, so a holder that took over and
// died in turn is taken over through another name.
func takeoverLockName(name string, rec *record) string {
	id := "none"
	if rec != nil {
		id = rec.Holder + "|" + strconv.FormatInt(rec.HeartbeatAt.UnixNano(), 10) + "|" +
			strconv.FormatInt(rec.DeliveredAt.UnixNano(), 10) + "|" + strconv.FormatBool(rec.Released)
	}
	return name + "_takeover_" + hashHex(id)[:16]
}

func (d *deduper) newHeldLock(leaseKey, what string) *heldLock {
	var token [16]byte
	_, _ = rand.Read(token[:])
	return &heldLock{
		d:        d,
		leaseKey: leaseKey,
		what:     what,
		token:    hex.EncodeToString(token[:]),
		stopBeat: func() {},
	}
}

// name is the storage lock held, for logs.
func (l *heldLock) name() string {
	if len(l.locks) == 0 {
		return ""
	}
	return l.locks[len(l.locks)-1].name
}

// writeLease records that this holder is alive now.
func (l *heldLock) writeLease(ctx context.Context) error {
	return l.writeMark(ctx, false)
}

// writeMark writes this holder's lease, or with released the mark that it
// let go of the event without delivering it (a failed forward): the next
// holder then need not wait for its silence.
func (l *heldLock) writeMark(ctx context.Context, released bool) error {
	lease := l.lease
	lease.Version = recordVersion
	lease.Holder = l.token
	lease.HeartbeatAt = l.d.now().UTC()
	lease.Released = released
	data, err := json.Marshal(lease)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	return l.d.store(ctx, l.leaseKey, data)
}

// heartbeat renews the lease until stopped: first after firstDelay, then
// every beatEvery. Before each renewal it checks that the lease is still
// its own; if another instance has taken the event over (this one stalled
// past staleAfter), it stops and the event is left to the new holder.
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
				l.d.logger.Error("another instance took over an event this one held (this one stalled); it may forward the event too",
					zap.String("lock", l.name()), zap.String("for", l.what))
				return
			}
			if err := l.writeLease(context.Background()); err != nil {
				l.d.logger.Warn("renewing a lock's lease", zap.String("lock", l.name()), zap.Error(err))
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

// settle stops the heartbeat and finds out whether the event is still this
// instance's, before the holder writes its final record: it reads its
// lease. (Even a holder of under a second: a waiter may have watched the
// record for the stale time before this holder came.)
func (l *heldLock) settle() {
	l.stopBeat()
	if !l.lost.Load() && !l.stillOurs() {
		l.lost.Store(true)
	}
}

// release releases the storage locks, unless another instance took the
// event over: a storage lock of this holder's that lapsed may be the new
// holder's by now, and file_system's Unlock checks no owner.
func (l *heldLock) release() {
	l.stopBeat()
	for _, a := range l.locks {
		if l.lost.Load() {
			a.drop()
		} else {
			a.end()
		}
	}
	l.locks = nil
}

// lock takes the storage lock name and blocks while it is held; for the
// probe and tests. Its hold ends with unlock.
func (d *deduper) lock(ctx context.Context, name string) error {
	if err := d.storage.Lock(ctx, name); err != nil {
		return err
	}
	d.countHeld(name, 1)
	return nil
}

// countHeld counts a storage lock this instance holds (n = 1) or no longer
// holds (n = -1), for Cleanup.
func (d *deduper) countHeld(name string, n int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.held[name] += n; d.held[name] <= 0 {
		delete(d.held, name)
	}
}

func (d *deduper) unlock(name string) {
	d.mu.Lock()
	if d.held[name] == 0 {
		// releaseAll (Cleanup) released it already, and storage Unlock does
		// not check the owner: the lock may be another instance's by now
		d.mu.Unlock()
		return
	}
	if d.held[name]--; d.held[name] == 0 {
		delete(d.held, name)
	}
	d.mu.Unlock()
	d.unlockStorage(name)
}

func (d *deduper) unlockStorage(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), storageTimeout)
	defer cancel()
	if err := d.storage.Unlock(ctx, name); err != nil {
		if d.retired.Load() {
			// the old config's storage module was cleaned up under this
			// forward (a reload): the lock expires by the storage's own rules
			d.logger.Info("a dedupe storage lock of the previous config could not be released; it expires by itself",
				zap.String("lock", name), zap.Error(err))
			return
		}
		d.logger.Error("releasing a dedupe storage lock", zap.String("lock", name), zap.Error(err))
	}
}

// releaseAll releases every storage lock still held, for Cleanup: Caddy only
// releases certmagic's own locks on shutdown.
func (d *deduper) releaseAll() {
	d.mu.Lock()
	names := make([]string, 0, len(d.held))
	for name := range d.held {
		names = append(names, name)
	}
	d.held = make(map[string]int)
	d.mu.Unlock()
	for _, name := range names {
		ctx, cancel := context.WithTimeout(context.Background(), storageTimeout)
		_ = d.storage.Unlock(ctx, name)
		cancel()
	}
}
