package kaylewebhook

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"path"
	"time"

	"go.uber.org/zap"
)

const (
	// sweepInterval is how often, at most, one instance of a cluster deletes
	// expired records.
	sweepInterval = time.Hour
	// sweepLockWait is how long an instance waits for the sweep lock, past
	// the time it takes to find its holder dead, before assuming another
	// instance is sweeping.
	sweepLockWait = 5 * time.Second
	// sweepLeaseName is the key, below the prefix, of the sweeper's lease.
	sweepLeaseName = "sweep_lease"
	// sweepPause: after each record folder the sweep rests this many times
	// as long as the folder took (at most sweepMaxPause), so it uses at most
	// a fifth of a CPU. On slow network storage it is a fifth of the time.
	sweepPause    = 4
	sweepMaxPause = time.Second
	// sweepShards is the number of record folders: eventKeys names them by
	// the first byte of the hash, in hex.
	sweepShards = 256
	// sweepClockMargin: records whose file time is within it of the cutoff
	// are read, so a storage clock ahead of this instance's by up to it
	// does not keep expired records an extra sweep.
	sweepClockMargin = time.Hour
)

// startSweeper deletes expired records in the background until ctx ends.
func (d *deduper) startSweeper(ctx context.Context) {
	go func() {
		// a random first delay spreads the instances of a cluster
		timer := time.NewTimer(time.Minute + rand.N(4*time.Minute))
		defer timer.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
				if err := d.sweep(ctx); err != nil && ctx.Err() == nil {
					d.logger.Warn("sweeping expired dedupe records", zap.Error(err))
				}
				timer.Reset(sweepInterval)
			}
		}
	}()
}

// sweep deletes the records older than the window. One instance of a cluster
// sweeps at a time (a storage lock), and at most once per sweepInterval (a
// marker record). A record re-written between our read and our delete is
// lost; the cost is one duplicate forward of an event older than the window.
func (d *deduper) sweep(ctx context.Context) error {
	_, _, err := d.sweepRecords(ctx, false)
	return err
}

// sweepRecords is sweep; now: even within an hour of the last sweep (the
// sweep command). It returns how many records it deleted and saw.
func (d *deduper) sweepRecords(ctx context.Context, now bool) (deleted, seen int, err error) {
	lockName := "kayle_webhook_sweep_" + hashHex(d.prefix)[:32]
	// long enough to outwait a dead sweeper's silence and take over
	waitCtx, cancel := context.WithTimeout(ctx, d.timing.staleAfter+sweepLockWait)
	held, _, err := d.acquire(waitCtx, lockName, path.Join(d.prefix, sweepLeaseName), "sweep")
	cancel()
	if errors.Is(err, errLockBusy) {
		return 0, 0, nil // another instance is sweeping (or Caddy is stopping)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("taking the sweep lock: %w", err)
	}
	if held == nil {
		return 0, 0, nil // cannot happen: a sweep lease is never a delivery
	}
	defer held.release()
	if err := held.writeLease(ctx); err != nil {
		return 0, 0, fmt.Errorf("writing the sweep lease: %w", err)
	}
	held.heartbeat(d.timing.beatEvery)
	defer func() {
		held.settle()
		if !held.lost.Load() {
			// the next sweeper need not wait for this lease's silence
			_ = held.writeMark(ctx, true)
		}
	}()

	markerKey := path.Join(d.prefix, "last_sweep")
	if data, err := d.storage.Load(ctx, markerKey); err == nil && !now {
		if last, err := time.Parse(time.RFC3339Nano, string(data)); err == nil && d.now().Sub(last) < sweepInterval {
			return 0, 0, nil
		}
	}
	clock, sweepStart := d.now(), time.Now()
	cutoff := clock.Add(-d.window)
	var listErr error
	// One record folder at a time: the keys of a busy window (a million
	// records) are never all in memory at once, and the sweep rests between
	// folders so that it takes little from the requests it runs beside. It
	// starts at a random folder, so sweeps cut short (a reload, a stop)
	// still reach every folder in time.
	first := rand.N(sweepShards)
	for i := range sweepShards {
		began := time.Now()
		folder := path.Join(d.prefix, fmt.Sprintf("%02x", (first+i)%sweepShards))
		keys, err := d.storage.List(ctx, folder, false)
		if errors.Is(err, fs.ErrNotExist) {
			// no such folder yet, or (file_system) a temp file renamed
			// during the listing: the keys listed so far are still good
			err = nil
		}
		if err != nil {
			// the other folders are still swept; the marker is not written,
			// so the next sweep tries this one again
			if listErr == nil {
				d.logger.Warn("listing a dedupe record folder; sweeping the others", zap.String("folder", folder), zap.Error(err))
			}
			listErr = cmp.Or(listErr, err)
			continue
		}
		seen += len(keys)
		for _, key := range keys {
			if ctx.Err() != nil {
				return deleted, seen, ctx.Err()
			}
			expired, err := d.expired(ctx, key, cutoff, clock)
			if err != nil || !expired {
				continue
			}
			if err := d.storage.Delete(ctx, key); err != nil {
				d.logger.Warn("deleting an expired dedupe record", zap.String("key", key), zap.Error(err))
				continue
			}
			deleted++
		}
		select {
		case <-ctx.Done():
			return deleted, seen, ctx.Err()
		case <-time.After(min(time.Since(began)*sweepPause, sweepMaxPause)):
		}
	}
	d.logger.Info("swept expired dedupe records", zap.Int("deleted", deleted), zap.Int("seen", seen),
		zap.Duration("took", time.Since(sweepStart)))
	if listErr != nil {
		return deleted, seen, listErr
	}
	return deleted, seen, d.storage.Store(ctx, markerKey, []byte(d.now().UTC().Format(time.RFC3339Nano)))
}

// expired reports whether key is one of ours and older than cutoff: a record
// (by its own time), or a temp file a crashed Store left in a record folder
// (by its modification time). Anything else in a record folder is left
// alone, and so is a folder: deleting a folder key deletes its contents.
//
// A record is written when its event is delivered, so a file time well
// after the cutoff and not after now (by the storage's clock; a time from
// the future is not trusted) says it is fresh without reading it: the
// hourly sweep then costs a Stat per record, not a read. A record whose
// file is newer than its own time (a copied storage) is kept a while
// longer, never deleted early.
func (d *deduper) expired(ctx context.Context, key string, cutoff, now time.Time) (bool, error) {
	isRecord := d.isRecordKey(key)
	if !isRecord && !d.isStrayTempFile(key) {
		return false, nil
	}
	info, err := d.storage.Stat(ctx, key)
	if err != nil {
		return false, err
	}
	// A record key is never a folder in our layout, and some storage
	// modules (pteich/caddy-tlsconsul) report no key as terminal: a record is
	// read whatever Stat says. A stray temp file must be a file, since
	// deleting a folder key deletes what is below it.
	if !info.IsTerminal && !isRecord {
		return false, nil
	}
	if info.Modified.After(cutoff.Add(sweepClockMargin)) && !info.Modified.After(now) {
		return false, nil
	}
	if isRecord {
		data, err := d.storage.Load(ctx, key)
		if err != nil {
			return false, err
		}
		var rec record
		if json.Unmarshal(data, &rec) == nil {
			if rec.Queue != nil {
				return false, nil // a queued or dead event: the queue's to end
			}
			if !rec.DeliveredAt.IsZero() {
				return rec.DeliveredAt.Before(cutoff), nil
			}
		}
	}
	return !info.Modified.IsZero() && info.Modified.Before(cutoff), nil
}

// isStrayTempFile reports whether key looks like file_system's temp file
// (os.CreateTemp's decimal name) inside one of our record folders.
func (d *deduper) isStrayTempFile(key string) bool {
	dir, name := path.Split(key)
	shard := path.Base(dir)
	if path.Dir(path.Clean(dir)) != d.prefix || len(shard) != 2 || !isLowerHex(shard) || name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if name[i] < '0' || name[i] > '9' {
			return false
		}
	}
	return true
}
