package kaylewebhook

import (
	"bytes"
	"encoding/json"
	"errors"
)

// maxIDLen bounds the ids copied into headers, placeholders and logs.
const maxIDLen = 256

var (
	errPayloadNotJSON = errors.New("decrypted payload is not a JSON object")
	errNoEventID      = errors.New("decrypted payload has no metadata.event_id string")
	errBadPayloadID   = errors.New("decrypted payload has an id or type that is empty, longer than 256 bytes or not printable")
)

// event is what the gateway reads from a decrypted payload: ids only. The
// rest of the plaintext is passed to the backend untouched and never kept.
type event struct {
	ID              string
	Type            string
	SessionID       string
	ContractVersion string
}

// parseEvent validates a decrypted payload as JSON and reads its ids. Its
// errors never quote the plaintext (encoding/json's would).
func parseEvent(plaintext []byte) (event, error) {
	if trimmed := bytes.TrimLeft(plaintext, " \t\r\n"); len(trimmed) == 0 || trimmed[0] != '{' {
		return event{}, errPayloadNotJSON
	}
	top, err := scanJSON(plaintext, "type", "metadata")
	if err != nil {
		return event{}, errPayloadNotJSON
	}
	var ev event
	if err := optionalString(top[0], "type", &ev.Type); err != nil {
		return event{}, err
	}
	if top[1] == nil || string(top[1]) == "null" {
		return event{}, errNoEventID
	}
	if top[1][0] != '{' {
		return event{}, errWrongType("metadata")
	}
	meta, err := scanJSON(top[1], "event_id", "verification_session_id", "contract_version")
	if err != nil {
		return event{}, errPayloadNotJSON // cannot happen: top[1] was validated
	}
	if meta[0] == nil || string(meta[0]) == "null" {
		return event{}, errNoEventID
	}
	if err := optionalString(meta[0], "metadata.event_id", &ev.ID); err != nil {
		return event{}, err
	}
	if err := optionalString(meta[1], "metadata.verification_session_id", &ev.SessionID); err != nil {
		return event{}, err
	}
	if v := meta[2]; v != nil && string(v) != "null" {
		if v[0] != '-' && (v[0] < '0' || v[0] > '9') {
			return event{}, errWrongType("metadata.contract_version")
		}
		ev.ContractVersion = string(v)
	}
	if !headerSafe(ev.ID) || (ev.Type != "" && !headerSafe(ev.Type)) ||
		(ev.SessionID != "" && !headerSafe(ev.SessionID)) || (ev.ContractVersion != "" && !headerSafe(ev.ContractVersion)) {
		return event{}, errBadPayloadID
	}
	return ev, nil
}

// optionalString decodes a raw JSON string member into dst; absent and null
// leave dst empty.
func optionalString(raw []byte, field string, dst *string) error {
	if raw == nil || string(raw) == "null" {
		return nil
	}
	if raw[0] != '"' || jsonUnmarshalString(raw, dst) != nil {
		return errWrongType(field)
	}
	return nil
}

func jsonUnmarshalString(raw []byte, dst *string) error { return json.Unmarshal(raw, dst) }

// errWrongType names the field only, never its value.
func errWrongType(field string) error {
	return errors.New("decrypted payload field " + field + " has the wrong JSON type")
}

// headerSafe reports whether s can travel in a header and a log line as is:
// non-empty, bounded, and no control characters.
func headerSafe(s string) bool {
	if s == "" || len(s) > maxIDLen {
		return false
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == '\uFFFD' {
			return false
		}
	}
	return true
}
