package kaylewebhook

import (
	"bytes"
	"crypto/hmac"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
)

// maxInspectBody bounds what inspect reads; the gateway's own limit is
// max_body_size (4 MiB by default).
const maxInspectBody = 64 << 20

func newInspectCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "inspect --config <file> [--adapter <name>] [--signature <header>] [--plaintext] <file|->",
		Short: "Explains a captured delivery: its JWE header, which key opens it, which secret signed it",
		Long: `
For an operator debugging a delivery the gateway refused (or one captured
on the way). It reads the delivery's body, byte for byte, from a file (or
stdin for "-"), and for each kayle_webhook handler in the config prints:

  - the JWE header: kid, alg and enc (read before decryption; unauthenticated)
  - whether a configured key opens it, and which kid; else why not, and
    the status the gateway answers
  - with --signature, whether the X-Kayle-Signature matches a configured
    signing secret (which one, by its position in the config) and how far
    its t is from now, against the handler's tolerance
  - the event id and type from the decrypted payload

The secrets and keys are loaded from the config as the gateway loads them,
placeholders ({env.*}, {file.*}) included: run it where the gateway runs.
It exits 0 when a handler would accept the delivery (signature checked only
when given), 1 otherwise.

--config <file>
    The config the gateway runs with (required).

--adapter <name>
    Its adapter, as for caddy run. Default: guessed from the file name.

--signature <header>
    The delivery's X-Kayle-Signature value (t=…,v1=…); a leading
    "X-Kayle-Signature:" is dropped. The body must be exactly the bytes
    that were signed.

--plaintext
    Also print the decrypted payload. It is personal data (names, birth
    dates, document images): this is the only place the project prints
    it, and only when asked.
`,
		Args: cobra.ExactArgs(1),
		RunE: runWith(cmdKayleInspect),
	}
	f := cmd.Flags()
	f.StringP("config", "c", "", "config file the gateway runs with (required)")
	f.StringP("adapter", "a", "", "name of the config adapter")
	f.String("signature", "", "the delivery's X-Kayle-Signature header value")
	f.Bool("plaintext", false, "print the decrypted payload (personal data)")
	return cmd
}

type inspectOptions struct {
	Config    string
	Adapter   string
	Signature string // empty: not checked
	Plaintext bool
	Body      string // a file, or "-" for stdin
}

func cmdKayleInspect(fl caddycmd.Flags, args []string, s cmdIO) (int, error) {
	o := inspectOptions{
		Config:    fl.String("config"),
		Adapter:   fl.String("adapter"),
		Signature: fl.String("signature"),
		Plaintext: fl.Bool("plaintext"),
		Body:      args[0],
	}
	if fl.Changed("signature") && strings.TrimSpace(o.Signature) == "" {
		return caddy.ExitCodeFailedStartup, errors.New("--signature must not be empty")
	}
	if err := runInspect(o, time.Now(), s); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

// errNotAccepted is inspect's answer when no handler would take the delivery.
var errNotAccepted = errors.New("no kayle_webhook handler in the config would accept this delivery")

func runInspect(o inspectOptions, now time.Time, s cmdIO) error {
	body, err := readInspectBody(o.Body, s.in)
	if err != nil {
		return err
	}
	lc, err := loadHandlers(o.Config, o.Adapter)
	if err != nil {
		return err
	}
	header := strings.TrimSpace(o.Signature)
	if name, value, ok := strings.Cut(header, ":"); ok && strings.EqualFold(strings.TrimSpace(name), kayle.SignatureHeader) {
		header = strings.TrimSpace(value)
	}

	fmt.Fprintf(s.out, "body: %d bytes\n", len(body))
	fmt.Fprintf(s.out, "JWE header: %s\n", describeJWEHeader(body))
	accepted := false
	for _, c := range lc.handlers {
		if len(lc.handlers) > 1 {
			prefix, _ := c.dedupePrefix()
			fmt.Fprintf(s.out, "\nhandler %s (dedupe_prefix %s):\n", c.where, prefix)
		}
		ok, err := inspectWith(c.handler, body, header, o, now, s)
		if err != nil {
			return fmt.Errorf("%s: %v", c.where, err)
		}
		accepted = accepted || ok
	}
	if !accepted {
		return errNotAccepted
	}
	return nil
}

func readInspectBody(name string, stdin io.Reader) ([]byte, error) {
	r := stdin
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	body, err := io.ReadAll(io.LimitReader(r, maxInspectBody+1))
	if err != nil {
		return nil, err
	}
	if len(body) > maxInspectBody {
		return nil, fmt.Errorf("the body is over %d bytes: not a Kayle delivery", maxInspectBody)
	}
	return body, nil
}

// describeJWEHeader shows kid, alg and enc from the protected header as
// sent, even for algorithms the gateway refuses.
func describeJWEHeader(body []byte) string {
	first, _, _ := bytes.Cut(body, []byte("."))
	raw, err := base64.RawURLEncoding.DecodeString(string(first))
	var h struct {
		Alg any `json:"alg"`
		Enc any `json:"enc"`
		Kid any `json:"kid"`
		Zip any `json:"zip"`
	}
	if err != nil || json.Unmarshal(raw, &h) != nil {
		return "none readable: the body does not start with a base64url JSON header (not a compact JWE)"
	}
	show := func(v any) string {
		if v == nil {
			return "(none)"
		}
		b, _ := json.Marshal(v)
		if len(b) > 2*kayle.MaxIDLen {
			return "(too long to show)"
		}
		return string(b)
	}
	desc := fmt.Sprintf("kid %s, alg %s, enc %s", show(h.Kid), show(h.Alg), show(h.Enc))
	if h.Zip != nil {
		desc += ", zip " + show(h.Zip)
	}
	return desc
}

// inspectWith checks the delivery against one handler's secrets and keys,
// loaded as Provision loads them, and reports whether it would accept it.
func inspectWith(h *Handler, body []byte, sigHeader string, o inspectOptions, now time.Time, s cmdIO) (bool, error) {
	repl := caddy.NewReplacer()
	if err := h.provisionSecrets(repl); err != nil {
		return false, err
	}
	if err := h.provisionKeys(repl); err != nil {
		return false, err
	}
	tolerance := time.Duration(h.Tolerance)
	if tolerance == 0 {
		tolerance = defaultTolerance
	}
	signed := sigHeader == "" || reportSignature(s.out, sigHeader, body, h.secrets, now, tolerance)

	plaintext, kid, err := h.keys.Decrypt(body)
	switch {
	case errors.Is(err, kayle.ErrNotJWE):
		fmt.Fprintf(s.out, "key: none tried: %v (the gateway answers 422)\n", err)
		return false, nil
	case errors.Is(err, kayle.ErrUnknownKeyID):
		fmt.Fprintf(s.out, "key: no configured key has kid %q (configured: %s); the gateway answers 500 and Kayle retries\n", kid, configuredKIDs(h.keys))
		return false, nil
	case err != nil && kid != "":
		fmt.Fprintf(s.out, "key: the key configured as kid %q does not open it (another key under that kid, or a changed ciphertext); the gateway answers 422\n", kid)
		return false, nil
	case err != nil:
		fmt.Fprintf(s.out, "key: the JWE names no kid and none of the configured keys (%s) opens it; the gateway answers 422\n", configuredKIDs(h.keys))
		return false, nil
	}
	fmt.Fprintf(s.out, "key: opened by the key configured as kid %q\n", kid)

	ev, err := kayle.ParseEvent(plaintext)
	if err != nil {
		fmt.Fprintf(s.out, "event: unusable payload: %v (the gateway answers 422)\n", err)
	} else {
		fmt.Fprintf(s.out, "event: id %s, type %s\n", ev.ID, orNone(ev.Type))
	}
	if o.Plaintext {
		fmt.Fprintf(s.out, "plaintext (%d bytes, personal data):\n%s", len(plaintext), withNewline(plaintext))
	} else {
		fmt.Fprintln(s.out, "plaintext: not shown (personal data; --plaintext shows it)")
	}
	return signed && err == nil, nil
}

// reportSignature prints which configured secrets (by position, from 1) the
// header's v1 values match and how far t is from now, and reports whether
// the gateway would accept the signature.
func reportSignature(out io.Writer, header string, body []byte, secrets [][]byte, now time.Time, tolerance time.Duration) bool {
	sig, err := kayle.ParseSignature(header)
	if err != nil {
		fmt.Fprintf(out, "signature: %v (the gateway answers 400)\n", err)
		return false
	}
	var matched []string
	for i, secret := range secrets {
		mac := kayle.SignatureMAC(secret, sig.Timestamp, body)
		for _, v1 := range sig.V1 {
			if hmac.Equal(mac, v1) {
				matched = append(matched, fmt.Sprintf("#%d", i+1))
				break
			}
		}
	}
	skew := now.Sub(time.Unix(sig.Unix, 0)).Round(time.Second)
	when := fmt.Sprintf("t is %s ago", skew)
	if skew < 0 {
		when = fmt.Sprintf("t is %s in the future", -skew)
	}
	fresh := skew <= tolerance && skew >= -tolerance
	if fresh {
		when += fmt.Sprintf(", within the %s tolerance", tolerance)
	} else {
		when += fmt.Sprintf(", outside the %s tolerance (the gateway answers 400; a resend from Kayle signs anew)", tolerance)
	}
	if len(matched) == 0 {
		fmt.Fprintf(out, "signature: matches none of the %d configured signing secrets (the gateway answers 400); %s\n", len(secrets), when)
		return false
	}
	fmt.Fprintf(out, "signature: matches signing secret %s of %d; %s\n", strings.Join(matched, ", "), len(secrets), when)
	return fresh
}

// configuredKIDs lists a key ring's kids in configuration order.
func configuredKIDs(kr kayle.KeyRing) string {
	kids := make([]string, len(kr.Keys))
	for i, k := range kr.Keys {
		kids[i] = fmt.Sprintf("%q", k.KID)
	}
	return strings.Join(kids, ", ")
}
