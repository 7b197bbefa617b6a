package kaylewebhook

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestReadBodyEndsAtItsSize: whatever its size, a body declared with its
// Content-Length is read whole into a buffer of that size (plus the byte
// that sees EOF), not into one doubled past it; one sent chunked is read
// whole too.
func TestReadBodyEndsAtItsSize(t *testing.T) {
	const limit = 4 << 20
	for _, size := range []int{0, 1, 600, initialBodyBuffer, initialBodyBuffer + 1, 1_400_000, limit} {
		sent := bytes.Repeat([]byte("k"), size)
		for _, declared := range []bool{true, false} {
			r := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(sent))
			if !declared {
				r.ContentLength = -1
			}
			body, err := readBody(httptest.NewRecorder(), r, limit)
			if err != nil || !bytes.Equal(body, sent) {
				t.Fatalf("size %d, declared %v: read %d bytes, %v", size, declared, len(body), err)
			}
			if declared && cap(body) > size+1 {
				t.Errorf("size %d: buffer of %d bytes", size, cap(body))
			}
		}
	}
}

// TestReadBodyLimit: a body over the limit is refused with MaxBytesError
// (the 413) whether it declares its length, hides it (chunked), or sends
// more than it declared.
func TestReadBodyLimit(t *testing.T) {
	const limit = 100_000
	over := bytes.Repeat([]byte("k"), limit+1)
	for name, declare := range map[string]int64{"declared": limit + 1, "chunked": -1, "lying": 10} {
		r := httptest.NewRequest(http.MethodPost, "/", nil)
		r.Body = io.NopCloser(bytes.NewReader(over))
		r.ContentLength = declare
		_, err := readBody(httptest.NewRecorder(), r, limit)
		if _, ok := errors.AsType[*http.MaxBytesError](err); !ok {
			t.Errorf("%s: %v, want a MaxBytesError", name, err)
		}
	}
	// exactly at the limit is fine, declared or not
	for _, declare := range []int64{limit, -1} {
		r := httptest.NewRequest(http.MethodPost, "/", nil)
		r.Body = io.NopCloser(bytes.NewReader(over[:limit]))
		r.ContentLength = declare
		if body, err := readBody(httptest.NewRecorder(), r, limit); err != nil || len(body) != limit {
			t.Errorf("declared %d: %d bytes, %v", declare, len(body), err)
		}
	}
}

// TestReadBodyLongerThanDeclared: a reader that yields more than its
// Content-Length (net/http never does) is still read to its end, bounded
// by the limit only.
func TestReadBodyLongerThanDeclared(t *testing.T) {
	sent := bytes.Repeat([]byte("k"), 300_000)
	r := httptest.NewRequest(http.MethodPost, "/", nil)
	r.Body = io.NopCloser(bytes.NewReader(sent))
	r.ContentLength = 1000
	body, err := readBody(httptest.NewRecorder(), r, 1<<20)
	if err != nil || !bytes.Equal(body, sent) {
		t.Fatalf("read %d bytes, %v", len(body), err)
	}
}
