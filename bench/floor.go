package main

import (
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// serveFloor is the least a Go receiver can do with a delivery: check the
// HMAC, decrypt with go-jose and read metadata.event_id. Every gateway row
// is a ratio to it.
func serveFloor(addr string, keyFiles []string) error {
	keys := map[string]*rsa.PrivateKey{}
	for _, f := range keyFiles {
		k, err := readKey(f)
		if err != nil {
			return err
		}
		keys[strings.TrimSuffix(baseName(f), ".pem")] = k
	}
	secret := []byte(benchSecret)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 4<<20))
		if err != nil || !validSignature(r.Header.Get("X-Kayle-Signature"), body, secret) {
			http.Error(w, "bad signature", http.StatusBadRequest)
			return
		}
		obj, err := jose.ParseEncryptedCompact(string(body), []jose.KeyAlgorithm{jose.RSA_OAEP_256},
			[]jose.ContentEncryption{jose.A128GCM, jose.A192GCM, jose.A256GCM})
		if err != nil {
			http.Error(w, "not a JWE", http.StatusUnprocessableEntity)
			return
		}
		key, ok := keys[obj.Header.KeyID]
		if !ok {
			http.Error(w, "unknown kid", http.StatusInternalServerError)
			return
		}
		plaintext, err := obj.Decrypt(key)
		if err != nil {
			http.Error(w, "decrypt", http.StatusUnprocessableEntity)
			return
		}
		var ev struct {
			Metadata struct {
				EventID string `json:"event_id"`
			} `json:"metadata"`
		}
		if json.Unmarshal(plaintext, &ev) != nil || ev.Metadata.EventID == "" {
			http.Error(w, "payload", http.StatusUnprocessableEntity)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return (&http.Server{Addr: addr, Handler: handler, ReadHeaderTimeout: 10 * time.Second}).ListenAndServe()
}

func validSignature(header string, body, secret []byte) bool {
	var ts string
	var sigs [][]byte
	for part := range strings.SplitSeq(header, ",") {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			if b, err := hex.DecodeString(v); err == nil {
				sigs = append(sigs, b)
			}
		}
	}
	t, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || time.Since(time.Unix(t, 0)).Abs() > 5*time.Minute {
		return false
	}
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	want := mac.Sum(nil)
	for _, s := range sigs {
		if hmac.Equal(s, want) {
			return true
		}
	}
	return false
}

// backendTakePath is where the backend hands the harness its receipts.
const backendTakePath = "/_bench/take"

// serveBackend is the trivial backend behind reverse_proxy: it reads the
// plaintext and answers 204. It notes each event it receives (the
// gateway's X-Kayle-Event-Id) and when, and GET backendTakePath hands the
// notes over ("<event id> <unix ns>" lines) and forgets them: the harness
// checks that every event arrived once, and how long after it was sent.
func serveBackend(addr string) error {
	var mu sync.Mutex
	var notes []byte
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == backendTakePath {
			mu.Lock()
			out := notes
			notes = make([]byte, 0, max(4096, len(out)))
			mu.Unlock()
			w.Header().Set("Content-Type", "text/plain")
			_, _ = w.Write(out)
			return
		}
		_, _ = io.Copy(io.Discard, r.Body)
		at := time.Now().UnixNano()
		if id := r.Header.Get("X-Kayle-Event-Id"); id != "" {
			mu.Lock()
			notes = append(notes, id...)
			notes = append(notes, ' ')
			notes = strconv.AppendInt(notes, at, 10)
			notes = append(notes, '\n')
			mu.Unlock()
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return (&http.Server{Addr: addr, Handler: handler, ReadHeaderTimeout: 10 * time.Second}).ListenAndServe()
}

func readKey(file string) (*rsa.PrivateKey, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New(file + ": not PEM")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		return nil, errors.New(file + ": not RSA")
	}
	return rk, nil
}

func baseName(p string) string { return p[strings.LastIndexByte(p, '/')+1:] }
