package kaylewebhook

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/user"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
)

func newQueueCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "queue --config <file> [--adapter <name>] [--prefix <p>] list [--dead] | retry <event_id>... | retry --dead | drop <event_id>... | pause | resume",
		Short: "Lists, retries, drops queued events; pauses and resumes the queue",
		Long: `
Looks after the queue of the config's kayle_webhook handler (its queue
block), in the storage the gateway uses (found as caddy kayle forget finds
it; run it as the user Caddy runs as). Every running gateway sharing that
storage sees the changes at its next poll.

    list            every queued event, oldest first: event id, type, when
                    it was received, tries so far, the backend's last
                    status, the next try, and why it cannot be opened (a
                    key that is not configured). Never its content.
    list --dead     the dead events instead: past the queue's horizon,
                    kept until retried or dropped.
    retry <id>...   makes queued events due now; a dead one comes back to
                    life: its tries count from 0 and its horizon from now.
    retry --dead    retries every dead event.
    drop <id>...    takes events out of the queue, unforwarded, for good; a
                    later copy from Kayle is answered as a duplicate (until
                    caddy kayle forget, or the dedupe window's end).
    pause           gateways stop starting forwards; deliveries are still
                    queued and answered 202.
    resume          gateways forward again.

Each event is changed under its storage lock, as the gateway takes it: an
event being forwarded right now is changed once that forward has ended.

It exits 1 when the config or the storage failed, or when an event given to
retry or drop was not queued.

--config <file>
    The config the gateway runs with (required).

--adapter <name>
    Its adapter, as for caddy run (e.g. caddyfile). Default: guessed from
    the file name, as caddy run does.

--prefix <dedupe_prefix>
    Which handler, when the config has several with a queue and different
    dedupe_prefix values.

--dead
    list: the dead events. retry: every dead event.
`,
		Args: cobra.MinimumNArgs(1),
		RunE: runWith(cmdKayleQueue),
	}
	addRecordsFlags(cmd)
	cmd.Flags().Bool("dead", false, "list or retry the dead events")
	return cmd
}

type queueOptions struct {
	Config   string
	Adapter  string
	Prefix   string
	Action   string // list, retry, drop, pause, resume
	Dead     bool
	EventIDs []string
	now      func() time.Time // tests set the gateway's clock; default time.Now
}

func cmdKayleQueue(fl caddycmd.Flags, args []string, s cmdIO) (int, error) {
	o := queueOptions{Config: fl.String("config"), Adapter: fl.String("adapter"), Prefix: fl.String("prefix"), Dead: fl.Bool("dead")}
	if len(args) > 0 {
		o.Action, o.EventIDs = args[0], args[1:]
	}
	if err := runQueue(context.Background(), o, s); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

// checkQueueArgs refuses an action given the wrong arguments, before the
// config is read.
func checkQueueArgs(o queueOptions) error {
	for _, id := range o.EventIDs {
		if id == "" {
			return errors.New("an event id is empty")
		}
	}
	switch o.Action {
	case "list":
		if len(o.EventIDs) > 0 {
			return errors.New("list takes no event id")
		}
	case "retry":
		switch {
		case o.Dead && len(o.EventIDs) > 0:
			return errors.New("retry takes event ids or --dead, not both")
		case !o.Dead && len(o.EventIDs) == 0:
			return errors.New("retry needs event ids (metadata.event_id, e.g. evt_…), or --dead for every dead event")
		}
	case "drop":
		if len(o.EventIDs) == 0 {
			return errors.New("drop needs event ids (metadata.event_id, e.g. evt_…)")
		}
	case "pause", "resume":
		if len(o.EventIDs) > 0 {
			return fmt.Errorf("%s takes no event id", o.Action)
		}
	case "":
		return errors.New("give an action: list, retry, drop, pause or resume")
	default:
		return fmt.Errorf("unknown action %s: give list, retry, drop, pause or resume", printable(o.Action))
	}
	if o.Dead && o.Action != "list" && o.Action != "retry" {
		return fmt.Errorf("--dead is for list and retry, not %s", o.Action)
	}
	return nil
}

func runQueue(ctx context.Context, o queueOptions, s cmdIO) error {
	if err := checkQueueArgs(o); err != nil {
		return err
	}
	lc, err := loadHandlers(o.Config, o.Adapter)
	if err != nil {
		return err
	}
	target, prefix, err := lc.queueHandler(o.Prefix)
	if err != nil {
		return err
	}
	cctx, cancel := newCommandContext()
	defer cancel()
	storage, desc, err := lc.openStorage(cctx, target)
	if err != nil {
		return err
	}
	window := time.Duration(target.handler.DedupeWindow)
	if window == 0 {
		window = defaultDedupeWindow
	}
	now := o.now
	if now == nil {
		now = time.Now
	}
	d := newDeduper(storage, prefix, window, zap.NewNop(), now)
	q := newQueueStore(d, zap.NewNop())
	fmt.Fprintf(s.out, "queue under %s in %s\n", q.dir, desc)

	switch o.Action {
	case "list":
		return printQueueList(ctx, &q, target.handler, o.Dead, s)
	case "retry", "drop":
		return runQueueChanges(ctx, &q, o, s.out)
	default:
		return runQueuePause(ctx, &q, o.Action == "pause", pauseNote(now()), s.out)
	}
}

// queueHandler picks the handler whose queue to look after, as
// dedupeHandler picks one, among the handlers with a queue.
func (lc *loadedConfig) queueHandler(prefix string) (configuredHandler, string, error) {
	queued := &loadedConfig{file: lc.file, StorageRaw: lc.StorageRaw}
	var without []string // the dedupe prefixes of handlers without a queue
	for _, c := range lc.handlers {
		if c.handler.Queue != nil && !c.handler.DedupeDisabled {
			queued.handlers = append(queued.handlers, c)
		} else if p, err := c.dedupePrefix(); err == nil && !c.handler.DedupeDisabled {
			without = append(without, p)
		}
	}
	if len(queued.handlers) == 0 {
		return configuredHandler{}, "", fmt.Errorf("%s: no kayle_webhook handler has a queue (a queue block with its forward): there is no queue to look after", lc.file)
	}
	if prefix != "" {
		if want, err := cleanPrefix(prefix); err == nil {
			has := false
			for _, c := range queued.handlers {
				if p, _ := c.dedupePrefix(); p == want {
					has = true
				}
			}
			for _, p := range without {
				if p == want && !has {
					return configuredHandler{}, "", fmt.Errorf("%s: the kayle_webhook handler with dedupe_prefix %s has no queue", lc.file, want)
				}
			}
		}
	}
	return queued.dedupeHandler(prefix)
}

// printQueueList prints the queued (or dead) events, one line each, and
// counts them. Nothing of a delivery is printed but its ids, times and
// counts.
func printQueueList(ctx context.Context, q *queueStore, h *Handler, dead bool, s cmdIO) error {
	if paused, note, err := q.pauseState(ctx); err != nil {
		fmt.Fprintf(s.notes, "the pause flag could not be read: %v\n", err)
	} else if paused {
		fmt.Fprintf(s.out, "PAUSED (%s): nothing is forwarded until caddy kayle queue resume\n", printable(cmp.Or(note, "no note")))
	}
	listing, err := q.listQueue(ctx, dead)
	if err != nil {
		return err
	}
	kids, kidNotes := handlerKIDs(h)
	for _, note := range kidNotes {
		fmt.Fprintln(s.notes, note)
	}

	now := q.d.now()
	tw := tabwriter.NewWriter(s.out, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "EVENT ID\tTYPE\tRECEIVED\tATTEMPTS\tLAST STATUS\tNEXT TRY")
	for _, e := range listing.Entries {
		status, next := "-", "dead"
		if e.LastStatus != 0 {
			status = strconv.Itoa(e.LastStatus)
		}
		if !e.Dead {
			next = showTime(e.NextTry)
			if !e.NextTry.After(now) {
				next += " (due)"
			}
		}
		var notes []string
		if !e.RetriedAt.IsZero() {
			notes = append(notes, "retried "+showTime(e.RetriedAt)) // its horizon counts from then
		}
		if !kids[e.KID] {
			notes = append(notes, "key "+printable(e.KID)+" not configured")
		}
		if e.LastError != "" {
			notes = append(notes, "last_error: "+printable(e.LastError))
		}
		// the notes, when any, in a last column (no trailing blanks without)
		line := fmt.Sprintf("%s\t%s\t%s\t%d\t%s\t%s", printable(e.EventID), printable(cmp.Or(e.EventType, "-")),
			showTime(e.ReceivedAt), e.Attempts, status, next)
		if len(notes) > 0 {
			line += "\t" + strings.Join(notes, "; ")
		}
		fmt.Fprintln(tw, line)
	}
	if err := tw.Flush(); err != nil {
		return err
	}

	what := "queued"
	if dead {
		what = "dead"
	}
	count := plural(len(listing.Entries), what+" event")
	if !dead {
		if n, err := q.countDead(ctx); err == nil && n > 0 {
			count += fmt.Sprintf("; %d dead (list them with --dead)", n)
		}
	}
	if listing.Stale > 0 {
		count += fmt.Sprintf(" (%s skipped: no queued event behind them)", plural(listing.Stale, "stale marker"))
	}
	fmt.Fprintln(s.out, count)
	if listing.Unreadable > 0 {
		return fmt.Errorf("not listed: %s the storage failed to read (%v)", plural(listing.Unreadable, "record"), listing.ReadErr)
	}
	return nil
}

// handlerKIDs is the set of kids a handler's config holds keys for: its
// decryption_keys, and the keys in its decryption_jwks files, read as
// Provision reads them. A file that cannot be read is named in a note, and
// its kids are not known.
func handlerKIDs(h *Handler) (map[string]bool, []string) {
	kids := make(map[string]bool)
	for _, kf := range h.DecryptionKeys {
		kids[kf.KeyID] = true
	}
	var notes []string
	repl := caddy.NewReplacer()
	for i, raw := range h.DecryptionJWKS {
		name := fmt.Sprintf("decryption JWKS #%d (decryption_jwks, JSON decryption_jwks[%d])", i+1, i)
		file, err := repl.ReplaceOrErr(raw, true, true)
		if err == nil {
			var keys []kayle.Key
			if keys, err = kayle.LoadJWKSFile(file); err == nil {
				for _, k := range keys {
					kids[k.KID] = true
				}
				continue
			}
		}
		notes = append(notes, fmt.Sprintf("%s could not be read (%v): the kids it holds are not known here, so an event encrypted to one of them is shown as \"not configured\"", name, err))
	}
	return kids, notes
}

// runQueueChanges retries or drops the events given, printing what became
// of each.
func runQueueChanges(ctx context.Context, q *queueStore, o queueOptions, out io.Writer) error {
	failed := 0
	report := func(c queueChange, err error) {
		id := printable(c.EventID)
		switch {
		case err != nil:
			failed++
			fmt.Fprintf(out, "%-11s %s: %v\n", "failed", id, err)
		case c.Action == actionNotQueued:
			failed++
			why := "no record: never queued here, or delivered and expired"
			if !c.Delivered.IsZero() {
				why = "delivered " + showTime(c.Delivered)
				if c.Dropped {
					why = "dropped " + showTime(c.Delivered)
				}
			}
			fmt.Fprintf(out, "%-11s %s (%s)\n", c.Action, id, why)
		case c.Action == actionNotDead:
			fmt.Fprintf(out, "%-11s %s (retried or delivered meanwhile; left as it is)\n", c.Action, id)
		case c.Action == actionRevived:
			fmt.Fprintf(out, "%-11s %s (was dead after %s; due now, its horizon counting from now)\n", c.Action, id, plural(c.Attempts, "try"))
		case c.Action == actionDropped:
			was := "queued"
			if c.WasDead {
				was = "dead"
			}
			fmt.Fprintf(out, "%-11s %s (was %s, %s; a later copy is answered as a duplicate)\n", c.Action, id, was, plural(c.Attempts, "try"))
		default:
			fmt.Fprintf(out, "%-11s %s (%s so far)\n", c.Action, id, plural(c.Attempts, "try"))
		}
	}

	if o.Action == "retry" && o.Dead {
		revived, seen := 0, 0
		err := q.retryDead(ctx, func(c queueChange, err error) {
			seen++
			if err == nil && c.Action == actionRevived {
				revived++
			}
			report(c, err)
		})
		if err != nil {
			return err
		}
		if seen == 0 {
			fmt.Fprintln(out, "no dead events")
		} else {
			fmt.Fprintf(out, "%d of %s revived; running gateways forward them at their next poll\n", revived, plural(seen, "dead event"))
		}
		if failed > 0 {
			return fmt.Errorf("%d of %d dead events could not be retried", failed, seen)
		}
		return nil
	}

	for _, id := range o.EventIDs {
		if o.Action == "retry" {
			report(q.retryEvent(ctx, id))
		} else {
			report(q.dropEvent(ctx, id))
		}
	}
	if failed > 0 {
		verb := map[string]string{"retry": "retried", "drop": "dropped"}[o.Action]
		return fmt.Errorf("%d of %d events were not %s", failed, len(o.EventIDs), verb)
	}
	return nil
}

// runQueuePause writes or deletes the pause flag.
func runQueuePause(ctx context.Context, q *queueStore, pause bool, note string, out io.Writer) error {
	changed, err := q.setPaused(ctx, pause, note)
	if err != nil {
		return err
	}
	switch {
	case pause && changed:
		fmt.Fprintln(out, "paused: running gateways start no forward from their next poll (within a second); deliveries are still queued")
	case pause:
		_, note, _ := q.pauseState(ctx)
		fmt.Fprintf(out, "already paused (%s)\n", printable(cmp.Or(note, "no note")))
	case changed:
		fmt.Fprintln(out, "resumed: running gateways forward again from their next poll (within a second)")
	default:
		fmt.Fprintln(out, "not paused: nothing to resume")
	}
	return nil
}

// pauseNote says when and by whom the queue was paused, for the next
// operator who lists it.
func pauseNote(now time.Time) string {
	who := "an unknown user"
	if u, err := user.Current(); err == nil {
		who = u.Username
	}
	if host, err := os.Hostname(); err == nil {
		who += " on " + host
	}
	return "paused " + showTime(now) + " by " + who
}

func showTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

// printable is s as printed: quoted when it holds anything a terminal
// would interpret, or that would break the listing's columns (a record in
// the storage is not proof that the gateway wrote it).
func printable(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) || r == '\t' }) < 0 {
		return s
	}
	return strconv.Quote(s)
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	if strings.HasSuffix(noun, "y") && !strings.HasSuffix(noun, "ey") {
		return strconv.Itoa(n) + " " + strings.TrimSuffix(noun, "y") + "ies"
	}
	return strconv.Itoa(n) + " " + noun + "s"
}
