package kaylewebhook

import (
	"context"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
)

func newSweepCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "sweep --config <file> [--adapter <name>] [--prefix <p>]",
		Short: "Deletes the dedupe records older than the handler's dedupe_window, now",
		Long: `
Deletes, now, the dedupe records older than the dedupe_window of the
config's kayle_webhook handler, as the gateway's own hourly sweep does:
for a storage that must shrink at once, or to check a new storage module.

The storage is found as the gateway finds it (see "caddy kayle forget").
It takes the cluster's sweep lock first, so it never sweeps beside a
running gateway's sweep; if a live gateway holds that lock, it sweeps
nothing and says so.

It prints how many records it deleted and saw. It exits 0 when the sweep
is done, 1 if the config or the storage failed.

--config <file>
    The config the gateway runs with (required).

--adapter <name>
    Its adapter, as for caddy run. Default: guessed from the file name.

--prefix <dedupe_prefix>
    Which handler, when the config has several with different
    dedupe_prefix values.
`,
		Args: cobra.NoArgs,
		RunE: runWith(cmdKayleSweep),
	}
	addRecordsFlags(cmd)
	return cmd
}

type sweepOptions struct {
	Config  string
	Adapter string
	Prefix  string
}

func cmdKayleSweep(fl caddycmd.Flags, _ []string, s cmdIO) (int, error) {
	o := sweepOptions{Config: fl.String("config"), Adapter: fl.String("adapter"), Prefix: fl.String("prefix")}
	if err := runSweep(context.Background(), o, s); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

func runSweep(ctx context.Context, o sweepOptions, s cmdIO) error {
	lc, err := loadHandlers(o.Config, o.Adapter)
	if err != nil {
		return err
	}
	target, prefix, err := lc.dedupeHandler(o.Prefix)
	if err != nil {
		return err
	}
	window := time.Duration(target.handler.DedupeWindow)
	if window == 0 {
		window = defaultDedupeWindow
	}
	if window < minDedupeWindow {
		return fmt.Errorf("%s: dedupe_window %s is shorter than the gateway accepts (8d)", target.where, window)
	}
	cctx, cancel := newCommandContext()
	defer cancel()
	storage, desc, err := lc.openStorage(cctx, target)
	if err != nil {
		return err
	}
	d := newDeduper(storage, prefix, window, zap.NewNop(), time.Now)
	fmt.Fprintf(s.out, "dedupe records under %s in %s, older than %s\n", prefix, desc, window)
	deleted, seen, err := d.sweepRecords(ctx, true)
	if err != nil {
		return err
	}
	if seen == 0 && deleted == 0 {
		fmt.Fprintln(s.out, "nothing to sweep (no records, or a running gateway is sweeping now)")
		return nil
	}
	fmt.Fprintf(s.out, "deleted %d of %d records\n", deleted, seen)
	return nil
}
