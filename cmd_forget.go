package kaylewebhook

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
)

// forgetLockWait bounds the wait for one event's storage lock: a forward in
// flight holds it at most forwardTimeout, and a stale lock (its holder died)
// is taken over well within the margin.
const forgetLockWait = forwardTimeout + storageTimeout

func newForgetCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "forget --config <file> [--adapter <name>] [--prefix <p>] <event_id>...",
		Short: "Deletes events' dedupe records, so their next delivery is forwarded again",
		Long: `
Deletes the dedupe records of the given events from the storage the
config's kayle_webhook handler uses, so that the next delivery of each
event (a replay from Kayle's dashboard) reaches the backend again instead
of being acknowledged as a duplicate.

The storage is found as the gateway finds it: the handler's own storage,
else the config's global storage, else Caddy's default file storage under
this user's data folder (so run it as the user Caddy runs as). The records
are under the handler's dedupe_prefix.

Each event's storage lock is taken first, as the gateway does: an event
being forwarded right now is forgotten only once that forward has ended.

It prints each event it forgot and each it found no record of (never
delivered through this handler, or expired and swept). It exits 0 when it
is done, whether or not each event had a record; 1 if the config or the
storage failed.

--config <file>
    The config the gateway runs with (required).

--adapter <name>
    Its adapter, as for caddy run (e.g. caddyfile). Default: guessed from
    the file name, as caddy run does.

--prefix <dedupe_prefix>
    Which handler, when the config has several with different
    dedupe_prefix values (without it, such a config is an error that lists
    them). Handlers with "dedupe off" are not counted.
`,
		Args: cobra.MinimumNArgs(1),
		RunE: runWith(cmdKayleForget),
	}
	addRecordsFlags(cmd)
	return cmd
}

type forgetOptions struct {
	Config   string
	Adapter  string
	Prefix   string
	EventIDs []string
}

func cmdKayleForget(fl caddycmd.Flags, args []string, s cmdIO) (int, error) {
	o := forgetOptions{Config: fl.String("config"), Adapter: fl.String("adapter"), Prefix: fl.String("prefix"), EventIDs: args}
	if err := runForget(context.Background(), o, s); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

func runForget(ctx context.Context, o forgetOptions, s cmdIO) error {
	for _, id := range o.EventIDs {
		if id == "" {
			return errors.New("an event id is empty")
		}
	}
	if len(o.EventIDs) == 0 {
		return errors.New("give at least one event id (metadata.event_id, e.g. evt_…)")
	}
	lc, err := loadHandlers(o.Config, o.Adapter)
	if err != nil {
		return err
	}
	target, prefix, err := lc.dedupeHandler(o.Prefix)
	if err != nil {
		return err
	}
	cctx, cancel := newCommandContext()
	defer cancel()
	storage, desc, err := lc.openStorage(cctx, target)
	if err != nil {
		return err
	}
	d := newDeduper(storage, prefix, 0, zap.NewNop(), time.Now)
	fmt.Fprintf(s.out, "dedupe records under %s in %s\n", prefix, desc)

	failed := 0
	for _, id := range o.EventIDs {
		lockCtx, cancel := context.WithTimeout(ctx, forgetLockWait)
		found, err := d.forget(lockCtx, id)
		cancel()
		switch {
		case err != nil:
			failed++
			fmt.Fprintf(s.out, "failed     %s: %v\n", id, err)
		case found:
			fmt.Fprintf(s.out, "forgot     %s\n", id)
		default:
			fmt.Fprintf(s.out, "not found  %s\n", id)
		}
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d events could not be forgotten", failed, len(o.EventIDs))
	}
	return nil
}

// addRecordsFlags adds the flags that find a handler's dedupe records:
// --config, --adapter and --prefix (see dedupeHandler).
func addRecordsFlags(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringP("config", "c", "", "config file the gateway runs with (required)")
	f.StringP("adapter", "a", "", "name of the config adapter")
	f.String("prefix", "", "dedupe_prefix of the handler to use, when the config has several")
}

// dedupeHandler picks the handler whose records to edit: the only one with
// dedupe on, or the one whose dedupe_prefix is prefix. Handlers that share a
// prefix and a storage are one set of records.
func (lc *loadedConfig) dedupeHandler(prefix string) (configuredHandler, string, error) {
	want := ""
	if prefix != "" {
		var err error
		if want, err = cleanPrefix(prefix); err != nil {
			return configuredHandler{}, "", fmt.Errorf("--prefix: %v", err)
		}
	}
	type candidate struct {
		c      configuredHandler
		prefix string
	}
	var all, picked []candidate
	for _, c := range lc.handlers {
		if c.handler.DedupeDisabled {
			continue
		}
		p, err := c.dedupePrefix()
		if err != nil {
			return configuredHandler{}, "", fmt.Errorf("%s: %v", c.where, err)
		}
		all = append(all, candidate{c, p})
		if want != "" && p != want {
			continue
		}
		if slices.ContainsFunc(picked, func(o candidate) bool {
			return o.prefix == p && string(o.c.handler.StorageRaw) == string(c.handler.StorageRaw)
		}) {
			continue // the same records
		}
		picked = append(picked, candidate{c, p})
	}
	list := func(cs []candidate) string {
		items := make([]string, len(cs))
		for i, c := range cs {
			items[i] = fmt.Sprintf("--prefix %s (at %s)", c.prefix, c.c.where)
		}
		return " " + strings.Join(items, "; ")
	}
	switch {
	case len(all) == 0:
		return configuredHandler{}, "", fmt.Errorf("%s: dedupe is off in every kayle_webhook handler: there are no records to forget", lc.file)
	case len(picked) == 0:
		return configuredHandler{}, "", fmt.Errorf("%s: no kayle_webhook handler has dedupe_prefix %s; it has:%s", lc.file, want, list(all))
	case len(picked) > 1 && want == "":
		return configuredHandler{}, "", fmt.Errorf("%s has %d kayle_webhook handlers; pick one with --prefix:%s", lc.file, len(picked), list(picked))
	case len(picked) > 1:
		return configuredHandler{}, "", fmt.Errorf("%s has %d kayle_webhook handlers with dedupe_prefix %s but different storage; give them different prefixes:%s", lc.file, len(picked), want, list(picked))
	}
	return picked[0].c, picked[0].prefix, nil
}
