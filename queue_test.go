package kaylewebhook

import (
	"encoding/json"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// adaptQueue adapts a site whose kayle_webhook block holds queueBlock and
// returns the handler's "queue" JSON.
func adaptQueue(t *testing.T, queueBlock string) (json.RawMessage, error) {
	t.Helper()
	caddyfile := ":8080 {\n\tkayle_webhook {\n\t\tsigning_secret whsec_0123456789abcdef0123\n\t\tdecryption_key k1 /keys/k1.pem\n" +
		queueBlock + "\n\t}\n}\n"
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), nil)
	if err != nil {
		return nil, err
	}
	var doc struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Routes []struct {
						Handle []json.RawMessage `json:"handle"`
					} `json:"routes"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfg, &doc); err != nil {
		t.Fatal(err)
	}
	var h struct {
		Queue json.RawMessage `json:"queue"`
	}
	_ = json.Unmarshal(doc.Apps.HTTP.Servers["srv0"].Routes[0].Handle[0], &h)
	return h.Queue, nil
}

func TestQueueCaddyfileAdaptsToJSON(t *testing.T) {
	got, err := adaptQueue(t, `queue {
			forward {
				reverse_proxy backend:8080 {
					header_up X-Queue yes
				}
			}
			horizon 3d
			max_backoff 30s
			concurrency 16
			rate 600/m
		}`)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"concurrency":16,"forward":[{"handle":[{"handler":"reverse_proxy","headers":{"request":{"set":{"X-Queue":["yes"]}}},"upstreams":[{"dial":"backend:8080"}]}]}],` +
		`"horizon":259200000000000,"max_backoff":30000000000,"rate":10}`
	if string(got) != want {
		t.Errorf("queue JSON\ngot  %s\nwant %s", got, want)
	}
	var q Queue
	if err := json.Unmarshal(got, &q); err != nil || len(q.Forward) != 1 || time.Duration(q.Horizon) != 72*time.Hour {
		t.Errorf("the JSON does not read back: %+v %v", q, err)
	}
}

func TestQueueCaddyfileRefuses(t *testing.T) {
	cases := map[string]struct{ block, says string }{
		"no forward":        {"queue {\n horizon 1d\n}", "needs a forward block"},
		"two forwards":      {"queue {\n forward {\n reverse_proxy a:1\n }\n forward {\n reverse_proxy b:1\n }\n}", "one forward block"},
		"queue twice":       {"queue {\n forward {\n reverse_proxy a:1\n }\n}\nqueue {\n forward {\n reverse_proxy a:1\n }\n}", "twice"},
		"queue argument":    {"queue now {\n forward {\n reverse_proxy a:1\n }\n}", "argument"},
		"rate without unit": {"queue {\n forward {\n reverse_proxy a:1\n }\n rate 50\n}", "is not a rate"},
		"rate per day":      {"queue {\n forward {\n reverse_proxy a:1\n }\n rate 50/d\n}", "is not a rate"},
		"rate zero":         {"queue {\n forward {\n reverse_proxy a:1\n }\n rate 0/s\n}", "is not a rate"},
		"concurrency 0":     {"queue {\n forward {\n reverse_proxy a:1\n }\n concurrency 0\n}", "from 1 to 1024"},
		"concurrency huge":  {"queue {\n forward {\n reverse_proxy a:1\n }\n concurrency 5000\n}", "from 1 to 1024"},
		"bad horizon":       {"queue {\n forward {\n reverse_proxy a:1\n }\n horizon soon\n}", "horizon"},
		"unknown option":    {"queue {\n forward {\n reverse_proxy a:1\n }\n retries 5\n}", `unrecognized queue option "retries"`},
		"bad forward":       {"queue {\n forward {\n no_such_directive\n }\n}", "no_such_directive"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := adaptQueue(t, c.block)
			if err == nil || !strings.Contains(err.Error(), c.says) {
				t.Errorf("error %v, want one saying %q", err, c.says)
			}
		})
	}
}

func TestQueueConfigRefused(t *testing.T) {
	forward := caddyhttp.RouteList{{HandlersRaw: []json.RawMessage{json.RawMessage(`{"handler":"static_response"}`)}}}
	cases := map[string]struct {
		h    Handler
		says string
	}{
		"dedupe off":     {Handler{DedupeDisabled: true, Queue: &Queue{Forward: forward}}, "queue needs dedupe"},
		"no forward":     {Handler{Queue: &Queue{}}, "queue.forward"},
		"horizon < 0":    {Handler{Queue: &Queue{Forward: forward, Horizon: -1}}, "queue.horizon"},
		"backoff 1ms":    {Handler{Queue: &Queue{Forward: forward, MaxBackoff: caddy.Duration(time.Millisecond)}}, "queue.max_backoff"},
		"concurrency -1": {Handler{Queue: &Queue{Forward: forward, Concurrency: -1}}, "queue.concurrency"},
		"rate NaN":       {Handler{Queue: &Queue{Forward: forward, Rate: math.NaN()}}, "queue.rate"},
		"rate < 0":       {Handler{Queue: &Queue{Forward: forward, Rate: -2}}, "queue.rate"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			err := c.h.Validate()
			if err == nil || !strings.Contains(err.Error(), c.says) {
				t.Errorf("Validate: %v, want an error naming %q", err, c.says)
			}
		})
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]float64{"50/s": 50, "600/m": 10, "1800/h": 0.5, "2.5/s": 2.5} {
		if got, err := parseRate(in); err != nil || got != want {
			t.Errorf("parseRate(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "50", "/s", "x/s", "-1/s", "0/m", "1/d", "Inf/s", "NaN/s"} {
		if _, err := parseRate(in); err == nil {
			t.Errorf("parseRate(%q) accepted", in)
		}
	}
}

func TestHandlerWithoutAQueueWarnsOfQueuedEvents(t *testing.T) {
	backend := newSwitchableBackend(http.StatusServiceUnavailable)
	qt := newQueueTest(t, &backend.testBackend)
	core, logs := observer.New(zapcore.WarnLevel)
	warnStrandedQueue(qt.h.dedupe, zap.New(core))
	if logs.Len() != 0 {
		t.Fatalf("warned of an empty queue: %v", logs.All())
	}
	qt.deliver(t, "evt_stranded")
	qt.waitTried(t, "evt_stranded")
	warnStrandedQueue(qt.h.dedupe, zap.New(core))
	if logs.FilterMessageSnippet("no queue block").Len() != 1 {
		t.Errorf("no warning of a queued event a handler without a queue would strand: %v", logs.All())
	}
}
