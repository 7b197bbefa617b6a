package kaylewebhook

import (
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// serveRefusedPayload sends payload as one genuine delivery (signed with the
// demo secret, encrypted to the demo key) and checks that the gateway
// refuses it with a 422 HandlerError, forwards nothing, and quotes none of
// the plaintext's values in its error or its log. It returns the error.
func serveRefusedPayload(t *testing.T, name string, payload []byte, plaintextValues ...string) error {
	t.Helper()
	h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled, h.StorageRaw = true, nil })
	core, logs := observer.New(zapcore.DebugLevel)
	h.setLogger(zap.New(core))
	backend := &testBackend{}
	res := serve(h, makeDelivery(t, payload, time.Now()), backend)
	if backend.Calls() != 0 {
		t.Errorf("%s: forwarded (status %d)", name, res.Status)
	}
	he, ok := errors.AsType[caddyhttp.HandlerError](res.Err)
	if !ok || he.StatusCode != http.StatusUnprocessableEntity {
		t.Errorf("%s: status %d, error %v; want a 422 caddyhttp.HandlerError", name, res.Status, res.Err)
		return res.Err
	}
	logged := ""
	for _, e := range logs.All() {
		logged += e.Message
		for k, v := range e.ContextMap() {
			logged += " " + k + "=" + strings.TrimSpace(strings.ReplaceAll(fmtAny(v), "\n", " "))
		}
	}
	for _, v := range plaintextValues {
		if strings.Contains(res.Err.Error(), v) || strings.Contains(logged, v) {
			t.Errorf("%s: the error or the log quotes the plaintext (%q): %v | %s", name, v, res.Err, logged)
		}
	}
	return res.Err
}

func fmtAny(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(b)
}

// backendView decodes a payload as a Go backend would, into a struct:
// encoding/json matches member names case-insensitively, the last one wins.
type backendView struct {
	Type     string `json:"type"`
	Metadata struct {
		EventID         string `json:"event_id"`
		SessionID       string `json:"verification_session_id"`
		ContractVersion int    `json:"contract_version"`
	} `json:"metadata"`
}

// TestAmbiguousPayloadFieldIsRefused: a signed payload in which type,
// metadata or one of the metadata ids the gateway reads has a sibling whose
// name differs only in letter case (or '_' / '-', or repeats exactly) is
// refused with 422. Forwarded, the gateway would deduplicate, filter and
// set headers on one value while a backend decoding into a struct reads
// the other: one event delivered as another, or twice.
func TestAmbiguousPayloadFieldIsRefused(t *testing.T) {
	const meta = `"metadata":{"contract_version":1,"event_id":"evt_gateway","verification_session_id":"vs_gateway"}`
	cases := map[string]string{
		"TYPE after type":         `{"type":"verification.session.failed","TYPE":"verification.session.succeeded",` + meta + `}`,
		"Type before type":        `{"Type":"verification.session.succeeded","type":"verification.session.failed",` + meta + `}`,
		"TYPE alone":              `{"TYPE":"verification.session.succeeded",` + meta + `}`,
		"type repeated":           `{"type":"verification.session.failed","type":"verification.session.succeeded",` + meta + `}`,
		"escaped \\u0054ype":      `{"type":"verification.session.failed","\u0054ype":"verification.session.succeeded",` + meta + `}`,
		"Metadata after metadata": `{"type":"verification.session.failed",` + meta + `,"Metadata":{"event_id":"evt_backend"}}`,
		"METADATA alone":          `{"type":"x","METADATA":{"event_id":"evt_backend"}}`,
		"EVENT_ID after event_id": `{"type":"x","metadata":{"event_id":"evt_gateway","EVENT_ID":"evt_backend"}}`,
		"Event_Id before":         `{"type":"x","metadata":{"Event_Id":"evt_backend","event_id":"evt_gateway"}}`,
		"event_id repeated":       `{"type":"x","metadata":{"event_id":"evt_gateway","event_id":"evt_backend"}}`,
		"eventId (json/v2)":       `{"type":"x","metadata":{"event_id":"evt_gateway","eventId":"evt_backend"}}`,
		"event-id (json/v2)":      `{"type":"x","metadata":{"event_id":"evt_gateway","event-id":"evt_backend"}}`,
		"session id, long s":      `{"type":"x","metadata":{"event_id":"evt_gateway","verification_session_id":"vs_gateway","verification_` + "\u017f" + `ession_id":"vs_backend"}}`,
		"Contract_Version":        `{"type":"x","metadata":{"event_id":"evt_gateway","contract_version":1,"Contract_Version":2}}`,
	}
	// the cases in which encoding/json (v1) reads another value than the
	// gateway; in the others json/v2's case-insensitive matching (which
	// ignores '_' and '-') or a first-wins decoder (gjson) does
	v1Attacks := []string{"TYPE after type", "TYPE alone", "escaped \\u0054ype", "Metadata after metadata", "METADATA alone",
		"EVENT_ID after event_id", "session id, long s", "Contract_Version"}
	for name, payload := range cases {
		if slices.Contains(v1Attacks, name) {
			var v backendView
			if err := json.Unmarshal([]byte(payload), &v); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if v.Type != "verification.session.succeeded" && v.Metadata.EventID != "evt_backend" &&
				v.Metadata.SessionID != "vs_backend" && v.Metadata.ContractVersion != 2 {
				t.Fatalf("%s: the test case is no attack: a Go backend reads %+v", name, v)
			}
		}
		err := serveRefusedPayload(t, name, []byte(payload), "evt_backend", "vs_backend", "verification.session.succeeded", "TYPE", "Metadata", "EVENT_ID", "eventId")
		if err != nil && !strings.Contains(err.Error(), "ambiguous") {
			t.Errorf("%s: %v, want it called ambiguous", name, err)
		}
	}
}

// TestPayloadCaseVariantsElsewhereAreForwarded: only the levels the gateway
// reads are checked; a claim or a member of data may be named anything.
func TestPayloadCaseVariantsElsewhereAreForwarded(t *testing.T) {
	h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled, h.StorageRaw = true, nil })
	payload := `{"type":"verification.session.succeeded","metadata":{"contract_version":1,"event_id":"evt_nested",` +
		`"verification_session_id":"vs_1","verification_attempt_id":"va_1","Data":{"EVENT_ID":"x"}},` +
		`"data":{"TYPE":"claim","type":"claim","claims":{"Metadata":{"event_id":"y","EVENT_ID":"z"}}}}`
	backend := &testBackend{}
	res := serve(h, makeDelivery(t, []byte(payload), time.Now()), backend)
	if res.Status != http.StatusOK || backend.Calls() != 1 {
		t.Fatalf("status %d, %d forwards, %v", res.Status, backend.Calls(), res.Err)
	}
	if got := backend.Request(0).Header.Get(kayle.HeaderEventID); got != "evt_nested" {
		t.Errorf("event id %q", got)
	}
}

// TestContractVersionMustBeASmallInteger: metadata.contract_version is
// forwarded only as an integer from 1 to 1000. 1e309 is valid JSON that a Go
// backend cannot decode into an int and that JavaScript reads as Infinity:
// forwarded, the backend fails on every one of Kayle's retries.
func TestContractVersionMustBeASmallInteger(t *testing.T) {
	var v backendView
	if json.Unmarshal([]byte(`{"metadata":{"contract_version":1e309}}`), &v) == nil {
		t.Fatal("the test's premise: a Go backend decodes 1e309 into an int")
	}
	for _, version := range []string{"1e309", "-1e309", "1.0", "1e0", "1.5", "0", "-0", "-1", "1001", "1000000", "99999999999999999999", `"1"`, "true", "[1]", "{}"} {
		payload := `{"type":"verification.session.succeeded","metadata":{"contract_version":` + version + `,"event_id":"evt_cv"}}`
		var quoted []string
		if len(version) > 4 {
			quoted = append(quoted, version)
		}
		err := serveRefusedPayload(t, "contract_version "+version, []byte(payload), quoted...)
		if err != nil && !strings.Contains(err.Error(), "metadata.contract_version") {
			t.Errorf("contract_version %s: %v, want it named", version, err)
		}
	}

	h := newTestHandler(t, func(h *Handler) { h.DedupeDisabled, h.StorageRaw = true, nil })
	for version, header := range map[string]string{"1": "1", "2": "2", "1000": "1000", "null": "", "": ""} {
		member := ""
		if version != "" {
			member = `"contract_version":` + version + `,`
		}
		payload := `{"type":"verification.session.succeeded","metadata":{` + member + `"event_id":"evt_cv_` + version + `"}}`
		backend := &testBackend{}
		res := serve(h, makeDelivery(t, []byte(payload), time.Now()), backend)
		if res.Status != http.StatusOK || backend.Calls() != 1 {
			t.Errorf("contract_version %q: status %d, %d forwards, %v", version, res.Status, backend.Calls(), res.Err)
			continue
		}
		if got := backend.Request(0).Header.Get(kayle.HeaderContractVersion); got != header {
			t.Errorf("contract_version %q: %s %q, want %q", version, kayle.HeaderContractVersion, got, header)
		}
	}
}
