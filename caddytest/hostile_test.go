package caddytest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
)

// TestSlowBodyIsCutAtTheReadTimeout: a client that trickles a signed
// delivery's body at a few bytes a second is cut when the server's body
// read timeout runs out, long before its body could end, and nothing
// reaches the backend.
func TestSlowBodyIsCutAtTheReadTimeout(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	gw.globalExtra = "\tservers {\n\t\ttimeouts {\n\t\t\tread_body 1s\n\t\t}\n\t}\n"
	h.load(gw.caddyfile())

	ev := newEvent(t, nil)
	body := encrypt(t, ev.payload)
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", gw.port))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "POST /kayle/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/jose\r\n"+
		"Content-Length: %d\r\n%s: %s\r\n\r\n", len(body), kayle.SignatureHeader,
		kayle.SignatureHeaderValue(demo.Secret, time.Now(), body))

	// five bytes a second: the body would take minutes
	stop := make(chan struct{})
	trickled := make(chan int, 1)
	go func() {
		sent := 0
		defer func() { trickled <- sent }()
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for sent < len(body) {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if _, err := conn.Write(body[sent : sent+1]); err != nil {
				return // the server closed the connection
			}
			sent++
		}
	}()
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	close(stop)
	sent := <-trickled
	if sent >= len(body) {
		t.Fatalf("the whole body (%d bytes) went through", sent)
	}
	// the cut shows either as an answer (the handler saw the timeout) or as
	// the connection closed under the client
	if err != nil {
		t.Logf("connection closed after %d of %d body bytes: %v", sent, len(body), err)
	} else {
		res.Body.Close()
		t.Logf("answered %d after %d of %d body bytes", res.StatusCode, sent, len(body))
		if res.StatusCode/100 == 2 {
			t.Fatalf("a body cut after %d of %d bytes was answered %d", sent, len(body), res.StatusCode)
		}
	}
	if n := be.total(); n != 0 {
		t.Errorf("backend got %d requests, want none", n)
	}
}

// TestThousandHostileRequests: random, oversized and malformed headers and
// bodies, one after another. Each gets a refusal (never a 2xx, never a
// dropped connection, which is how a panic would show), none reaches the
// backend, and the in-process Caddy's heap is back to its size before.
func TestThousandHostileRequests(t *testing.T) {
	h := newHarness(t)
	be := newBackend(t)
	gw := h.gateway(be)
	gw.kayleExtra = "\t\tmax_body_size 64KiB\n"
	h.load(gw.caddyfile())
	genuine := encrypt(t, newEvent(t, nil).payload)
	rng := rand.New(rand.NewPCG(7, 7))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.UintN(256))
		}
		return b
	}
	printable := func(n int) string {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(0x21 + rng.UintN(0x5e))
		}
		return string(b)
	}
	token := func(n int) string {
		const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
		b := make([]byte, n)
		for i := range b {
			b[i] = alphabet[rng.IntN(len(alphabet))]
		}
		return string(b)
	}
	hostile := []func() (*http.Request, error){
		func() (*http.Request, error) { // random body, random signature
			req, err := http.NewRequest(http.MethodPost, gw.url(), bytes.NewReader(random(rng.IntN(8<<10))))
			if err == nil {
				req.Header.Set(kayle.SignatureHeader, printable(rng.IntN(300)))
			}
			return req, err
		},
		func() (*http.Request, error) { // oversized, declared
			return http.NewRequest(http.MethodPost, gw.url(), bytes.NewReader(random(100<<10)))
		},
		func() (*http.Request, error) { // oversized, chunked (no declared length)
			req, err := http.NewRequest(http.MethodPost, gw.url(), io.MultiReader(bytes.NewReader(random(100<<10))))
			if err == nil {
				req.ContentLength = -1
			}
			return req, err
		},
		func() (*http.Request, error) { // the genuine body with a forged signature
			req, err := http.NewRequest(http.MethodPost, gw.url(), bytes.NewReader(genuine))
			if err == nil {
				req.Header.Set(kayle.SignatureHeader, fmt.Sprintf("t=%d,v1=%x", time.Now().Unix(), random(32)))
			}
			return req, err
		},
		func() (*http.Request, error) { // a huge signature header of many v1 values
			req, err := http.NewRequest(http.MethodPost, gw.url(), bytes.NewReader(genuine))
			if err == nil {
				req.Header.Set(kayle.SignatureHeader, fmt.Sprintf("t=%d", time.Now().Unix())+strings.Repeat(",v1="+strings.Repeat("a", 64), 400))
			}
			return req, err
		},
		func() (*http.Request, error) { // many random headers, spoofed X-Kayle-*
			req, err := http.NewRequest(http.MethodPost, gw.url(), bytes.NewReader(random(rng.IntN(1024))))
			if err == nil {
				for range 50 {
					req.Header.Add("X-"+token(1+rng.IntN(20)), printable(rng.IntN(200)))
				}
				req.Header.Set(kayle.HeaderVerified, "true")
				req.Header.Set(kayle.HeaderEventID, printable(40))
			}
			return req, err
		},
		func() (*http.Request, error) { // a method other than POST, with a body
			return http.NewRequest([]string{http.MethodGet, http.MethodPut, http.MethodDelete, "PATCH"}[rng.IntN(4)], gw.url(), bytes.NewReader(random(512)))
		},
	}

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	client := &http.Client{Timeout: 30 * time.Second}
	for i := range 1000 {
		kind := i % len(hostile)
		req, err := hostile[kind]()
		if err != nil {
			t.Fatal(err)
		}
		res, err := client.Do(req)
		if err != nil {
			t.Fatalf("request %d (kind %d): %v", i, kind, err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
		if res.StatusCode/100 == 2 || res.StatusCode >= 500 {
			t.Fatalf("request %d (kind %d): status %d", i, kind, res.StatusCode)
		}
	}
	client.CloseIdleConnections()
	if n := be.total(); n != 0 {
		t.Errorf("backend got %d requests, want none", n)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	// 1000 requests of up to 100 KB: a leak of any per-request buffer would
	// be tens of MB
	if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 8<<20 {
		t.Errorf("heap grew by %d bytes over 1000 refused requests", grew)
	}
}
