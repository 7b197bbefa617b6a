package caddytest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// adminMetrics reads the in-process Caddy's admin /metrics, as Prometheus
// would scrape it.
func (h *harness) adminMetrics() string {
	h.t.Helper()
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://localhost:%d/metrics", adminPort), nil)
	if err != nil {
		h.t.Fatal(err)
	}
	req.Close = true // leave no pooled connection to an admin server the next load replaces
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		h.t.Fatalf("admin /metrics: %d, %v", resp.StatusCode, err)
	}
	return string(body)
}

// metricValue is the value of the sample named exactly series (name and
// labels as exposed), or -1 when /metrics does not have it.
func metricValue(t testing.TB, metrics, series string) float64 {
	t.Helper()
	for line := range strings.Lines(metrics) {
		value, ok := strings.CutPrefix(strings.TrimSpace(line), series+" ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			t.Fatalf("%s: %v", series, err)
		}
		return v
	}
	return -1
}

// The metrics an operator scrapes from the admin endpoint keep counting
// across a config reload, and name the kid that opened each delivery and the
// position of the signing secret that matched.
func TestMetricsOnTheAdminEndpointAfterReload(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())
	// The answer goes out before the record is written, so a delivery's
	// dedupe_storage time is observed just after its answer: wait for it.
	// (The metrics are the process's, so other tests' counts are in them.)
	storagePhase := `caddy_kayle_webhook_phase_duration_seconds_count{phase="dedupe_storage"}`
	initial := max(metricValue(t, h.adminMetrics(), storagePhase), 0)
	h.expectForwarded(deliver(t, gw.url(), newEvent(t, nil)))

	const (
		kid       = `caddy_kayle_webhook_key_uses_total{kid="demo"}`
		position  = `caddy_kayle_webhook_signing_secret_matches_total{position="1"}`
		forwarded = `caddy_kayle_webhook_requests_total{outcome="forwarded"}`
		rejected  = `caddy_kayle_webhook_requests_total{outcome="rejected_signature"}`
	)
	before := h.metricsWhen(func(m string) bool { return metricValue(t, m, storagePhase) >= initial+1 })
	for _, series := range []string{kid, position, forwarded} {
		if metricValue(t, before, series) < 1 {
			t.Fatalf("before the reload, /metrics lacks %s", series)
		}
	}

	h.load(gw.caddyfile()) // a forced reload: a fresh metrics registry
	h.expectForwarded(deliver(t, gw.url(), newEvent(t, nil)))
	h.expectForwarded(deliver(t, gw.url(), newEvent(t, nil)))
	h.expect(deliveryRequest(t, gw.url(), encrypt(t, newEvent(t, nil).payload), nil, time.Now(), "x"), http.StatusBadRequest)
	after := h.metricsWhen(func(m string) bool {
		return metricValue(t, m, storagePhase)-metricValue(t, before, storagePhase) >= 2
	})

	for series, want := range map[string]float64{kid: 2, position: 2, forwarded: 2, rejected: 1} {
		if got := metricValue(t, after, series) - max(metricValue(t, before, series), 0); got != want {
			t.Errorf("%s grew by %v across the reload, want %v", series, got, want)
		}
	}
	for _, phase := range []string{"verify", "decrypt", "dedupe_storage", "forward"} {
		series := `caddy_kayle_webhook_phase_duration_seconds_count{phase="` + phase + `"}`
		if got := metricValue(t, after, series) - metricValue(t, before, series); got != 2 {
			t.Errorf("%s grew by %v, want 2", series, got)
		}
	}
	if t.Failed() {
		t.Logf("/metrics after the reload:\n%s", grepLines(after, "caddy_kayle_webhook"))
	}
}

// metricsWhen reads the admin /metrics until ready accepts them, for up to
// 5 s, and returns the last read.
func (h *harness) metricsWhen(ready func(metrics string) bool) string {
	deadline := time.Now().Add(5 * time.Second)
	for {
		m := h.adminMetrics()
		if ready(m) || time.Now().After(deadline) {
			return m
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func grepLines(s, substr string) string {
	var b strings.Builder
	for line := range strings.Lines(s) {
		if strings.Contains(line, substr) {
			b.WriteString(line)
		}
	}
	return b.String()
}

// A request without X-Kayle-Signature that announces a body with
// Expect: 100-continue gets its 400 at once: no 100 Continue invites the
// body, and the body is never waited for.
func TestUnsignedRequestRefusedBeforeItsBody(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())

	for name, signature := range map[string]string{
		"no signature":        "",
		"malformed signature": "X-Kayle-Signature: t=now,v1=forged\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", gw.port))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			// bounds a hang only: a gateway that waits for the body never answers
			if err := conn.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(conn, "POST /kayle/webhook HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/jose\r\n"+
				"Content-Length: 3000000\r\nExpect: 100-continue\r\n%s\r\n", gw.port, signature)
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("no answer without the body: %v", err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("status %d, want 400 before the body (a 100 means the gateway asked for the body)", resp.StatusCode)
			}
		})
	}
	if n := be.total(); n != 0 {
		t.Errorf("backend got %d requests", n)
	}
}

// An error route can forward the plaintext to a fallback when the backend is
// down: the request handle_errors gets still carries the decrypted body.
func TestHandleErrorsForwardsThePlaintextToAFallback(t *testing.T) {
	h := newHarness(t)
	fallback := newBackend(t)
	gw := h.gateway(fallback)
	gw.backend = "127.0.0.1:" + itoa(mustFreePort(t)) // nothing listens there
	gw.siteExtra = "\thandle_errors {\n\t\treverse_proxy " + fallback.hostPort() + "\n\t}\n"
	h.load(gw.caddyfile())

	ev := newEvent(t, nil)
	_, body := h.expect(deliver(t, gw.url(), ev), http.StatusOK)
	if string(body) != `{"received":true}` {
		t.Errorf("Kayle got %q, want the fallback's answer", body)
	}
	reqs := fallback.requests()
	if len(reqs) != 1 {
		t.Fatalf("the fallback got %d requests, want 1", len(reqs))
	}
	if got := reqs[0]; !bytes.Equal(got.Body, ev.payload) || got.ContentLength != int64(len(ev.payload)) {
		t.Errorf("the fallback got %d bytes (Content-Length %d), want the %d-byte plaintext", len(got.Body), got.ContentLength, len(ev.payload))
	}
}
