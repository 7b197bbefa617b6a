package kaylewebhook

import (
	"errors"
	"net/http"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
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
func (h *Handler) answerIgnored(w http.ResponseWriter, ev kayle.Event, kid, deliveryID string) error {
	countRequest("ignored")
	h.logger.Info("event type not in the events allowlist; acknowledged, not forwarded",
		zap.String("event_id", ev.ID), zap.String("event_type", ev.Type),
		zap.String("kid", kid), zap.String("delivery_id", deliveryID))
	return acknowledge(w, HeaderIgnored, "ignored", ev.ID)
}
