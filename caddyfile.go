package kaylewebhook

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
	"go.uber.org/zap"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("kayle_webhook", parseCaddyfile)
	// runs after timeouts (which puts a read deadline on the body) and before
	// reverse_proxy, so no `order` line is needed
	httpcaddyfile.RegisterDirectiveOrder("kayle_webhook", httpcaddyfile.After, "timeouts")
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax, with
// each line's JSON field:
//
//	kayle_webhook {
//		signing_secret <secret>          # signing_secrets; repeatable; placeholders like {env.X}, {file.path}
//		decryption_key <kid> <file>      # decryption_keys; repeatable; PEM (PKCS#8, PKCS#1) or JWK
//		decryption_jwks <jwks-file>      # decryption_jwks; repeatable; a JWKS of private keys with kids
//		tolerance <duration>             # tolerance; default 5m
//		max_body_size <size>             # max_body_size; default 4MiB, from 1B to 1GiB
//		dedupe_window <duration>         # dedupe_window; default 14d, at least 8d
//		dedupe_prefix <key-prefix>       # dedupe_prefix; default kayle_webhook/events
//		storage <module> { … }           # storage; default: the global storage
//		dedupe off                       # dedupe_disabled; forward every verified copy
//		forward_signature <whsec_secret> # forward_signature_secrets; repeatable; sign the forward (Standard Webhooks)
//		events <type>…                   # events; repeatable; forward only these types
//		queue {                          # queue; answer 202 once stored, forward from the queue
//			forward {                    # queue.forward; handler directives, e.g. reverse_proxy
//				reverse_proxy <upstream>
//			}
//			horizon <duration>           # queue.horizon; default 7d; then the event is dead
//			max_backoff <duration>       # queue.max_backoff; default 1m
//			concurrency <n>              # queue.concurrency; default 8
//			rate <n>/s|m|h               # queue.rate (per second); default: no limit
//		}
//	}
//
// decryption_keys <jwks-file>, decryption_jwks's old name, is still read,
// with a WARN. Error messages never repeat a signing_secret or
// forward_signature token.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "signing_secret":
			if !d.NextArg() || d.Val() == "" {
				return d.Err("signing_secret's value is empty; " + unsetVariableHint)
			}
			h.SigningSecrets = append(h.SigningSecrets, d.Val())
			if d.NextArg() {
				return d.Err("signing_secret takes exactly one argument (quote a secret that contains spaces)")
			}
		case "forward_signature":
			if !d.NextArg() || d.Val() == "" {
				return d.Err("forward_signature needs one argument, a whsec_ secret, and its value is empty; " + unsetVariableHint)
			}
			h.ForwardSignatureSecrets = append(h.ForwardSignatureSecrets, d.Val())
			if d.NextArg() {
				return d.Err("forward_signature takes exactly one argument; repeat the line for a second secret")
			}
		case "events":
			types := d.RemainingArgs()
			if len(types) == 0 {
				return d.Err("events needs at least one event type")
			}
			h.Events = append(h.Events, types...)
		case "decryption_key":
			var kid, file string
			if !d.Args(&kid, &file) || kid == "" || file == "" {
				return d.Err("decryption_key takes two arguments, <kid> <file>, and one is missing or empty; " + unsetVariableHint)
			}
			if d.NextArg() {
				return d.Err("decryption_key takes two arguments: <kid> <file>")
			}
			h.DecryptionKeys = append(h.DecryptionKeys, KeyFile{KeyID: kid, File: file})
		case "decryption_jwks", "decryption_keys":
			name := d.Val()
			var file string
			if !d.Args(&file) || file == "" {
				return d.Errf("%s takes one argument, <jwks-file>, and its value is empty; %s", name, unsetVariableHint)
			}
			if d.NextArg() {
				return d.Errf("%s takes one argument: <jwks-file>", name)
			}
			if name == "decryption_keys" {
				warnJWKSAlias(d)
			}
			h.DecryptionJWKS = append(h.DecryptionJWKS, file)
		case "tolerance", "dedupe_window":
			name := d.Val()
			dur, err := durationArg(d, name)
			if err != nil {
				return err
			}
			if name == "tolerance" {
				h.Tolerance = caddy.Duration(dur)
			} else {
				h.DedupeWindow = caddy.Duration(dur)
			}
		case "max_body_size":
			var value string
			if !d.Args(&value) || d.NextArg() {
				return d.ArgErr()
			}
			size, err := humanize.ParseBytes(value)
			if err != nil {
				return d.Errf("max_body_size: %v", err)
			}
			if !validMaxBodySize(size) {
				return d.Err(errMaxBodySizeRange(value).Error())
			}
			h.MaxBodySize = int64(size)
		case "dedupe_prefix":
			if !d.Args(&h.DedupePrefix) || d.NextArg() {
				return d.ArgErr()
			}
		case "dedupe":
			var value string
			if !d.Args(&value) || d.NextArg() {
				return d.ArgErr()
			}
			switch value {
			case "off":
				h.DedupeDisabled = true
			case "on":
				h.DedupeDisabled = false
			default:
				return d.Errf("dedupe takes on or off, not %q", value)
			}
		case "storage":
			if !d.NextArg() {
				return d.ArgErr()
			}
			modStem := d.Val()
			modID := "caddy.storage." + modStem
			unm, err := caddyfile.UnmarshalModule(d, modID)
			if err != nil {
				return err
			}
			storage, ok := unm.(caddy.StorageConverter)
			if !ok {
				return d.Errf("module %s is not a caddy.StorageConverter", modID)
			}
			h.StorageRaw = caddyconfig.JSONModuleObject(storage, "module", modStem, nil)
		case "queue":
			if err := h.unmarshalQueue(d); err != nil {
				return err
			}
		default:
			return d.Errf("unrecognized kayle_webhook option %q", d.Val())
		}
	}
	return nil
}

// unmarshalQueue reads the queue block. Its forward block is kept for
// parseCaddyfile, which parses it as routes with the helper.
func (h *Handler) unmarshalQueue(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	if h.Queue != nil {
		return d.Err("queue is given twice")
	}
	h.Queue = new(Queue)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "forward":
			if h.queueForward != nil {
				return d.Err("queue has one forward block")
			}
			h.queueForward = d.NewFromNextSegment()
		case "horizon", "max_backoff":
			name := d.Val()
			dur, err := durationArg(d, "queue "+name)
			if err != nil {
				return err
			}
			if name == "horizon" {
				h.Queue.Horizon = caddy.Duration(dur)
			} else {
				h.Queue.MaxBackoff = caddy.Duration(dur)
			}
		case "concurrency":
			var value string
			if !d.Args(&value) || d.NextArg() {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(value)
			if err != nil || n < 1 || n > maxQueueConcurrency {
				return d.Errf("queue concurrency %q: give a number of forwards from 1 to %d", value, maxQueueConcurrency)
			}
			h.Queue.Concurrency = n
		case "rate":
			var value string
			if !d.Args(&value) || d.NextArg() {
				return d.ArgErr()
			}
			perSecond, err := parseRate(value)
			if err != nil {
				return d.Errf("queue rate: %v", err)
			}
			h.Queue.Rate = perSecond
		default:
			return d.Errf("unrecognized queue option %q", d.Val())
		}
	}
	if h.queueForward == nil {
		return d.Err("queue needs a forward block: forward { reverse_proxy <backend> }")
	}
	return nil
}

// durationArg reads the one duration argument of the option called name.
func durationArg(d *caddyfile.Dispenser, name string) (time.Duration, error) {
	var value string
	if !d.Args(&value) || d.NextArg() {
		return 0, d.ArgErr()
	}
	dur, err := caddy.ParseDuration(value)
	if err != nil {
		return 0, d.Errf("%s: %v", name, err)
	}
	return dur, nil
}

// parseRate reads a rate such as 50/s, 600/m or 1000/h as forwards a second.
func parseRate(value string) (float64, error) {
	count, unit, ok := strings.Cut(value, "/")
	per := map[string]float64{"s": 1, "m": 60, "h": 3600}[unit]
	n, err := strconv.ParseFloat(count, 64)
	if !ok || per == 0 || err != nil || !(n > 0) || math.IsInf(n, 0) {
		return 0, fmt.Errorf("%q is not a rate: give forwards per second, minute or hour, such as 50/s, 600/m or 1000/h", value)
	}
	return n / per, nil
}

// caddyfileLog is where the Caddyfile parser warns: Caddy's log, where the
// process that adapts a Caddyfile (caddy run, adapt, reload, a config posted
// as text/caddyfile) logs the adapter's own warnings. The adapter hands the
// server JSON, in which an old Caddyfile name leaves no trace, so this is
// the only place it can be noticed. A variable for the tests.
var caddyfileLog = caddy.Log

// warnJWKSAlias logs that the line just read uses decryption_keys with one
// argument, decryption_jwks's old name in the Caddyfile (decryption_keys is
// the JSON name of the decryption_key lines).
func warnJWKSAlias(d *caddyfile.Dispenser) {
	caddyfileLog().Warn("kayle_webhook: decryption_keys <jwks-file> is the old name of decryption_jwks <jwks-file>, which means the same (JSON decryption_jwks); use decryption_jwks",
		zap.String("adapter", "caddyfile"), zap.String("file", d.File()), zap.Int("line", d.Line()))
}

// unsetVariableHint explains an empty argument: a Caddyfile {$VAR} whose
// variable is unset becomes nothing, and the line loses that argument.
const unsetVariableHint = "is an environment variable ({$VAR}) on that line unset? The Caddyfile's {$VAR} are replaced when it is adapted, by the process running caddy run, adapt or reload"

func parseCaddyfile(helper httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	h := new(Handler)
	if err := h.UnmarshalCaddyfile(helper.Dispenser); err != nil {
		return nil, err
	}
	if h.queueForward != nil {
		// as reverse_proxy's handle_response: the block's handler
		// directives become routes
		handler, err := httpcaddyfile.ParseSegmentAsSubroute(helper.WithDispenser(h.queueForward))
		if err != nil {
			return nil, err
		}
		subroute, ok := handler.(*caddyhttp.Subroute)
		if !ok {
			return nil, helper.Errf("queue forward: the block was not parsed as routes")
		}
		h.Queue.Forward = subroute.Routes
		h.queueForward = nil
	}
	return h, nil
}
