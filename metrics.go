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
		Help:      "Deliveries handled, by outcome (forwarded, duplicate, ignored, rejected_<reason>, unknown_kid, storage_unavailable, lock_busy, client_gone).",
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
	for _, c := range []prometheus.Collector{requestsTotal, recordWriteFailuresTotal, keyUsesTotal, secretMatchesTotal, phaseSeconds} {
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
