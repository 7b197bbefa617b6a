package kaylewebhook

import (
	"errors"
)

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
