package kaylewebhook

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// TestReadBodyDoesNotTrustContentLength: a declared length preallocates
// nothing large before the bytes arrive (an unauthenticated client could
// otherwise pin max_body_size per connection by sending nothing).
func TestReadBodyDoesNotTrustContentLength(t *testing.T) {
	const declared = 4 << 20
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 20 {
		r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader("tiny"))
		r.ContentLength = declared
		body, err := readBody(httptest.NewRecorder(), r, declared)
		if err != nil || string(body) != "tiny" {
			t.Fatalf("%q %v", body, err)
		}
	}
	runtime.ReadMemStats(&after)
	if allocated := after.TotalAlloc - before.TotalAlloc; allocated > declared {
		t.Errorf("20 tiny bodies declaring 4 MiB allocated %d bytes", allocated)
	}
}

// BenchmarkReadBody reads a delivery's body as net/http hands it over, with
// its Content-Length: Kayle's ordinary size, a face-image event, and the
// 1 MiB payload of the memory test.
func BenchmarkReadBody(b *testing.B) {
	for _, size := range []int{1000, 270_000, 1_400_000} {
		sent := bytes.Repeat([]byte("k"), size)
		b.Run(strconv.Itoa(size), func(b *testing.B) {
			b.SetBytes(int64(size))
			b.ReportAllocs()
			for b.Loop() {
				r := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(sent))
				if _, err := readBody(httptest.NewRecorder(), r, defaultMaxBodySize); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

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
