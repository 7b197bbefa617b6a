package kaylewebhook

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

const (
	keygenDefaultBits = 4096 // what Kayle suggests
	// keygenMaxBits bounds a typo: 16384-bit keys take minutes to make and
	// make every delivery slow to decrypt.
	keygenMaxBits = 8192
)

// keygenKIDPattern keeps a kid usable as a file name and a bare Caddyfile
// token.
var keygenKIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func newKeygenCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "keygen [--bits 4096] [--kid <id>] [--out <dir>]",
		Short: "Makes an RSA key for Kayle: writes the private key, prints the public JWK",
		Long: `
Makes a new RSA key pair for a Kayle endpoint. It writes the private key to
<out>/<kid>.pem (PKCS#8 PEM, mode 0600; an existing file is never
overwritten) and prints the public JWK to stdout, exactly as Kayle's key
registration takes it:

    {"kty": "RSA", "n": …, "e": "AQAB", "kid": <kid>, "alg": "RSA-OAEP-256", "use": "enc"}

It never prints the private key. On stderr it says where the key went and
gives the kayle_webhook line that uses it:

    decryption_key <kid> <absolute path of the key file>

so "caddy kayle keygen > k1.jwk" keeps the JWK alone in a file.

--bits <n>
    The key size. Default 4096 (Kayle's suggestion); at least 2048 (Kayle
    refuses smaller keys), at most 8192.

--kid <id>
    The key_id to register the key under at Kayle, and the file's name:
    letters, digits, '.', '_' and '-', at most 64. Default: k<date>-<6 hex>,
    e.g. k20260115-3fa9c1.

--out <dir>
    The folder to write the key to; made (mode 0700) if missing. Default:
    the current folder.
`,
		Args: cobra.NoArgs,
		RunE: runWith(cmdKayleKeygen),
	}
	f := cmd.Flags()
	f.Int("bits", keygenDefaultBits, "RSA key size in bits (at least 2048)")
	f.String("kid", "", "key id to register at Kayle, also the file name (default k<date>-<hex>)")
	f.String("out", ".", "folder to write <kid>.pem to")
	return cmd
}

type keygenOptions struct {
	Bits int // 0 means the default
	KID  string
	Out  string
}

func cmdKayleKeygen(fl caddycmd.Flags, _ []string, s cmdIO) (int, error) {
	bits, err := fl.GetInt("bits")
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	opts := keygenOptions{Bits: bits, KID: fl.String("kid"), Out: fl.String("out")}
	if fl.Changed("kid") && opts.KID == "" {
		return caddy.ExitCodeFailedStartup, errors.New("--kid must not be empty")
	}
	if err := runKeygen(opts, s); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

// runKeygen makes the key, writes the private half and prints the public
// JWK. Everything is checked before the (slow) key generation.
func runKeygen(o keygenOptions, s cmdIO) error {
	if o.Bits == 0 {
		o.Bits = keygenDefaultBits
	}
	if o.Bits < kayle.MinRSABits {
		return fmt.Errorf("--bits %d: Kayle requires at least %d", o.Bits, kayle.MinRSABits)
	}
	if o.Bits > keygenMaxBits {
		return fmt.Errorf("--bits %d: at most %d (larger keys make every delivery slow to decrypt)", o.Bits, keygenMaxBits)
	}
	if o.KID == "" {
		o.KID = "k" + time.Now().UTC().Format("20060102") + "-" + kayle.RandomHex(3)
	}
	if !keygenKIDPattern.MatchString(o.KID) {
		return fmt.Errorf("--kid %q: use letters, digits, '.', '_' and '-' (at most 64, not starting with '.', '_' or '-')", o.KID)
	}
	if o.Out == "" {
		o.Out = "."
	}
	path, err := filepath.Abs(filepath.Join(o.Out, o.KID+".pem"))
	if err != nil {
		return err
	}
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s already exists: keygen never overwrites a key (pick another --kid or --out)", path)
	}
	if err := os.MkdirAll(o.Out, 0o700); err != nil {
		return err
	}

	key, err := rsa.GenerateKey(rand.Reader, o.Bits)
	if err != nil {
		return fmt.Errorf("generating the key: %v", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeNewFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})); err != nil {
		return err
	}
	jwk, err := newPublicJWK(&key.PublicKey, o.KID).marshal()
	if err != nil {
		return err
	}
	if _, err := s.out.Write(jwk); err != nil {
		return err
	}
	fmt.Fprintf(s.notes, "Wrote the private key (RSA %d, PKCS#8 PEM, mode 0600) to %s: keep it secret.\n", o.Bits, path)
	printKeyInstructions(s.notes, o.KID, path)
	fmt.Fprintln(s.notes, "Keep the old decryption_key lines: retries and replays of older deliveries stay encrypted to the old keys.")
	return nil
}

// writeNewFile creates path with mode 0600, failing if it exists (also when
// it appeared since the caller looked), and removes it if writing fails.
func writeNewFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s already exists: keygen never overwrites a key (pick another --kid or --out)", path)
	}
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("writing %s: %v", path, err)
	}
	return nil
}
