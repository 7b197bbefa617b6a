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
	for _, f := range []struct{ name, value string }{
		{"metadata.event_id", ev.ID},
		{"type", ev.Type},
		{"metadata.verification_session_id", ev.SessionID},
		{"metadata.contract_version", ev.ContractVersion},
	} {
		if (f.value != "" || f.name == "metadata.event_id") && !headerSafe(f.value) {
			return event{}, errUnsafeID(f.name)
		}
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

// errUnsafeID names the field only, never its value.
func errUnsafeID(field string) error {
	return errors.New("decrypted payload field " + field + " is empty, longer than 256 bytes, not printable ASCII, or starts or ends with a space; the backend could not receive it byte for byte")
}

// headerSafe reports whether s reaches the backend in a header exactly as
// the gateway deduplicated on it, and can go in a log line as is: 1 to 256
// bytes of printable ASCII (Kayle's ids are ASCII), no leading or trailing
// space (net/http trims those as it writes a header, so " evt_1" and
// "evt_1" would be two events to the dedupe but one id to the backend; a
// backend would read UTF-8 as Latin-1).
func headerSafe(s string) bool {
	if s == "" || len(s) > maxIDLen || s[0] == ' ' || s[len(s)-1] == ' ' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
