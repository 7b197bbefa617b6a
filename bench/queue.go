package main

import (
	"errors"
	"fmt"
	"slices"
	"time"
)

// queueSettle bounds the wait, after a queue-mode row's last answer, for
// the backend to receive every event it answered 202: the forwards still
// running or queued behind them. A sync row's events are there when its
// answers are.
const queueSettle, syncSettle = 2 * time.Minute, 5 * time.Second

// file registers a run's deliveries in the ledger under name and round and
// waits until the backend has every event answered 2xx (in queue mode the
// forwards go on after the answers, and the next row must not run beside
// them). The sends go into the ledger only, not the report.
func (s *setup) file(name string, round int, res *result, queue bool) error {
	return s.fileAt(s.backend, name, round, res, queue)
}

// fileAt is file for the backend at addr.
func (s *setup) fileAt(addr, name string, round int, res *result, queue bool) error {
	s.ledger.register(name, round, *res)
	res.sent = nil
	settle := syncSettle
	if queue {
		settle = queueSettle
	}
	all, err := s.ledger.await(addr, time.Now().Add(settle), groupKey{name, round})
	if err != nil {
		return fmt.Errorf("reading the backend's receipts: %v", err)
	}
	d := s.ledger.stats(groupKey{name, round})
	if !all {
		logf("round %d %s: %d events answered 2xx had not reached the backend %s after the run", round+1, name, d.missing, settle)
	}
	if queue {
		logf("round %d %-28s delivered %8.1f/s  e2e p50 %-8s p99 %-8s once %d/%d dupes %d", round+1, name, d.deliveredRate(),
			percentileOf(d.e2e, 0.5).Round(10*time.Microsecond), percentileOf(d.e2e, 0.99).Round(10*time.Microsecond), d.once, d.answered, d.dupes)
	}
	return nil
}

// queueLatencyRound runs, open loop at half the round's throughput of the
// sync dedupe row on the same storage, the sync site and the queue site:
// the queue's added latency is the time from send to the backend's receipt
// (its 202 answers before the forward), against sync mode's.
func (s *setup) queueLatencyRound(o options, rep *report, round int) error {
	type target struct {
		name, url, rateOf string
		queue             bool
	}
	gw := s.gw
	all := []target{
		{e2eSyncTmpfs, gw.url(gw.tmpfs), tmpfs2048, false},
		{e2eQueueTmpfs, gw.url(gw.qtmpfs), tmpfs2048, true},
		{e2eSyncDisk, gw.url(gw.disk), disk2048, false},
		{e2eQueueDisk, gw.url(gw.qdisk), disk2048, true},
	}
	targets := slices.DeleteFunc(all, func(t target) bool { return !o.selected(t.name) })
	for _, t := range rotated(targets, round) {
		syncRate := rep.results[t.rateOf][round].rate()
		if syncRate <= 0 {
			return fmt.Errorf("%s served nothing", t.rateOf)
		}
		rate := syncRate / 2
		ds, err := genuine(s.k2048, 600, int(rate*o.duration.Seconds())+16)
		if err != nil {
			return err
		}
		var counts0 queueCounts
		if t.queue {
			counts0 = readQueueCounts(gw.admin)
		}
		res := openLoop(t.url, ds, rate, o.duration)
		if err := s.file(t.name, round, &res, t.queue); err != nil {
			return err
		}
		if t.queue {
			s.reopened[groupKey{t.name, round}] = readQueueCounts(gw.admin).sub(counts0).reopened()
		}
		rep.add(t.name, res)
		d := s.ledger.stats(groupKey{t.name, round})
		logf("round %d %-28s %8.1f/s  answer p99 %-8s e2e p50 %-8s p99 %-8s non-2xx %d errors %d", round+1, t.name, res.rate(),
			res.percentile(0.99).Round(10*time.Microsecond), percentileOf(d.e2e, 0.5).Round(10*time.Microsecond),
			percentileOf(d.e2e, 0.99).Round(10*time.Microsecond), res.non2xx, res.errors)
	}
	return nil
}

// queueCounts are a gateway's counters that tell a first try from a try
// out of the storage: every decrypt (the handler's, and a queued event's
// opened again) and every delivery answered 202.
type queueCounts struct{ decrypts, queued float64 }

func readQueueCounts(admin int) queueCounts {
	var c queueCounts
	var err1, err2 error
	c.decrypts, err1 = metricSum(admin, "caddy_kayle_webhook_phase_duration_seconds_count", `phase="decrypt"`)
	c.queued, err2 = metricSum(admin, "caddy_kayle_webhook_requests_total", `outcome="queued"`)
	if err := errors.Join(err1, err2); err != nil {
		logf("reading the gateway's metrics: %v", err)
	}
	return c
}

func (c queueCounts) sub(o queueCounts) queueCounts {
	return queueCounts{c.decrypts - o.decrypts, c.queued - o.queued}
}

// reopened: decrypts beyond one per delivery answered 202, i.e. queued
// events read back from the storage and decrypted a second time (the
// handler decrypts every delivery once; a first try uses that plaintext).
func (c queueCounts) reopened() int { return int(c.decrypts - c.queued) }
