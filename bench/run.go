package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"
)

// row is one load against one receiver.
type row struct {
	name   string
	url    string
	key    keyPair
	size   int  // payload bytes
	forged bool // bad signatures, expecting 400
	queue  bool // a queue-mode site: answered 202, forwarded after
	caddy  *proc
	admin  int
}

// setup is everything the rows run against.
type setup struct {
	work, tmpfsDir, diskDir, diskFS string
	caddyBin, boringBin             string
	k2048, k4096                    keyPair
	nodeInfo                        string
	procs                           []*proc
	floorURL, nodeURL, backend      string
	gw, boring                      gatewayPorts
	gwProc, boringProc              *proc
	lastRate                        map[string]float64 // by row, the last round's
	conc                            int                // the closed loop's, and the queue's concurrency
	// ledger matches what the gateways answered with what the backends got
	ledger *ledger
	// the scale rows' Caddy (with the Redis storage module), if they run
	storageBin string
	// reopened: a queue row's events the queue read back from the storage
	// and decrypted again, all slots being busy at its 202
	reopened map[groupKey]int
}

func (s *setup) close(keep bool) {
	for _, p := range s.procs {
		p.stop()
	}
	os.RemoveAll(s.tmpfsDir)
	if !keep {
		os.RemoveAll(s.work)
	} else {
		logf("kept %s", s.work)
	}
}

func run(o options, command string) (missed int, err error) {
	if _, err := os.Stat("cmd/caddy/main.go"); err != nil {
		return 0, errors.New("run it from the repository root: go run ./bench")
	}
	if o.pprofDir != "" {
		if err := os.MkdirAll(o.pprofDir, 0o755); err != nil {
			return 0, err
		}
	}
	if err := checkRowSelection(o); err != nil {
		return 0, err
	}
	s := &setup{lastRate: map[string]float64{}, conc: o.conc, ledger: newLedger(), reopened: map[groupKey]int{}}
	defer func() { s.close(o.keep) }()
	if err := s.start(o); err != nil {
		return 0, err
	}
	if o.rssOnly {
		_, err := measureRSS(s.caddyBin, s.work, o.rssWaves, s.config, s.k2048, o.pprofDir)
		return 0, err
	}
	rep := &report{opts: o, command: command, started: time.Now(), nodeInfo: s.nodeInfo, diskFS: s.diskFS, ledger: s.ledger, reopened: s.reopened, loadBefore: loadAverage()}

	rows := slices.DeleteFunc(s.rows(), func(rw row) bool { return !o.selected(rw.name) })
	latency := slices.ContainsFunc(latencyRowNames, o.selected)
	queueLatency := slices.ContainsFunc(queueLatencyRowNames, o.selected)
	underLoad := o.selected(underFlood)
	for r := range o.rounds {
		// rotate the order each round so no row always runs first or last
		order := rotated(rows, r)
		for _, rw := range order {
			res, err := s.runRow(o, rw, r)
			if err != nil {
				return 0, fmt.Errorf("%s: %v", rw.name, err)
			}
			rep.add(rw.name, res)
			logf("round %d %-28s %8.1f/s  p99 %-8s non-2xx %d errors %d", r+1, rw.name, res.rate(), res.percentile(0.99).Round(10*time.Microsecond), res.non2xx, res.errors)
		}
		if latency {
			if err := s.latencyRound(o, rep, r); err != nil {
				return 0, err
			}
		}
		if queueLatency {
			if err := s.queueLatencyRound(o, rep, r); err != nil {
				return 0, err
			}
		}
		if underLoad {
			if err := s.floodRound(o, rep, r); err != nil {
				return 0, err
			}
		}
	}
	if o.queueScale {
		for _, st := range scaleStorages {
			if !o.selected(scaleRowName(st)) {
				continue
			}
			res, err := s.runScale(o, st)
			if err != nil {
				return 0, fmt.Errorf("%s: %v", scaleRowName(st), err)
			}
			rep.scale = append(rep.scale, res)
		}
	}
	// late copies of any event still count against it
	time.Sleep(time.Second)
	if err := s.ledger.take(s.backend); err != nil {
		return 0, err
	}
	if o.rows != nil {
		rep.printRatios()
		return 0, nil
	}
	if err := s.storageCost(o, rep); err != nil {
		return 0, err
	}
	rssRes, err := measureRSS(s.caddyBin, s.work, o.rssWaves, s.config, s.k2048, o.pprofDir)
	if err != nil {
		return 0, fmt.Errorf("RSS test: %v", err)
	}
	rep.rss = rssRes
	return rep.write(o.out)
}

func (s *setup) start(o options) error {
	var err error
	if s.work, err = os.MkdirTemp("", "kayle-bench-"); err != nil {
		return err
	}
	if s.tmpfsDir, err = os.MkdirTemp("/dev/shm", "kayle-bench-"); err != nil {
		return fmt.Errorf("a tmpfs folder in /dev/shm: %v", err)
	}
	s.diskDir = filepath.Join(s.work, "dedupe-disk")
	if err := os.MkdirAll(s.diskDir, 0o700); err != nil {
		return err
	}
	s.diskFS = fsName(s.diskDir)
	if s.caddyBin, err = buildCaddy(s.work, false); err != nil {
		return err
	}
	if s.boringBin, err = buildCaddy(s.work, true); err != nil {
		return err
	}
	if o.queueScale {
		if s.storageBin, err = buildStorageCaddy(s.work); err != nil {
			return err
		}
	}
	if s.k2048, err = generateKey(s.work, 2048); err != nil {
		return err
	}
	if s.k4096, err = generateKey(s.work, 4096); err != nil {
		return err
	}
	secretFile := filepath.Join(s.work, "secret.txt")
	if err := os.WriteFile(secretFile, []byte(benchSecret), 0o600); err != nil {
		return err
	}
	if s.nodeInfo, err = installNode(filepath.Join(s.work, "node")); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	ports := make([]int, 3)
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return err
		}
	}
	s.backend = "127.0.0.1:" + strconv.Itoa(ports[0])
	backend, err := start("backend", filepath.Join(s.work, "backend.log"), nil, self, "-serve", "backend", "-addr", s.backend)
	if err != nil {
		return err
	}
	s.procs = append(s.procs, backend)
	floorAddr := "127.0.0.1:" + strconv.Itoa(ports[1])
	floor, err := start("floor", filepath.Join(s.work, "floor.log"), nil, self, "-serve", "floor", "-addr", floorAddr, s.k2048.file, s.k4096.file)
	if err != nil {
		return err
	}
	s.procs = append(s.procs, floor)
	s.floorURL = "http://" + floorAddr + "/kayle"
	node, err := start("node", filepath.Join(s.work, "node.log"), nil, "node", filepath.Join(s.work, "node", "receiver.mjs"),
		strconv.Itoa(ports[2]), benchSecret, s.k2048.file, s.k4096.file)
	if err != nil {
		return err
	}
	s.procs = append(s.procs, node)
	s.nodeURL = "http://127.0.0.1:" + strconv.Itoa(ports[2]) + "/kayle"
	for _, w := range []struct {
		url string
		p   *proc
	}{{"http://" + s.backend, backend}, {s.floorURL, floor}, {s.nodeURL, node}} {
		if err := waitHTTP(w.url, w.p, 30*time.Second); err != nil {
			return err
		}
	}
	if s.gw, err = newGatewayPorts(true); err != nil {
		return err
	}
	if s.gwProc, err = startCaddy("caddy", s.caddyBin, s.work, s.gw, s.config(s.gw)); err != nil {
		return err
	}
	s.procs = append(s.procs, s.gwProc)
	if s.boring, err = newGatewayPorts(false); err != nil {
		return err
	}
	if s.boringProc, err = startCaddy("caddy-boring", s.boringBin, s.work, s.boring, s.config(s.boring)); err != nil {
		return err
	}
	s.procs = append(s.procs, s.boringProc)
	return nil
}

// config is the Caddyfile of a gateway process; each process gets its own
// dedupe folders.
func (s *setup) config(g gatewayPorts) string {
	tmpfs := filepath.Join(s.tmpfsDir, strconv.Itoa(g.admin))
	disk := filepath.Join(s.diskDir, strconv.Itoa(g.admin))
	return caddyfile(g, []keyPair{s.k2048, s.k4096}, filepath.Join(s.work, "secret.txt"), s.backend, tmpfs, disk, s.conc)
}

// The names rows are reported under; targets refer to them.
const (
	floor2048, floor4096         = "floor RSA-2048", "floor RSA-4096"
	off2048, off4096             = "dedupe off RSA-2048", "dedupe off RSA-4096"
	tmpfs2048, tmpfs4096         = "dedupe tmpfs RSA-2048", "dedupe tmpfs RSA-4096"
	disk2048, disk4096           = "dedupe disk RSA-2048", "dedupe disk RSA-4096"
	boring4096                   = "boring tmpfs RSA-4096"
	floorLarge, nodeLarge        = "floor 200KB RSA-2048", "node 200KB RSA-2048"
	gatewayLarge                 = "dedupe tmpfs 200KB RSA-2048"
	forgedGateway, forgedRespond = "forged vs kayle_webhook", "forged vs respond 400"
	// the latency rows, open loop at half the floor's rate
	p99Floor, p99Tmpfs, p99Off = "p99 floor at half rate", "p99 dedupe tmpfs at half rate", "p99 dedupe off at half rate"
	// genuine deliveries at a fixed rate beside a forged flood (issue 13),
	// selected by the first name; the second is the flood's own row
	underFlood, floodBeside = "genuine 50/s under forged flood", "forged flood beside genuine 50/s"
	// queue mode (issue 15), closed loop like the dedupe rows
	queueTmpfs2048, queueDisk2048 = "queue tmpfs RSA-2048", "queue disk RSA-2048"
	// open loop at half the sync row's rate: the time from send to the
	// backend, queue mode against sync mode on the same storage
	e2eSyncTmpfs, e2eQueueTmpfs = "e2e dedupe tmpfs at half rate", "e2e queue tmpfs at half rate"
	e2eSyncDisk, e2eQueueDisk   = "e2e dedupe disk at half rate", "e2e queue disk at half rate"
)

var queueLatencyRowNames = []string{e2eSyncTmpfs, e2eQueueTmpfs, e2eSyncDisk, e2eQueueDisk}

var latencyRowNames = []string{p99Floor, p99Tmpfs, p99Off}

// genuineUnderFlood is the rate of the genuine deliveries beside the flood,
// as issue 13 sets it.
const genuineUnderFlood = 50.0

// rotated is xs rotated left by round, so that across rounds every element
// runs first once.
func rotated[T any](xs []T, round int) []T {
	if len(xs) == 0 {
		return xs
	}
	return slices.Concat(xs[round%len(xs):], xs[:round%len(xs)])
}

// checkRowSelection refuses, before anything is built, a -rows expression
// that selects nothing, or latency rows without the floor RSA-2048 row
// whose rate they run at.
func checkRowSelection(o options) error {
	if o.rows == nil {
		return nil
	}
	if o.rssOnly {
		return errors.New("-rows selects load rows; -rss-only runs none")
	}
	var names []string
	for _, rw := range (&setup{}).rows() {
		names = append(names, rw.name)
	}
	names = append(append(append(names, latencyRowNames...), queueLatencyRowNames...), underFlood)
	var scale []string
	for _, st := range scaleStorages {
		scale = append(scale, scaleRowName(st))
	}
	if o.queueScale {
		names = append(names, scale...)
	} else if slices.ContainsFunc(scale, o.selected) && !slices.ContainsFunc(names, o.selected) {
		return fmt.Errorf("-rows %s selects the queue's scale rows only: they run with -queue-scale", o.rows)
	}
	if !slices.ContainsFunc(names, o.selected) {
		return fmt.Errorf("no row matches -rows %s; the rows: %q", o.rows, names)
	}
	if slices.ContainsFunc(latencyRowNames, o.selected) && !o.selected(floor2048) {
		return fmt.Errorf("-rows %s selects latency rows, which run at half the floor's rate: select %q too", o.rows, floor2048)
	}
	for i, sync := range []string{tmpfs2048, tmpfs2048, disk2048, disk2048} {
		if o.selected(queueLatencyRowNames[i]) && !o.selected(sync) {
			return fmt.Errorf("-rows %s selects %q, which runs at half the rate of %q: select it too", o.rows, queueLatencyRowNames[i], sync)
		}
	}
	return nil
}

func (s *setup) rows() []row {
	gw, b := s.gw, s.boring
	return []row{
		{name: floor2048, url: s.floorURL, key: s.k2048, size: 600},
		{name: off2048, url: gw.url(gw.off), key: s.k2048, size: 600, caddy: s.gwProc, admin: gw.admin},
		{name: tmpfs2048, url: gw.url(gw.tmpfs), key: s.k2048, size: 600, caddy: s.gwProc, admin: gw.admin},
		{name: disk2048, url: gw.url(gw.disk), key: s.k2048, size: 600, caddy: s.gwProc, admin: gw.admin},
		{name: queueTmpfs2048, url: gw.url(gw.qtmpfs), key: s.k2048, size: 600, queue: true, caddy: s.gwProc, admin: gw.admin},
		{name: queueDisk2048, url: gw.url(gw.qdisk), key: s.k2048, size: 600, queue: true, caddy: s.gwProc, admin: gw.admin},
		{name: floor4096, url: s.floorURL, key: s.k4096, size: 600},
		{name: off4096, url: gw.url(gw.off), key: s.k4096, size: 600, caddy: s.gwProc, admin: gw.admin},
		{name: tmpfs4096, url: gw.url(gw.tmpfs), key: s.k4096, size: 600, caddy: s.gwProc, admin: gw.admin},
		{name: disk4096, url: gw.url(gw.disk), key: s.k4096, size: 600, caddy: s.gwProc, admin: gw.admin},
		{name: boring4096, url: b.url(b.tmpfs), key: s.k4096, size: 600, caddy: s.boringProc, admin: b.admin},
		{name: floorLarge, url: s.floorURL, key: s.k2048, size: 200 << 10},
		{name: nodeLarge, url: s.nodeURL, key: s.k2048, size: 200 << 10},
		{name: gatewayLarge, url: gw.url(gw.tmpfs), key: s.k2048, size: 200 << 10, caddy: s.gwProc, admin: gw.admin},
		{name: forgedGateway, url: gw.url(gw.off), key: s.k2048, forged: true, caddy: s.gwProc, admin: gw.admin},
		{name: forgedRespond, url: gw.url(gw.refuse), key: s.k2048, forged: true, caddy: s.gwProc, admin: gw.admin},
	}
}

func (s *setup) runRow(o options, rw row, round int) (result, error) {
	n, want := o.maxSmall, is2xx
	if rw.size > 600 {
		n = o.maxLarge
	}
	if last := s.lastRate[rw.name]; last > 0 {
		// generating unused deliveries costs time: plan for 1.5x the last round
		n = min(n, int(last*1.5*o.duration.Seconds())+o.conc)
	}
	warm := 2 * o.conc
	var ds []delivery
	var err error
	if rw.forged {
		n, want = 4*o.maxSmall, is400
		ds, err = forged(rw.key, n+warm)
	} else {
		ds, err = genuine(rw.key, rw.size, n+warm)
	}
	if err != nil {
		return result{}, err
	}
	profiled := o.pprofDir != "" && round == 0 && (rw.name == off2048 || rw.name == tmpfs2048 || rw.name == boring4096 || rw.name == forgedGateway || rw.queue)
	done := make(chan error, 1)
	if profiled {
		file := filepath.Join(o.pprofDir, profileName(rw.name)+".cpu.pprof")
		secs := max(1, int(o.duration.Seconds())-1)
		go func() { done <- savePprof(rw.admin, "profile?seconds="+strconv.Itoa(secs), file) }()
	}
	var opened0 queueCounts
	if rw.queue {
		opened0 = readQueueCounts(rw.admin)
	}
	res := closedLoop(rw.url, ds, warm, o.conc, o.duration, want)
	s.lastRate[rw.name] = res.rate()
	if rw.caddy != nil && !rw.forged {
		if err := s.file(rw.name, round, &res, rw.queue); err != nil {
			return res, err
		}
	}
	if rw.queue {
		n := readQueueCounts(rw.admin).sub(opened0).reopened()
		s.reopened[groupKey{rw.name, round}] = n
		logf("round %d %-28s reopened %d (decrypted again, out of the storage)", round+1, rw.name, n)
	}
	if profiled {
		if err := <-done; err != nil {
			logf("cpu profile of %s: %v", rw.name, err)
		}
		// allocations since Caddy started: every gateway row so far
		if err := savePprof(rw.admin, "allocs", filepath.Join(o.pprofDir, profileName(rw.name)+".allocs.pprof")); err != nil {
			logf("allocs profile after %s: %v", rw.name, err)
		}
	}
	return res, nil
}

func profileName(name string) string {
	out := []byte(name)
	for i, c := range out {
		if c == ' ' || c == '/' {
			out[i] = '-'
		}
	}
	return string(out)
}

// latencyRound runs the floor and the gateway (tmpfs, and dedupe off to
// tell the proxy's share from the storage's) at half the floor's
// throughput of this round, at a fixed rate.
func (s *setup) latencyRound(o options, rep *report, round int) error {
	floorRate := rep.results[floor2048][round].rate()
	if floorRate <= 0 {
		return errors.New("the floor served nothing")
	}
	rate := floorRate / 2
	n := int(rate*o.duration.Seconds()) + 9
	urls := map[string]string{p99Floor: s.floorURL, p99Tmpfs: s.gw.url(s.gw.tmpfs), p99Off: s.gw.url(s.gw.off)}
	names := slices.DeleteFunc(slices.Clone(latencyRowNames), func(name string) bool { return !o.selected(name) })
	// rotated like the other rows: a row that always ran first (or right
	// after the closed-loop rows) would meet the machine in another state
	for _, name := range rotated(names, round) {
		target := struct{ name, url string }{name, urls[name]}
		ds, err := genuine(s.k2048, 600, n)
		if err != nil {
			return err
		}
		res := openLoop(target.url, ds, rate, o.duration)
		if target.name != p99Floor {
			if err := s.file(target.name, round, &res, false); err != nil {
				return err
			}
		}
		rep.add(target.name, res)
		logf("round %d %-28s %8.1f/s  p50 %-8s p99 %-8s non-2xx %d errors %d", round+1, target.name, res.rate(),
			res.percentile(0.5).Round(10*time.Microsecond), res.percentile(0.99).Round(10*time.Microsecond), res.non2xx, res.errors)
	}
	return nil
}

// floodRound sends genuine deliveries, each a new event, open loop at
// genuineUnderFlood a second to the tmpfs dedupe site (RSA-2048) while a
// closed-loop forged-signature flood from o.floodConc connections hits the
// same site as fast as the generator and the gateway go: the flood starts
// first, runs at full rate before the first genuine delivery is due, and
// stops when the last genuine answer is in. The genuine latencies count from
// when each delivery was due, so queueing behind the flood is charged.
func (s *setup) floodRound(o options, rep *report, round int) error {
	const ramp = 500 * time.Millisecond
	url := s.gw.url(s.gw.tmpfs)
	ds, err := genuine(s.k2048, 600, int(genuineUnderFlood*o.duration.Seconds())+16)
	if err != nil {
		return err
	}
	bad, err := forged(s.k2048, 1)
	if err != nil {
		return err
	}
	// bounds: the genuine run, its stragglers (the client's 30 s timeout),
	// and far more requests than loopback carries in that time
	maxDur := ramp + o.duration + 35*time.Second
	maxN := int(maxDur.Seconds()) * 200_000
	if rep.floodConc == 0 {
		rep.floodConc = o.floodConc
		if rep.floodConc <= 0 {
			rep.floodConc = s.fastestFlood(o, rep, url, bad[0])
		}
	}
	stop := make(chan struct{})
	flooded := make(chan result, 1)
	go func() { flooded <- flood(url, bad[0], rep.floodConc, maxN, maxDur, stop, is400) }()
	time.Sleep(ramp)

	profiled := o.pprofDir != "" && round == 0
	done := make(chan error, 1)
	if profiled {
		file := filepath.Join(o.pprofDir, profileName(underFlood)+".cpu.pprof")
		secs := max(1, int(o.duration.Seconds())-1)
		go func() { done <- savePprof(s.gw.admin, "profile?seconds="+strconv.Itoa(secs), file) }()
	}
	res := openLoop(url, ds, genuineUnderFlood, o.duration)
	close(stop)
	fl := <-flooded
	if profiled {
		if err := <-done; err != nil {
			logf("cpu profile of %s: %v", underFlood, err)
		}
	}
	if err := s.file(underFlood, round, &res, false); err != nil {
		return err
	}
	rep.add(underFlood, res)
	rep.add(floodBeside, fl)
	logf("round %d %-28s %8.1f/s  p50 %-8s p99 %-8s max %-8s non-2xx %d errors %d", round+1, underFlood, res.rate(),
		res.percentile(0.5).Round(10*time.Microsecond), res.percentile(0.99).Round(10*time.Microsecond),
		res.percentile(1).Round(10*time.Microsecond), res.non2xx, res.errors)
	logf("round %d %-28s %8.1f/s  (c=%d) non-400 %d errors %d", round+1, floodBeside, fl.rate(), rep.floodConc, fl.non2xx, fl.errors)
	return nil
}

// floodProbeConns are the connection counts fastestFlood tries, from two per
// CPU of this 2-CPU machine up; on it, shared with the generator, the
// flood's rate flattens somewhere between 16 and 64.
var floodProbeConns = []int{4, 8, 16, 32, 64}

// floodProbeTime is how long fastestFlood runs each probe.
func floodProbeTime(o options) time.Duration {
	if o.quick {
		return 500 * time.Millisecond
	}
	return time.Second
}

// fastestFlood runs the forged flood alone against url for a second at each
// of floodProbeConns, twice (in order, then reversed, so that neither end
// always runs first), and returns the count whose mean rate was highest: the
// flood the genuine deliveries then run beside is the fastest this
// generator reaches on this machine, not a guess.
func (s *setup) fastestFlood(o options, rep *report, url string, bad delivery) int {
	probe := floodProbeTime(o)
	const passes = 2
	rates := make([]float64, len(floodProbeConns))
	for pass := range passes {
		for j := range floodProbeConns {
			if pass%2 == 1 {
				j = len(floodProbeConns) - 1 - j
			}
			c := floodProbeConns[j]
			res := flood(url, bad, c, int(probe.Seconds()*200_000)+1, probe, nil, is400)
			rates[j] += res.rate() / passes
			logf("flood probe %d c=%-3d %8.1f/s  non-400 %d errors %d", pass+1, c, res.rate(), res.non2xx, res.errors)
		}
	}
	best := 0
	for j, c := range floodProbeConns {
		rep.floodProbe = append(rep.floodProbe, floodProbe{conns: c, rate: rates[j]})
		if rates[j] > rates[best] {
			best = j
		}
	}
	return floodProbeConns[best]
}

// storageCost times single deliveries (one at a time) through the three
// dedupe modes; the difference to dedupe off is what storage costs per new
// event, set beside the cost of one fsync on the same disk.
func (s *setup) storageCost(o options, rep *report) error {
	n := 400
	if o.quick {
		n = 60
	}
	for _, c := range []struct {
		name string
		port int
	}{{off2048, s.gw.off}, {tmpfs2048, s.gw.tmpfs}, {disk2048, s.gw.disk}} {
		ds, err := genuine(s.k2048, 600, n+4)
		if err != nil {
			return err
		}
		res := closedLoop(s.gw.url(c.port), ds, 4, 1, time.Minute, is2xx)
		rep.sequential[c.name] = mean(res.latencies)
	}
	var err error
	if rep.fsyncDisk, err = fsyncCost(s.diskDir, n/2); err != nil {
		return err
	}
	rep.fsyncTmpfs, err = fsyncCost(s.tmpfsDir, n/2)
	return err
}

// fsName says what file system dir is on, for the report.
func fsName(dir string) string {
	var st syscall.Statfs_t
	if syscall.Statfs(dir, &st) != nil {
		return "unknown"
	}
	switch st.Type {
	case 0x01021994:
		return "tmpfs"
	case 0xEF53:
		return "ext4"
	case 0x58465342:
		return "xfs"
	case 0x9123683E:
		return "btrfs"
	case 0x794c7630:
		return "overlayfs"
	}
	return fmt.Sprintf("0x%x", st.Type)
}
