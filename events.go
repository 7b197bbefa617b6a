package kaylewebhook

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// HeaderIgnored marks the answer to a delivery whose type is not in the
// events allowlist: acknowledged so Kayle stops retrying, never forwarded.
const HeaderIgnored = "X-Kayle-Ignored"

// provisionEvents builds the allowlist set; none means every type passes.
func (h *Handler) provisionEvents() error {
	h.allowedTypes = nil
	for _, typ := range h.Events {
		if typ == "" {
			return errors.New("events: an event type must not be empty")
		}
		if h.allowedTypes == nil {
			h.allowedTypes = make(map[string]bool, len(h.Events))
		}
		h.allowedTypes[typ] = true
	}
	return nil
}

// wantsType reports whether a verified delivery of typ is forwarded.
func (h *Handler) wantsType(typ string) bool {
	return h.allowedTypes == nil || h.allowedTypes[typ]
}

// answerIgnored acknowledges a delivery of a type outside the allowlist with
// 200: nothing is forwarded and nothing is remembered, so a later change of
// the allowlist lets a replay of it through.
func (h *Handler) answerIgnored(w http.ResponseWriter, ev event, kid, deliveryID string) error {
	countRequest("ignored")
	h.logger.Info("event type not in the events allowlist; acknowledged, not forwarded",
		zap.String("event_id", ev.ID), zap.String("event_type", ev.Type),
		zap.String("kid", kid), zap.String("delivery_id", deliveryID))
	body, err := json.Marshal(struct {
		Status  string `json:"status"`
		EventID string `json:"event_id"`
	}{"ignored", ev.ID})
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)+1))
	w.Header().Set(HeaderIgnored, "true")
	w.Header().Set(HeaderEventID, ev.ID)
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(append(body, '\n'))
	return nil
}
