package kaylewebhook

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Package-level collectors, registered again into each config's registry: a
// reload brings a fresh registry, and counters registered only once would
// vanish from /metrics after it. Labels are fixed outcome names, never ids.
var (
	requestsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "requests_total",
		Help:      "Deliveries handled, by outcome (forwarded, duplicate, rejected_<reason>, unknown_kid, storage_unavailable).",
	}, []string{"outcome"})
	recordWriteFailuresTotal = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy",
		Subsystem: "kayle_webhook",
		Name:      "dedupe_record_write_failures_total",
		Help:      "Events the backend accepted whose dedupe record could not be written; a retry of them would be forwarded again.",
	})
)

func registerMetrics(registry *prometheus.Registry) error {
	if registry == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{requestsTotal, recordWriteFailuresTotal} {
		if err := registry.Register(c); err != nil {
			if _, already := errors.AsType[prometheus.AlreadyRegisteredError](err); !already {
				return fmt.Errorf("registering metrics: %w", err)
			}
		}
	}
	return nil
}

func countRequest(outcome string) { requestsTotal.WithLabelValues(outcome).Inc() }

func countRecordWriteFailure() { recordWriteFailuresTotal.Inc() }
