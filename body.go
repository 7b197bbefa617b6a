package kaylewebhook

import (
	"io"
	"net/http"
	"strings"
)

// initialBodyBuffer caps what a declared Content-Length preallocates.
const initialBodyBuffer = 64 << 10

// closeAfterUnreadBody ends the connection after a refusal to a client that
// waits for 100 Continue before sending its body. Otherwise net/http, which
// no longer sees its own body type under Caddy's wrappers, would read up to
// 256 KB of the body before answering, and so ask for it with a 100
// Continue that the client waits for. A client that sends its body without
// waiting is left to net/http's own handling (it reads up to 256 KB, then
// closes gracefully): closing at once would reset the connection under a
// body still arriving, and the client would lose the answer.
func closeAfterUnreadBody(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 && r.ContentLength != 0 && strings.EqualFold(r.Header.Get("Expect"), "100-continue") {
		w.Header().Set("Connection", "close")
	}
}

// readBody reads the whole body, at most limit bytes.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	if r.Body == nil {
		return nil, nil
	}
	if r.ContentLength > limit {
		return nil, &http.MaxBytesError{Limit: limit}
	}
	// Not closed here: net/http must see the unread rest of a refused body
	// and drain or drop the connection, or it would parse the rest as the
	// next request. (Caddy's wrapped writer hides MaxBytesReader's signal.)
	body := http.MaxBytesReader(w, r.Body, limit)
	// Memory grows with the bytes that arrive, never to more than three
	// times them: a client declaring 4 MiB and sending nothing pins little.
	// The buffer doubles, but jumps to the declared Content-Length once that
	// is within three times what arrived, so it ends at the body's size
	// instead of doubling past it. The spare byte lets a read see EOF, or
	// the limit passed, without growing.
	size := limit
	if r.ContentLength >= 0 {
		size = r.ContentLength
	}
	buf := make([]byte, 0, min(size, initialBodyBuffer)+1)
	for {
		if len(buf) == cap(buf) {
			if int64(len(buf)) > size {
				size = limit // longer than declared: only the limit bounds it
			}
			next := 2 * int64(len(buf))
			if size <= 3*int64(len(buf)) {
				next = size + 1
			}
			grown := make([]byte, len(buf), min(next, size+1))
			copy(grown, buf)
			buf = grown
		}
		n, err := body.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return nil, err
		}
	}
}
