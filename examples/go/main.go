// Command receiver is a backend for the kayle_webhook gateway: net/http and the
// Standard Webhooks Go library. It checks the gateway's signature, processes each
// event once (keyed by X-Kayle-Event-Id), and answers non-2xx on failure so Kayle
// retries.
package main

import (
	"cmp"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"os"
	"strings"
	"sync"

	standardwebhooks "github.com/standard-webhooks/standard-webhooks/libraries/go"
)

// statusOf is the session status each event type sets; others are only acknowledged.
var statusOf = map[string]string{
	"verification.session.succeeded": "verified",
	"verification.session.failed":    "failed",
	"verification.session.expired":   "expired",
	"verification.session.cancelled": "cancelled",
}

type receiver struct {
	webhook   *standardwebhooks.Webhook
	log       *json.Encoder // one JSON line per processed event
	mu        sync.Mutex
	processed map[string]bool // event ids: a real application keeps them in its database
}

func (rc *receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	code, status := rc.receive(w, r)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]string{"status": status})
}

// receive processes one forward and returns the answer's status code and text.
func (rc *receiver) receive(w http.ResponseWriter, r *http.Request) (int, string) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 16<<20))
	if err != nil {
		return http.StatusBadRequest, "unreadable body"
	}
	// Verify checks webhook-id/-timestamp/-signature with 5 minutes' tolerance;
	// the idempotency key must be the id the signature covers.
	eventID := r.Header.Get("X-Kayle-Event-Id")
	if rc.webhook.Verify(body, r.Header) != nil || eventID != r.Header.Get("webhook-id") {
		return http.StatusUnauthorized, "bad signature"
	}
	var event struct {
		Type string `json:"type"`
	}
	if json.Unmarshal(body, &event) != nil || event.Type == "" {
		return http.StatusBadRequest, "not a Kayle event"
	}

	rc.mu.Lock() // one copy of an event at a time
	defer rc.mu.Unlock()
	if rc.processed[eventID] {
		return http.StatusOK, "duplicate"
	}
	status, known := statusOf[event.Type]
	if !known {
		status = "ignored"
	}
	// your application: set the verification session's status (metadata.
	// verification_session_id); the consented claims are in data.claims
	if err := rc.log.Encode(map[string]string{"event_id": eventID, "type": event.Type, "status": status}); err != nil {
		return http.StatusInternalServerError, "cannot record it"
	}
	rc.processed[eventID] = true
	return http.StatusOK, status
}

func main() {
	secret := os.Getenv("KAYLE_FORWARD_SECRET")
	webhook, err := standardwebhooks.NewWebhook(secret)
	if err != nil || strings.TrimPrefix(secret, "whsec_") == "" {
		log.Fatal("KAYLE_FORWARD_SECRET must be the gateway's whsec_ forward_signature secret")
	}
	processedLog := io.Writer(os.Stdout)
	if path := os.Getenv("KAYLE_PROCESSED_LOG"); path != "" {
		if processedLog, err = os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600); err != nil {
			log.Fatal(err)
		}
	}
	mux := http.NewServeMux() // answers 405 to other methods
	mux.Handle("POST /", &receiver{webhook: webhook, log: json.NewEncoder(processedLog), processed: map[string]bool{}})
	log.Fatal(http.ListenAndServe("127.0.0.1:"+cmp.Or(os.Getenv("PORT"), "9000"), mux))
}
