package kaylewebhook

import (
	"context"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/certmagic"
	"github.com/spf13/cobra"
)

// The "caddy kayle" command and the helpers its subcommands share; each
// subcommand lives in its own cmd_<name>.go.
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "kayle",
		Usage: "send|keygen|jwk|forget|sweep|inspect|queue [flags]",
		Short: "Tools for the kayle_webhook handler",
		Long: `
Tools for running a kayle_webhook gateway:

    send      send a genuine (or deliberately broken) delivery to a gateway
    keygen    make a new RSA key: the private key file and the JWK to register
    jwk       print the public JWK of a key you already have
    forget    delete events' dedupe records, so a replay is forwarded again
    sweep     delete the dedupe records older than dedupe_window, now
    inspect   explain a captured delivery against a config's secrets and keys
    queue     list, retry or drop queued events; pause or resume the queue

Run "caddy kayle <command> --help" for each one's flags.
`,
		CobraFunc: func(cmd *cobra.Command) {
			cmd.AddCommand(newSendCommand(), newKeygenCommand(), newJWKCommand(), newForgetCommand(), newSweepCommand(), newInspectCommand(), newQueueCommand())
		},
	})
}

// cmdIO is where a subcommand reads and writes: the terminal in use, a
// buffer in tests. Results go to out, so they can be piped; notes for the
// person at the terminal go to notes (stderr).
type cmdIO struct {
	in    io.Reader
	out   io.Writer
	notes io.Writer
}

// runWith adapts a subcommand to cobra as caddycmd.WrapCommandFuncForCobra
// does (exit status, error logging), also handing it its arguments and the
// command's streams.
func runWith(f func(fl caddycmd.Flags, args []string, s cmdIO) (int, error)) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		s := cmdIO{in: cmd.InOrStdin(), out: cmd.OutOrStdout(), notes: cmd.ErrOrStderr()}
		return caddycmd.WrapCommandFuncForCobra(func(fl caddycmd.Flags) (int, error) {
			return f(fl, args, s)
		})(cmd, args)
	}
}

// publicJWK is an RSA public key as Kayle's key registration takes it, in
// that field order. It has no field for a private part.
type publicJWK struct {
	Kty string `json:"kty"`
	N   string `json:"n"`
	E   string `json:"e"`
	Kid string `json:"kid"`
	Alg string `json:"alg"`
	Use string `json:"use"`
}

func newPublicJWK(pub *rsa.PublicKey, kid string) publicJWK {
	return publicJWK{
		Kty: "RSA",
		N:   base64.RawURLEncoding.EncodeToString(pub.N.Bytes()),
		E:   base64.RawURLEncoding.EncodeToString(big.NewInt(int64(pub.E)).Bytes()),
		Kid: kid,
		Alg: "RSA-OAEP-256",
		Use: "enc",
	}
}

func (j publicJWK) marshal() ([]byte, error) {
	data, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// printKeyInstructions tells what to do with a key's JWK and file.
func printKeyInstructions(w io.Writer, kid, path string) {
	fmt.Fprintf(w, "Register the public JWK (on stdout) at Kayle as key_id %s. Then, in the kayle_webhook block:\n\n\t%s\n\n", kid, caddyfileLine(kid, path))
}

// caddyfileLine is the kayle_webhook subdirective that installs a key file.
func caddyfileLine(kid, path string) string {
	return "decryption_key " + caddyfileToken(kid) + " " + caddyfileToken(path)
}

// caddyfileToken quotes s when the Caddyfile would otherwise split or
// reinterpret it.
func caddyfileToken(s string) string {
	if s == "" || strings.ContainsAny(s, " \t\r\n\"'`{}#\\") {
		return strconv.Quote(s)
	}
	return s
}

// configuredHandler is one kayle_webhook handler found in a config.
type configuredHandler struct {
	where   string // its JSON path in the config, e.g. apps.http.servers.srv0.routes[0].handle[0]
	handler *Handler
}

// dedupePrefix is the cleaned prefix of the handler's dedupe records.
func (c configuredHandler) dedupePrefix() (string, error) {
	prefix := c.handler.DedupePrefix
	if prefix == "" {
		prefix = defaultDedupePrefix
	}
	return cleanPrefix(prefix)
}

// loadedConfig is what the forget and inspect commands read from a config.
type loadedConfig struct {
	file     string
	handlers []configuredHandler
	// StorageRaw is the config's global storage, if any.
	StorageRaw json.RawMessage `json:"storage,omitempty" caddy:"namespace=caddy.storage inline_key=module"`
}

// loadHandlers adapts a config as "caddy run" would and finds every
// kayle_webhook handler in its http app, wherever it is nested (subroutes,
// handle blocks, error routes, named routes).
func loadHandlers(configFile, adapter string) (*loadedConfig, error) {
	if configFile == "" {
		return nil, errors.New("--config is required: the config the gateway runs with")
	}
	cfg, _, _, err := caddycmd.LoadConfig(configFile, adapter)
	if err != nil {
		return nil, err
	}
	var top struct {
		Storage json.RawMessage `json:"storage"`
		Apps    struct {
			HTTP json.RawMessage `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfg, &top); err != nil {
		return nil, fmt.Errorf("%s: %v", configFile, err)
	}
	lc := &loadedConfig{file: configFile, StorageRaw: top.Storage}
	if top.Apps.HTTP != nil {
		if err := lc.findHandlers(top.Apps.HTTP, "apps.http"); err != nil {
			return nil, fmt.Errorf("%s: %v", configFile, err)
		}
	}
	if len(lc.handlers) == 0 {
		return nil, fmt.Errorf("%s has no kayle_webhook handler", configFile)
	}
	return lc, nil
}

func (lc *loadedConfig) findHandlers(raw json.RawMessage, where string) error {
	switch firstByte(raw) {
	case '{':
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(raw, &obj); err != nil {
			return err
		}
		var name string
		if json.Unmarshal(obj["handler"], &name) == nil && name == "kayle_webhook" {
			h := new(Handler)
			if err := json.Unmarshal(raw, h); err != nil {
				return fmt.Errorf("%s: %v", where, err)
			}
			lc.handlers = append(lc.handlers, configuredHandler{where: where, handler: h})
			return nil
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		slices.Sort(keys) // a stable order to list handlers in
		for _, k := range keys {
			if err := lc.findHandlers(obj[k], where+"."+k); err != nil {
				return err
			}
		}
	case '[':
		var arr []json.RawMessage
		if err := json.Unmarshal(raw, &arr); err != nil {
			return err
		}
		for i, v := range arr {
			if err := lc.findHandlers(v, fmt.Sprintf("%s[%d]", where, i)); err != nil {
				return err
			}
		}
	}
	return nil
}

func firstByte(raw json.RawMessage) byte {
	for _, c := range raw {
		if c != ' ' && c != '\t' && c != '\r' && c != '\n' {
			return c
		}
	}
	return 0
}

// openStorage opens the storage a handler keeps its dedupe records in, as
// Provision does: its own storage, else the config's global storage, else
// Caddy's default (the file storage under this user's data folder).
func (lc *loadedConfig) openStorage(ctx caddy.Context, c configuredHandler) (certmagic.Storage, string, error) {
	var (
		mod  any
		err  error
		desc string
	)
	switch {
	case c.handler.StorageRaw != nil:
		mod, err = ctx.LoadModule(c.handler, "StorageRaw")
		desc = "the handler's storage"
	case lc.StorageRaw != nil:
		mod, err = ctx.LoadModule(lc, "StorageRaw")
		desc = "the global storage"
	default:
		return caddy.DefaultStorage, "Caddy's default storage " + caddy.DefaultStorage.String(), nil
	}
	if err != nil {
		return nil, "", fmt.Errorf("loading %s: %v", desc, err)
	}
	storage, err := mod.(caddy.StorageConverter).CertMagicStorage()
	if err != nil {
		return nil, "", fmt.Errorf("opening %s: %v", desc, err)
	}
	if s, ok := storage.(fmt.Stringer); ok {
		desc += " " + s.String()
	}
	return storage, desc, nil
}

// newCommandContext is a Caddy context for loading modules outside a
// running config, as Caddy's own storage commands make one.
func newCommandContext() (caddy.Context, context.CancelFunc) {
	return caddy.NewContext(caddy.Context{Context: context.Background()})
}

func withNewline(b []byte) string {
	if len(b) > 0 && b[len(b)-1] != '\n' {
		return string(b) + "\n"
	}
	return string(b)
}
