package kaylewebhook

import (
	"bytes"
	"context"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/go-jose/go-jose/v4"
	"github.com/spf13/cobra"
)

// Defaults of "caddy kayle send". Each matches Caddyfile.example, including
// the environment variables it reads, so a bare send reaches a gateway
// started with that file.
const (
	sendDefaultKeyFile    = "testdata/demo/demo-key.pem"
	sendDefaultSecretFile = "testdata/demo/demo-secret.txt"
	sendDefaultKID        = "demo"
	defaultPort           = "8080"
	defaultEventType      = "verification.session.succeeded"

	// unknownKID is what --corrupt kid encrypts under: no gateway holds it.
	unknownKID = "kayle-send-unknown-kid"
	// notAJWE is what --corrupt body sends: fixed text, so it can never be
	// personal data.
	notAJWE = "this body is deliberately not a JWE (caddy kayle send --corrupt body)\n"
	// maxRepeat keeps a typo from flooding a gateway.
	maxRepeat = 1000
	// maxPrintedBody bounds how much of each response is printed.
	maxPrintedBody = 64 << 10
	sendTimeout    = 30 * time.Second
)

// corruptions maps each --corrupt value to the status the handler answers it
// with, shown to the user as what to expect.
var corruptions = map[string]int{
	"signature":  http.StatusBadRequest,
	"timestamp":  http.StatusBadRequest,
	"ciphertext": http.StatusUnprocessableEntity,
	"body":       http.StatusUnprocessableEntity,
	"kid":        http.StatusInternalServerError,
}

var contentEncryptions = map[string]jose.ContentEncryption{
	"A128GCM": jose.A128GCM,
	"A192GCM": jose.A192GCM,
	"A256GCM": jose.A256GCM,
}

func newSendCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "send [flags]",
		Short: "Sends a genuine Kayle delivery (encrypted and signed) to a gateway",
		Long: `
Makes a webhook delivery as Kayle does and POSTs it: a sample payload (or
--payload) encrypted to an RSA public key as a compact JWE (RSA-OAEP-256),
signed with the endpoint's signing secret in X-Kayle-Signature. For each
request it prints the status line, X-Kayle-Duplicate if present and the
response body, and the gateway's X-Kayle-Refused reason when it refused.
It exits 0 only if every response was 2xx (with --corrupt: the expected
refusal).

The defaults are the demo material in testdata/demo and the address
Caddyfile.example listens on, so from the repository root:

    go run ./cmd/caddy run --config Caddyfile.example
    go run ./cmd/caddy kayle send

Like Caddyfile.example, the defaults follow KAYLE_KEY_FILE, KAYLE_KEY_ID,
KAYLE_SIGNING_SECRET_FILE and KAYLE_LISTEN_PORT when they are set. Relative
paths are relative to the current directory.

--type <event type>
    The sample payload to send: verification.session.succeeded (default),
    .failed, .expired or .cancelled; any other type gets a sample with
    "data": {}. Each sample has a fresh metadata.event_id and session id.
    With --payload it only sets the X-Kayle-Event header (default: the
    payload's own "type").

--payload <file>
    Send this file as the plaintext, byte for byte, instead of a sample.

--event-id <id>
    Use this metadata.event_id in the sample, e.g. to send one event twice.

--config <file> [--adapter <name>]
    The gateway's config: the signing secret, the key (the public half of
    the configured private key) and its kid are taken from its first
    kayle_webhook handler, placeholders resolved as the gateway resolves
    them. --key, --kid and --secret(-file), when given, still win. Give
    --url too: the config does not say how Kayle reaches the gateway.

--key <file>
    The RSA key to encrypt to: a public key (PEM or JWK) or a private key
    (PEM or JWK), whose public half is used. Default: $KAYLE_KEY_FILE, else
    testdata/demo/demo-key.pem.

--kid <key id>
    The kid in the JWE header. Default: the JWK's kid; else, without --key,
    $KAYLE_KEY_ID; else "demo" for the demo key. Any other key without a
    kid is refused: pass its --kid. --kid "" sends no kid (the gateway then
    tries every key).

--enc <A256GCM|A192GCM|A128GCM>
    The content encryption. Default: A256GCM, as Kayle.

--secret-file <file>, --secret <secret>
    The signing secret (whsec_...). A file's trailing newline is dropped, as
    Caddy's {file.*} placeholder does. Default: $KAYLE_SIGNING_SECRET_FILE,
    else testdata/demo/demo-secret.txt. --secret shows the secret to other
    users of this machine (process list, shell history): prefer a file.

--time-offset <duration>
    Shift the signature's t, e.g. -10m to test the staleness check.

--repeat <n>
    Send the same delivery (same event, same body) n times, each with a new
    signature and X-Kayle-Delivery-Id, as Kayle's retries are. Default: 1.

--corrupt <signature|ciphertext|kid|timestamp|body>
    Break the delivery on purpose; the gateway must refuse it:
      signature   flip a hex digit of v1                      (400)
      timestamp   sign with a t 10 minutes old                (400)
      ciphertext  flip a ciphertext byte, then sign           (422)
      body        sign a body that is not a JWE               (422)
      kid         encrypt to a kid the gateway does not hold  (500)
    The command then exits 0 only if every answer had that status.

--url <url>
    Where to POST. Default: http://localhost:8080/ (or $KAYLE_LISTEN_PORT).

--print-payload
    Print the plaintext payload. Off by default: a real payload is personal
    data. The response body is printed as it comes, so a backend that echoes
    the payload (like Caddyfile.example's demo backend) shows it anyway.
`,
		Args: cobra.NoArgs,
		RunE: runWith(cmdKayleSend),
	}
	f := cmd.Flags()
	f.String("config", "", "the gateway's config: take the secret, key and kid from its first kayle_webhook handler")
	f.String("adapter", "", "the config adapter, as for caddy run (default: by the file name)")
	f.String("url", "", "URL to POST to (default http://localhost:8080/)")
	f.StringP("type", "t", defaultEventType, "event type of the sample payload")
	f.String("payload", "", "file holding the plaintext payload to send as is, instead of a sample")
	f.String("event-id", "", "metadata.event_id of the sample (default: a fresh evt_…)")
	f.String("key", "", "RSA public or private key file to encrypt to (default "+sendDefaultKeyFile+")")
	f.String("kid", "", `kid in the JWE header (default: the JWK's kid, or "demo" for the demo key)`)
	f.String("enc", "A256GCM", "content encryption: A256GCM, A192GCM or A128GCM")
	f.String("secret-file", "", "file holding the signing secret (default "+sendDefaultSecretFile+")")
	f.String("secret", "", "the signing secret itself (prefer --secret-file)")
	f.Duration("time-offset", 0, "shift the signature timestamp by this much, e.g. -10m")
	f.IntP("repeat", "n", 1, "send the same delivery this many times")
	f.String("corrupt", "", "break the delivery: signature, ciphertext, kid, timestamp or body")
	f.Bool("print-payload", false, "print the plaintext payload (personal data in real use)")
	return cmd
}

// sendOptions is what "caddy kayle send" was asked to do. Empty fields take
// the defaults documented on the command.
type sendOptions struct {
	Config       string // the gateway's config, for the secret, key and kid
	Adapter      string
	URL          string
	EventType    string // sample type; with PayloadFile, only the X-Kayle-Event header
	PayloadFile  string
	EventID      string
	KeyFile      string
	KID          string
	OmitKID      bool // no kid in the JWE header
	Enc          string
	SecretFile   string
	Secret       string
	TimeOffset   time.Duration
	Repeat       int // 0 means 1
	Corrupt      string
	PrintPayload bool
}

func cmdKayleSend(fl caddycmd.Flags, _ []string, s cmdIO) (int, error) {
	opts, err := sendOptionsFromFlags(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if err := runSend(context.Background(), opts, s); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

// sendOptionsFromFlags reads the flags; values are checked by newSendPlan.
func sendOptionsFromFlags(fl caddycmd.Flags) (sendOptions, error) {
	var o sendOptions
	var err error
	o.Config = fl.String("config")
	o.Adapter = fl.String("adapter")
	if fl.Changed("config") && o.Config == "" {
		return o, errors.New("--config must not be empty")
	}
	o.URL = fl.String("url")
	o.EventType = fl.String("type")
	if fl.Changed("type") && o.EventType == "" {
		return o, errors.New("--type must not be empty")
	}
	o.PayloadFile = fl.String("payload")
	if o.PayloadFile != "" && !fl.Changed("type") {
		o.EventType = "" // the payload's own type
	}
	o.EventID = fl.String("event-id")
	if fl.Changed("event-id") && o.EventID == "" {
		return o, errors.New("--event-id must not be empty")
	}
	o.KeyFile = fl.String("key")
	o.KID = fl.String("kid")
	o.OmitKID = fl.Changed("kid") && o.KID == ""
	o.Enc = fl.String("enc")
	o.SecretFile = fl.String("secret-file")
	o.Secret = fl.String("secret")
	if fl.Changed("secret") && o.Secret == "" {
		return o, errors.New("--secret must not be empty")
	}
	if o.TimeOffset, err = fl.GetDuration("time-offset"); err != nil {
		return o, err
	}
	if o.Repeat, err = fl.GetInt("repeat"); err != nil {
		return o, err
	}
	if o.Repeat < 1 {
		return o, fmt.Errorf("--repeat must be at least 1, not %d", o.Repeat)
	}
	o.Corrupt = fl.String("corrupt")
	if fl.Changed("corrupt") && o.Corrupt == "" {
		return o, errors.New("--corrupt needs one of: " + corruptionNames())
	}
	o.PrintPayload = fl.Bool("print-payload")
	return o, nil
}

// sendPlan is one delivery, encrypted once, that can be signed and sent any
// number of times: Kayle retries resend the same ciphertext, signed anew.
type sendPlan struct {
	url        string
	urlGiven   bool   // --url was given: the demo hint would mislead
	from       string // the config handler the material came from, if any
	eventType  string // X-Kayle-Event; not sent when empty
	eventID    string // for display only; empty when a payload file has none
	kid        string
	enc        jose.ContentEncryption
	payload    []byte // the plaintext: printed only with --print-payload
	body       []byte // exactly what is POSTed and signed
	secret     []byte
	timeOffset time.Duration
	corrupt    string
	repeat     int
}

// newSendPlan checks the options, reads the key, secret and payload, and
// encrypts (and, if asked, corrupts) the delivery body.
func newSendPlan(o sendOptions) (*sendPlan, error) {
	p := &sendPlan{timeOffset: o.TimeOffset, corrupt: o.Corrupt, repeat: o.Repeat}
	if p.repeat == 0 {
		p.repeat = 1
	}
	if p.repeat < 1 || p.repeat > maxRepeat {
		return nil, fmt.Errorf("--repeat must be between 1 and %d, not %d", maxRepeat, p.repeat)
	}
	if _, ok := corruptions[p.corrupt]; p.corrupt != "" && !ok {
		return nil, fmt.Errorf("--corrupt %q: must be one of %s", p.corrupt, corruptionNames())
	}
	encName := o.Enc
	if encName == "" {
		encName = "A256GCM"
	}
	var ok bool
	if p.enc, ok = contentEncryptions[strings.ToUpper(encName)]; !ok {
		return nil, fmt.Errorf("--enc %q: must be A256GCM, A192GCM or A128GCM", encName)
	}
	var err error
	if p.url, err = sendURL(o.URL); err != nil {
		return nil, err
	}
	p.urlGiven = o.URL != ""
	if o.Secret != "" && o.SecretFile != "" {
		return nil, errors.New("give --secret or --secret-file, not both")
	}
	var conf *sendMaterial
	if o.Config != "" {
		if conf, err = configMaterial(o.Config, o.Adapter); err != nil {
			return nil, err
		}
	}
	var fromConfig []string
	if conf != nil && o.Secret == "" && o.SecretFile == "" {
		p.secret = conf.secret
		fromConfig = append(fromConfig, "secret")
	} else if p.secret, err = loadSecret(o); err != nil {
		return nil, err
	}
	if err := p.makePayload(o); err != nil {
		return nil, err
	}

	var pub *rsa.PublicKey
	var jwkKID, keyFile string
	if conf != nil && o.KeyFile == "" {
		pub, jwkKID = conf.pub, conf.kid
		fromConfig = append(fromConfig, "key")
		if !o.OmitKID && o.KID == "" {
			fromConfig = append(fromConfig, "kid")
		}
	} else {
		var demo bool
		keyFile, demo = defaultPath(o.KeyFile, "KAYLE_KEY_FILE", sendDefaultKeyFile)
		if pub, jwkKID, err = kayle.LoadPublicKeyFile(keyFile); err != nil {
			return nil, fileError(err, keyFile, demo, "--key")
		}
	}
	switch {
	case o.OmitKID:
	case o.KID != "":
		p.kid = o.KID
	case jwkKID != "":
		p.kid = jwkKID
	case o.KeyFile == "" && os.Getenv("KAYLE_KEY_ID") != "":
		// the key is $KAYLE_KEY_FILE's, which Caddyfile.example pairs with it
		p.kid = os.Getenv("KAYLE_KEY_ID")
	case kayle.IsDemoKey(pub):
		p.kid = sendDefaultKID
	default:
		// a guessed kid would only get a 500 from the gateway
		hint := ", or --config <the gateway's config>"
		if conf != nil {
			hint = "" // --key replaced the config's key, and its kid with it
		}
		return nil, fmt.Errorf("%s holds no kid and is not the demo key: pass --kid <the key_id it is registered under at Kayle> (or --kid \"\" to send none; the gateway then tries every key)%s", keyFile, hint)
	}
	if p.corrupt == "kid" {
		p.kid = unknownKID
	}
	if len(fromConfig) > 0 {
		p.from = strings.Join(fromConfig, ", ") + ": from " + conf.where
	}

	if p.corrupt == "body" {
		p.body = []byte(notAJWE)
		return p, nil
	}
	if p.body, err = kayle.EncryptDelivery(p.payload, pub, p.kid, p.enc); err != nil {
		return nil, err
	}
	if p.corrupt == "ciphertext" {
		if p.body, err = kayle.FlipCiphertextByte(p.body); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// makePayload reads --payload or builds the sample, and sets the type and id
// shown and sent in headers.
func (p *sendPlan) makePayload(o sendOptions) error {
	if o.PayloadFile != "" {
		if o.EventID != "" {
			return errors.New("--event-id applies to the built-in samples; with --payload, edit metadata.event_id in the file")
		}
		payload, err := os.ReadFile(o.PayloadFile)
		if err != nil {
			return err
		}
		p.payload = payload
		// best effort, for display and the unsigned X-Kayle-Event header:
		// the file is sent as is, valid or not
		if ev, err := kayle.ParseEvent(payload); err == nil {
			p.eventID, p.eventType = ev.ID, ev.Type
		}
		if o.EventType != "" {
			p.eventType = o.EventType
		}
		if p.eventType != "" && !kayle.HeaderSafe(p.eventType) {
			return fmt.Errorf("--type %q cannot be sent in a header", o.EventType)
		}
		return nil
	}
	p.eventType = o.EventType
	if p.eventType == "" {
		p.eventType = defaultEventType
	}
	if !kayle.HeaderSafe(p.eventType) {
		return fmt.Errorf("--type %q: must be non-empty, at most %d bytes, no control characters", p.eventType, kayle.MaxIDLen)
	}
	p.eventID = o.EventID
	if p.eventID == "" {
		p.eventID = "evt_" + kayle.RandomHex(12)
	} else if !kayle.HeaderSafe(p.eventID) {
		return fmt.Errorf("--event-id %q: must be at most %d bytes, no control characters", p.eventID, kayle.MaxIDLen)
	}
	var err error
	p.payload, err = kayle.SamplePayload(p.eventType, p.eventID)
	return err
}

// newRequest signs the body at now (shifted by --time-offset) and makes one
// POST with a fresh delivery id, as each Kayle attempt is.
func (p *sendPlan) newRequest(ctx context.Context, now time.Time) (*http.Request, error) {
	t := now.Add(p.timeOffset)
	if p.corrupt == "timestamp" {
		t = t.Add(-10 * time.Minute) // twice the gateway's default tolerance
	}
	sig := kayle.SignatureHeaderValue(p.secret, t, p.body)
	if p.corrupt == "signature" {
		sig = kayle.FlipLastHexDigit(sig)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.url, bytes.NewReader(p.body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/jose")
	req.Header.Set(kayle.SignatureHeader, sig)
	req.Header.Set(kayle.HeaderDeliveryID, "whd_"+kayle.RandomHex(12))
	if p.eventType != "" {
		req.Header.Set(kayle.HeaderEvent, p.eventType)
	}
	req.Header.Set("User-Agent", "caddy-kayle-send")
	return req, nil
}

// runSend sends the delivery o describes and prints each answer to s.out.
// It returns an error if a request failed or any answer was not 2xx (with
// --corrupt: not the refusal the corruption must get).
func runSend(ctx context.Context, o sendOptions, s cmdIO) error {
	out := s.out
	p, err := newSendPlan(o)
	if err != nil {
		return err
	}
	p.describe(out)
	if o.PrintPayload {
		fmt.Fprintf(out, "payload (plaintext, %d bytes):\n%s", len(p.payload), withNewline(p.payload))
	}
	client := &http.Client{
		Timeout: sendTimeout,
		// show a redirect as the answer it is: Kayle does not follow them
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	failed := 0
	for i := 1; i <= p.repeat; i++ {
		req, err := p.newRequest(ctx, time.Now())
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "\n#%d POST %s  %s: %s\n", i, p.url, kayle.HeaderDeliveryID, req.Header.Get(kayle.HeaderDeliveryID))
		resp, err := client.Do(req)
		if err != nil {
			if p.urlGiven {
				return fmt.Errorf("%v (is the gateway listening at %s?)", err, p.url)
			}
			return fmt.Errorf("%v (is the gateway running? go run ./cmd/caddy run --config Caddyfile.example)", err)
		}
		if !p.expected(printResponse(out, resp)) {
			failed++
		}
	}
	if failed == 0 {
		return nil
	}
	if p.corrupt != "" {
		return fmt.Errorf("%d of %d responses were not the %d that --corrupt %s must get", failed, p.repeat, corruptions[p.corrupt], p.corrupt)
	}
	return fmt.Errorf("%d of %d responses were not 2xx", failed, p.repeat)
}

func (p *sendPlan) describe(out io.Writer) {
	eventID := p.eventID
	if eventID == "" {
		eventID = "(none readable in the payload file)"
	}
	kid := fmt.Sprintf("kid %q", p.kid)
	if p.kid == "" {
		kid = "no kid"
	}
	body := fmt.Sprintf("JWE RSA-OAEP-256 + %s to %s (%d bytes)", p.enc, kid, len(p.body))
	if p.corrupt == "body" {
		body = fmt.Sprintf("a %d-byte body that is not a JWE", len(p.body))
	}
	fmt.Fprintf(out, "%s event %s: %d-byte payload, %s\n", orNone(p.eventType), eventID, len(p.payload), body)
	if p.from != "" {
		fmt.Fprintln(out, p.from)
	}
	if p.corrupt != "" {
		fmt.Fprintf(out, "corrupted on purpose (--corrupt %s): the gateway should answer %d\n", p.corrupt, corruptions[p.corrupt])
	}
}

// expected reports whether an answer's status is the one this delivery
// must get: 2xx, or the refusal of its corruption.
func (p *sendPlan) expected(status int) bool {
	if p.corrupt != "" {
		return status == corruptions[p.corrupt]
	}
	return status >= 200 && status <= 299
}

// printResponse prints the status line, X-Kayle-Queued, X-Kayle-Duplicate,
// X-Kayle-Ignored, X-Kayle-Refused, Location and the body (bounded), and
// returns the status.
func printResponse(out io.Writer, resp *http.Response) int {
	defer resp.Body.Close()
	fmt.Fprintf(out, "%s %s\n", resp.Proto, resp.Status)
	for _, name := range []string{kayle.HeaderQueued, kayle.HeaderDuplicate, kayle.HeaderIgnored, kayle.HeaderRefused, "Location"} {
		if v := resp.Header.Get(name); v != "" {
			fmt.Fprintf(out, "%s: %s\n", name, v)
		}
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPrintedBody+1))
	if len(body) > maxPrintedBody {
		fmt.Fprintf(out, "%s… (truncated at %d bytes)\n", body[:maxPrintedBody], maxPrintedBody)
	} else if len(body) > 0 {
		fmt.Fprint(out, withNewline(body))
	}
	if err != nil {
		fmt.Fprintf(out, "(reading the response body: %v)\n", err)
	}
	return resp.StatusCode
}

// sendURL checks --url, or makes the default from KAYLE_LISTEN_PORT.
func sendURL(raw string) (string, error) {
	if raw == "" {
		port := os.Getenv("KAYLE_LISTEN_PORT")
		if port == "" {
			port = defaultPort
		}
		raw = "http://localhost:" + port + "/"
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("--url %q: must be an http:// or https:// URL with a host", raw)
	}
	return u.String(), nil
}

// loadSecret reads the signing secret, trimming the file as Caddy's
// {file.*} placeholder (which Caddyfile.example uses) does, so both sides
// agree on its bytes.
func loadSecret(o sendOptions) ([]byte, error) {
	if o.Secret != "" {
		return []byte(o.Secret), nil
	}
	path, demo := defaultPath(o.SecretFile, "KAYLE_SIGNING_SECRET_FILE", sendDefaultSecretFile)
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fileError(err, path, demo, "--secret-file or --secret")
	}
	data = bytes.TrimSuffix(data, []byte("\n"))
	data = bytes.TrimSuffix(data, []byte("\r"))
	if len(data) == 0 {
		return nil, fmt.Errorf("signing secret file %s is empty", path)
	}
	return data, nil
}

// defaultPath returns flagValue, else $envVar, else demoPath, and whether
// the demo file was chosen.
func defaultPath(flagValue, envVar, demoPath string) (string, bool) {
	if flagValue != "" {
		return flagValue, false
	}
	if v := os.Getenv(envVar); v != "" {
		return v, false
	}
	return demoPath, true
}

// fileError explains a missing demo file: the defaults are relative to the
// repository root.
func fileError(err error, path string, demo bool, flags string) error {
	if demo && errors.Is(err, fs.ErrNotExist) {
		wd, _ := os.Getwd()
		return fmt.Errorf("demo file %s not found in %s: run from the repository root or pass %s", path, wd, flags)
	}
	return err
}

func corruptionNames() string {
	names := make([]string, 0, len(corruptions))
	for name := range corruptions {
		names = append(names, name)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

func orNone(s string) string {
	if s == "" {
		return "(no type)"
	}
	return s
}

// sendMaterial is what a gateway's config gives send: the signing secret,
// and the public half and kid of a configured private key.
type sendMaterial struct {
	where  string
	secret []byte
	pub    *rsa.PublicKey
	kid    string
}

// configMaterial reads the first kayle_webhook handler of a config, its
// secrets and keys loaded as Provision loads them, and takes its first
// signing secret and first key.
func configMaterial(configFile, adapter string) (*sendMaterial, error) {
	lc, err := loadHandlers(configFile, adapter)
	if err != nil {
		return nil, err
	}
	c := lc.handlers[0]
	repl := caddy.NewReplacer()
	if err := c.handler.provisionSecrets(repl); err != nil {
		return nil, fmt.Errorf("%s, %s: %v", configFile, c.where, err)
	}
	if err := c.handler.provisionKeys(repl); err != nil {
		return nil, fmt.Errorf("%s, %s: %v", configFile, c.where, err)
	}
	key := c.handler.keys.Keys[0]
	where := fmt.Sprintf("%s, the kayle_webhook handler at %s (signing secret #1, key %q)", configFile, c.where, key.KID)
	if len(lc.handlers) > 1 {
		where += fmt.Sprintf(", the first of %d", len(lc.handlers))
	}
	return &sendMaterial{where: where, secret: c.handler.secrets[0], pub: &key.Private.PublicKey, kid: key.KID}, nil
}
