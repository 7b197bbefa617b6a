package kaylewebhook

import (
	"context"
	"crypto/rsa"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/go-jose/go-jose/v4"
	"github.com/prometheus/client_golang/prometheus"
)

// TestMetricsSurviveReload: each config load has a fresh registry; the
// counters must be registered into every one of them, not just the first.
func TestMetricsSurviveReload(t *testing.T) {
	for load := range 2 {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		h := &Handler{
			SigningSecrets: []string{demoSecret(t)},
			DecryptionKeys: []KeyFile{{KeyID: demoKID, File: demoKeyFile}},
			DedupeDisabled: true,
		}
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		serve(h, httptest.NewRequest(http.MethodGet, "/", nil), &testBackend{})
		families, err := ctx.GetMetricsRegistry().Gather()
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, mf := range families {
			found = found || mf.GetName() == "caddy_kayle_webhook_requests_total"
		}
		if !found {
			t.Errorf("load %d: caddy_kayle_webhook_requests_total is not in the config's registry", load+1)
		}
	}
}

// labeledCount reads one counter of a vec, e.g. labeledCount(t, requestsTotal, "ignored").
func labeledCount(t testing.TB, vec *prometheus.CounterVec, label string) float64 {
	t.Helper()
	var m dto.Metric
	if err := vec.WithLabelValues(label).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func histogramCount(t testing.TB, phase string) uint64 {
	t.Helper()
	var m dto.Metric
	if err := phaseSeconds.WithLabelValues(phase).(prometheus.Metric).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount()
}

// The metrics name the kid that opened each delivery and the position of
// the secret that matched, and time each phase; a configured key or secret
// that nothing uses shows as 0.
func TestKeyAndSecretMetrics(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	// not the demo material, which may not be mixed with other material
	const newSecret, oldSecret = "whsec_the_new_secret_not_yet_used_0", "whsec_the_old_secret_still_in_use_0"
	h := &Handler{
		// a delivery signed with the old secret matches position 2
		SigningSecrets: []string{newSecret, oldSecret},
		DecryptionJWKS: []string{vectorsDir + "/keys/private.jwks.json"}, // k1 and k2
		DedupeDisabled: true,
	}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	families, err := ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, mf := range families {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				seen[mf.GetName()+"/"+l.GetName()+"="+l.GetValue()] = true
			}
		}
	}
	for _, want := range []string{
		"caddy_kayle_webhook_key_uses_total/kid=k1",
		"caddy_kayle_webhook_key_uses_total/kid=k2",
		"caddy_kayle_webhook_signing_secret_matches_total/position=1",
		"caddy_kayle_webhook_signing_secret_matches_total/position=2",
	} {
		if !seen[want] {
			t.Errorf("%s is not shown before any delivery", want)
		}
	}

	k1Before, k2Before := labeledCount(t, keyUsesTotal, "k1"), labeledCount(t, keyUsesTotal, "k2")
	pos1Before, pos2Before := labeledCount(t, secretMatchesTotal, "1"), labeledCount(t, secretMatchesTotal, "2")
	phasesBefore := map[string]uint64{}
	for _, p := range []string{phaseVerify, phaseDecrypt, phaseForward} {
		phasesBefore[p] = histogramCount(t, p)
	}
	keys, err := kayle.LoadJWKSFile(vectorsDir + "/keys/private.jwks.json")
	if err != nil {
		t.Fatal(err)
	}
	var k2 *rsa.PublicKey
	for _, k := range keys {
		if k.KID == "k2" {
			k2 = &k.Private.PublicKey
		}
	}
	backend := &testBackend{}
	for i := range 3 {
		body, err := kayle.EncryptDelivery(eventPayload("evt_metrics_"+strconv.Itoa(i)), k2, "k2", jose.A256GCM)
		if err != nil {
			t.Fatal(err)
		}
		res := serve(h, deliveryRequest(body, kayle.SignatureHeaderValue([]byte(oldSecret), time.Now(), body)), backend)
		if res.Status != http.StatusOK {
			t.Fatalf("status %d: %v", res.Status, res.Err)
		}
	}
	if got := labeledCount(t, keyUsesTotal, "k2") - k2Before; got != 3 {
		t.Errorf("key_uses_total{kid=k2} grew by %v, want 3", got)
	}
	if got := labeledCount(t, keyUsesTotal, "k1") - k1Before; got != 0 {
		t.Errorf("key_uses_total{kid=k1} grew by %v, want 0", got)
	}
	if got := labeledCount(t, secretMatchesTotal, "2") - pos2Before; got != 3 {
		t.Errorf("signing_secret_matches_total{position=2} grew by %v, want 3", got)
	}
	if got := labeledCount(t, secretMatchesTotal, "1") - pos1Before; got != 0 {
		t.Errorf("signing_secret_matches_total{position=1} grew by %v, want 0", got)
	}
	for p, before := range phasesBefore {
		if got := histogramCount(t, p) - before; got != 3 {
			t.Errorf("phase_duration_seconds{phase=%s} has %d more samples, want 3", p, got)
		}
	}
}

// With dedupe on, the dedupe_storage phase is timed once per delivery,
// forwarded or duplicate.
func TestDedupePhaseTimed(t *testing.T) {
	h := newTestHandler(t)
	before, forwardBefore := histogramCount(t, phaseDedupeStorage), histogramCount(t, phaseForward)
	backend := &testBackend{}
	payload := eventPayload("evt_phase")
	for range 2 {
		if res := serve(h, makeDelivery(t, payload, time.Now()), backend); res.Status != http.StatusOK {
			t.Fatalf("status %d: %v", res.Status, res.Err)
		}
	}
	if got := histogramCount(t, phaseDedupeStorage) - before; got != 2 {
		t.Errorf("dedupe_storage samples: %d, want 2", got)
	}
	if got := histogramCount(t, phaseForward) - forwardBefore; got != 1 {
		t.Errorf("forward samples: %d, want 1 (the duplicate is not forwarded)", got)
	}
}
