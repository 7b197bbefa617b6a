package main

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// benchSecret is the signing secret every receiver in the run is given.
const benchSecret = "whsec_bench_0123456789abcdef0123456789abcdef"

// keyPair is one RSA key, its kid and where its PKCS#8 PEM was written.
type keyPair struct {
	kid  string
	key  *rsa.PrivateKey
	file string
}

func generateKey(dir string, bits int) (keyPair, error) {
	key, err := rsa.GenerateKey(rand.Reader, bits)
	if err != nil {
		return keyPair{}, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return keyPair{}, err
	}
	kid := "k" + strconv.Itoa(bits)
	file := filepath.Join(dir, kid+".pem")
	err = os.WriteFile(file, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
	return keyPair{kid: kid, key: key, file: file}, err
}

// delivery is one request as Kayle sends it.
type delivery struct {
	body      []byte
	signature string
	// seq is the event's number in this run (the end of its event id), by
	// which the backend's receipts are matched to it; 0 for forged ones.
	seq int64
}

// eventSeq makes every event id of the run unique, across rows and rounds,
// so a dedupe gateway never answers a copy as a duplicate.
var eventSeq atomic.Int64

// payload is a verification.session.succeeded event of about size bytes: the
// claims of a real one plus a base64 "portrait" filling the rest, as Kayle's
// face-image claims do. id is its number in this run, the end of its event id.
func payload(size int) (out []byte, id int64) {
	id = eventSeq.Add(1)
	ev := map[string]any{
		"type": "verification.session.succeeded",
		"metadata": map[string]any{
			"contract_version":        1,
			"event_id":                fmt.Sprintf("evt_bench_%d_%d", time.Now().UnixNano(), id),
			"verification_session_id": fmt.Sprintf("vs_bench_%d", id),
		},
		"data": map[string]any{
			"claims": map[string]any{
				"date_of_birth": "1995-04-12", "family_name": "Curie", "given_names": "Marie",
				"kayle_document_id": "kdid_bench", "age_over_18": true, "portrait": "",
			},
			"selected_field_keys": []string{"age_over_18", "date_of_birth", "family_name", "given_names", "kayle_document_id", "portrait"},
		},
	}
	base, _ := json.Marshal(ev)
	if fill := size - len(base); fill > 0 {
		raw := make([]byte, fill*3/4)
		_, _ = rand.Read(raw)
		ev["data"].(map[string]any)["claims"].(map[string]any)["portrait"] = base64.StdEncoding.EncodeToString(raw)
	}
	out, _ = json.Marshal(ev)
	return out, id
}

// genuine makes n deliveries of one payload size encrypted to k, each with
// its own event id, signed now.
func genuine(k keyPair, size, n int) ([]delivery, error) {
	enc, err := jose.NewEncrypter(jose.A256GCM, jose.Recipient{Algorithm: jose.RSA_OAEP_256, Key: &k.key.PublicKey, KeyID: k.kid}, nil)
	if err != nil {
		return nil, err
	}
	out := make([]delivery, n)
	for i := range out {
		plain, seq := payload(size)
		obj, err := enc.Encrypt(plain)
		if err != nil {
			return nil, err
		}
		compact, err := obj.CompactSerialize()
		if err != nil {
			return nil, err
		}
		body := []byte(compact)
		out[i] = delivery{body: body, signature: sign(body, time.Now()), seq: seq}
	}
	return out, nil
}

// forged is n copies of a genuine body whose v1 was made with another
// secret: what an attacker without the secret can send.
func forged(k keyPair, n int) ([]delivery, error) {
	one, err := genuine(k, 600, 1)
	if err != nil {
		return nil, err
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	mac := hmac.New(sha256.New, []byte("whsec_not_the_secret_at_all_0000"))
	mac.Write([]byte(ts + "."))
	mac.Write(one[0].body)
	d := delivery{body: one[0].body, signature: "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))} // no seq: never forwarded
	out := make([]delivery, n)
	for i := range out {
		out[i] = d
	}
	return out, nil
}

// sign makes X-Kayle-Signature the way Kayle does.
func sign(body []byte, t time.Time) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	mac := hmac.New(sha256.New, []byte(benchSecret))
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}
