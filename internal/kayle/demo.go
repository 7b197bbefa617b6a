package kayle

// The demo material in testdata/demo is published with the source, so
// anyone can sign and encrypt deliveries that it accepts. These functions
// recognize it; the handler refuses or names it (demo.go at the root).

import (
	"bytes"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// Fingerprints of testdata/demo (demo_test.go checks them against the
// files): SHA-256 of the key HMAC-SHA256 really uses for the signing secret
// (see hmacKeyFingerprint), and of the demo key's RSA modulus.
// Fingerprints rather than the files themselves, so no build of the plugin
// carries a private key.
const (
	demoSecretHMACKey = "9eb4745beb8b280f9ea195b6f17d0893ff3196b588082d528744c068532618bb"
	demoModulusSHA256 = "f6b839453be4bb6847d3bead4e5cc247eaf58a06d84e70940ca49059e4043edc"
	// DemoKID is the kid the demo key is sent under.
	DemoKID = "demo"
)

// IsDemoSecret reports whether secret signs as the demo secret, or would
// once stripped of surrounding white space (a careless copy of it).
func IsDemoSecret(secret []byte) bool {
	return HMACKeyFingerprint(secret) == demoSecretHMACKey ||
		HMACKeyFingerprint(bytes.TrimSpace(secret)) == demoSecretHMACKey
}

// HMACKeyFingerprint is the hex SHA-256 of the key block HMAC-SHA256 makes
// of secret: the secret itself, or its SHA-256 when it is longer than a
// block, padded with zero bytes to the block. Two secrets with one
// fingerprint sign every message alike (the demo secret and the demo secret
// plus a NUL, say), so recognizing a secret by it cannot be evaded.
func HMACKeyFingerprint(secret []byte) string {
	var block [sha256.BlockSize]byte
	if len(secret) > sha256.BlockSize {
		sum := sha256.Sum256(secret)
		copy(block[:], sum[:])
	} else {
		copy(block[:], secret)
	}
	sum := sha256.Sum256(block[:])
	return hex.EncodeToString(sum[:])
}

// IsDemoKey reports whether pub is the public half of the demo key.
func IsDemoKey(pub *rsa.PublicKey) bool {
	sum := sha256.Sum256(pub.N.Bytes())
	return hex.EncodeToString(sum[:]) == demoModulusSHA256
}

// DemoMaterial sorts the provisioned secrets and keys into the demo's and
// the user's own, as phrases for messages (never a secret's value).
type DemoMaterial struct {
	Demo, Own []string
	// OwnKeyUnderDemoKID: a key of the user's own under the kid "demo",
	// which Caddyfile.example produces when KAYLE_KEY_ID is unset.
	OwnKeyUnderDemoKID bool
}

func ClassifyMaterial(secrets [][]byte, keys []Key) DemoMaterial {
	var m DemoMaterial
	for i, s := range secrets {
		if IsDemoSecret(s) {
			m.Demo = append(m.Demo, fmt.Sprintf("signing secret #%d", i+1))
		} else {
			m.Own = append(m.Own, fmt.Sprintf("signing secret #%d", i+1))
		}
	}
	for _, k := range keys {
		if IsDemoKey(&k.Private.PublicKey) {
			m.Demo = append(m.Demo, fmt.Sprintf("decryption key %q", k.KID))
		} else {
			m.Own = append(m.Own, fmt.Sprintf("decryption key %q", k.KID))
			m.OwnKeyUnderDemoKID = m.OwnKeyUnderDemoKID || k.KID == DemoKID
		}
	}
	return m
}
