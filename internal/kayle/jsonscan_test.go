package kayle

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
)

var jsonSeeds = []string{
	`{}`, `[]`, `""`, `0`, `-0`, `1.5e+10`, `-1.0E-2`, `true`, `false`, `null`,
	` {"a" : [1, 2, {"b": null}] } `, `{"type":"x","metadata":{"event_id":"e"}}`,
	`{"type":"a","type":"b"}`, `{"typ\u0065":"escaped key"}`, `{"TYPE":"case"}`,
	`{"type":"a","TYPE":"b"}`, `{"Metadata":{},"metadata":{}}`, `{"type":"a","\u0054ype":"b"}`,
	"{\"type\":\"a\",\"\u017fype\":\"b\"}", `{"ty_pe":"a","type":"b"}`, `{"data":{"TYPE":"nested"},"type":"a"}`,
	`"\u00e9\n\t\"\\\/"`, "\"\xff\xfe invalid utf-8\"", `"\ud800"`,
	// invalid
	``, ` `, `{`, `}`, `{"a"}`, `{"a":}`, `{"a":1,}`, `[1,]`, `[1 2]`, `{a:1}`, `'a'`,
	`01`, `1.`, `.5`, `-`, `+1`, `1e`, `1e+`, `0x10`, `NaN`, `tru`, `nulll`, `"a`, `"\x"`,
	`"\u12"`, `"\u12G4"`, "\"a\x01b\"", `{} {}`, `[] x`, `{"a":1}}`, `{"a" 1}`, "{\"a\":1}\x00",
}

func TestScanJSONMatchesEncodingJSON(t *testing.T) {
	for _, s := range jsonSeeds {
		checkScanJSON(t, []byte(s))
	}
	for _, depth := range []int{maxJSONDepth - 1, maxJSONDepth, maxJSONDepth + 1} {
		checkScanJSON(t, []byte(strings.Repeat("[", depth)+strings.Repeat("]", depth)))
		checkScanJSON(t, []byte(`{"type":`+strings.Repeat(`{"a":`, depth-1)+"1"+strings.Repeat("}", depth)))
	}
	files, _ := filepath.Glob(filepath.Join(kayletest.VectorsDir, "bodies/*.json"))
	if len(files) == 0 {
		t.Fatal("no plaintext vectors")
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		checkScanJSON(t, data)
	}
}

// checkScanJSON compares scanJSON with encoding/json: the same verdict on
// validity, and for an object the same raw value of "type" and "metadata"
// (encoding/json's map decoding also compares keys exactly, last one wins),
// which is also what a struct decoding reads (case-insensitively) unless
// scanJSON calls the name ambiguous.
func checkScanJSON(t *testing.T, data []byte) {
	t.Helper()
	found := make([]member, 2)
	err := scanJSON(data, []string{"type", "metadata"}, found)
	if valid := json.Valid(data); valid != (err == nil) {
		t.Fatalf("%q: encoding/json says valid=%v, scanJSON says %v", data, valid, err)
	}
	if err != nil {
		return
	}
	var members map[string]json.RawMessage
	if json.Unmarshal(data, &members) != nil {
		if found[0].value != nil || found[1].value != nil {
			t.Fatalf("%q: members found in a non-object", data)
		}
		return
	}
	for i, name := range []string{"type", "metadata"} {
		if want := members[name]; !bytes.Equal(found[i].value, want) {
			t.Fatalf("%q: member %s = %q, encoding/json has %q", data, name, found[i].value, want)
		}
	}
	var st struct {
		Type     json.RawMessage `json:"type"`
		Metadata json.RawMessage `json:"metadata"`
	}
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatalf("%q: a struct decoding fails: %v", data, err)
	}
	for i, got := range []json.RawMessage{st.Type, st.Metadata} {
		if !found[i].ambiguous && !bytes.Equal(found[i].value, got) {
			t.Fatalf("%q: member %d = %q, not ambiguous, but a struct decoding reads %q", data, i, found[i].value, got)
		}
	}
}

// FuzzScanJSON checks scanJSON against encoding/json on arbitrary input.
func FuzzScanJSON(f *testing.F) {
	for _, s := range jsonSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		checkScanJSON(t, data)
	})
}

func TestFoldEqual(t *testing.T) {
	for _, c := range []struct {
		key, name string
		want      bool
	}{
		{"type", "type", true},
		{"TYPE", "type", true},
		{"tyPe", "type", true},
		{"ty_pe", "type", true},
		{"-type-", "type", true},
		{"typ", "type", false},
		{"types", "type", false},
		{"tipe", "type", false},
		{"", "type", false},
		{"eventId", "event_id", true},
		{"EVENTID", "event_id", true},
		{"event__id", "event_id", true},
		{"event_id_", "event_id", true},
		{"event_ids", "event_id", false},
		{"verification_\u017fession_id", "verification_session_id", true}, // ſ folds to s
		{"\u212aey", "key", true}, // KELVIN SIGN folds to k
		{"verification_attempt_id", "verification_session_id", false},
		{"type\xff", "type", false},
		{"t\u0131pe", "tipe", false}, // dotless ı has no simple fold to i
	} {
		if got := foldEqual([]byte(c.key), c.name); got != c.want {
			t.Errorf("foldEqual(%q, %q) = %v, want %v", c.key, c.name, got, c.want)
		}
	}
}
