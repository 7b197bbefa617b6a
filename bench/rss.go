package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// rssResult is the Caddy process's memory over repeated waves of large
// deliveries.
type rssResult struct {
	baseline int64   // VmRSS before the first wave
	liveBase int64   // Go heap in use before the first wave, after a forced GC
	settled  int64   // Go heap in use 2 s after the last wave, after a forced GC
	hwm      []int64 // each wave's peak RSS (VmHWM, reset before the wave)
	rss      []int64 // VmRSS after each wave
	live     []int64 // Go heap in use after each wave, after a forced GC
	non2xx   int
}

// measureRSS starts a fresh Caddy (so VmHWM is this test's alone) and sends
// waves of 64 concurrent 1 MiB genuine deliveries to its tmpfs dedupe site,
// each wave with new event ids.
func measureRSS(binary, work string, waves int, newConfig func(gatewayPorts) string, k keyPair, pprofDir string) (rssResult, error) {
	const conc, size = 64, 1 << 20
	var out rssResult
	g, err := newGatewayPorts(false)
	if err != nil {
		return out, err
	}
	p, err := startCaddy("caddy-rss", binary, work, g, newConfig(g))
	if err != nil {
		return out, err
	}
	defer p.stop()
	warm, err := genuine(k, 600, 8)
	if err != nil {
		return out, err
	}
	closedLoop(g.url(g.tmpfs), warm, 8, 8, time.Minute, is2xx)
	if out.baseline, err = p.memory("VmRSS"); err != nil {
		return out, err
	}
	if out.liveBase, err = liveHeap(g.admin); err != nil {
		return out, err
	}
	logf("rss before: VmRSS %s, live heap %s", mib(out.baseline), mib(out.liveBase))
	client := newClient(conc)
	defer client.CloseIdleConnections()
	for wave := range waves {
		ds, err := genuine(k, size, conc)
		if err != nil {
			return out, err
		}
		// VmHWM from here on is this wave's peak alone
		if err := p.resetPeak(); err != nil {
			return out, err
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, d := range ds {
			wg.Go(func() {
				status, err := post(client, g.url(g.tmpfs), d)
				if err != nil || !is2xx(status) {
					mu.Lock()
					out.non2xx++
					mu.Unlock()
				}
			})
		}
		if wave == 0 && pprofDir != "" {
			// mid-load: the bodies are in and being decrypted
			time.Sleep(300 * time.Millisecond)
			if err := savePprof(g.admin, "heap", filepath.Join(pprofDir, "rss-64x1MiB.heap.pprof")); err != nil {
				logf("heap profile: %v", err)
			}
		}
		wg.Wait()
		hwm, err := p.memory("VmHWM")
		if err != nil {
			return out, err
		}
		rss, err := p.memory("VmRSS")
		if err != nil {
			return out, err
		}
		live, err := liveHeap(g.admin)
		if err != nil {
			return out, err
		}
		out.hwm, out.rss, out.live = append(out.hwm, hwm), append(out.rss, rss), append(out.live, live)
		logf("rss wave %d: VmHWM %s, VmRSS %s, live heap %s", wave+1, mib(hwm), mib(rss), mib(live))
	}
	// handlers may still be writing their dedupe records after the answers
	time.Sleep(2 * time.Second)
	if out.settled, err = liveHeap(g.admin); err != nil {
		return out, err
	}
	logf("rss settled: live heap %s", mib(out.settled))
	if pprofDir != "" {
		if err := savePprof(g.admin, "heap", filepath.Join(pprofDir, "rss-settled.heap.pprof")); err != nil {
			logf("heap profile: %v", err)
		}
	}
	return out, nil
}

func mib(b int64) string { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }

// savePprof fetches one profile from Caddy's admin endpoint into file.
func savePprof(adminPort int, profile, file string) error {
	res, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/%s", adminPort, profile))
	if err != nil {
		return err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("pprof %s: %s", profile, res.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, res.Body)
	return err
}

// liveHeap forces a collection in Caddy (through pprof's gc=1) and reads
// the heap left, from the admin endpoint's expvar memstats.
func liveHeap(adminPort int) (int64, error) {
	res, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/heap?gc=1", adminPort))
	if err != nil {
		return 0, err
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	res, err = http.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/vars", adminPort))
	if err != nil {
		return 0, err
	}
	defer res.Body.Close()
	var vars struct {
		Memstats struct{ HeapAlloc int64 } `json:"memstats"`
	}
	if err := json.NewDecoder(res.Body).Decode(&vars); err != nil {
		return 0, fmt.Errorf("admin /debug/vars: %v", err)
	}
	return vars.Memstats.HeapAlloc, nil
}
