package kaylewebhook

import (
	"encoding/json"
	"net/http"
	"strconv"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// acknowledge answers Kayle 200 itself, without forwarding: the body is
// {"status":<status>,"event_id":<id>} and the header named marker says
// why (X-Kayle-Duplicate, X-Kayle-Ignored). Kayle stops retrying the event.
func acknowledge(w http.ResponseWriter, marker, status, eventID string) error {
	body, err := json.Marshal(struct {
		Status  string `json:"status"`
		EventID string `json:"event_id"`
	}{status, eventID})
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	body = append(body, '\n')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Header().Set(marker, "true")
	w.Header().Set(kayle.HeaderEventID, eventID)
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
	return nil
}
