package kaylewebhook

import (
	"path"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"
)

func TestDueMarkerNamesRoundTrip(t *testing.T) {
	q := newQueueStore(newDeduper(newMemStorage(), "kayle/prod", defaultDedupeWindow, zap.NewNop(), time.Now), zap.NewNop())
	now := time.Date(2026, 12, 2, 12, 30, 15, 0, time.UTC)
	next := now.Add(90 * time.Second)
	received := now.Add(-time.Hour)
	hash := hashHex("evt_x")
	key := q.dueMarkerKey(hash, next, received, now)
	if want := path.Join("kayle/prod/queue/due", strconv.FormatInt(next.Unix()/60, 10)); path.Dir(key) != want {
		t.Errorf("marker %s not in the bucket of its next try (%s)", key, want)
	}
	m, ok := parseDueMarker(key)
	if !ok || m.eventHash != hash || !m.next.Equal(next) || !m.received.Equal(received) {
		t.Errorf("parsed %+v from %s", m, key)
	}
	// a try due in the past is written into the writer's own minute, never
	// into a bucket a poll may have left behind
	late := q.dueMarkerKey(hash, now.Add(-10*time.Minute), received, now)
	if got, want := path.Base(path.Dir(late)), strconv.FormatInt(now.Unix()/60, 10); got != want {
		t.Errorf("past-due marker in bucket %s, want the current minute's %s", got, want)
	}
	for _, bad := range []string{"x/due/1/abc", "x/due/1/1-2-notahash", "x/due/1/a-b-" + hash, "x/due/1/" + hash} {
		if _, ok := parseDueMarker(bad); ok {
			t.Errorf("parsed %q", bad)
		}
	}
	if !sameMarker("/"+key, key) || sameMarker(key, late) {
		t.Error("sameMarker compares the markers' names")
	}
}
