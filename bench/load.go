package main

import (
	"bytes"
	"io"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// result is what one load run saw.
type result struct {
	ok, non2xx, errors int
	start              time.Time // of the measured part, after the warm-up
	elapsed            time.Duration
	latencies          []time.Duration
	// sent is every genuine delivery sent, warm-up included, for the
	// ledger to match with the backend's receipts.
	sent []sent
}

// sent is one genuine delivery as the load generator saw it.
type sent struct {
	seq    int64     // the event's number (delivery.seq)
	at     time.Time // when it was sent; in the open loop, when it was due
	status int       // its answer; 0: the request failed
	warm   bool      // a warm-up request, outside the measured window
}

// note records a genuine delivery's send for the ledger.
func (r *result) note(d delivery, at time.Time, status int, err error, warm bool) {
	if d.seq == 0 {
		return
	}
	if err != nil {
		status = 0
	}
	r.sent = append(r.sent, sent{seq: d.seq, at: at, status: status, warm: warm})
}

// count records one answer: a latency only for the wanted ones.
func (r *result) count(status int, err error, wantStatus func(int) bool, took time.Duration) {
	switch {
	case err != nil:
		r.errors++
	case wantStatus(status):
		r.ok++
		r.latencies = append(r.latencies, took)
	default:
		r.non2xx++
	}
}

// add merges a worker's counts into r.
func (r *result) add(w result) {
	r.ok += w.ok
	r.non2xx += w.non2xx
	r.errors += w.errors
	r.latencies = append(r.latencies, w.latencies...)
	r.sent = append(r.sent, w.sent...)
}

func (r result) rate() float64 {
	if r.elapsed <= 0 {
		return 0
	}
	return float64(r.ok) / r.elapsed.Seconds()
}

func (r result) percentile(p float64) time.Duration {
	if len(r.latencies) == 0 {
		return 0
	}
	s := slices.Clone(r.latencies)
	slices.Sort(s)
	return s[min(len(s)-1, int(float64(len(s))*p))]
}

func newClient(conns int) *http.Client {
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			MaxIdleConnsPerHost: conns,
			MaxConnsPerHost:     conns,
			DisableCompression:  true,
			Proxy:               nil, // loopback only, whatever the environment says
		},
	}
}

func post(client *http.Client, url string, d delivery) (int, error) {
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(d.body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/jose")
	req.Header.Set("X-Kayle-Signature", d.signature)
	req.Header.Set("X-Kayle-Delivery-Id", "whd_bench")
	req.Header.Set("X-Kayle-Event", "verification.session.succeeded")
	res, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res.StatusCode, nil
}

// closedLoop sends the deliveries from conc workers, each waiting for its
// answer before the next, until all are sent or maxDur has passed. The
// first warm deliveries open the connections and are not counted.
func closedLoop(url string, ds []delivery, warm, conc int, maxDur time.Duration, wantStatus func(int) bool) result {
	client := newClient(conc)
	defer client.CloseIdleConnections()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var res result
	for i := range min(warm, len(ds)) {
		wg.Go(func() {
			t0 := time.Now()
			status, err := post(client, url, ds[i])
			mu.Lock()
			res.note(ds[i], t0, status, err, true)
			mu.Unlock()
		})
		if (i+1)%conc == 0 {
			wg.Wait()
		}
	}
	wg.Wait()
	ds = ds[min(warm, len(ds)):]

	var next atomic.Int64
	start := time.Now()
	res.start = start
	deadline := start.Add(maxDur)
	for range conc {
		wg.Go(func() {
			var local result
			for {
				i := next.Add(1) - 1
				if int(i) >= len(ds) || time.Now().After(deadline) {
					break
				}
				t0 := time.Now()
				status, err := post(client, url, ds[i])
				local.count(status, err, wantStatus, time.Since(t0))
				local.note(ds[i], t0, status, err, false)
			}
			mu.Lock()
			res.add(local)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

// openLoop sends at a fixed rate whatever the answers do, and times each
// request from when it was due, so a stalled server is charged for the
// requests queued behind it.
func openLoop(url string, ds []delivery, rate float64, dur time.Duration) result {
	// Requests due while every connection is busy wait for one (their
	// latency still counts from when they were due); more connections would
	// overflow the listen backlog, and a dropped SYN costs a 1 s retransmit.
	const maxInFlight, conns = 512, 64
	client := newClient(conns)
	defer client.CloseIdleConnections()
	interval := time.Duration(float64(time.Second) / rate)
	// open a few connections first, so the first due times are not charged
	// with the handshakes
	const warm = 16
	var wg sync.WaitGroup
	var mu sync.Mutex
	var res result
	for i := range min(warm, len(ds)) {
		wg.Go(func() {
			t0 := time.Now()
			status, err := post(client, url, ds[i])
			mu.Lock()
			res.note(ds[i], t0, status, err, true)
			mu.Unlock()
		})
	}
	wg.Wait()
	ds = ds[min(warm, len(ds)):]
	n := min(len(ds), int(dur/interval))
	slots := make(chan struct{}, maxInFlight)
	start := time.Now()
	res.start = start
	for i := range n {
		due := start.Add(time.Duration(i) * interval)
		time.Sleep(time.Until(due))
		slots <- struct{}{}
		wg.Go(func() {
			defer func() { <-slots }()
			status, err := post(client, url, ds[i])
			lat := time.Since(due)
			mu.Lock()
			defer mu.Unlock()
			res.note(ds[i], due, status, err, false)
			switch {
			case err != nil:
				res.errors++
			case status/100 == 2:
				res.ok++
				res.latencies = append(res.latencies, lat)
			default:
				res.non2xx++
			}
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}

func is2xx(status int) bool { return status/100 == 2 }

func is400(status int) bool { return status == http.StatusBadRequest }

// flood sends d again and again from conc workers, each waiting for its
// answer before the next, until stop is closed, maxDur has passed or maxN
// requests were sent: a closed-loop flood at whatever rate the server and
// the generator reach. The first 2*conc requests open the connections and
// are not counted.
func flood(url string, d delivery, conc, maxN int, maxDur time.Duration, stop <-chan struct{}, wantStatus func(int) bool) result {
	client := newClient(conc)
	defer client.CloseIdleConnections()
	var wg sync.WaitGroup
	for range conc {
		wg.Go(func() {
			for range 2 {
				_, _ = post(client, url, d)
			}
		})
	}
	wg.Wait()

	var sent atomic.Int64
	var mu sync.Mutex
	var res result
	start := time.Now()
	deadline := start.Add(maxDur)
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	for range conc {
		wg.Go(func() {
			var local result
			for sent.Add(1) <= int64(maxN) && time.Now().Before(deadline) && !stopped() {
				t0 := time.Now()
				status, err := post(client, url, d)
				local.count(status, err, wantStatus, time.Since(t0))
			}
			mu.Lock()
			res.add(local)
			mu.Unlock()
		})
	}
	wg.Wait()
	res.elapsed = time.Since(start)
	return res
}
