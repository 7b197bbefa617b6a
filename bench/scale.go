package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
)

// The queue at scale (issue 15, point 9): one storage's run, in a Caddy of
// its own (built with the Redis storage module) whose sites all share that
// storage, each under its own dedupe_prefix:
//
//	deep     the queue that gets -queue-events deliveries while paused
//	empty-N  a queue for round N of the answer-latency comparison, empty
//	         when its round begins
//	sync     no queue (dedupe on): the throughput the drain is set against
//
// and a backend of its own, which the run stops and starts again.
type scaleStorage struct {
	name string // "disk" or "redis"
}

var scaleStorages = []scaleStorage{{"disk"}, {"redis"}}

func scaleRowName(st scaleStorage) string { return "queue scale " + st.name }

// Scale settings: the answer-latency comparison's open-loop rate.
const scaleRate = 50.0

// scaleFillChunk is how many deliveries are made (and signed) at a time
// while the queue fills: their signatures must be fresh when they arrive.
const scaleFillChunk = 5000

const (
	deepPrefix  = "bench/deep"
	syncPrefix  = "bench/sync"
	emptyPrefix = "bench/empty-"
)

// scaleResult is one storage's scale run.
type scaleResult struct {
	storage   string
	storeDesc string // what the storage was
	events    int    // deliveries sent to fill the deep queue
	fill      time.Duration
	fillRates []float64 // 202s a second, chunk by chunk
	fillBad   int       // fill deliveries not answered 202

	depth      []int // the deep queue's depth when each latency round began
	deep       []result
	empty      []result
	idleWindow time.Duration
	idleCPU    float64 // Caddy, fraction of one core
	redisCPU   float64 // redis-server, fraction of one core (-1: none)
	idleTries  int     // forwards the deep queue tried in the window (all failing)
	gaugeDepth float64 // queue_depth as the gateway last counted it (-1: unread)
	idleRSS    int64   // Caddy's VmRSS at the window's end
	idleDepth  int     // events the deep queue held

	drained    int           // deep events delivered in the drain
	probeWait  time.Duration // backend up → first delivery
	drainSpan  time.Duration // first → last delivery
	drainTotal time.Duration // backend up → last delivery
	drainAll   bool          // every deep event arrived within the limit

	syncBefore, syncAfter result // the sync site, closed loop
	conc                  int

	once       deliveryStats // every event of this storage's run
	not202     int           // queue deliveries answered 2xx but not 202
	emptyAll   bool          // the empty queues' events all arrived once resumed
	wall       time.Duration
	loadBefore string // /proc/loadavg when it began
}

// drainRate is the drain's events a second once the queue found the
// backend up: the first delivery (the backoff's probe) to the last.
func (r scaleResult) drainRate() float64 {
	if r.drainSpan <= 0 {
		return 0
	}
	return float64(r.drained) / r.drainSpan.Seconds()
}

// scaleGroup names one part of a storage's scale run in the ledger.
func scaleGroup(st scaleStorage, part string, round int) groupKey {
	return groupKey{scaleRowName(st) + ": " + part, round}
}

// scaleRun is the running setup of one storage's scale run.
type scaleRun struct {
	s           *setup
	st          scaleStorage
	dir         string
	config      string // the Caddyfile's path
	caddy       *proc
	redis       *proc
	admin       int
	backendAddr string
	backend     *proc
	deep, sync  string   // site URLs
	empty       []string // by round
}

func (s *setup) runScale(o options, st scaleStorage) (res scaleResult, err error) {
	t0 := time.Now()
	res = scaleResult{storage: st.name, conc: o.conc, redisCPU: -1, gaugeDepth: -1, loadBefore: loadAverage()}
	r := &scaleRun{s: s, st: st, dir: filepath.Join(s.work, "scale-"+st.name)}
	defer r.close()
	if err := r.start(o, &res); err != nil {
		return res, err
	}
	logf("%s: %s; pausing the queues", scaleRowName(st), res.storeDesc)

	// the sync site first, on the storage as it is before the fill
	if res.syncBefore, err = r.syncRun(o, "sync before"); err != nil {
		return res, err
	}
	if err := r.fill(o, &res); err != nil {
		return res, err
	}
	if err := r.latencyRounds(o, &res); err != nil {
		return res, err
	}
	if err := r.idle(o, &res); err != nil {
		return res, err
	}
	if err := r.drain(o, &res); err != nil {
		return res, err
	}
	if res.syncAfter, err = r.syncRun(o, "sync after"); err != nil {
		return res, err
	}
	// the empty queues' events, forwarded at last, so every event of the
	// run is counted at the backend
	var keys []groupKey
	for round := range o.rounds {
		if err := r.queueCommand(emptyPrefix+strconv.Itoa(round+1), "resume"); err != nil {
			return res, err
		}
		keys = append(keys, scaleGroup(st, "empty", round))
	}
	if res.emptyAll, err = s.ledger.await(r.backendAddr, time.Now().Add(queueSettle+time.Minute), keys...); err != nil {
		return res, err
	}
	time.Sleep(time.Second) // a late copy would still show
	if err := s.ledger.take(r.backendAddr); err != nil {
		return res, err
	}
	res.once = s.ledger.stats(r.allGroups(o)...)
	queued := slices.DeleteFunc(r.allGroups(o), func(k groupKey) bool {
		return strings.HasSuffix(k.name, ": sync before") || strings.HasSuffix(k.name, ": sync after")
	})
	q := s.ledger.stats(queued...)
	res.not202 = q.answered - q.queued
	res.wall = time.Since(t0)
	logf("%s: every event answered 202 reached the backend once: %v (%d of %d once, %d missing, %d twice or more, %d not answered 2xx); %s",
		scaleRowName(st), res.once.exactlyOnce(), res.once.once, res.once.answered, res.once.missing, res.once.dupes, res.once.extra, res.wall.Round(time.Second))
	return res, nil
}

// allGroups is every ledger group of the run.
func (r *scaleRun) allGroups(o options) []groupKey {
	keys := []groupKey{scaleGroup(r.st, "sync before", 0), scaleGroup(r.st, "sync after", 0), scaleGroup(r.st, "fill", 0)}
	for round := range o.rounds {
		keys = append(keys, scaleGroup(r.st, "deep", round), scaleGroup(r.st, "empty", round))
	}
	return keys
}

// start brings up the storage (redis-server), the backend and the Caddy,
// with every queue paused before Caddy's first poll.
func (r *scaleRun) start(o options, res *scaleResult) error {
	if err := os.MkdirAll(r.dir, 0o700); err != nil {
		return err
	}
	var storage string
	switch r.st.name {
	case "disk":
		folder := filepath.Join(r.dir, "storage")
		storage = "\t\tstorage file_system " + folder + "\n"
		res.storeDesc = "a folder on " + fsName(r.dir)
	case "redis":
		addr, p, err := startRedis(r.dir)
		if err != nil {
			return err
		}
		r.redis = p
		storage = "\t\tstorage redis {\n\t\t\taddress " + addr + "\n\t\t}\n"
		res.storeDesc = "pberkel/caddy-storage-redis on redis-server " + redisVersion() + " (appendonly yes, appendfsync everysec, its files on " + fsName(r.dir) + ")"
	default:
		return fmt.Errorf("unknown storage %s", r.st.name)
	}
	port, err := freePort()
	if err != nil {
		return err
	}
	r.backendAddr = "127.0.0.1:" + strconv.Itoa(port)
	if err := r.backendUp(); err != nil {
		return err
	}

	if r.admin, err = freePort(); err != nil {
		return err
	}
	kw := kayleOptions([]keyPair{r.s.k2048}, filepath.Join(r.s.work, "secret.txt"))
	site := func(prefix string) (string, string, error) {
		port, err := freePort()
		if err != nil {
			return "", "", err
		}
		extra := storage + "\t\tdedupe_prefix " + prefix + "\n"
		url := fmt.Sprintf("http://127.0.0.1:%d/kayle", port)
		if prefix == syncPrefix {
			return url, syncSite(port, kw, extra, r.backendAddr), nil
		}
		return url, queueSite(port, kw, extra, r.backendAddr, o.conc), nil
	}
	var cfg strings.Builder
	cfg.WriteString(globalOptions(r.admin))
	var text string
	if r.deep, text, err = site(deepPrefix); err != nil {
		return err
	}
	cfg.WriteString(text)
	for round := range o.rounds {
		url, text, err := site(emptyPrefix + strconv.Itoa(round+1))
		if err != nil {
			return err
		}
		r.empty = append(r.empty, url)
		cfg.WriteString(text)
	}
	if r.sync, text, err = site(syncPrefix); err != nil {
		return err
	}
	cfg.WriteString(text)
	name := "caddy-" + filepath.Base(r.dir)
	r.config = filepath.Join(r.s.work, name, "Caddyfile")
	if err := os.MkdirAll(filepath.Dir(r.config), 0o700); err != nil {
		return err
	}
	if err := os.WriteFile(r.config, []byte(cfg.String()), 0o600); err != nil {
		return err
	}
	// paused before Caddy starts: its first poll reads the flag
	for _, p := range r.queuePrefixes(o) {
		if err := r.queueCommand(p, "pause"); err != nil {
			return err
		}
	}
	if r.caddy, err = startCaddyAdmin(name, r.s.storageBin, r.s.work, r.admin, cfg.String()); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, p := range r.queuePrefixes(o) {
		for {
			v, ok, err := metricValue(r.admin, "caddy_kayle_webhook_queue_paused", p)
			if err != nil {
				return err
			}
			if ok && v == 1 {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("the queue %s is not paused 30 s after Caddy started", p)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return nil
}

func (r *scaleRun) queuePrefixes(o options) []string {
	out := []string{deepPrefix}
	for round := range o.rounds {
		out = append(out, emptyPrefix+strconv.Itoa(round+1))
	}
	return out
}

func (r *scaleRun) close() {
	r.caddy.stop()
	r.backend.stop()
	r.redis.stop()
	os.RemoveAll(r.dir)
}

// backendUp starts the run's backend on its address.
func (r *scaleRun) backendUp() error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	p, err := start("scale-backend", filepath.Join(r.s.work, "scale-backend-"+r.st.name+".log"), nil, self, "-serve", "backend", "-addr", r.backendAddr)
	if err != nil {
		return err
	}
	// not backendTakePath: that would take receipts the ledger has not seen
	if err := waitHTTP("http://"+r.backendAddr+"/", p, 30*time.Second); err != nil {
		p.stop()
		return err
	}
	r.backend = p
	return nil
}

// backendDown takes the receipts so far, then stops the backend: the
// queue's forwards then find nothing listening (reverse_proxy answers 502).
func (r *scaleRun) backendDown() error {
	if err := r.s.ledger.take(r.backendAddr); err != nil {
		return err
	}
	r.backend.stop()
	r.backend = nil
	return nil
}

// queueCommand runs `caddy kayle queue --config … --prefix <p> <action>`,
// as an operator would.
func (r *scaleRun) queueCommand(prefix, action string) error {
	dir := filepath.Dir(r.config)
	cmd := exec.Command(r.s.storageBin, "kayle", "queue", "--config", r.config, "--adapter", "caddyfile", "--prefix", prefix, action)
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("caddy kayle queue --prefix %s %s: %v\n%s", prefix, action, err, out)
	}
	return nil
}

// syncRun is the sync site's closed loop at the queue's concurrency.
func (r *scaleRun) syncRun(o options, part string) (result, error) {
	dur := scaleSyncTime(o)
	ds, err := genuine(r.s.k2048, 600, int(1500*dur.Seconds())+2*o.conc)
	if err != nil {
		return result{}, err
	}
	res := closedLoop(r.sync, ds, 2*o.conc, o.conc, dur, is2xx)
	if err := r.s.fileAt(r.backendAddr, scaleGroup(r.st, part, 0).name, 0, &res, false); err != nil {
		return res, err
	}
	logf("%s: %s: %8.1f/s at c=%d, p99 %s, non-2xx %d errors %d", scaleRowName(r.st), part, res.rate(), o.conc,
		res.percentile(0.99).Round(10*time.Microsecond), res.non2xx, res.errors)
	return res, nil
}

func is202(status int) bool { return status == http.StatusAccepted }

// fill sends -queue-events deliveries to the paused deep queue, closed
// loop, each answered 202 and left queued.
func (r *scaleRun) fill(o options, res *scaleResult) error {
	g := scaleGroup(r.st, "fill", 0)
	t0 := time.Now()
	for sent := 0; sent < o.queueEvents; {
		n := min(scaleFillChunk, o.queueEvents-sent)
		ds, err := genuine(r.s.k2048, 600, n)
		if err != nil {
			return err
		}
		c := closedLoop(r.deep, ds, 0, o.conc, time.Hour, is202)
		r.s.ledger.register(g.name, g.round, c)
		res.fillRates = append(res.fillRates, c.rate())
		res.fillBad += c.non2xx + c.errors
		sent += n
		logf("%s: filled %d of %d (%.0f/s this chunk, %d not 202)", scaleRowName(r.st), sent, o.queueEvents, c.rate(), c.non2xx+c.errors)
	}
	res.fill = time.Since(t0)
	res.events = o.queueEvents
	return nil
}

// latencyRounds compares, round by round, a new delivery's answer at the
// deep queue and at an empty one, both paused (each delivery is stored and
// answered 202, nothing forwarded), open loop at scaleRate, in alternating
// order.
func (r *scaleRun) latencyRounds(o options, res *scaleResult) error {
	dur := scaleRunTime(o)
	for round := range o.rounds {
		res.depth = append(res.depth, r.s.ledger.stats(r.deepGroups(round)...).queued)
		order := []string{"deep", "empty"}
		if round%2 == 1 {
			order = []string{"empty", "deep"}
		}
		for _, part := range order {
			url := r.deep
			if part == "empty" {
				url = r.empty[round]
			}
			ds, err := genuine(r.s.k2048, 600, int(scaleRate*dur.Seconds())+16)
			if err != nil {
				return err
			}
			done := make(chan error, 1)
			profiled := o.pprofDir != "" && round == 0 && part == "deep"
			if profiled {
				file := filepath.Join(o.pprofDir, profileName(scaleRowName(r.st))+"-deep-latency.cpu.pprof")
				go func() {
					done <- savePprof(r.admin, "profile?seconds="+strconv.Itoa(max(1, int(dur.Seconds())-1)), file)
				}()
			}
			c := openLoop(url, ds, scaleRate, dur)
			if profiled {
				if err := <-done; err != nil {
					logf("cpu profile: %v", err)
				}
			}
			g := scaleGroup(r.st, part, round)
			r.s.ledger.register(g.name, g.round, c)
			c.sent = nil
			if part == "deep" {
				res.deep = append(res.deep, c)
			} else {
				res.empty = append(res.empty, c)
			}
			logf("%s: round %d %-5s %6.1f/s  p50 %-8s p99 %-8s max %-8s non-2xx %d errors %d", scaleRowName(r.st), round+1, part, c.rate(),
				c.percentile(0.5).Round(10*time.Microsecond), c.percentile(0.99).Round(10*time.Microsecond), c.percentile(1).Round(10*time.Microsecond), c.non2xx, c.errors)
		}
	}
	return nil
}

// deepGroups are the ledger groups of the deep queue's events: the fill
// and the latency rounds before round.
func (r *scaleRun) deepGroups(round int) []groupKey {
	keys := []groupKey{scaleGroup(r.st, "fill", 0)}
	for i := range round {
		keys = append(keys, scaleGroup(r.st, "deep", i))
	}
	return keys
}

// idle stops the backend and resumes the deep queue: its first forwards
// fail, it backs off (one probe at a time, up to max_backoff apart), and
// Caddy's CPU is read over the window.
func (r *scaleRun) idle(o options, res *scaleResult) error {
	if err := r.backendDown(); err != nil {
		return err
	}
	if err := r.queueCommand(deepPrefix, "resume"); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		v, ok, err := metricValue(r.admin, "caddy_kayle_webhook_queue_backoff_seconds", deepPrefix)
		if err != nil {
			return err
		}
		if ok && v > 0 {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("the deep queue did not back off within 30 s of resuming with its backend down")
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(5 * time.Second) // the first failed forwards rescheduled
	res.idleWindow = scaleIdleTime(o)
	tries0, err := metricSum(r.admin, "caddy_kayle_webhook_queue_forwards_total", `queue="`+deepPrefix+`"`)
	if err != nil {
		return err
	}
	caddy0, err := cpuTicks(r.caddy)
	if err != nil {
		return err
	}
	var redis0 int64
	if r.redis != nil {
		if redis0, err = cpuTicks(r.redis); err != nil {
			return err
		}
	}
	t0 := time.Now()
	time.Sleep(res.idleWindow)
	caddy1, err := cpuTicks(r.caddy)
	if err != nil {
		return err
	}
	elapsed := time.Since(t0)
	res.idleCPU = ticksToSeconds(caddy1-caddy0) / elapsed.Seconds()
	if r.redis != nil {
		redis1, err := cpuTicks(r.redis)
		if err != nil {
			return err
		}
		res.redisCPU = ticksToSeconds(redis1-redis0) / elapsed.Seconds()
	}
	tries1, err := metricSum(r.admin, "caddy_kayle_webhook_queue_forwards_total", `queue="`+deepPrefix+`"`)
	if err != nil {
		return err
	}
	res.idleTries = int(tries1 - tries0)
	if v, ok, err := metricValue(r.admin, "caddy_kayle_webhook_queue_depth", deepPrefix); err == nil && ok {
		res.gaugeDepth = v
	}
	res.idleRSS, _ = r.caddy.memory("VmRSS")
	res.idleDepth = r.s.ledger.stats(r.deepGroups(o.rounds)...).queued
	logf("%s: idle with the backend down, %d queued: Caddy %.2f %% of a core over %s (redis-server, if any: %.2f %%), %d forwards tried, queue_depth %.0f",
		scaleRowName(r.st), res.idleDepth, 100*res.idleCPU, elapsed.Round(time.Second), 100*max(res.redisCPU, 0), res.idleTries, res.gaugeDepth)
	if o.pprofDir != "" {
		file := filepath.Join(o.pprofDir, profileName(scaleRowName(r.st))+"-idle.cpu.pprof")
		if err := savePprof(r.admin, "profile?seconds="+strconv.Itoa(int(res.idleWindow.Seconds())), file); err != nil {
			logf("cpu profile: %v", err)
		}
	}
	return nil
}

// drain brings the backend back and times the deep queue's delivery of
// every event it holds.
func (r *scaleRun) drain(o options, res *scaleResult) error {
	keys := r.deepGroups(o.rounds)
	n := r.s.ledger.stats(keys...).queued
	if err := r.backendUp(); err != nil {
		return err
	}
	up := time.Now()
	// the backoff's probe comes within max_backoff (1m); then no slower
	// than 20 events a second, or the drain is reported unfinished
	deadline := up.Add(2*time.Minute + time.Duration(n/20)*time.Second)
	profiling := false
	done := make(chan error, 1)
	for {
		if err := r.s.ledger.take(r.backendAddr); err != nil {
			return err
		}
		left := r.s.ledger.pending(keys...)
		if o.pprofDir != "" && !profiling && left < n {
			profiling = true
			file := filepath.Join(o.pprofDir, profileName(scaleRowName(r.st))+"-drain.cpu.pprof")
			go func() { done <- savePprof(r.admin, "profile?seconds=20", file) }()
		}
		if left == 0 || time.Now().After(deadline) {
			res.drainAll = left == 0
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if profiling {
		if err := <-done; err != nil {
			logf("cpu profile: %v", err)
		}
	}
	d := r.s.ledger.stats(keys...)
	res.drained = d.once
	if !d.first.IsZero() {
		res.probeWait = d.first.Sub(up)
		res.drainSpan = d.last.Sub(d.first)
		res.drainTotal = d.last.Sub(up)
	}
	logf("%s: drained %d of %d: the first %s after the backend came up, then %.1f/s over %s (all: %v)",
		scaleRowName(r.st), res.drained, n, res.probeWait.Round(time.Millisecond), res.drainRate(), res.drainSpan.Round(time.Millisecond), res.drainAll)
	return nil
}

// Durations of the scale parts; -quick shortens them to a smoke test.
func scaleRunTime(o options) time.Duration  { return pick(o.quick, 5*time.Second, 20*time.Second) }
func scaleIdleTime(o options) time.Duration { return pick(o.quick, 10*time.Second, 60*time.Second) }
func scaleSyncTime(o options) time.Duration { return pick(o.quick, 3*time.Second, 20*time.Second) }

func pick(quick bool, short, long time.Duration) time.Duration {
	if quick {
		return short
	}
	return long
}

// cpuTicks is a process's user and system CPU time so far, in clock ticks
// (/proc/<pid>/stat utime + stime, every thread).
func cpuTicks(p *proc) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// after the command name, which is in parentheses and may hold spaces
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0, errors.New("unreadable /proc/<pid>/stat")
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("short /proc/<pid>/stat")
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return utime + stime, nil
}

// ticksToSeconds: Linux reports CPU times in USER_HZ ticks, 100 a second
// on every architecture Go supports there.
func ticksToSeconds(t int64) float64 { return float64(t) / 100 }

// metricValue reads one series of a metric from Caddy's admin /metrics,
// the one whose queue label is queue.
func metricValue(admin int, name, queue string) (float64, bool, error) {
	vs, err := metricSeries(admin, name, `queue="`+queue+`"`)
	if err != nil || len(vs) == 0 {
		return 0, false, err
	}
	return vs[0], true, nil
}

// metricSum adds up the series of a metric that have label (name="value").
func metricSum(admin int, name, label string) (float64, error) {
	vs, err := metricSeries(admin, name, label)
	sum := 0.0
	for _, v := range vs {
		sum += v
	}
	return sum, err
}

func metricSeries(admin int, name, label string) ([]float64, error) {
	res, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", admin))
	if err != nil {
		return nil, err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("admin /metrics: %s", res.Status)
	}
	var out []float64
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, name+"{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok || !strings.Contains(","+labels+",", ","+label+",") {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(value), 64)
		if err == nil {
			out = append(out, v)
		}
	}
	return out, sc.Err()
}

// startRedis runs redis-server on a free loopback port with its data in
// dir, persisted as an operator running it for Caddy's storage would set
// it up (an append-only file, no eviction), and waits for its PING.
func startRedis(dir string) (string, *proc, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		bin = "/usr/bin/redis-server"
	}
	port, err := freePort()
	if err != nil {
		return "", nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	data := filepath.Join(dir, "redis")
	if err := os.MkdirAll(data, 0o700); err != nil {
		return "", nil, err
	}
	p, err := start("redis-server", filepath.Join(dir, "redis.log"), nil, bin,
		"--bind", "127.0.0.1", "--port", strconv.Itoa(port), "--dir", data,
		"--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction", "--daemonize", "no")
	if err != nil {
		return "", nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		if kayletest.RedisPing(ctx, addr) == nil {
			return addr, p, nil
		}
		if ctx.Err() != nil || p.cmd.ProcessState != nil {
			p.stop()
			return "", nil, fmt.Errorf("redis-server on %s did not answer PING (log: %s)", addr, filepath.Join(dir, "redis.log"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func redisVersion() string {
	out, err := exec.Command("redis-server", "--version").Output()
	if err != nil {
		return "?"
	}
	for f := range strings.FieldsSeq(string(out)) {
		if v, ok := strings.CutPrefix(f, "v="); ok {
			return v
		}
	}
	return "?"
}
