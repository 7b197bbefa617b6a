package kayle

import (
	"bytes"
	"encoding/json"
	"errors"
	"strconv"
)

// MaxIDLen bounds the ids copied into headers, placeholders and logs.
const MaxIDLen = 256

var (
	errPayloadNotJSON  = errors.New("decrypted payload is not a JSON object")
	errNoEventID       = errors.New("decrypted payload has no metadata.event_id string")
	errContractVersion = errors.New("decrypted payload field metadata.contract_version is not an integer from 1 to " + strconv.Itoa(maxContractVersion))
)

// Event is what the gateway reads from a decrypted payload: ids only. The
// rest of the plaintext is passed to the backend untouched and never kept.
type Event struct {
	ID              string
	Type            string
	SessionID       string
	ContractVersion string
}

// maxContractVersion bounds metadata.contract_version. Kayle's contract
// is at version 1; a backend reads the number into an int, and 1e309 or
// 1.5 would make it fail (or, in JavaScript, read Infinity) on every retry.
const maxContractVersion = 1000

// The members parseEvent reads: of the payload, and of its metadata.
var (
	topNames      = [...]string{"type", "metadata"}
	metadataNames = [...]string{"event_id", "verification_session_id", "contract_version"}
)

// ParseEvent validates a decrypted payload as JSON and reads its ids. Its
// errors never quote the plaintext (encoding/json's would).
//
// A field it reads must be unambiguous: a backend decoding the body into a
// struct matches member names case-insensitively, the last one winning, so
// a "TYPE" beside "type" (or an "EVENT_ID", "eventId", a repeated
// "event_id") would have it read another event than the one the gateway
// deduplicated and filtered on.
func ParseEvent(plaintext []byte) (Event, error) {
	if trimmed := bytes.TrimLeft(plaintext, " \t\r\n"); len(trimmed) == 0 || trimmed[0] != '{' {
		return Event{}, errPayloadNotJSON
	}
	var top [2]member
	if err := scanJSON(plaintext, topNames[:], top[:]); err != nil {
		return Event{}, errPayloadNotJSON
	}
	if top[0].ambiguous {
		return Event{}, errAmbiguous("type")
	}
	if top[1].ambiguous {
		return Event{}, errAmbiguous("metadata")
	}
	var ev Event
	if err := optionalString(top[0].value, "type", &ev.Type); err != nil {
		return Event{}, err
	}
	metadata := top[1].value
	if metadata == nil || string(metadata) == "null" {
		return Event{}, errNoEventID
	}
	if metadata[0] != '{' {
		return Event{}, errWrongType("metadata")
	}
	var meta [3]member
	if err := scanJSON(metadata, metadataNames[:], meta[:]); err != nil {
		return Event{}, errPayloadNotJSON // cannot happen: metadata was validated
	}
	for i, name := range metadataNames {
		if meta[i].ambiguous {
			return Event{}, errAmbiguous("metadata." + name)
		}
	}
	if v := meta[0].value; v == nil || string(v) == "null" {
		return Event{}, errNoEventID
	}
	if err := optionalString(meta[0].value, "metadata.event_id", &ev.ID); err != nil {
		return Event{}, err
	}
	if err := optionalString(meta[1].value, "metadata.verification_session_id", &ev.SessionID); err != nil {
		return Event{}, err
	}
	if v := meta[2].value; v != nil && string(v) != "null" {
		if v[0] != '-' && (v[0] < '0' || v[0] > '9') {
			return Event{}, errWrongType("metadata.contract_version")
		}
		if !contractVersionOK(v) {
			return Event{}, errContractVersion
		}
		ev.ContractVersion = string(v)
	}
	for _, f := range []struct{ name, value string }{
		{"metadata.event_id", ev.ID},
		{"type", ev.Type},
		{"metadata.verification_session_id", ev.SessionID},
		{"metadata.contract_version", ev.ContractVersion},
	} {
		if (f.value != "" || f.name == "metadata.event_id") && !HeaderSafe(f.value) {
			return Event{}, errUnsafeID(f.name)
		}
	}
	return ev, nil
}

// contractVersionOK reports whether a raw JSON number is an integer from 1
// to maxContractVersion written plainly: no sign, fraction, exponent or
// leading zero (1.0 and 1e0 fail a decode into an int).
func contractVersionOK(raw []byte) bool {
	if len(raw) == 0 || raw[0] < '1' || raw[0] > '9' || len(raw) > len("1000") {
		return false
	}
	n := 0
	for _, c := range raw {
		if c < '0' || c > '9' {
			return false
		}
		n = 10*n + int(c-'0')
	}
	return n <= maxContractVersion
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

// errAmbiguous names the field only, never the names or values beside it.
func errAmbiguous(field string) error {
	return errors.New("decrypted payload field " + field + " is ambiguous: it repeats, or another member's name differs from it only in letter case, '_' or '-' (a backend decoding into a struct would read that one)")
}

// errUnsafeID names the field only, never its value.
func errUnsafeID(field string) error {
	return errors.New("decrypted payload field " + field + " is empty, longer than 256 bytes, not printable ASCII, or starts or ends with a space; the backend could not receive it byte for byte")
}

// HeaderSafe reports whether s reaches the backend in a header exactly as
// the gateway deduplicated on it, and can go in a log line as is: 1 to 256
// bytes of printable ASCII (Kayle's ids are ASCII), no leading or trailing
// space (net/http trims those as it writes a header, so " evt_1" and
// "evt_1" would be two events to the dedupe but one id to the backend; a
// backend would read UTF-8 as Latin-1).
func HeaderSafe(s string) bool {
	if s == "" || len(s) > MaxIDLen || s[0] == ' ' || s[len(s)-1] == ' ' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
