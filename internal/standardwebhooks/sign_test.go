package standardwebhooks

import (
	"encoding/base64"
	"strings"
	"testing"
)

// The known-answer example the Standard Webhooks specification and its
// reference libraries publish: a backend's library accepts our signature
// only if the key decoding, the signed content and the encoding all match.
func TestSignatureKnownAnswer(t *testing.T) {
	key, err := ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		t.Fatal(err)
	}
	got := Signature([][]byte{key}, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", []byte(`{"test": 2432232314}`))
	if want := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}

func TestParseSecretRefuses(t *testing.T) {
	const payload = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	for name, secret := range map[string]string{
		"no prefix":      payload,
		"other prefix":   "whsex_" + payload,
		"prefix only":    "whsec_",
		"not base64":     "whsec_" + payload[:20] + "!!!!" + payload[24:],
		"url alphabet":   "whsec_" + strings.Repeat("_-", 16),
		"short key":      "whsec_" + base64.StdEncoding.EncodeToString([]byte("sixteen byte key")),
		"internal space": "whsec_" + payload[:16] + " " + payload[16:],
	} {
		_, err := ParseSecret(secret)
		if err == nil {
			t.Errorf("%s: accepted", name)
			continue
		}
		if strings.Contains(err.Error(), payload[:16]) {
			t.Errorf("%s: the error quotes the secret: %v", name, err)
		}
	}
	// padding is optional
	unpadded := "whsec_" + base64.RawStdEncoding.EncodeToString([]byte("twenty-five bytes of key!"))
	if _, err := ParseSecret(unpadded); err != nil {
		t.Errorf("unpadded secret refused: %v", err)
	}
}
