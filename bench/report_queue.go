package main

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The targets of issue 15 at scale.
const (
	scaleIdleMax  = 0.05 // of one core
	scaleP99Max   = 1.5  // deep queue's p99 / empty queue's
	scaleDrainMin = 0.5  // drain rate / sync mode's throughput
)

// onceLine is the target row of the ledger: every genuine delivery a
// gateway answered 2xx reached the backend, once.
func (r *report) onceLine(verdict func(bool) string) string {
	if r.ledger == nil {
		return ""
	}
	all, bad := r.ledger.allStats()
	value := fmt.Sprintf("%d of %d", all.once, all.answered)
	if len(bad) > 0 {
		value += fmt.Sprintf("; %d missing, %d twice or more, %d not answered 2xx, in: %s", all.missing, all.dupes, all.extra, strings.Join(bad, ", "))
	}
	return fmt.Sprintf("| every genuine delivery answered 2xx by a gateway (every row with a backend, the queue's included) reached the backend exactly once, counted there by event id | %s | | all, once | %s |\n",
		value, verdict(len(bad) == 0 && all.answered > 0))
}

// p99Ratios are a scale run's rounds: the deep queue's answer p99 over the
// empty queue's.
func (s scaleResult) p99Ratios() []float64 {
	var out []float64
	for i := range min(len(s.deep), len(s.empty)) {
		if e := s.empty[i].percentile(0.99); e > 0 {
			out = append(out, float64(s.deep[i].percentile(0.99))/float64(e))
		}
	}
	return out
}

// syncRate is the sync site's throughput the drain is judged against: the
// higher of the runs before the fill and after the drain.
func (s scaleResult) syncRate() float64 { return max(s.syncBefore.rate(), s.syncAfter.rate()) }

func (s scaleResult) drainRatio() float64 {
	if s.syncRate() <= 0 {
		return 0
	}
	return s.drainRate() / s.syncRate()
}

// allOnce: every delivery of the run answered 2xx (202 at the queues),
// and every one of them received exactly once.
func (s scaleResult) allOnce() bool {
	failed := s.fillBad
	for _, r := range slices.Concat(s.deep, s.empty, []result{s.syncBefore, s.syncAfter}) {
		failed += r.non2xx + r.errors
	}
	return failed == 0 && s.not202 == 0 && s.once.exactlyOnce() && s.drainAll && s.emptyAll
}

func (s scaleResult) label() string {
	if s.storage == "disk" {
		return "file_system (disk)"
	}
	return "Redis"
}

// scaleLines are the scale targets, a row each, per storage.
func (r *report) scaleLines(verdict func(bool) string) string {
	var b strings.Builder
	for _, s := range r.scale {
		fmt.Fprintf(&b, "| queue at scale, %s: idle Caddy's CPU over %s, %s queued, backend down (the queue backing off) | %.2f %% of a core | | < %.0f %% | %s |\n",
			s.label(), s.idleWindow, thousands(s.idleDepth), 100*s.idleCPU, 100*scaleIdleMax, verdict(s.idleWindow > 0 && s.idleCPU < scaleIdleMax))
		rs := s.p99Ratios()
		lo, hi := 0.0, 0.0
		if len(rs) > 0 {
			lo, hi = slices.Min(rs), slices.Max(rs)
		}
		m := median(rs)
		fmt.Fprintf(&b, "| queue at scale, %s: a new delivery's answer (202) p99, %.0f/s open loop, %s queued / an empty queue | %.2f | %.2f–%.2f | ≤ %.2f | %s |\n",
			s.label(), scaleRate, depthRange(s.depth), m, lo, hi, scaleP99Max, verdict(m > 0 && m <= scaleP99Max))
		fmt.Fprintf(&b, "| queue at scale, %s: drain on recovery, events delivered/s (concurrency %d) / sync mode's requests/s (closed loop, c=%d, the higher of before and after) | %.2f | %.0f/s vs %.0f/s | ≥ %.2f | %s |\n",
			s.label(), s.conc, s.conc, s.drainRatio(), s.drainRate(), s.syncRate(), scaleDrainMin, verdict(s.drainAll && s.drainRatio() >= scaleDrainMin))
		fmt.Fprintf(&b, "| queue at scale, %s: every event answered 202 (the %s, the latency rounds') reached the backend exactly once | %d of %d | | all, once | %s |\n",
			s.label(), thousands(s.events), s.once.once, s.once.answered, verdict(s.allOnce()))
	}
	return b.String()
}

// Markers of the scale section, which a run without -queue-scale keeps.
const (
	scaleBegin = "<!-- queue scale: begin (written by go run ./bench -queue-scale; a run without it keeps this section as it is) -->"
	scaleEnd   = "<!-- queue scale: end -->"
)

// keptScale is the scale section of the report in file, markers included,
// or "".
func keptScale(file string) string {
	old, err := os.ReadFile(file)
	if err != nil {
		return ""
	}
	text := string(old)
	i := strings.Index(text, scaleBegin)
	j := strings.Index(text, scaleEnd)
	if i < 0 || j < i {
		return ""
	}
	return text[i:j+len(scaleEnd)] + "\n"
}

// keptScaleDate says which run wrote a kept scale section.
func keptScaleDate(kept string) string {
	_, rest, ok := strings.Cut(kept, "Measured on ")
	if !ok {
		return "an earlier run"
	}
	date, _, _ := strings.Cut(rest, " by ")
	return "the run of " + date
}

// scaleSection is the scale runs' section, or "" if none ran.
func (r *report) scaleSection() string {
	if len(r.scale) == 0 {
		return ""
	}
	judge := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**MISSED**"
	}
	var b strings.Builder
	b.WriteString(scaleBegin + "\n## The queue at scale (issue 15)\n\n")
	var stores []string
	for _, s := range r.scale {
		stores = append(stores, fmt.Sprintf("%s: %s; %s, load average (1, 5, 15 min) before it %s", s.label(), s.storeDesc, s.wall.Round(time.Second), s.loadBefore))
	}
	fmt.Fprintf(&b, "Measured on %s by `%s`. %s.\n\n", r.started.UTC().Format("2006-01-02 15:04 MST"), r.command, strings.Join(stores, ". "))
	fmt.Fprintf(&b, "Each storage gets a Caddy of its own (the plugin and the storage modules of `storagetest/caddy`), "+
		"a backend of its own (the harness's, counting each event it receives by `X-Kayle-Event-Id`), and sites that share the storage under their own `dedupe_prefix`: "+
		"`%s`, the queue filled; `%sN`, a queue for round N of the latency comparison, empty when the round begins; `%s`, no queue (dedupe on). "+
		"The queues have the defaults (`max_backoff 1m`, `horizon 7d`) and `concurrency %d`; RSA-2048, 600 B payloads. In order:\n\n",
		deepPrefix, emptyPrefix, syncPrefix, r.opts.conc)
	fmt.Fprintf(&b, "1. **Sync before**: the sync site, closed loop at c=%d for %s.\n", r.opts.conc, scaleSyncTime(r.opts))
	b.WriteString("2. **Fill**: every queue paused first (`caddy kayle queue --config … --prefix … pause`, before Caddy starts), then the deliveries sent to the deep queue, closed loop at the same c, each signed when its batch of 5 000 is made; each must be answered 202. Nothing is forwarded.\n")
	fmt.Fprintf(&b, "3. **Answer latency**: %d rounds; in each, %.0f new deliveries a second for %s, open loop (timed from when each was due), to the deep queue and to that round's empty one, in alternating order. Both paused, so a delivery takes the same path at both (verified, decrypted, marker and record written, 202); only the queue's depth differs, and the deep queue's minute-long walk over its markers (the metrics' count) runs beside it.\n",
		r.opts.rounds, scaleRate, scaleRunTime(r.opts))
	fmt.Fprintf(&b, "4. **Idle, backend down**: the backend stopped, the deep queue resumed: its first forwards fail (502), it backs off (doubling to `max_backoff`, one probe at a time), and after 5 s more Caddy's CPU is read over %s from `/proc/<pid>/stat` (utime + stime, every thread; redis-server's too), a window that holds one of the queue's minute walks.\n", scaleIdleTime(r.opts))
	b.WriteString("5. **Drain**: the backend started again; the time until it has every event the deep queue holds (the fill's and the latency rounds'). The queue finds it up at its next probe, up to `max_backoff` later; the drain rate is the events over the time from that first delivery to the last.\n")
	fmt.Fprintf(&b, "6. **Sync after**: the sync site again, %s, on the storage as the drain left it. The drain is judged against the higher of the two sync runs. The sync loop's client and the gateway share the 2 CPUs; the drain's only client is the queue.\n", scaleSyncTime(r.opts))
	b.WriteString("7. **Once**: the empty queues resumed, and every event answered 202 (or 2xx by the sync site) counted at the backend: each exactly once.\n\n")
	b.WriteString("| comparison | value | min–max | target | |\n|---|---|---|---|---|\n")
	b.WriteString(r.scaleLines(judge))
	for _, s := range r.scale {
		fmt.Fprintf(&b, "\n### %s\n\n", s.label())
		fmt.Fprintf(&b, "- **Fill**: %s deliveries in %s, %.0f/s (first batch %.0f/s, last %.0f/s); not answered 202: %d.\n",
			thousands(s.events), s.fill.Round(time.Second), float64(s.events)/s.fill.Seconds(), first(s.fillRates), last(s.fillRates), s.fillBad)
		b.WriteString("- **Answer latency** (202 answers, from when each was due):\n\n")
		b.WriteString("| round | deep: queued at start | deep p50 | deep p99 | deep max | empty p50 | empty p99 | empty max | p99 deep / empty | not 202 or failed |\n|---|---|---|---|---|---|---|---|---|---|\n")
		for i := range min(len(s.deep), len(s.empty)) {
			d, e := s.deep[i], s.empty[i]
			ratio := 0.0
			if p := e.percentile(0.99); p > 0 {
				ratio = float64(d.percentile(0.99)) / float64(p)
			}
			depth := 0
			if i < len(s.depth) {
				depth = s.depth[i]
			}
			fmt.Fprintf(&b, "| %d | %s | %s | %s | %s | %s | %s | %s | %.2f | %d |\n", i+1, thousands(depth),
				rnd(d.percentile(0.5)), rnd(d.percentile(0.99)), rnd(d.percentile(1)), rnd(e.percentile(0.5)), rnd(e.percentile(0.99)), rnd(e.percentile(1)),
				ratio, d.non2xx+d.errors+e.non2xx+e.errors)
		}
		redis := ""
		if s.redisCPU >= 0 {
			redis = fmt.Sprintf("; redis-server %.2f %%", 100*s.redisCPU)
		}
		depth := "not yet counted"
		if s.gaugeDepth >= 0 {
			depth = thousands(int(s.gaugeDepth))
		}
		fmt.Fprintf(&b, "\n- **Idle, backend down**, %s queued: Caddy %.2f %% of a core over %s%s. Forwards the queue tried in the window (its probes, each failing): %d; its `queue_depth` gauge (counted every minute) read %s; Caddy's VmRSS %s.\n",
			thousands(s.idleDepth), 100*s.idleCPU, s.idleWindow, redis, s.idleTries, depth, mib(s.idleRSS))
		fmt.Fprintf(&b, "- **Drain**: %s events; the first reached the backend %s after it came up (the backoff's probe), the last %s after the first: **%.0f events/s** (%.0f/s counting from the backend's start, %s in all). Every one arrived: %s.\n",
			thousands(s.drained), s.probeWait.Round(time.Millisecond), s.drainSpan.Round(time.Millisecond), s.drainRate(),
			float64(s.drained)/max(s.drainTotal.Seconds(), 1e-9), s.drainTotal.Round(time.Second), yesNo(s.drainAll))
		fmt.Fprintf(&b, "- **Sync mode**, closed loop c=%d: before the fill %.0f/s (p99 %s), after the drain %.0f/s (p99 %s); non-2xx or failed: %d. Drain / sync: %.2f (before), %.2f (after).\n",
			s.conc, s.syncBefore.rate(), rnd(s.syncBefore.percentile(0.99)), s.syncAfter.rate(), rnd(s.syncAfter.percentile(0.99)),
			s.syncBefore.non2xx+s.syncBefore.errors+s.syncAfter.non2xx+s.syncAfter.errors,
			s.drainRate()/max(s.syncBefore.rate(), 1e-9), s.drainRate()/max(s.syncAfter.rate(), 1e-9))
		fmt.Fprintf(&b, "- **Once**: %s events answered 2xx (%s of them 202; at a queue but not 202: %d); received exactly once %s, never %d, twice or more %d, received though not answered 2xx %d.\n",
			thousands(s.once.answered), thousands(s.once.queued), s.not202, thousands(s.once.once), s.once.missing, s.once.dupes, s.once.extra)
	}
	b.WriteString(scaleEnd + "\n")
	return b.String()
}

// queueSection is the queue-mode rows' section (issue 15), round by round,
// or "" if none ran.
func (r *report) queueSection() string {
	closed := []string{queueTmpfs2048, tmpfs2048, queueDisk2048, disk2048}
	open := []string{e2eQueueTmpfs, e2eSyncTmpfs, e2eQueueDisk, e2eSyncDisk}
	ran := func(names []string) []string {
		return slices.DeleteFunc(slices.Clone(names), func(n string) bool { return len(r.results[n]) == 0 })
	}
	closed, open = ran(closed), ran(open)
	if !slices.Contains(closed, queueTmpfs2048) && !slices.Contains(closed, queueDisk2048) && len(open) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("\n## Queue mode against sync mode (issue 15)\n\n")
	fmt.Fprintf(&b, "The queue rows' sites are in the gateway of the dedupe rows, each with a `file_system` folder of its own on the same medium (tmpfs, disk), "+
		"a `queue` with `concurrency %d` forwarding to the same backend; the sync rows are the dedupe rows above. The backend notes each event it receives (by `X-Kayle-Event-Id`) and when. "+
		"**Answers/s** counts the gateway's answers (202 in queue mode) over the row's run; **delivered/s** counts the same events over the time from the run's start to the backend's receipt of the last of them, "+
		"so forwards still running after the last answer are charged: that is the throughput judged above, in both modes. "+
		"**e2e** is the time from a delivery's send (in the open loop, from when it was due) to the backend's receipt of its event; in sync mode it is the answer's time less the way back. "+
		"**once**: events answered 2xx that the backend received exactly once, of all answered 2xx (warm-up included). "+
		"**reopened** (queue rows): events not tried at once with the plaintext in hand, because no forward slot was free when they were answered, so that the queue read them back from the storage and decrypted them a second time (the gateway's count of decrypts less its count of 202s over the row, from its /metrics). "+
		"A queue row waits, before the next row, until the backend has all its events (at most %s).\n\n", r.opts.conc, queueSettle)
	cell := func(name string, i int, answerP99 bool) string {
		res := r.results[name][i]
		d := r.delivery(name, i)
		out := fmt.Sprintf("%.0f answers/s, %.0f delivered/s; ", res.rate(), d.deliveredRate())
		if answerP99 {
			out = fmt.Sprintf("%.0f/s; answer p99 %s; ", res.rate(), rnd(res.percentile(0.99)))
		}
		out += fmt.Sprintf("e2e p50 %s, p99 %s; once %d/%d", rnd(percentileOf(d.e2e, 0.5)), rnd(percentileOf(d.e2e, 0.99)), d.once, d.answered)
		if n, ok := r.reopened[groupKey{name, i}]; ok {
			out += fmt.Sprintf("; reopened %d", n)
		}
		if d.dupes+d.extra > 0 {
			out += fmt.Sprintf(", %d twice, %d unanswered", d.dupes, d.extra)
		}
		return out
	}
	table := func(names []string, answerP99 bool) {
		b.WriteString("| row |")
		for i := range r.opts.rounds {
			fmt.Fprintf(&b, " round %d |", i+1)
		}
		b.WriteString("\n|---|" + strings.Repeat("---|", r.opts.rounds) + "\n")
		for _, name := range names {
			fmt.Fprintf(&b, "| %s |", name)
			for i := range len(r.results[name]) {
				fmt.Fprintf(&b, " %s |", cell(name, i, answerP99))
			}
			b.WriteString("\n")
		}
	}
	if len(closed) > 0 {
		fmt.Fprintf(&b, "Closed loop, c=%d (the throughput rows):\n\n", r.opts.conc)
		table(closed, false)
	}
	if len(open) > 0 {
		b.WriteString("\nOpen loop at half the round's sync-mode throughput on the same medium (the latency rows): requests/s, the answer's p99 (202 in queue mode), and e2e:\n\n")
		table(open, true)
	}
	return b.String()
}

// depthRange says how deep the queue was over the latency rounds.
func depthRange(depth []int) string {
	if len(depth) == 0 {
		return "?"
	}
	lo, hi := slices.Min(depth), slices.Max(depth)
	if lo == hi {
		return thousands(lo)
	}
	return thousands(lo) + " to " + thousands(hi)
}

func rnd(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }

func first(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	return xs[0]
}

func last(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	return xs[len(xs)-1]
}

func yesNo(ok bool) string {
	if ok {
		return "yes"
	}
	return "**no**"
}

// thousands writes n with a space between groups of three digits.
func thousands(n int) string {
	s := strconv.Itoa(n)
	if n < 0 {
		return "-" + thousands(-n)
	}
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + " " + s[i:]
	}
	return s
}
