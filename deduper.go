package kaylewebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

const (
	// storageTimeout bounds storage calls made after the request may be gone
	// (writing the record, releasing locks).
	storageTimeout = 30 * time.Second
)

// deduper forwards each event once across every Caddy instance sharing its
// storage. Per event it takes an in-process claim (so same-instance copies
// never pay the storage lock's poll), then the storage lock (so copies on
// other instances wait), then looks for the "delivered" record. The record is
// written only after the backend answered 2xx, so a failed forward is retried
// by Kayle and forwarded again. The storage lock can be lost in rare cases
// (a holder stalled past the stale-lock timeout); the cost is then at most one
// duplicate forward, never a lost event.
type deduper struct {
	storage certmagic.Storage
	prefix  string
	window  time.Duration
	logger  *zap.Logger
	now     func() time.Time

	timing lockTiming

	mu   sync.Mutex
	held map[string]int // storage locks held now, by name, for Cleanup

	// identity names the records this deduper keeps (storage and prefix),
	// and generation orders the dedupers of one identity (see successor).
	identity string
	// storageConfig is the JSON of the handler's own storage, nil for the
	// global storage: part of the identity.
	storageConfig json.RawMessage
	generation    uint64
	retired       atomic.Bool // the handler was cleaned up (a reload, a stop)
}

func newDeduper(storage certmagic.Storage, prefix string, window time.Duration, logger *zap.Logger, now func() time.Time) *deduper {
	return &deduper{
		storage: storage,
		prefix:  prefix,
		window:  window,
		logger:  logger,
		now:     now,
		timing:  defaultLockTiming,
		held:    make(map[string]int),
	}
}

// cleanPrefix normalizes a storage prefix and refuses one that could climb
// out of the storage root.
func cleanPrefix(prefix string) (string, error) {
	cleaned := path.Clean("/" + prefix)[1:]
	if cleaned == "" || cleaned == "." {
		return "", errors.New("dedupe_prefix must name a folder below the storage root")
	}
	// '\\' too: file_system storage on Windows splits on it
	if slices.Contains(strings.FieldsFunc(prefix, func(r rune) bool { return r == '/' || r == '\\' }), "..") {
		return "", fmt.Errorf("dedupe_prefix %q must not contain '..'", prefix)
	}
	return cleaned, nil
}
