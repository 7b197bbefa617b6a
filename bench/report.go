package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

// report gathers every measurement of a run and judges the targets.
type report struct {
	opts       options
	command    string
	started    time.Time
	nodeInfo   string
	diskFS     string
	results    map[string][]result // by row, one per round
	order      []string
	sequential map[string]time.Duration // mean latency at c=1
	fsyncDisk  time.Duration
	fsyncTmpfs time.Duration
	rss        rssResult
	floodConc  int          // connections of the flood beside genuine deliveries
	floodProbe []floodProbe // how fast the flood alone went, if probed
	ledger     *ledger      // what the backends received
	reopened   map[groupKey]int
	loadBefore string // /proc/loadavg when the rows began
	delivered  map[groupKey]deliveryStats
	scale      []scaleResult // the queue at scale, if it ran
}

// delivery is what became of a row's events in one round (from the
// ledger, once every receipt is in).
func (r *report) delivery(name string, round int) deliveryStats {
	if r.delivered == nil {
		r.delivered = map[groupKey]deliveryStats{}
	}
	k := groupKey{name, round}
	d, ok := r.delivered[k]
	if !ok && r.ledger != nil {
		d = r.ledger.stats(k)
		r.delivered[k] = d
	}
	return d
}

// floodProbe is one connection count's rate in fastestFlood.
type floodProbe struct {
	conns int
	rate  float64
}

func (r *report) add(name string, res result) {
	if r.results == nil {
		r.results = map[string][]result{}
		r.sequential = map[string]time.Duration{}
	}
	if _, seen := r.results[name]; !seen {
		r.order = append(r.order, name)
	}
	r.results[name] = append(r.results[name], res)
}

// target is a ratio of two rows, judged on its median over the rounds.
type target struct {
	what     string
	num, den string
	min, max float64 // one of them set
	latency  bool    // p99 ratio instead of throughput ratio
	// delivered: events that reached the backend a second (the ledger's
	// deliveredRate) instead of answers; e2e: the p99 of send → receipt
	delivered, e2e bool
}

var targets = []target{
	{what: "dedupe off, RSA-4096 / floor", num: off4096, den: floor4096, min: 0.95},
	{what: "dedupe off, RSA-2048 / floor", num: off2048, den: floor2048, min: 0.85},
	{what: "dedupe on tmpfs, RSA-4096 / floor", num: tmpfs4096, den: floor4096, min: 0.92},
	{what: "dedupe on tmpfs, RSA-2048 / floor", num: tmpfs2048, den: floor2048, min: 0.75},
	{what: "dedupe on disk, RSA-4096 / floor (reported)", num: disk4096, den: floor4096},
	{what: "dedupe on disk, RSA-2048 / floor (reported)", num: disk2048, den: floor2048},
	{what: "BoringCrypto build, tmpfs, RSA-4096 / pure-Go floor", num: boring4096, den: floor4096, min: 1.30},
	{what: "200 KB, gateway (tmpfs) / Node.js jose receiver", num: gatewayLarge, den: nodeLarge, min: 1.0001},
	{what: "200 KB, gateway (tmpfs) / floor (reported)", num: gatewayLarge, den: floorLarge},
	{what: "p99 at half the floor's rate, gateway (tmpfs) / floor", num: p99Tmpfs, den: p99Floor, max: 2.0, latency: true},
	{what: "p99 at half the floor's rate, gateway (dedupe off) / floor (reported: the proxy's share)", num: p99Off, den: p99Floor, latency: true},
	{what: "forged flood, kayle_webhook 400s / respond 400", num: forgedGateway, den: forgedRespond, min: 0.80},
	{what: "queue mode, tmpfs: events delivered/s / sync mode (dedupe tmpfs), closed loop", num: queueTmpfs2048, den: tmpfs2048, min: 0.80, delivered: true},
	{what: "queue mode, disk: events delivered/s / sync mode (dedupe disk), closed loop", num: queueDisk2048, den: disk2048, min: 0.80, delivered: true},
	{what: "queue mode, tmpfs: 202 answers/s / sync mode's answers/s (reported)", num: queueTmpfs2048, den: tmpfs2048},
	{what: "queue mode, disk: 202 answers/s / sync mode's answers/s (reported)", num: queueDisk2048, den: disk2048},
	{what: "queue mode, tmpfs: end-to-end p99 (send → backend) at half the sync rate / sync mode's (reported)", num: e2eQueueTmpfs, den: e2eSyncTmpfs, e2e: true},
	{what: "queue mode, disk: end-to-end p99 (send → backend) at half the sync rate / sync mode's (reported)", num: e2eQueueDisk, den: e2eSyncDisk, e2e: true},
	{what: "queue mode, tmpfs: answer (202) p99 at half the sync rate / sync mode's answer p99 (reported)", num: e2eQueueTmpfs, den: e2eSyncTmpfs, latency: true},
	{what: "queue mode, disk: answer (202) p99 at half the sync rate / sync mode's answer p99 (reported)", num: e2eQueueDisk, den: e2eSyncDisk, latency: true},
}

func (r *report) ratios(t target) []float64 {
	nums, dens := r.results[t.num], r.results[t.den]
	var out []float64
	for i := range min(len(nums), len(dens)) {
		n, d := nums[i].rate(), dens[i].rate()
		switch {
		case t.latency:
			n, d = float64(nums[i].percentile(0.99)), float64(dens[i].percentile(0.99))
		case t.delivered:
			n, d = r.delivery(t.num, i).deliveredRate(), r.delivery(t.den, i).deliveredRate()
		case t.e2e:
			n, d = float64(percentileOf(r.delivery(t.num, i).e2e, 0.99)), float64(percentileOf(r.delivery(t.den, i).e2e, 0.99))
		}
		if d > 0 {
			out = append(out, n/d)
		}
	}
	return out
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// handWrittenMarker starts the part of BENCHMARKS.md that write keeps.
const handWrittenMarker = "<!-- Below: written by hand, kept by go run ./bench. -->"

// write renders BENCHMARKS.md and returns how many targets were missed.
func (r *report) write(file string) (int, error) {
	var b strings.Builder
	missed := 0
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		missed++
		return "**MISSED**"
	}
	fmt.Fprintf(&b, "# Benchmarks\n\nWritten by `%s` on %s (%s).\n\n", r.command, r.started.UTC().Format("2006-01-02 15:04 MST"), time.Since(r.started).Round(time.Second))
	fmt.Fprintf(&b, "Machine: %d CPUs (`nproc`), %s, %s, %s; dedupe \"disk\" folder on %s, \"tmpfs\" in /dev/shm. %s.\n",
		runtime.NumCPU(), cpuModel(), runtime.GOOS+"/"+runtime.GOARCH, goVersion(), r.diskFS, r.nodeInfo)
	if r.loadBefore != "" {
		fmt.Fprintf(&b, "Load average (1, 5, 15 min) when the rows began: %s; when the report was written: %s.\n", r.loadBefore, loadAverage())
	}
	fmt.Fprintf(&b, "Load: loopback, the load generator on the same CPUs, c=%d, unique genuine deliveries (600 B payload unless said), "+
		"%d interleaved rounds of at most %s and %d requests (%d for 200 KB) per row. "+
		"A ratio is taken within each round; the verdict is on the median, min–max beside it.\n\n",
		r.opts.conc, r.opts.rounds, r.opts.duration, r.opts.maxSmall, r.opts.maxLarge)
	if r.opts.quick {
		b.WriteString("**Quick mode: a smoke test, too short to judge the targets by.**\n\n")
	}

	b.WriteString("| comparison | median | min–max | target | |\n|---|---|---|---|---|\n")
	for _, t := range targets {
		rs := r.ratios(t)
		lo, hi := 0.0, 0.0
		if len(rs) > 0 {
			lo, hi = slices.Min(rs), slices.Max(rs)
		}
		m := median(rs)
		goal, v := "", ""
		switch {
		case t.min > 0:
			goal, v = fmt.Sprintf("≥ %.2f", t.min), verdict(m >= t.min)
		case t.max > 0:
			goal, v = fmt.Sprintf("≤ %.2f", t.max), verdict(m > 0 && m <= t.max)
		}
		fmt.Fprintf(&b, "| %s | %.2f | %.2f–%.2f | %s | %s |\n", t.what, m, lo, hi, goal, v)
	}
	b.WriteString(r.floodLine(verdict))
	hwm := slices.Max(append([]int64{0}, r.rss.hwm...))
	fmt.Fprintf(&b, "| peak RSS (VmHWM), 64 concurrent 1 MiB deliveries, highest of %d waves | %s | | < 256 MiB | %s |\n", len(r.rss.hwm), mib(hwm), verdict(hwm > 0 && hwm < 256<<20 && r.rss.non2xx == 0))
	// Growth is what a wave leaves behind: the Go heap after a forced GC.
	// Each wave's peak RSS (reset before it) swings by a third with when
	// the collector happened to run mid-wave, so it is reported, not judged.
	left := slices.Max(append([]int64{r.rss.settled}, r.rss.live...))
	fmt.Fprintf(&b, "| growth over %d waves: Go heap after each wave and 2 s after the last (forced GC), highest, vs before | %s vs %s | | ≤ +16 MiB | %s |\n", len(r.rss.live), mib(left), mib(r.rss.liveBase), verdict(len(r.rss.live) > 1 && r.rss.settled > 0 && left <= r.rss.liveBase+16<<20))
	var bad []string
	for _, name := range r.order {
		for _, res := range r.results[name] {
			if res.non2xx+res.errors > 0 && !strings.HasPrefix(name, "forged") {
				bad = append(bad, name)
				break
			}
		}
	}
	fmt.Fprintf(&b, "| non-2xx or failed genuine deliveries | %s | | none | %s |\n", strings.Join(orNone(bad), ", "), verdict(len(bad) == 0 && r.rss.non2xx == 0))
	b.WriteString(r.onceLine(verdict))
	scaleBlock := r.scaleSection()
	if scaleBlock != "" {
		b.WriteString(r.scaleLines(verdict))
	} else if kept := keptScale(file); kept != "" {
		fmt.Fprintf(&b, "| the queue at scale (issue 15): not run this time (`-queue-scale`); its section below is kept from %s | | | | |\n", keptScaleDate(kept))
		scaleBlock = kept
	}

	b.WriteString("\n## Throughput per round (requests/s; p99)\n\n| row |")
	for i := range r.opts.rounds {
		fmt.Fprintf(&b, " round %d |", i+1)
	}
	b.WriteString("\n|---|" + strings.Repeat("---|", r.opts.rounds) + "\n")
	for _, name := range r.order {
		fmt.Fprintf(&b, "| %s |", name)
		for _, res := range r.results[name] {
			extra := ""
			if res.non2xx+res.errors > 0 {
				extra = fmt.Sprintf(", %d non-2xx, %d errors", res.non2xx, res.errors)
			}
			fmt.Fprintf(&b, " %.0f; %s%s |", res.rate(), res.percentile(0.99).Round(10*time.Microsecond), extra)
		}
		b.WriteString("\n")
	}

	b.WriteString(r.floodSection())
	b.WriteString(r.queueSection())

	off, tmpfs, disk := r.sequential[off2048], r.sequential[tmpfs2048], r.sequential[disk2048]
	b.WriteString("\n## Storage cost per new event\n\n")
	fmt.Fprintf(&b, "One delivery at a time (c=1, RSA-2048), mean latency: dedupe off %s, tmpfs %s, disk %s. "+
		"Storage per new event: **%s on disk** (%.1f× one write+fsync of a small file on the same disk, %s), "+
		"%s on tmpfs (fsync there: %s).\n\n",
		us(off), us(tmpfs), us(disk), us(disk-off), float64(disk-off)/float64(max(r.fsyncDisk, 1)), us(r.fsyncDisk), us(tmpfs-off), us(r.fsyncTmpfs))
	fmt.Fprintf(&b, "The fsync figure is the unit: a storage write that must survive a crash costs at least one. "+
		"Storage per new event over it says how many such round trips the dedupe path pays.\n\n")

	b.WriteString("## Memory, 64 concurrent 1 MiB deliveries per wave (fresh Caddy, dedupe tmpfs)\n\n")
	fmt.Fprintf(&b, "Peak RSS is VmHWM, reset before each wave (`/proc/<pid>/clear_refs`); Go heap is read after a forced GC. "+
		"(Until 2026-11-26 growth was judged by VmHWM after the last wave: never reset, that is the highest peak of all waves, so it could only grow. "+
		"Each wave's peak swings by a third with when the collector ran mid-wave; what a leak changes is the heap a wave leaves, judged above.) "+
		"Before: VmRSS %s, Go heap %s.", mib(r.rss.baseline), mib(r.rss.liveBase))
	for i := range r.rss.hwm {
		fmt.Fprintf(&b, " Wave %d: peak %s, VmRSS after %s, Go heap %s.", i+1, mib(r.rss.hwm[i]), mib(r.rss.rss[i]), mib(r.rss.live[i]))
	}
	fmt.Fprintf(&b, " 2 s later: Go heap %s.\n", mib(r.rss.settled))
	if scaleBlock != "" {
		b.WriteString("\n" + scaleBlock)
	}
	// the hand-written sections below the marker (go test -bench figures,
	// the profiles behind the code) are kept
	if old, err := os.ReadFile(file); err == nil {
		if i := bytes.Index(old, []byte(handWrittenMarker)); i >= 0 {
			b.WriteString("\n")
			b.Write(old[i:])
		}
	}
	if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
		return 0, err
	}
	logf("wrote %s", file)
	fmt.Print(b.String())
	return missed, nil
}

// floodP99 is the most a genuine delivery's p99 may reach beside the
// forged flood: Kayle waits a few seconds for an answer.
const floodP99 = 2 * time.Second

// floodLine is the target row of the genuine deliveries under the forged
// flood, or "" if they did not run: every delivery of every round answered
// 2xx, and every round's p99 under floodP99. The median and range columns
// are the rounds' p99.
func (r *report) floodLine(verdict func(bool) string) string {
	rounds, floods := r.results[underFlood], r.results[floodBeside]
	if len(rounds) == 0 {
		return ""
	}
	var p99s, rates []float64
	ok := true
	for i, res := range rounds {
		p99 := res.percentile(0.99)
		p99s = append(p99s, float64(p99))
		ok = ok && res.ok > 0 && res.non2xx+res.errors == 0 && p99 < floodP99
		if i < len(floods) {
			rates = append(rates, floods[i].rate())
		}
	}
	ms := func(f float64) string { return time.Duration(f).Round(100 * time.Microsecond).String() }
	return fmt.Sprintf("| genuine deliveries, %.0f/s open loop, beside a forged flood (c=%d, median %.0f forged/s): p99, every one 2xx (see below) | %s | %s–%s | all 2xx, p99 < %s each round | %s |\n",
		genuineUnderFlood, r.floodConc, median(rates), ms(median(p99s)), ms(slices.Min(p99s)), ms(slices.Max(p99s)), floodP99, verdict(ok))
}

// floodSection is the section of the genuine deliveries under the forged
// flood, round by round, or "" if they did not run.
func (r *report) floodSection() string {
	rounds, floods := r.results[underFlood], r.results[floodBeside]
	if len(rounds) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("\n## Genuine deliveries under a forged flood\n\n")
	fmt.Fprintf(&b, "The dedupe tmpfs site (RSA-2048, `file_system` in /dev/shm, the site of the tmpfs rows) gets a closed-loop "+
		"forged-signature flood (one body, its v1 made with another secret, keep-alive connections) from c=%d connections, ", r.floodConc)
	if len(r.floodProbe) > 0 {
		var ps []string
		for _, p := range r.floodProbe {
			ps = append(ps, fmt.Sprintf("c=%d %.0f/s", p.conns, p.rate))
		}
		fmt.Fprintf(&b, "the count at which the flood alone went fastest in a probe of each (mean of two runs of %s: %s), ", floodProbeTime(r.opts), strings.Join(ps, ", "))
	} else {
		b.WriteString("as `-flood-c` said, ")
	}
	fmt.Fprintf(&b, "from 0.5 s before the first genuine delivery until the last one's answer. Beside it, %.0f genuine deliveries a second, "+
		"each a new event, go open loop to the same site for %s: sent by the clock whatever the answers do and timed from when each was due, "+
		"so a delivery queued behind the flood is charged for the wait. "+
		"Target (issue 13): every genuine delivery answered 2xx and p99 under %s, in every round.\n\n", genuineUnderFlood, r.opts.duration, floodP99)
	b.WriteString("| round | genuine sent | 2xx | non-2xx | failed | p50 | p99 | max | flood, 400s/s | flood, not 400 or failed |\n|---|---|---|---|---|---|---|---|---|---|\n")
	for i, res := range rounds {
		var fl result
		if i < len(floods) {
			fl = floods[i]
		}
		round := func(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }
		fmt.Fprintf(&b, "| %d | %d | %d | %d | %d | %s | %s | %s | %.0f | %d |\n", i+1, res.ok+res.non2xx+res.errors, res.ok, res.non2xx, res.errors,
			round(res.percentile(0.5)), round(res.percentile(0.99)), round(res.percentile(1)), fl.rate(), fl.non2xx+fl.errors)
	}
	return b.String()
}

func us(d time.Duration) string { return fmt.Sprintf("%d µs", d.Microseconds()) }

func orNone(xs []string) []string {
	if len(xs) == 0 {
		return []string{"none"}
	}
	return xs
}

func cpuModel() string {
	data, _ := os.ReadFile("/proc/cpuinfo")
	for line := range strings.SplitSeq(string(data), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func goVersion() string {
	out, err := exec.Command("go", "env", "GOVERSION").Output()
	if err != nil {
		return runtime.Version()
	}
	return strings.TrimSpace(string(out))
}

// printRatios prints, for a -rows run, every comparison whose two rows ran.
func (r *report) printRatios() {
	for _, t := range targets {
		rs := r.ratios(t)
		if len(rs) == 0 {
			continue
		}
		logf("%-70s median %.2f (%.2f–%.2f) over %d rounds", t.what, median(rs), slices.Min(rs), slices.Max(rs), len(rs))
	}
	judge := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**MISSED**"
	}
	if line := r.floodLine(judge); line != "" {
		fmt.Print(line, r.floodSection())
	}
	fmt.Print(r.onceLine(judge), r.queueSection())
	if scale := r.scaleSection(); scale != "" {
		fmt.Print("\n", scale)
	}
}

// loadAverage is /proc/loadavg's three averages: whether others shared the
// machine.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], ", ")
}
