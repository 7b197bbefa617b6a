package kayle

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"strconv"
	"strings"
	"sync"
	"time"
)

// SignatureHeader is the header Kayle signs each delivery with:
// "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t + "." + body)>".
const SignatureHeader = "X-Kayle-Signature"

const (
	// maxSignatureHeaderLen bounds the work an attacker can ask of the parser.
	maxSignatureHeaderLen = 4096
	// maxV1Signatures bounds the HMAC comparisons per request (rotation needs two or three).
	maxV1Signatures = 8
)

var (
	ErrNoSignature      = errors.New("missing " + SignatureHeader + " header")
	ErrSignatureFormat  = errors.New("malformed " + SignatureHeader + " header")
	ErrSignatureInvalid = errors.New("no v1 signature matches a configured signing secret")
)

// Signature is a parsed X-Kayle-Signature header.
type Signature struct {
	// Timestamp is the t field exactly as sent: the HMAC covers these bytes.
	Timestamp string
	Unix      int64
	V1        [][]byte
}

// ParseSignature parses "t=…,v1=…[,v1=…]". Unknown schemes (v0, v2, …) are
// ignored, as in other t=/v1= webhook schemes, so Kayle can add one later.
// It is strict about what it uses: exactly one t of decimal digits, and each
// v1 exactly 64 hex characters.
func ParseSignature(header string) (Signature, error) {
	var sig Signature
	if header == "" {
		return sig, ErrNoSignature
	}
	if len(header) > maxSignatureHeaderLen {
		return sig, fmt.Errorf("%w: longer than %d bytes", ErrSignatureFormat, maxSignatureHeaderLen)
	}
	seenT := false
	for field := range strings.SplitSeq(header, ",") {
		name, value, ok := strings.Cut(strings.TrimSpace(field), "=")
		if !ok {
			return sig, fmt.Errorf("%w: field without '='", ErrSignatureFormat)
		}
		switch name {
		case "t":
			if seenT {
				return sig, fmt.Errorf("%w: more than one t", ErrSignatureFormat)
			}
			seenT = true
			unix, err := parseUnixSeconds(value)
			if err != nil {
				return sig, err
			}
			sig.Timestamp, sig.Unix = value, unix
		case "v1":
			if len(sig.V1) == maxV1Signatures {
				return sig, fmt.Errorf("%w: more than %d v1 values", ErrSignatureFormat, maxV1Signatures)
			}
			if len(value) != 2*sha256.Size {
				return sig, fmt.Errorf("%w: v1 is not %d hex characters", ErrSignatureFormat, 2*sha256.Size)
			}
			mac, err := hex.DecodeString(value)
			if err != nil {
				return sig, fmt.Errorf("%w: v1 is not hex", ErrSignatureFormat)
			}
			sig.V1 = append(sig.V1, mac)
		}
	}
	if !seenT {
		return sig, fmt.Errorf("%w: no t", ErrSignatureFormat)
	}
	if len(sig.V1) == 0 {
		return sig, fmt.Errorf("%w: no v1", ErrSignatureFormat)
	}
	return sig, nil
}

// parseUnixSeconds accepts only plain decimal digits: no sign, no spaces, no
// exponent. (Leading zeros pass; the MAC covers t exactly as sent.)
func parseUnixSeconds(s string) (int64, error) {
	if s == "" || len(s) > 12 {
		return 0, fmt.Errorf("%w: t is not a Unix time in seconds", ErrSignatureFormat)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("%w: t is not a Unix time in seconds", ErrSignatureFormat)
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

// VerifySignature parses the header and verifies it over the raw body (see
// signature.verify).
func VerifySignature(header string, body []byte, secrets [][]byte, now time.Time, tolerance time.Duration) (Signature, error) {
	sig, err := ParseSignature(header)
	if err != nil {
		return sig, err
	}
	_, err = sig.Verify(body, NewMACKeys(secrets), now, tolerance)
	return sig, err
}

// MACKeys are the signing secrets, each with a pool of HMACs keyed with it.
// Keying an HMAC hashes two blocks and allocates five times; a forged flood
// would pay that for every secret of every request. (Go's HMAC restores its
// keyed state on Reset; BoringCrypto's re-keys there, so with it only the
// allocations are saved.)
type MACKeys struct {
	pools []sync.Pool
}

func NewMACKeys(secrets [][]byte) *MACKeys {
	k := &MACKeys{pools: make([]sync.Pool, len(secrets))}
	for i, secret := range secrets {
		k.pools[i].New = func() any { return hmac.New(sha256.New, secret) }
	}
	return k
}

// sum appends HMAC-SHA256(secret i, timestamp + "." + body) to out.
func (k *MACKeys) sum(out []byte, i int, timestamp string, body []byte) []byte {
	mac := k.pools[i].Get().(hash.Hash)
	defer k.pools[i].Put(mac)
	mac.Reset()
	mac.Write([]byte(timestamp))
	mac.Write(dot)
	mac.Write(body)
	return mac.Sum(out)
}

// dot is a package variable: a literal passed to Write would be allocated
// on every call.
var dot = []byte{'.'}

// Verify checks the v1 values against every secret over the raw body, then
// the timestamp against now, and returns the 1-based position of the first
// secret that matched (for the metrics: an old secret no longer matching can
// be retired). The MAC comparison is constant time; the timestamp is checked
// second so that an unauthenticated request learns nothing about our clock.
func (sig Signature) Verify(body []byte, keys *MACKeys, now time.Time, tolerance time.Duration) (position int, err error) {
	expected := make([]byte, 0, sha256.Size)
	for i := range keys.pools {
		expected = keys.sum(expected[:0], i, sig.Timestamp, body)
		for _, candidate := range sig.V1 {
			// no early exit: the work done does not depend on which one matches
			if hmac.Equal(expected, candidate) && position == 0 {
				position = i + 1
			}
		}
	}
	if position == 0 {
		return 0, ErrSignatureInvalid
	}
	skew := now.Sub(time.Unix(sig.Unix, 0))
	if skew > tolerance || skew < -tolerance {
		return 0, &ExpiredError{Skew: skew, Tolerance: tolerance}
	}
	return position, nil
}

// ExpiredError is a signature that matched but whose t is too far from now.
type ExpiredError struct {
	Skew, Tolerance time.Duration // Skew is now minus t
}

func (e *ExpiredError) Error() string {
	return fmt.Sprintf("signature timestamp is %s away from now, outside the %s tolerance", e.Skew.Round(time.Second), e.Tolerance)
}

// SignatureMAC is HMAC-SHA256(secret, timestamp + "." + body).
func SignatureMAC(secret []byte, timestamp string, body []byte) []byte {
	return NewMACKeys([][]byte{secret}).sum(nil, 0, timestamp, body)
}

// SignatureHeaderValue builds an X-Kayle-Signature value for body, as Kayle
// does. The send command and the tests use it.
func SignatureHeaderValue(secret []byte, t time.Time, body []byte) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	return "t=" + ts + ",v1=" + hex.EncodeToString(SignatureMAC(secret, ts, body))
}
