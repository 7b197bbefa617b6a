// Command bench measures the gateway against the crypto floor and writes
// BENCHMARKS.md: run `go run ./bench` from the repository root (-quick for
// a smoke test). It builds Caddy with the plugin (pure Go and BoringCrypto),
// generates keys and genuine deliveries, and runs every comparison on
// loopback in interleaved rounds. It exits 1 when a target is missed.
package main

import (
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"
)

// options are the command-line flags of one measurement run.
type options struct {
	quick     bool
	rounds    int
	duration  time.Duration
	conc      int
	floodConc int // connections of the forged flood beside genuine deliveries
	maxSmall  int // request bound per row, 600 B deliveries
	maxLarge  int // request bound per row, 200 KB deliveries
	rssWaves  int
	out       string
	pprofDir  string
	keep      bool
	rssOnly   bool
	rows      *regexp.Regexp // -rows: only these rows, printed, no report
	// the queue at scale (issue 15): run, with how many queued events
	queueScale  bool
	queueEvents int
}

// selected reports whether the row called name runs: all do without -rows.
func (o options) selected(name string) bool { return o.rows == nil || o.rows.MatchString(name) }

func main() {
	var o options
	serve := flag.String("serve", "", "internal: run the `floor` or `backend` server instead of the harness")
	addr := flag.String("addr", "", "internal: the address -serve listens on")
	flag.BoolVar(&o.quick, "quick", false, "smoke test: 2 rounds of about 1 s per row")
	flag.IntVar(&o.rounds, "rounds", 5, "interleaved rounds")
	flag.DurationVar(&o.duration, "duration", 4*time.Second, "the longest a row runs in one round")
	flag.IntVar(&o.conc, "c", 8, "concurrent requests of the closed-loop rows")
	flag.IntVar(&o.floodConc, "flood-c", 0, "connections of the forged flood that genuine deliveries run beside (0: whichever of 4, 8, 16, 32, 64 floods fastest in two 1 s probes of each)")
	flag.IntVar(&o.rssWaves, "rss-waves", 5, "waves of 64 concurrent 1 MiB deliveries in the memory test")
	flag.StringVar(&o.out, "o", "BENCHMARKS.md", "report file")
	flag.StringVar(&o.pprofDir, "pprof", "", "save CPU and allocation profiles of the RSA-2048 gateway rows (the queue's included), the BoringCrypto row, the forged flood and the genuine deliveries under it (first round), heap profiles of the RSS test, and with -queue-scale CPU profiles of the deep queue's first latency round, of the idle instance (after its measured window) and of the drain's first 20 s, into this folder, from Caddy's admin /debug/pprof")
	flag.BoolVar(&o.keep, "keep", false, "keep the work folder (binaries, Caddyfiles, logs)")
	flag.BoolVar(&o.rssOnly, "rss-only", false, "run only the memory test and print it (no BENCHMARKS.md)")
	flag.BoolVar(&o.queueScale, "queue-scale", false, "also run the queue at scale (issue 15), on file_system (disk) and on Redis: fill a paused queue with -queue-events deliveries, then an idle instance's CPU with the backend down, a new delivery's answer p99 beside an empty queue, and the drain once the backend is back (some 15 minutes per storage at 100 000); without it, the report keeps the scale section of the last run that had it")
	flag.IntVar(&o.queueEvents, "queue-events", 100_000, "events queued in the -queue-scale rows")
	rowsExpr := flag.String("rows", "", "run only the rows whose names (as in BENCHMARKS.md) match this `regexp`, print them and their ratios, and write no report: for experiments (latency rows need \"floor RSA-2048\" too)")
	flag.Parse()
	if *rowsExpr != "" {
		re, err := regexp.Compile(*rowsExpr)
		fatalIf(err)
		o.rows = re
	}

	switch *serve {
	case "":
	case "floor":
		fatalIf(serveFloor(*addr, flag.Args()))
		return
	case "backend":
		fatalIf(serveBackend(*addr))
		return
	default:
		fatalIf(fmt.Errorf("unknown -serve %q", *serve))
	}

	if o.quick {
		o.rounds, o.duration, o.rssWaves = 2, time.Second, 2
	}
	if o.queueEvents < 1 {
		fatalIf(fmt.Errorf("-queue-events %d: give at least 1", o.queueEvents))
	}
	o.maxSmall = int(o.duration.Seconds() * 3000)
	o.maxLarge = int(o.duration.Seconds() * 250)
	command := "go run ./bench " + strings.Join(os.Args[1:], " ")
	missed, err := run(o, strings.TrimSpace(command))
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if missed > 0 {
		fmt.Fprintf(os.Stderr, "bench: %d target(s) missed, see %s\n", missed, o.out)
		os.Exit(1)
	}
}

func fatalIf(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}
