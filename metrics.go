package kaylewebhook

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Package-level collectors, registered again into each config's registry: a
// reload brings a fresh registry, and counters registered only once would
// vanish from /metrics after it. Labels are fixed outcome and phase names,
// configured kids and secret positions: never an event id or payload data.
var (
	requestsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "requests_total",
		Help:      "Deliveries handled, by outcome (forwarded, queued, duplicate, ignored, rejected_<reason>, unknown_kid, storage_unavailable, lock_busy, client_gone).",
	}, []string{"outcome"})
	recordWriteFailuresTotal = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "dedupe_record_write_failures_total",
		Help:      "Events the backend accepted whose dedupe record could not be written; a retry of them would be forwarded again.",
	})
	keyUsesTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "key_uses_total",
		Help:      "Deliveries decrypted, by the kid of the private key that opened them; a key that stays at 0 is no longer used.",
	}, []string{"kid"})
	secretMatchesTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "signing_secret_matches_total",
		Help:      "Deliveries whose signature verified, by the 1-based position of the first signing_secret that matched it.",
	}, []string{"position"})
	phaseSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "phase_duration_seconds",
		Help:      "Time spent per delivery in each phase: verify (HMAC), decrypt (JWE), dedupe_storage (locks, including waiting for another copy of the event, and records), forward (the rest of the route, i.e. the backend).",
		// from an HMAC (tens of µs) to a slow backend (forwardTimeout)
		Buckets: []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120},
	}, []string{"phase"})
)

// The queue's collectors, labelled by the queue (its dedupe_prefix, a
// configured name).
var (
	queueDepth = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "queue_depth",
		Help:      "Events queued and not yet delivered, dead ones aside, as last counted (every minute).",
	}, []string{"queue"})
	queueOldestAge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "queue_oldest_age_seconds",
		Help:      "How long ago the oldest queued event was received, as last counted; 0 when the queue is empty.",
	}, []string{"queue"})
	queueDead = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "queue_dead",
		Help:      "Dead events (past the horizon, or unopenable), kept until an operator retries or drops them, as last counted.",
	}, []string{"queue"})
	queueForwardsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "queue_forwards_total",
		Help:      "Forwards from the queue, by the status the backend answered (502 when it could not be reached).",
	}, []string{"queue", "status"})
	queueBackoffSeconds = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "queue_backoff_seconds",
		Help:      "The queue's current wait between probes of a failing backend; 0 while the backend answers.",
	}, []string{"queue"})
	queuePausedGauge = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "queue_paused",
		Help:      "1 while the queue is paused (caddy kayle queue pause): deliveries are queued, none forwarded.",
	}, []string{"queue"})
)

// The phases of phaseSeconds.
const (
	phaseVerify        = "verify"
	phaseDecrypt       = "decrypt"
	phaseDedupeStorage = "dedupe_storage"
	phaseForward       = "forward"
)

// registerMetrics registers the collectors into registry and makes the kids
// and secret positions of this config visible at 0, so an operator sees a
// key or secret that nothing uses.
func registerMetrics(registry *prometheus.Registry, kids []string, secrets int) error {
	if registry == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{requestsTotal, recordWriteFailuresTotal, keyUsesTotal, secretMatchesTotal, phaseSeconds,
		queueDepth, queueOldestAge, queueDead, queueForwardsTotal, queueBackoffSeconds, queuePausedGauge} {
		if err := registry.Register(c); err != nil {
			if _, already := errors.AsType[prometheus.AlreadyRegisteredError](err); !already {
				return fmt.Errorf("registering metrics: %w", err)
			}
		}
	}
	for _, kid := range kids {
		keyUsesTotal.WithLabelValues(kid)
	}
	for position := 1; position <= secrets; position++ {
		secretMatchesTotal.WithLabelValues(strconv.Itoa(position))
	}
	return nil
}

func countRequest(o outcome) { requestsTotal.WithLabelValues(string(o)).Inc() }

func countRecordWriteFailure() { recordWriteFailuresTotal.Inc() }

// countKeyUse is called only with kids of configured keys, so the label set
// is bounded by the configuration, not by what senders write.
func countKeyUse(kid string) { keyUsesTotal.WithLabelValues(kid).Inc() }

func countSecretMatch(position int) {
	secretMatchesTotal.WithLabelValues(strconv.Itoa(position)).Inc()
}

// observePhase records the time since start in phase.
func observePhase(phase string, start time.Time) { observeDuration(phase, time.Since(start)) }

// observeDuration records d in phase.
func observeDuration(phase string, d time.Duration) {
	phaseSeconds.WithLabelValues(phase).Observe(d.Seconds())
}

// registerQueueMetrics makes a queue's gauges visible at 0.
func registerQueueMetrics(queue string) {
	for _, g := range []*prometheus.GaugeVec{queueDepth, queueOldestAge, queueDead, queueBackoffSeconds, queuePausedGauge} {
		g.WithLabelValues(queue)
	}
}

// countQueueForward counts a forward from the queue by its status, a
// number from 100 to 599.
func countQueueForward(queue string, status int) {
	queueForwardsTotal.WithLabelValues(queue, strconv.Itoa(status)).Inc()
}

func setQueueBackoff(queue string, wait time.Duration) {
	queueBackoffSeconds.WithLabelValues(queue).Set(wait.Seconds())
}

func setQueuePaused(queue string, paused bool) {
	v := 0.0
	if paused {
		v = 1
	}
	queuePausedGauge.WithLabelValues(queue).Set(v)
}

func setQueueStats(queue string, depth int, oldest time.Duration, dead int) {
	queueDepth.WithLabelValues(queue).Set(float64(depth))
	if depth == 0 {
		oldest = 0
	}
	queueOldestAge.WithLabelValues(queue).Set(oldest.Seconds())
	queueDead.WithLabelValues(queue).Set(float64(dead))
}
