package kaylewebhook

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/go-jose/go-jose/v4"
	"github.com/spf13/cobra"
)

func newJWKCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "jwk <key file> [--kid <id>]",
		Short: "Prints the public JWK of an RSA key you already have, for Kayle's key registration",
		Long: `
Prints the public JWK of an existing RSA key, as Kayle's key registration
takes it: {"kty", "n", "e", "kid", "alg": "RSA-OAEP-256", "use": "enc"}.
Only the public half is ever printed, whatever the file holds.

The key file may be a private key (PEM PKCS#8 "PRIVATE KEY" or PKCS#1
"RSA PRIVATE KEY", as openssl writes them, or a JWK) or a public key (PEM
"PUBLIC KEY" or "RSA PUBLIC KEY", or a JWK). RSA, 2048 bits or more.

For a private key, stderr also gives the kayle_webhook line that uses it.

--kid <id>
    The key_id to register the key under. Default: the JWK's own kid; a
    PEM file has none, so --kid is then required. A --kid that differs
    from the JWK's kid is refused (the gateway would refuse that file too).
`,
		Args: cobra.ExactArgs(1),
		RunE: runWith(cmdKayleJWK),
	}
	cmd.Flags().String("kid", "", "key id to register at Kayle (default: the JWK's kid)")
	return cmd
}

func cmdKayleJWK(fl caddycmd.Flags, args []string, s cmdIO) (int, error) {
	kid := fl.String("kid")
	if fl.Changed("kid") && kid == "" {
		return caddy.ExitCodeFailedStartup, errors.New("--kid must not be empty")
	}
	if err := runJWK(args[0], kid, s); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

func runJWK(path, kid string, s cmdIO) error {
	if _, jwk, err := kayle.ReadKeyFile(path); err != nil {
		return err
	} else if jwk != nil {
		if jwk.Use != "" && jwk.Use != "enc" {
			return fmt.Errorf("%s: key use is %q; Kayle encrypts to \"enc\" keys", path, jwk.Use)
		}
		if jwk.Algorithm != "" && jwk.Algorithm != string(jose.RSA_OAEP_256) {
			return fmt.Errorf("%s: key alg is %q, not %q", path, jwk.Algorithm, jose.RSA_OAEP_256)
		}
	}
	pub, fileKID, err := kayle.LoadPublicKeyFile(path)
	if err != nil {
		return err
	}
	if bits := pub.N.BitLen(); bits < kayle.MinRSABits {
		return fmt.Errorf("%s: RSA key is %d bits; Kayle requires at least %d", path, bits, kayle.MinRSABits)
	}
	switch {
	case kid == "" && fileKID == "":
		return fmt.Errorf("%s has no kid: pass --kid <the key_id to register at Kayle>", path)
	case kid == "":
		kid = fileKID
	case fileKID != "" && fileKID != kid:
		return fmt.Errorf("%s says kid %q, not %q: the gateway would refuse it under --kid %q", path, fileKID, kid, kid)
	}
	if !kayle.HeaderSafe(kid) {
		return fmt.Errorf("--kid %q: must be at most %d bytes, no control characters", kid, kayle.MaxIDLen)
	}
	data, err := newPublicJWK(pub, kid).marshal()
	if err != nil {
		return err
	}
	if _, err := s.out.Write(data); err != nil {
		return err
	}
	if _, _, err := kayle.LoadPrivateKeyFile(path); err == nil {
		if abs, err := filepath.Abs(path); err == nil {
			printKeyInstructions(s.notes, kid, abs)
		}
	}
	return nil
}
