package kaylewebhook

import (
	"net/http"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// A flood of forged deliveries is counted one by one but logged at most
// rejectLogBurst times a second: an attacker cannot flood the logs, nor
// make each refusal cost a log line.
func TestRejectionsLoggedSampledCountedAll(t *testing.T) {
	h := newTestHandler(t)
	core, logs := observer.New(zapcore.InfoLevel)
	h.setLogger(zap.New(core))
	before := counterValue(t, requestsTotal.WithLabelValues("rejected_signature"))

	const forged = 200
	body, _ := signDelivery(t, eventPayload("evt_forged_flood"), time.Now())
	forgedSig := kayle.SignatureHeaderValue([]byte("whsec_the_attackers_own_secret_0123"), time.Now(), body)
	began := time.Now()
	for range forged {
		if res := serve(h, deliveryRequest(body, forgedSig), &testBackend{}); res.Status != http.StatusBadRequest {
			t.Fatalf("forged delivery answered %d, want 400", res.Status)
		}
	}
	seconds := int(time.Since(began)/time.Second) + 2 // the sampler's ticks the loop may span
	if got := counterValue(t, requestsTotal.WithLabelValues("rejected_signature")) - before; got != forged {
		t.Errorf("counted %v refusals, want %d", got, forged)
	}
	lines := logs.FilterMessage("rejected delivery").Len()
	if lines == 0 || lines > seconds*rejectLogBurst {
		t.Errorf("%d refusal log lines for %d forged deliveries in under %d s; want between 1 and %d", lines, forged, seconds, seconds*rejectLogBurst)
	}
}
