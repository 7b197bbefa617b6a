package kaylewebhook

// The demo material in testdata/demo is published with the source, so
// anyone can sign and encrypt deliveries that it accepts. Caddyfile.example
// falls back to it for each unset variable; this file makes sure such a
// fallback never guards a real endpoint unnoticed.

import (
	"bytes"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// Fingerprints of testdata/demo (demo_test.go checks them against the
// files): SHA-256 of the key HMAC-SHA256 really uses for the signing secret
// (see hmacKeyFingerprint), and of the demo key's RSA modulus.
// Fingerprints rather than the files themselves, so no build of the plugin
// carries a private key.
const (
	demoSecretHMACKey = "9eb4745beb8b280f9ea195b6f17d0893ff3196b588082d528744c068532618bb"
	demoModulusSHA256 = "f6b839453be4bb6847d3bead4e5cc247eaf58a06d84e70940ca49059e4043edc"
	// demoMaterialKID is the kid the demo key is sent under.
	demoMaterialKID = "demo"
	// demoPublicEnv, set to a true value in Caddy's environment, lets the
	// demo material run on a listener that is not loopback-only.
	demoPublicEnv = "KAYLE_DEMO_PUBLIC"
	// demoVariables is what to check in Caddyfile.example.
	demoVariables = "Caddyfile.example: KAYLE_SIGNING_SECRET_FILE, KAYLE_KEY_ID, KAYLE_KEY_FILE"
)

// isDemoSecret reports whether secret signs as the demo secret, or would
// once stripped of surrounding white space (a careless copy of it).
func isDemoSecret(secret []byte) bool {
	return hmacKeyFingerprint(secret) == demoSecretHMACKey ||
		hmacKeyFingerprint(bytes.TrimSpace(secret)) == demoSecretHMACKey
}

// hmacKeyFingerprint is the hex SHA-256 of the key block HMAC-SHA256 makes
// of secret: the secret itself, or its SHA-256 when it is longer than a
// block, padded with zero bytes to the block. Two secrets with one
// fingerprint sign every message alike (the demo secret and the demo secret
// plus a NUL, say), so recognizing a secret by it cannot be evaded.
func hmacKeyFingerprint(secret []byte) string {
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

// isDemoKey reports whether pub is the public half of the demo key.
func isDemoKey(pub *rsa.PublicKey) bool {
	sum := sha256.Sum256(pub.N.Bytes())
	return hex.EncodeToString(sum[:]) == demoModulusSHA256
}

// demoMaterial sorts the provisioned secrets and keys into the demo's and
// the user's own, as phrases for messages (never a secret's value).
type demoMaterial struct {
	demo, own []string
	// ownKeyUnderDemoKID: a key of the user's own under the kid "demo",
	// which Caddyfile.example produces when KAYLE_KEY_ID is unset.
	ownKeyUnderDemoKID bool
}

func classifyMaterial(secrets [][]byte, keys []decryptionKey) demoMaterial {
	var m demoMaterial
	for i, s := range secrets {
		if isDemoSecret(s) {
			m.demo = append(m.demo, fmt.Sprintf("signing secret #%d", i+1))
		} else {
			m.own = append(m.own, fmt.Sprintf("signing secret #%d", i+1))
		}
	}
	for _, k := range keys {
		if isDemoKey(&k.key.PublicKey) {
			m.demo = append(m.demo, fmt.Sprintf("decryption key %q", k.kid))
		} else {
			m.own = append(m.own, fmt.Sprintf("decryption key %q", k.kid))
			m.ownKeyUnderDemoKID = m.ownKeyUnderDemoKID || k.kid == demoMaterialKID
		}
	}
	return m
}

// checkDemoMaterial refuses the demo material beside material of the
// user's own (a variable meant to replace the demo's is unset or
// misspelled), and on a listener that is not loopback-only unless
// KAYLE_DEMO_PUBLIC acknowledges it. Demo material it lets through is named
// in a WARN, at every provisioning: start and reload.
func (h *Handler) checkDemoMaterial(ctx caddy.Context) error {
	m := classifyMaterial(h.secrets, h.keys.keys)
	if len(m.demo) > 0 && len(m.own) > 0 {
		return fmt.Errorf("refusing a mix of the published DEMO material in testdata/demo (%s) and material of your own (%s): "+
			"a variable meant to replace the demo's is probably unset or misspelled (%s); configure your own secret and key throughout, or the demo's alone",
			strings.Join(m.demo, ", "), strings.Join(m.own, ", "), demoVariables)
	}
	if m.ownKeyUnderDemoKID {
		return fmt.Errorf("decryption key %q is not the published demo key, but %q is the demo's kid (testdata/demo): "+
			"KAYLE_KEY_ID is probably unset or misspelled; configure your key under the key_id you registered it with at Kayle",
			demoMaterialKID, demoMaterialKID)
	}
	if len(m.demo) == 0 {
		return nil
	}
	listen, inServer := serverListen(ctx)
	acknowledged, _ := strconv.ParseBool(os.Getenv(demoPublicEnv))
	public := inServer && !loopbackOnly(listen)
	if public && !acknowledged {
		return fmt.Errorf("refusing the published DEMO material in testdata/demo (%s) on a listener that is not loopback-only (%s): anyone can sign deliveries for it. "+
			"Configure your own secret and key (%s), bind the site to 127.0.0.1 and ::1, or set %s=1 in Caddy's environment to run the demo there anyway",
			strings.Join(m.demo, ", "), strings.Join(listen, " "), demoVariables, demoPublicEnv)
	}
	h.logger.Warn("this endpoint uses the published DEMO signing secret and key (testdata/demo): anyone can sign deliveries for it; configure your own before it guards anything real",
		zap.Strings("demo_material", m.demo), zap.Strings("listen", listen), zap.Bool("public_acknowledged", public && acknowledged))
	return nil
}

// serverListen returns the listen addresses of the server whose routes are
// being provisioned, if any (a handler provisioned outside a server, as in
// a command or a unit test, has none).
func serverListen(ctx caddy.Context) ([]string, bool) {
	srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok || srv == nil {
		return nil, false
	}
	return srv.Listen, true
}

// loopbackOnly reports whether every address is a loopback IP, localhost or
// a unix socket. Anything else, including an address it cannot read or
// none at all, counts as reachable from elsewhere.
func loopbackOnly(listen []string) bool {
	if len(listen) == 0 {
		return false
	}
	repl := caddy.NewReplacer()
	for _, raw := range listen {
		addr, err := caddy.ParseNetworkAddress(repl.ReplaceAll(raw, ""))
		if err != nil || addr.IsFdNetwork() {
			return false
		}
		if addr.IsUnixNetwork() || strings.EqualFold(addr.Host, "localhost") {
			continue
		}
		ip, err := netip.ParseAddr(addr.Host)
		if err != nil || !ip.IsLoopback() {
			return false
		}
	}
	return true
}
