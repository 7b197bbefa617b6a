package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// ledger matches the genuine deliveries the harness sent with what the
// backends received: every event a gateway answered 2xx must reach its
// backend exactly once, and the time from its send to its receipt is the
// end-to-end latency. Events are indexed by their number in the run
// (delivery.seq), so a million of them cost tens of megabytes.
type ledger struct {
	mu      sync.Mutex
	groups  []ledgerGroup
	byKey   map[groupKey]int // → index in groups
	events  []ledgerEntry    // by seq
	unknown int              // receipts of events no group sent
}

// groupKey names the deliveries of one row in one round.
type groupKey struct {
	name  string
	round int
}

type ledgerGroup struct {
	groupKey
	start   time.Time // the measured window's
	pending int       // answered 2xx and not received yet
}

type ledgerEntry struct {
	group    int32 // index+1 in groups; 0: not tracked
	status   int16 // the gateway's answer; 0: failed
	warm     bool
	received uint16 // how many times the backend got it
	sent     int64  // unix ns, sent (or due, open loop)
	first    int64  // unix ns, its first receipt
}

func newLedger() *ledger { return &ledger{byKey: map[groupKey]int{}} }

// register files the deliveries of a load run under name and round.
func (l *ledger) register(name string, round int, res result) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := groupKey{name, round}
	gi, ok := l.byKey[k]
	if !ok {
		gi = len(l.groups)
		l.groups = append(l.groups, ledgerGroup{groupKey: k, start: res.start})
		l.byKey[k] = gi
	}
	g := &l.groups[gi]
	if g.start.IsZero() || (!res.start.IsZero() && res.start.Before(g.start)) {
		g.start = res.start
	}
	for _, s := range res.sent {
		for int64(len(l.events)) <= s.seq {
			l.events = append(l.events, make([]ledgerEntry, max(1024, len(l.events)))...)
		}
		e := &l.events[s.seq]
		*e = ledgerEntry{group: int32(gi + 1), status: int16(s.status), warm: s.warm, received: e.received, sent: s.at.UnixNano(), first: e.first}
		if is2xx(s.status) && e.received == 0 {
			g.pending++
		}
	}
}

// take fetches and files what the backend at addr received since the last
// take.
func (l *ledger) take(addr string) error {
	res, err := http.Get("http://" + addr + backendTakePath)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("backend %s: %s", backendTakePath, res.Status)
	}
	body, err := io.ReadAll(res.Body)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		id, at, ok := bytes.Cut(sc.Bytes(), []byte(" "))
		seq, ok2 := eventSeqOf(id)
		ns, err := strconv.ParseInt(string(at), 10, 64)
		if !ok || !ok2 || err != nil || seq >= int64(len(l.events)) || l.events[seq].group == 0 {
			l.unknown++
			continue
		}
		e := &l.events[seq]
		e.received++
		if e.received == 1 {
			e.first = ns
			if is2xx(int(e.status)) {
				l.groups[e.group-1].pending--
			}
		}
	}
	return sc.Err()
}

// eventSeqOf reads the event number at the end of a bench event id
// (evt_bench_<ns>_<seq>).
func eventSeqOf(id []byte) (int64, bool) {
	i := bytes.LastIndexByte(id, '_')
	if i < 0 {
		return 0, false
	}
	n, err := strconv.ParseInt(string(id[i+1:]), 10, 64)
	return n, err == nil && n > 0
}

// await takes from the backend at addr until every event the named groups
// answered 2xx has arrived, or until deadline; it says whether all did.
func (l *ledger) await(addr string, deadline time.Time, keys ...groupKey) (bool, error) {
	for {
		if err := l.take(addr); err != nil {
			return false, err
		}
		if l.pending(keys...) == 0 {
			return true, nil
		}
		if time.Now().After(deadline) {
			return false, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// pending is how many events the named groups answered 2xx that have not
// arrived yet.
func (l *ledger) pending(keys ...groupKey) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, k := range keys {
		if gi, ok := l.byKey[k]; ok {
			n += l.groups[gi].pending
		}
	}
	return n
}

// deliveryStats is what became of one group's events.
type deliveryStats struct {
	answered    int             // answered 2xx, warm-up included
	queued      int             // of those, 202
	once        int             // answered 2xx and received exactly once
	missing     int             // answered 2xx, never received
	dupes       int             // received more than once
	extra       int             // received, though not answered 2xx
	measured    int             // answered 2xx in the measured window
	e2e         []time.Duration // measured: send (due) → first receipt
	start       time.Time       // of the measured window
	first, last time.Time       // first and last receipt of a measured event
}

// exactlyOnce: every event answered 2xx arrived, none twice, none unasked.
func (d deliveryStats) exactlyOnce() bool {
	return d.answered > 0 && d.missing == 0 && d.dupes == 0 && d.extra == 0
}

// deliveredRate is the measured events over the time from the measured
// window's start to the last one's receipt: what the mode sustains, the
// forwards still running after the last answer included.
func (d deliveryStats) deliveredRate() float64 {
	span := d.last.Sub(d.start)
	if d.measured == 0 || span <= 0 {
		return 0
	}
	return float64(d.measured) / span.Seconds()
}

// stats sums up the named groups.
func (l *ledger) stats(keys ...groupKey) deliveryStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	want := map[int32]bool{}
	for _, k := range keys {
		if gi, ok := l.byKey[k]; ok {
			want[int32(gi+1)] = true
		}
	}
	var d deliveryStats
	for _, g := range l.perGroup(want) {
		d.merge(g)
	}
	return d
}

// perGroup sums up each group that want names, in one pass over the
// events; the caller holds l.mu.
func (l *ledger) perGroup(want map[int32]bool) map[int32]*deliveryStats {
	out := map[int32]*deliveryStats{}
	for gi := range want {
		out[gi] = &deliveryStats{start: l.groups[gi-1].start}
	}
	for _, e := range l.events {
		d := out[e.group]
		if d == nil {
			continue
		}
		ok := is2xx(int(e.status))
		if e.received > 1 {
			d.dupes++
		}
		if !ok {
			if e.received > 0 {
				d.extra++
			}
			continue
		}
		d.answered++
		if e.status == http.StatusAccepted {
			d.queued++
		}
		switch e.received {
		case 0:
			d.missing++
		case 1:
			d.once++
		}
		if e.warm {
			continue
		}
		d.measured++
		if e.received == 0 {
			continue
		}
		d.e2e = append(d.e2e, time.Duration(e.first-e.sent))
		first := time.Unix(0, e.first)
		if d.first.IsZero() || first.Before(d.first) {
			d.first = first
		}
		if first.After(d.last) {
			d.last = first
		}
	}
	return out
}

// merge adds g to d.
func (d *deliveryStats) merge(g *deliveryStats) {
	d.answered += g.answered
	d.queued += g.queued
	d.once += g.once
	d.missing += g.missing
	d.dupes += g.dupes
	d.extra += g.extra
	d.measured += g.measured
	d.e2e = append(d.e2e, g.e2e...)
	if d.start.IsZero() || (!g.start.IsZero() && g.start.Before(d.start)) {
		d.start = g.start
	}
	if d.first.IsZero() || (!g.first.IsZero() && g.first.Before(d.first)) {
		d.first = g.first
	}
	if g.last.After(d.last) {
		d.last = g.last
	}
}

// allStats sums up every group, and names (once each) the rows whose
// events did not all arrive exactly once.
func (l *ledger) allStats() (deliveryStats, []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	want := map[int32]bool{}
	for gi := range l.groups {
		want[int32(gi+1)] = true
	}
	var all deliveryStats
	var bad []string
	seen := map[string]bool{}
	groups := l.perGroup(want)
	for gi := range l.groups {
		g := groups[int32(gi+1)]
		all.merge(g)
		if name := l.groups[gi].name; !g.exactlyOnce() && !seen[name] {
			seen[name] = true
			bad = append(bad, name)
		}
	}
	return all, bad
}

// percentileOf is the p-th latency of ds (0 for none).
func percentileOf(ds []time.Duration, p float64) time.Duration {
	return result{latencies: ds}.percentile(p)
}
