package caddytest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// A genuine delivery reaches the backend as the plaintext JSON with trusted
// headers taken from the decrypted payload; spoofed X-Kayle-* headers do not.
func TestGenuineDeliveryReachesBackendAsPlaintext(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	gw.proxyExtra = "\t\theader_up X-Seen-Event {http.kayle.event_id}\n"
	h.load(gw.caddyfile())

	ev := newEvent(t, nil)
	signedAt := time.Now()
	req := deliveryRequest(t, gw.url(), encrypt(t, ev.payload), demo.Secret, signedAt, ev.typ)
	deliveryID := req.Header.Get(kayle.HeaderDeliveryID)
	// forged by whoever sits between Kayle and the gateway: not signed
	spoofed := map[string]string{
		kayle.HeaderEventID:            "evt_spoofed",
		kayle.HeaderEventType:          "verification.session.failed",
		kayle.HeaderEvent:              "verification.session.failed",
		kayle.HeaderSessionID:          "vs_spoofed",
		kayle.HeaderContractVersion:    "99",
		kayle.HeaderKeyID:              "spoofed",
		kayle.HeaderSignatureTimestamp: "1",
		kayle.HeaderVerified:           "spoofed",
		kayle.HeaderDuplicate:          "true",
		"X-Kayle-Anything-Else":        "spoofed",
	}
	for name, value := range spoofed {
		req.Header.Set(name, value)
	}

	resp, body := h.expect(req, http.StatusOK)
	if string(body) != `{"received":true}` {
		t.Errorf("Kayle got body %q, want the backend's answer", body)
	}
	if got := resp.Header.Get(kayle.HeaderDuplicate); got != "" {
		t.Errorf("first delivery answered with %s: %q", kayle.HeaderDuplicate, got)
	}

	reqs := be.requests()
	if len(reqs) != 1 {
		t.Fatalf("backend got %d requests, want 1", len(reqs))
	}
	got := reqs[0]
	if got.Method != http.MethodPost {
		t.Errorf("backend got method %s, want POST", got.Method)
	}
	if !bytes.Equal(got.Body, ev.payload) {
		t.Errorf("backend body differs from the plaintext:\n got %q\nwant %q", truncate(got.Body), truncate(ev.payload))
	}
	if got.ContentLength != int64(len(ev.payload)) {
		t.Errorf("backend ContentLength %d, want %d", got.ContentLength, len(ev.payload))
	}
	if len(got.TransferEncoding) != 0 {
		t.Errorf("backend got Transfer-Encoding %v, want a plain Content-Length body", got.TransferEncoding)
	}
	want := map[string]string{
		"Content-Type":                 "application/json",
		"Content-Length":               strconv.Itoa(len(ev.payload)),
		kayle.HeaderEventID:            ev.id,
		kayle.HeaderEventType:          ev.typ,
		kayle.HeaderEvent:              ev.typ,
		kayle.HeaderSessionID:          sessionID(t, ev),
		kayle.HeaderContractVersion:    "1",
		kayle.HeaderKeyID:              demoKID,
		kayle.HeaderSignatureTimestamp: strconv.FormatInt(signedAt.Unix(), 10),
		kayle.HeaderVerified:           "true",
		kayle.HeaderDeliveryID:         deliveryID,
		"X-Seen-Event":                 ev.id,
	}
	for name, value := range want {
		if vs := got.Header.Values(name); len(vs) != 1 || vs[0] != value {
			t.Errorf("backend header %s = %q, want exactly %q", name, vs, value)
		}
	}
	for _, name := range []string{kayle.SignatureHeader, kayle.HeaderDuplicate, "X-Kayle-Anything-Else"} {
		if vs := got.Header.Values(name); len(vs) != 0 {
			t.Errorf("backend got header %s %q, want none", name, vs)
		}
	}
}

// sessionID is the verification_session_id inside ev's payload.
func sessionID(t testing.TB, ev event) string {
	t.Helper()
	const key = `"verification_session_id":"`
	s := string(ev.payload)
	i := strings.Index(s, key)
	if i < 0 {
		t.Fatalf("payload has no session id: %s", s)
	}
	s = s[i+len(key):]
	return s[:strings.IndexByte(s, '"')]
}

// A delivery whose signature does not hold, or holds but is stale, gets 400
// and nothing reaches the backend; the refusals leave no trace, so the
// genuine delivery of the same event is forwarded afterwards.
func TestForgedAndStaleDeliveriesAreRefused(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())

	ev := newEvent(t, nil)
	now := time.Now()
	cases := []struct {
		name string
		req  func() *http.Request
	}{
		{"signed with another secret", func() *http.Request {
			return deliveryRequest(t, gw.url(), encrypt(t, ev.payload), []byte("whsec_forged_by_someone_who_guessed_0000"), now, ev.typ)
		}},
		{"body changed after signing", func() *http.Request {
			body := encrypt(t, ev.payload)
			req := deliveryRequest(t, gw.url(), body, demo.Secret, now, ev.typ)
			// change the first character of the ciphertext (the fourth part)
			tampered := bytes.Clone(body)
			i := bytes.LastIndexByte(tampered[:bytes.LastIndexByte(tampered, '.')], '.') + 1
			if tampered[i] == 'A' {
				tampered[i] = 'B'
			} else {
				tampered[i] = 'A'
			}
			req.Body = io.NopCloser(bytes.NewReader(tampered))
			return req
		}},
		{"no signature header", func() *http.Request {
			return deliveryRequest(t, gw.url(), encrypt(t, ev.payload), nil, now, ev.typ)
		}},
		{"signature over another body", func() *http.Request {
			req := deliveryRequest(t, gw.url(), encrypt(t, ev.payload), demo.Secret, now, ev.typ)
			other := encrypt(t, ev.payload)
			req.Header.Set(kayle.SignatureHeader, kayle.SignatureHeaderValue(demo.Secret, now, other))
			return req
		}},
		{"genuine but signed 10 minutes ago", func() *http.Request {
			return deliveryRequest(t, gw.url(), encrypt(t, ev.payload), demo.Secret, now.Add(-10*time.Minute), ev.typ)
		}},
		{"genuine but signed 10 minutes ahead", func() *http.Request {
			return deliveryRequest(t, gw.url(), encrypt(t, ev.payload), demo.Secret, now.Add(10*time.Minute), ev.typ)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h.sub(t).expect(tc.req(), http.StatusBadRequest)
			if n := be.total(); n != 0 {
				t.Fatalf("backend got %d requests, want none", n)
			}
		})
	}

	h.expect(deliver(t, gw.url(), ev), http.StatusOK)
	if n := be.count(ev.id); n != 1 {
		t.Errorf("backend got the genuine delivery %d times after the forgeries, want 1", n)
	}
}

// The default max_body_size (4 MiB) refuses a 5 MiB body with 413, whether
// its length is declared or it is chunked, and a body just under the limit
// goes through intact. Methods other than POST get 405.
func TestBodyLimitAndMethod(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())

	const limit = 4 << 20
	// a claim holding a large image, as Kayle's claims may: the JWE grows
	// by a third through base64url
	big := newEvent(t, map[string]any{"portrait": strings.Repeat("A", (5<<20)*3/4+4096)})
	bigBody := encrypt(t, big.payload)
	if len(bigBody) < 5<<20 {
		t.Fatalf("test body is %d bytes, want at least 5 MiB", len(bigBody))
	}

	t.Run("5 MiB with Content-Length", func(t *testing.T) {
		req := deliveryRequest(t, gw.url(), bigBody, demo.Secret, time.Now(), big.typ)
		h.sub(t).expect(req, http.StatusRequestEntityTooLarge)
	})
	t.Run("5 MiB chunked", func(t *testing.T) {
		req := deliveryRequest(t, gw.url(), bigBody, demo.Secret, time.Now(), big.typ)
		req.ContentLength = -1 // unknown length: sent chunked
		req.Body = io.NopCloser(bytes.NewReader(bigBody))
		// not reused afterwards: what becomes of the connection is
		// TestOversizedChunkedBodyEndsTheConnection's business
		req.Close = true
		h.sub(t).expect(req, http.StatusRequestEntityTooLarge)
	})
	if n := be.total(); n != 0 {
		t.Fatalf("backend got %d requests for oversized bodies, want none", n)
	}

	t.Run("GET", func(t *testing.T) {
		req, err := http.NewRequest(http.MethodGet, gw.url(), nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, _ := h.sub(t).expect(req, http.StatusMethodNotAllowed)
		if got := resp.Header.Get("Allow"); got != http.MethodPost {
			t.Errorf("Allow: %q, want POST", got)
		}
	})
	if n := be.total(); n != 0 {
		t.Fatalf("backend got %d requests, want none", n)
	}

	t.Run("just under the limit", func(t *testing.T) {
		ev := newEvent(t, map[string]any{"portrait": strings.Repeat("B", limit*3/4-8192)})
		body := encrypt(t, ev.payload)
		if len(body) >= limit || len(body) < limit-64<<10 {
			t.Fatalf("test body is %d bytes, want just under %d", len(body), limit)
		}
		h.sub(t).expect(deliveryRequest(t, gw.url(), body, demo.Secret, time.Now(), ev.typ), http.StatusOK)
		reqs := be.requests()
		if len(reqs) != 1 || !bytes.Equal(reqs[0].Body, ev.payload) {
			t.Fatalf("backend got %d requests; want one with the %d-byte plaintext", len(reqs), len(ev.payload))
		}
	})
}

// After refusing a chunked body over max_body_size with 413, the gateway
// must not read what is left of that body as further requests: it closes the
// connection (or skips to the body's end). Otherwise bytes chosen by the
// sender are parsed as a request of their own, which a proxy in front that
// reuses connections turns into request smuggling. The same holds for a
// request refused with 400 for its signature header before its body is read.
func TestOversizedChunkedBodyEndsTheConnection(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	h.load(gw.caddyfile())

	// well-formed, so the body is read (and found too large) before the MAC is checked
	signed := "X-Kayle-Signature: t=" + strconv.FormatInt(time.Now().Unix(), 10) + ",v1=" + strings.Repeat("0", 64) + "\r\n"
	for name, c := range map[string]struct {
		signature string
		status    int
	}{
		"413 for the body":             {signed, http.StatusRequestEntityTooLarge},
		"400 for the signature header": {"", http.StatusBadRequest},
	} {
		t.Run(name, func(t *testing.T) { expectNoRequestAfterRefusal(t, gw, c.signature, c.status) })
	}
	if n := be.total(); n != 0 {
		t.Errorf("backend got %d requests, want none", n)
	}
}

func expectNoRequestAfterRefusal(t *testing.T, gw gateway, signatureLine string, status int) {
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", gw.port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	host := fmt.Sprintf("127.0.0.1:%d", gw.port)
	written := make(chan error, 1)
	go func() {
		// a 5 MiB chunked POST, then a pipelined GET on the same connection
		w := bufio.NewWriter(conn)
		fmt.Fprintf(w, "POST /kayle/webhook HTTP/1.1\r\nHost: %s\r\nContent-Type: application/jose\r\n%sTransfer-Encoding: chunked\r\n\r\n", host, signatureLine)
		chunk := strings.Repeat("A", 64<<10)
		for range 80 {
			fmt.Fprintf(w, "%x\r\n%s\r\n", len(chunk), chunk)
		}
		fmt.Fprintf(w, "0\r\n\r\nGET /kayle/webhook HTTP/1.1\r\nHost: %s\r\n\r\n", host)
		written <- w.Flush() // fails once the server closed the connection: fine
	}()

	r := bufio.NewReader(conn)
	first, err := http.ReadResponse(r, nil)
	if err != nil {
		t.Fatalf("reading the answer to the refused POST: %v", err)
	}
	first.Body.Close()
	if first.StatusCode != status {
		t.Fatalf("refused chunked POST: status %d, want %d", first.StatusCode, status)
	}
	second, err := http.ReadResponse(r, nil)
	switch {
	case err != nil:
		// the connection ended after the refusal: nothing more was parsed
	case second.StatusCode == http.StatusMethodNotAllowed:
		// the rest of the body was skipped; the pipelined GET got its answer
		second.Body.Close()
	default:
		second.Body.Close()
		t.Errorf("after the %d (Connection: %q) the server answered %d on the same connection: "+
			"it parsed the rest of the refused body as a new request", status, first.Header.Get("Connection"), second.StatusCode)
	}
	conn.Close()
	<-written
}
