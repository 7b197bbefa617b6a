package kaylewebhook

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"path"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"golang.org/x/time/rate"
)

// Queue defaults and bounds, documented on the Queue fields.
const (
	defaultQueueHorizon     = 7 * 24 * time.Hour
	defaultQueueMaxBackoff  = time.Minute
	defaultQueueConcurrency = 8
	maxQueueConcurrency     = 1024
	minQueueMaxBackoff      = 100 * time.Millisecond
	// maxRetryAfter caps a backend's Retry-After: a typo there must not
	// stop the queue for days.
	maxRetryAfter = time.Hour
	// queuePollEvery is how often an instance looks for due events.
	queuePollEvery = time.Second
	// queueStatsEvery is how often an instance counts the queue for its
	// metrics: the one walk over every marker.
	queueStatsEvery = time.Minute
	// queueClockSkew: buckets younger than this are always looked at, so an
	// instance whose clock is behind ours by up to it never writes a marker
	// where our poll no longer looks.
	queueClockSkew = 5 * time.Minute
	// queueStopWait is how long a stopping Caddy waits for the forwards in
	// flight to end; one cut short is taken over after the restart.
	queueStopWait = 5 * time.Second
	// queueQuietRecheck is how often a past bucket found empty is listed
	// again while it is within the clock skew.
	queueQuietRecheck = 10 * time.Second
	// emptyBucketAge is how old an empty bucket folder must be to go.
	emptyBucketAge = time.Hour
)

// Queue turns on queue mode: a delivery that verifies, decrypts and names
// an event not yet delivered or queued is written to the storage as the JWE
// it arrived as, Kayle is answered 202 at once, and the queue forwards it
// through Forward, retrying past Kayle's own retry horizon. The handler
// then never calls the rest of its route. Requires dedupe.
type Queue struct {
	// The routes the queue delivers through, as in a subroute: typically one
	// reverse_proxy (with its TLS, upstreams and health checks). Required.
	Forward caddyhttp.RouteList `json:"forward,omitempty"`

	// How long an event is tried, from when it was received (or retried by
	// an operator); then it is dead: kept and listed, never tried again by
	// itself. Default: 7d.
	Horizon caddy.Duration `json:"horizon,omitempty"`

	// The longest wait between two tries, of the whole queue while the
	// backend fails and of one event the backend refuses. A backend's
	// Retry-After (on 429 and 503) is honoured beyond it, up to an hour.
	// At least 100ms. Default: 1m.
	MaxBackoff caddy.Duration `json:"max_backoff,omitempty"`

	// Forwards in flight at once, per instance, from 1 to 1024. Default: 8.
	Concurrency int `json:"concurrency,omitempty"`

	// Forwards started per second, per instance (the Caddyfile's rate
	// N/s, N/m or N/h). Default: 0, no limit but Concurrency.
	Rate float64 `json:"rate,omitempty"`
}

// validate checks the queue settings that can never work.
func (q *Queue) validate(dedupeDisabled bool) error {
	switch {
	case dedupeDisabled:
		return errors.New("queue needs dedupe: the queue lives in the dedupe storage (remove dedupe off)")
	case len(q.Forward) == 0:
		return errors.New("queue needs a forward block (JSON queue.forward): the routes the queue delivers through, such as reverse_proxy <backend>")
	case q.Horizon < 0:
		return fmt.Errorf("queue horizon (JSON queue.horizon) is %s; it must not be negative", time.Duration(q.Horizon))
	case q.MaxBackoff != 0 && time.Duration(q.MaxBackoff) < minQueueMaxBackoff:
		return fmt.Errorf("queue max_backoff (JSON queue.max_backoff) is %s; it must be at least %s", time.Duration(q.MaxBackoff), minQueueMaxBackoff)
	case q.Concurrency < 0 || q.Concurrency > maxQueueConcurrency:
		return fmt.Errorf("queue concurrency (JSON queue.concurrency) is %d; it must be between 1 and %d", q.Concurrency, maxQueueConcurrency)
	case q.Rate < 0 || math.IsNaN(q.Rate) || math.IsInf(q.Rate, 0):
		return fmt.Errorf("queue rate (JSON queue.rate) is %v; it must be a positive number of forwards a second", q.Rate)
	}
	return nil
}

// queueRunner is a handler's queue at work: it takes deliveries in (accept)
// and forwards what is due, from this instance, beside every other instance
// sharing the storage.
type queueRunner struct {
	queueStore
	h       *Handler
	forward caddyhttp.Handler
	server  *caddyhttp.Server

	horizon    time.Duration
	maxBackoff time.Duration
	slots      chan struct{} // one per forward in flight
	limiter    *rate.Limiter // nil: no rate

	pollEvery, statsEvery time.Duration // tests shorten them

	mu      sync.Mutex
	backoff queueBackoff
	paused  bool
	cursor  int64 // the oldest due bucket that may hold a marker
	// quiet: when each past bucket was last found empty (the poll loop's)
	quiet map[int64]time.Time
	// leases: other holders' leases met by polls, by event hash
	leases map[string]leaseSighting
	// ready: opened deliveries waiting for a slot (queue_ready.go)
	ready      map[string]readyEvent
	readyBytes int
	started    bool // the cursor was set by a first scan

	wake   chan struct{}
	ctx    context.Context
	stop   context.CancelFunc
	done   chan struct{}  // the poll loop ended
	active sync.WaitGroup // forwards in flight
}

// provisionQueue sets up the queue of a handler whose deduper is ready.
func (h *Handler) provisionQueue(ctx caddy.Context) error {
	cfg := h.Queue
	if err := cfg.Forward.Provision(ctx); err != nil {
		return fmt.Errorf("queue forward (JSON queue.forward): %v", err)
	}
	q := &queueRunner{
		queueStore: newQueueStore(h.dedupe, h.logger.Named("queue")),
		h:          h,
		forward:    cfg.Forward.Compile(nothingAnswers{}),
		horizon:    time.Duration(cfg.Horizon),
		maxBackoff: time.Duration(cfg.MaxBackoff),
		pollEvery:  queuePollEvery,
		statsEvery: queueStatsEvery,
		wake:       make(chan struct{}, 1),
		quiet:      make(map[int64]time.Time),
		leases:     make(map[string]leaseSighting),
		ready:      make(map[string]readyEvent),
		done:       make(chan struct{}),
	}
	if q.horizon == 0 {
		q.horizon = defaultQueueHorizon
	}
	if q.maxBackoff == 0 {
		q.maxBackoff = defaultQueueMaxBackoff
	}
	concurrency := cfg.Concurrency
	if concurrency == 0 {
		concurrency = defaultQueueConcurrency
	}
	if h.timing != nil {
		q.pollEvery, q.statsEvery = h.timing.queuePoll, h.timing.queueStats
	}
	q.slots = make(chan struct{}, concurrency)
	if cfg.Rate > 0 {
		q.limiter = rate.NewLimiter(rate.Limit(cfg.Rate), 1)
	}
	// reverse_proxy reads the server from the request; the queue's requests
	// come from no connection, so it takes the server the handler is in
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && srv != nil {
		q.server = srv
	} else {
		q.server = new(caddyhttp.Server)
	}
	registerQueueMetrics(h.dedupe.prefix)
	h.queue = q
	return nil
}

// start runs the poll loop until stopQueue.
func (q *queueRunner) start() {
	q.ctx, q.stop = context.WithCancel(context.Background())
	go q.loop()
}

// stopQueue ends the poll loop. Forwards in flight go on (a reload: each
// ends and records its own result), except when Caddy exits: then they are
// given queueStopWait, and one still running then is taken over after the
// restart, by this instance or another.
func (q *queueRunner) stopQueue(exiting bool) {
	if q.stop == nil {
		return
	}
	q.stop()
	<-q.done
	if !exiting {
		return
	}
	ended := make(chan struct{})
	go func() { q.active.Wait(); close(ended) }()
	select {
	case <-ended:
	case <-time.After(queueStopWait):
		q.logger.Warn("stopping with forwards in flight; they are tried again after the restart")
	}
}

// kick makes the poll loop look for due events now.
func (q *queueRunner) kick() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// nothingAnswers ends the forward routes: a route that reaches it answered
// nothing (forwardFromQueue makes that a 502).
type nothingAnswers struct{}

func (nothingAnswers) ServeHTTP(http.ResponseWriter, *http.Request) error { return nil }

// warnStrandedQueue warns when a handler without a queue finds queued or
// dead events under its prefix: a queue block was removed, and nothing
// forwards them (copies of them are answered as duplicates).
func warnStrandedQueue(d *deduper, logger *zap.Logger) {
	q := newQueueStore(d, logger)
	ctx, cancel := context.WithTimeout(context.Background(), storageTimeout)
	defer cancel()
	due, _ := d.storage.List(ctx, path.Join(q.dir, queueDueFolder), false)
	dead, _ := d.storage.List(ctx, path.Join(q.dir, queueDeadFolder), false)
	if len(due) > 0 || len(dead) > 0 {
		logger.Warn("the storage holds queued or dead events but this handler has no queue block: nothing forwards them, and Kayle's copies are answered as duplicates; put the queue block back (caddy kayle queue list shows them)",
			zap.String("prefix", d.prefix), zap.Int("due_buckets", len(due)), zap.Int("dead", len(dead)))
	}
}
