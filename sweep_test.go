package kaylewebhook

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

// sweepFixture fills a storage with what a sweep meets: records delivered
// past the window and within it, a marker, stray temp files (as
// certmagic's atomic Store leaves after a crash) old and new, and folders.
type sweepFixture struct {
	expiredIDs, freshIDs []string
	oldStray, newStray   string   // keys
	folderFile           string   // a fresh file in a subfolder with an old time
	foreign              []string // old files that are not ours: never swept
}

// modTimer sets a key's modification time.
type modTimer func(t *testing.T, key string, modified time.Time)

func storageModTimer(st certmagic.Storage) modTimer {
	return func(t *testing.T, key string, modified time.Time) {
		t.Helper()
		switch s := st.(type) {
		case *memStorage:
			data, err := s.Load(context.Background(), key)
			if err != nil {
				t.Fatal(err)
			}
			s.put(key, data, modified)
		case *certmagic.FileStorage:
			if err := os.Chtimes(s.Filename(key), modified, modified); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func newSweepFixture(t *testing.T, st certmagic.Storage, now time.Time) sweepFixture {
	t.Helper()
	ctx := context.Background()
	setMod := storageModTimer(st)
	var f sweepFixture
	writeAt := func(id string, at, fileTime time.Time) {
		old := newTestDeduper(st, newTestClock(at))
		hash, key, _ := old.eventKeys(id)
		if err := old.commit(ctx, key, record{EventSHA256: hash}, http.StatusOK); err != nil {
			t.Fatal(err)
		}
		setMod(t, key, fileTime)
	}
	for i := range 3 {
		id := fmt.Sprintf("evt_expired_%d", i)
		at := now.Add(-defaultDedupeWindow - time.Duration(i+1)*time.Hour)
		// written when delivered, by a storage clock up to 50 min ahead
		writeAt(id, at, at.Add(time.Duration(i)*25*time.Minute))
		f.expiredIDs = append(f.expiredIDs, id)
		// a fresh record in a file that looks old: its own time decides
		id = fmt.Sprintf("evt_fresh_%d", i)
		writeAt(id, now.Add(-defaultDedupeWindow+time.Duration(i+1)*time.Hour), now.Add(-2*defaultDedupeWindow))
		f.freshIDs = append(f.freshIDs, id)
	}
	// an unreadable record file goes by its modification time too
	_, garbled, _ := newTestDeduper(st, newTestClock(now)).eventKeys("evt_garbled")
	f.oldStray = path.Join(testPrefix, "0f", "2367183409") // os.CreateTemp's naming
	f.newStray = path.Join(testPrefix, "0f", "981276354")
	f.folderFile = path.Join(testPrefix, "0f", "sub", "keep")
	// a prefix pointed at a folder that holds other data must not lose it
	f.foreign = []string{path.Join(testPrefix, "notes.txt"), path.Join(testPrefix, "0f", "readme"), path.Join(testPrefix, "12345")}
	for _, key := range f.foreign {
		if err := st.Store(ctx, key, []byte("not ours")); err != nil {
			t.Fatal(err)
		}
		setMod(t, key, now.Add(-2*defaultDedupeWindow))
	}
	for key, mod := range map[string]time.Time{
		f.oldStray:   now.Add(-defaultDedupeWindow - time.Minute),
		f.newStray:   now.Add(-time.Minute),
		f.folderFile: now,
		garbled:      now.Add(-time.Hour),
	} {
		if err := st.Store(ctx, key, []byte("{partial")); err != nil {
			t.Fatal(err)
		}
		setMod(t, key, mod)
	}
	f.freshIDs = append(f.freshIDs, "evt_garbled") // its file is an hour old
	if fsys, ok := st.(*certmagic.FileStorage); ok {
		// an old folder: it must stay, with what is in it
		dir := fsys.Filename(path.Dir(f.folderFile))
		old := now.Add(-2 * defaultDedupeWindow)
		if err := os.Chtimes(dir, old, old); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(fsys.Filename(path.Join(testPrefix, "empty_old_dir")), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(fsys.Filename(path.Join(testPrefix, "empty_old_dir")), old, old); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

func (f sweepFixture) assertSwept(t *testing.T, d *deduper) {
	t.Helper()
	ctx := context.Background()
	for _, id := range f.expiredIDs {
		if hasRecord(d, id) {
			t.Errorf("expired record of %s survived the sweep", id)
		}
	}
	for _, id := range f.freshIDs {
		if !hasRecord(d, id) {
			t.Errorf("fresh record of %s was swept", id)
		}
	}
	if _, err := d.storage.Stat(ctx, f.oldStray); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("old stray temp file survived the sweep (%v)", err)
	}
	for _, key := range append([]string{f.newStray, f.folderFile}, f.foreign...) {
		if _, err := d.storage.Stat(ctx, key); err != nil {
			t.Errorf("%s: %v; want it kept", key, err)
		}
	}
	if info, err := d.storage.Stat(ctx, path.Dir(f.folderFile)); err != nil || info.IsTerminal {
		t.Errorf("the old subfolder is gone or not a folder: %+v %v", info, err)
	}
	if fsys, ok := d.storage.(*certmagic.FileStorage); ok {
		if _, err := os.Stat(fsys.Filename(path.Join(testPrefix, "empty_old_dir"))); err != nil {
			t.Errorf("an old empty folder was deleted: %v", err)
		}
	}
	if ms, ok := d.storage.(*memStorage); ok && ms.folderDeletes > 0 {
		t.Errorf("the sweep called Delete on a folder key %d times", ms.folderDeletes)
	}
	if _, err := d.storage.Load(ctx, path.Join(testPrefix, "last_sweep")); err != nil {
		t.Errorf("no sweep marker: %v", err)
	}
}

func TestSweepExpiredRecords(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			st := sc.new(t)
			now := testEpoch
			f := newSweepFixture(t, st, now)
			d := newTestDeduper(st, newTestClock(now))
			if err := d.sweep(context.Background()); err != nil {
				t.Fatalf("sweep: %v", err)
			}
			f.assertSwept(t, d)
			assertNoLocks(t, d)

			// the swept event is forwarded again, the fresh one is not
			backend := &testBackend{}
			assertForwardedOK(t, deliverEvent(d, f.expiredIDs[0], backend))
			assertDuplicate(t, deliverEvent(d, f.freshIDs[0], backend), f.freshIDs[0])
		})
	}
}

func TestSweepEmptyStorage(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			d := newTestDeduper(sc.new(t), newTestClock(testEpoch))
			if err := d.sweep(context.Background()); err != nil {
				t.Fatalf("sweep of a storage with no records: %v", err)
			}
			assertNoLocks(t, d)
		})
	}
}

func TestSweepHourlyMarker(t *testing.T) {
	for _, sc := range storageCases {
		t.Run(sc.name, func(t *testing.T) {
			st := sc.new(t)
			clock := newTestClock(testEpoch)
			d := newTestDeduper(st, clock)
			ctx := context.Background()
			if err := d.sweep(ctx); err != nil {
				t.Fatal(err)
			}

			// a record that expires 10 minutes after that sweep
			old := newTestDeduper(st, newTestClock(testEpoch.Add(-defaultDedupeWindow+10*time.Minute)))
			hash, key, _ := old.eventKeys("evt_expires_soon")
			if err := old.commit(ctx, key, record{EventSHA256: hash}, 200); err != nil {
				t.Fatal(err)
			}
			clock.Advance(59 * time.Minute)
			if err := d.sweep(ctx); err != nil {
				t.Fatal(err)
			}
			if !hasRecord(d, "evt_expires_soon") {
				t.Error("a second sweep within the hour deleted a record")
			}
			if ms, ok := st.(*memStorage); ok && ms.callCount("List") != sweepShards {
				t.Errorf("List called %d times, want %d (one sweep): the second sweep must do nothing", ms.callCount("List"), sweepShards)
			}

			clock.Advance(time.Minute)
			if err := d.sweep(ctx); err != nil {
				t.Fatal(err)
			}
			if hasRecord(d, "evt_expires_soon") {
				t.Error("the sweep an hour later kept an expired record")
			}
			assertNoLocks(t, d)
		})
	}
}

// TestSweepConcurrentSweepers: of two instances sweeping at once, one does
// the work; the other waits for the sweep lock, then finds the marker.
func TestSweepConcurrentSweepers(t *testing.T) {
	t.Run("memory", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		a, b := newTestDeduper(st, newTestClock(testEpoch)), newTestDeduper(st, newTestClock(testEpoch))

		// pause a in its first Delete, so b arrives mid-sweep
		inDelete, resume := make(chan struct{}), make(chan struct{})
		var once sync.Once
		st.hook = func(method, key string) {
			if method == "Delete" {
				once.Do(func() { close(inDelete); <-resume })
			}
		}
		errA := make(chan error, 1)
		go func() { errA <- a.sweep(context.Background()) }()
		waitFor(t, inDelete, "the first sweeper to delete")

		// b gives up waiting for the lock (its 5 s wait, shortened)
		ctxB, cancelB := context.WithCancel(context.Background())
		errB := make(chan error, 1)
		go func() { errB <- b.sweep(ctxB) }()
		waitFor(t, st.lockWaits, "the second sweeper to wait on the lock")
		cancelB()
		if err := waitFor(t, errB, "the second sweeper to give up"); err != nil {
			t.Errorf("a sweeper that lost the lock race: %v, want nil", err)
		}

		// b waits for the lock this time, and finds a's marker
		go func() { errB <- b.sweep(context.Background()) }()
		waitFor(t, st.lockWaits, "the second sweeper to wait on the lock")
		close(resume)
		if err := waitFor(t, errA, "the first sweeper"); err != nil {
			t.Fatal(err)
		}
		if err := waitFor(t, errB, "the second sweeper"); err != nil {
			t.Fatal(err)
		}
		if n := st.callCount("List"); n != sweepShards {
			t.Errorf("List called %d times, want %d (one sweep): one sweeper does the work", n, sweepShards)
		}
		if n := st.callCount("Delete"); n != len(f.expiredIDs)+1 {
			t.Errorf("Delete called %d times, want %d (each expired file once)", n, len(f.expiredIDs)+1)
		}
		f.assertSwept(t, a)
		assertNoLocks(t, a)
		assertNoLocks(t, b)
	})

	t.Run("file_system", func(t *testing.T) {
		root := t.TempDir()
		f := newSweepFixture(t, &certmagic.FileStorage{Path: root}, testEpoch)
		// two instances: two FileStorage values on one folder
		a := newTestDeduper(&certmagic.FileStorage{Path: root}, newTestClock(testEpoch))
		b := newTestDeduper(&certmagic.FileStorage{Path: root}, newTestClock(testEpoch))
		errs := make(chan error, 2)
		start := make(chan struct{})
		for _, d := range []*deduper{a, b} {
			go func() { <-start; errs <- d.sweep(context.Background()) }()
		}
		close(start)
		for range 2 {
			if err := waitFor(t, errs, "a sweeper"); err != nil {
				t.Error(err)
			}
		}
		f.assertSwept(t, a)
		assertNoLocks(t, a)
	})
}

func TestSweepStorageFailures(t *testing.T) {
	t.Run("Stat fails: nothing deleted", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		st.fail("Stat", errInjected)
		if err := d.sweep(context.Background()); err != nil {
			t.Fatal(err)
		}
		if n := st.callCount("Delete"); n != 0 {
			t.Errorf("Delete called %d times with Stat failing", n)
		}
		for _, id := range append(f.expiredIDs, f.freshIDs...) {
			if !hasRecord(d, id) {
				t.Errorf("record of %s deleted", id)
			}
		}
		assertNoLocks(t, d)
	})

	t.Run("Lock fails: an error to log, not a silent skip", func(t *testing.T) {
		st := newMemStorage()
		d := newTestDeduper(st, newTestClock(testEpoch))
		st.fail("Lock", errInjected)
		if err := d.sweep(context.Background()); !errors.Is(err, errInjected) {
			t.Errorf("sweep = %v, want the Lock error", err)
		}
		if n := st.callCount("List"); n != 0 {
			t.Errorf("swept without the lock (%d List calls)", n)
		}
	})

	t.Run("List fails: an error, no marker, tried again next time", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		st.fail("List", errInjected)
		if err := d.sweep(context.Background()); !errors.Is(err, errInjected) {
			t.Errorf("sweep = %v, want the List error", err)
		}
		assertNoLocks(t, d)
		st.fail("List", nil)
		if err := d.sweep(context.Background()); err != nil {
			t.Fatal(err)
		}
		f.assertSwept(t, d)
	})

	t.Run("List of one folder fails: the others are swept, no marker", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		_, victim, _ := d.eventKeys(f.expiredIDs[0])
		st.failOnly("List", path.Dir(victim), errInjected)
		if err := d.sweep(context.Background()); !errors.Is(err, errInjected) {
			t.Errorf("sweep = %v, want the List error", err)
		}
		for _, id := range f.expiredIDs {
			_, key, _ := d.eventKeys(id)
			if inVictim := path.Dir(key) == path.Dir(victim); hasRecord(d, id) != inVictim {
				t.Errorf("record of %s (in the unlisted folder: %v) kept: %v", id, inVictim, hasRecord(d, id))
			}
		}
		if _, err := st.Load(context.Background(), path.Join(testPrefix, "last_sweep")); err == nil {
			t.Error("a sweep that missed a folder wrote the marker")
		}
		assertNoLocks(t, d)
	})

	t.Run("List cut short by a vanished temp file: the keys listed are swept", func(t *testing.T) {
		// file_system's List is a filepath.Walk: a temp file renamed between
		// reading a folder and stat-ing the file ends it with fs.ErrNotExist
		st := &partialList{newMemStorage()}
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		if err := d.sweep(context.Background()); err != nil {
			t.Fatal(err)
		}
		for _, id := range f.expiredIDs {
			if hasRecord(d, id) {
				t.Errorf("expired record of %s survived", id)
			}
		}
	})

	t.Run("Delete fails: the others are still deleted", func(t *testing.T) {
		st := newMemStorage()
		f := newSweepFixture(t, st, testEpoch)
		d := newTestDeduper(st, newTestClock(testEpoch))
		_, victim, _ := d.eventKeys(f.expiredIDs[0])
		st.failOnly("Delete", victim, errInjected)
		if err := d.sweep(context.Background()); err != nil {
			t.Fatal(err)
		}
		for _, id := range f.expiredIDs[1:] {
			if hasRecord(d, id) {
				t.Errorf("expired record of %s survived", id)
			}
		}
		assertNoLocks(t, d)
	})
}

// TestSweepLeavesNestedPrefixes: with prefixes kayle and kayle/ep2 (two
// endpoints, as docs/clusters.md advises), kayle's sweep leaves ep2's records.
func TestSweepLeavesNestedPrefixes(t *testing.T) {
	st := newMemStorage()
	old := testEpoch.Add(-2 * defaultDedupeWindow)
	parent := newDeduper(st, "kayle", defaultDedupeWindow, zap.NewNop(), newTestClock(testEpoch).Now)
	child := newDeduper(st, "kayle/ep2", 30*24*time.Hour, zap.NewNop(), newTestClock(old).Now)
	oldParent := newDeduper(st, "kayle", defaultDedupeWindow, zap.NewNop(), newTestClock(old).Now)
	for _, dd := range []*deduper{child, oldParent} {
		hash, key, _ := dd.eventKeys("evt_1")
		if err := dd.commit(context.Background(), key, record{EventSHA256: hash}, http.StatusOK); err != nil {
			t.Fatal(err)
		}
	}
	if err := parent.sweep(context.Background()); err != nil {
		t.Fatal(err)
	}
	if hasRecord(parent, "evt_1") {
		t.Error("the parent's expired record survived")
	}
	if !hasRecord(child, "evt_1") {
		t.Error("the parent's sweep deleted a record of the nested prefix")
	}
	_, key, _ := child.eventKeys("evt_1")
	if !strings.HasPrefix(key, "kayle/ep2/") || path.Base(path.Dir(key)) != path.Base(key)[:2] {
		t.Errorf("record key %s", key)
	}
}

// TestSweepReadsOnlyRecordsNearTheCutoff: the hourly sweep of a busy window
// reads no record whose file time says it is fresh; it reads those near the
// cutoff, and those whose file time is ahead of this instance's clock.
func TestSweepReadsOnlyRecordsNearTheCutoff(t *testing.T) {
	st := newMemStorage()
	now := testEpoch
	d := newTestDeduper(st, newTestClock(now))
	ctx := context.Background()
	write := func(id string, deliveredAt, fileTime time.Time) string {
		hash, key, _ := d.eventKeys(id)
		old := newTestDeduper(st, newTestClock(deliveredAt))
		if err := old.commit(ctx, key, record{EventSHA256: hash}, http.StatusOK); err != nil {
			t.Fatal(err)
		}
		storageModTimer(st)(t, key, fileTime)
		return key
	}
	for i := range 200 {
		at := now.Add(-time.Duration(i) * time.Hour)
		write(fmt.Sprintf("evt_recent_%d", i), at, at)
	}
	nearCutoff := now.Add(-defaultDedupeWindow + 30*time.Minute)
	wantRead := map[string]bool{
		write("evt_near_cutoff", nearCutoff, nearCutoff):                  true,
		write("evt_clock_ahead", now.Add(-time.Hour), now.Add(time.Hour)): true,
	}
	read := map[string]bool{}
	st.hook = func(method, key string) {
		if method == "Load" && d.isRecordKey(key) {
			read[key] = true
		}
	}
	if err := d.sweep(ctx); err != nil {
		t.Fatal(err)
	}
	for key := range read {
		if !wantRead[key] {
			t.Errorf("the sweep read %s, whose file time says it is fresh", key)
		}
	}
	for key := range wantRead {
		if !read[key] {
			t.Errorf("the sweep did not read %s", key)
		}
	}
	for _, id := range []string{"evt_recent_0", "evt_recent_199", "evt_near_cutoff", "evt_clock_ahead"} {
		if !hasRecord(d, id) {
			t.Errorf("fresh record of %s was swept", id)
		}
	}
}

// Expired records are deleted, and fresh ones kept, on a storage whose
// Stat never says a key is terminal: each record is judged by its own time.
func TestSweepWhereStatSaysNothing(t *testing.T) {
	st := vagueStat{newMemStorage()}
	now := testEpoch
	var expired, fresh []string
	for i := range 3 {
		for _, c := range []struct {
			kind string
			ids  *[]string
			at   time.Time
		}{
			{"expired", &expired, now.Add(-defaultDedupeWindow - time.Duration(i+1)*time.Hour)},
			{"fresh", &fresh, now.Add(-defaultDedupeWindow + time.Duration(i+1)*time.Hour)},
		} {
			id := fmt.Sprintf("evt_%s_%d", c.kind, i)
			old := newTestDeduper(st, newTestClock(c.at))
			hash, key, _ := old.eventKeys(id)
			if err := old.commit(context.Background(), key, record{EventSHA256: hash}, http.StatusOK); err != nil {
				t.Fatal(err)
			}
			*c.ids = append(*c.ids, id)
		}
	}
	d := newTestDeduper(st, newTestClock(now))
	if err := d.sweep(context.Background()); err != nil {
		t.Fatalf("sweep: %v", err)
	}
	for _, id := range expired {
		if _, key, _ := d.eventKeys(id); st.Exists(context.Background(), key) {
			t.Errorf("expired record of %s kept", id)
		}
	}
	for _, id := range fresh {
		if _, key, _ := d.eventKeys(id); !st.Exists(context.Background(), key) {
			t.Errorf("fresh record of %s deleted", id)
		}
	}
}
