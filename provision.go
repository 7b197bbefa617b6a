package kaylewebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/standardwebhooks"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Provision resolves secrets, loads the keys and opens the dedupe storage.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.setLogger(ctx.Logger())
	// Caddy validates after provisioning; a value that can never work is
	// refused before any file is read or the storage is opened and probed.
	if err := h.Validate(); err != nil {
		return err
	}
	if h.now == nil {
		h.now = time.Now
	}
	if h.exiting == nil {
		h.exiting = caddy.Exiting
	}
	h.tolerance = time.Duration(h.Tolerance)
	if h.tolerance == 0 {
		h.tolerance = defaultTolerance
	}
	if h.MaxBodySize == 0 {
		h.MaxBodySize = defaultMaxBodySize
	}
	repl := caddy.NewReplacer()
	if err := h.provisionSecrets(repl); err != nil {
		return err
	}
	if err := h.provisionForwardKeys(repl); err != nil {
		return err
	}
	if err := h.provisionKeys(repl); err != nil {
		return err
	}
	if err := h.checkDemoMaterial(ctx); err != nil {
		return err
	}
	if err := h.provisionEvents(); err != nil {
		return fmt.Errorf("%v (JSON events)", err)
	}
	kids := make([]string, len(h.keys.Keys))
	for i, k := range h.keys.Keys {
		kids[i] = k.KID
	}
	if err := registerMetrics(ctx.GetMetricsRegistry(), kids, len(h.secrets)); err != nil {
		return err
	}
	if h.DedupeDisabled {
		if h.StorageRaw != nil || h.DedupeWindow != 0 || h.DedupePrefix != "" {
			h.logger.Warn("dedupe is off: storage, dedupe_window and dedupe_prefix are ignored")
		}
		return nil
	}
	if err := h.provisionDedupe(ctx); err != nil {
		return err
	}
	if h.Queue == nil {
		go warnStrandedQueue(h.dedupe, h.logger)
		return nil
	}
	if err := h.provisionQueue(ctx); err != nil {
		return err
	}
	h.queue.start()
	return nil
}

func (h *Handler) provisionSecrets(repl *caddy.Replacer) error {
	h.secrets = h.secrets[:0]
	for i, raw := range h.SigningSecrets {
		secret, err := repl.ReplaceOrErr(raw, true, true)
		name := fmt.Sprintf("signing secret #%d (signing_secret, JSON signing_secrets[%d])", i+1, i)
		if err != nil {
			// not err itself: it quotes the {…} it stopped at, which in a
			// literal secret would be part of the secret
			return fmt.Errorf("%s: a placeholder in it is unknown or empty (an unset env var, an unreadable file); a literal secret must not contain '{'", name)
		}
		if len(secret) < minSecretLen {
			return fmt.Errorf("%s is %d bytes after placeholders; at least %d are required (Kayle's are whsec_ and 32 more)", name, len(secret), minSecretLen)
		}
		if hasControlByte(secret) {
			// HMAC pads a key with zero bytes to its block size, so the
			// published demo secret plus a NUL signs as the demo secret
			return fmt.Errorf("%s holds a control byte (a NUL, a line break, a tab…) after placeholders; Kayle's secrets have none, and HMAC would sign with a secret ending in NUL exactly as without it", name)
		}
		h.secrets = append(h.secrets, []byte(secret))
	}
	if len(h.secrets) == 0 {
		return errors.New("no signing_secret (JSON signing_secrets) configured")
	}
	h.macKeys = kayle.NewMACKeys(h.secrets)
	return nil
}

func (h *Handler) provisionForwardKeys(repl *caddy.Replacer) error {
	h.forwardKeys = h.forwardKeys[:0]
	for i, raw := range h.ForwardSignatureSecrets {
		secret, err := repl.ReplaceOrErr(raw, true, true)
		if err != nil {
			// not err itself, which would quote part of a literal secret
			return fmt.Errorf("forward_signature secret #%d: a placeholder in it is unknown or empty (an unset env var, an unreadable file); a literal secret must not contain '{' (JSON forward_signature_secrets[%d])", i+1, i)
		}
		key, err := standardwebhooks.ParseSecret(strings.TrimSpace(secret))
		if err != nil {
			return fmt.Errorf("forward_signature secret #%d %v (JSON forward_signature_secrets[%d])", i+1, err, i)
		}
		h.forwardKeys = append(h.forwardKeys, key)
	}
	return nil
}

func (h *Handler) provisionKeys(repl *caddy.Replacer) error {
	h.keys = kayle.KeyRing{}
	for i, kf := range h.DecryptionKeys {
		name := fmt.Sprintf("decryption key %q (decryption_key, JSON decryption_keys[%d])", kf.KeyID, i)
		path, err := repl.ReplaceOrErr(kf.File, true, true)
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		key, fileKID, err := kayle.LoadPrivateKeyFile(path)
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		if fileKID != "" && fileKID != kf.KeyID {
			return fmt.Errorf("%s: the JWK in %s says kid %q", name, path, fileKID)
		}
		if err := h.keys.Add(kf.KeyID, key); err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
	}
	for i, raw := range h.DecryptionJWKS {
		name := fmt.Sprintf("decryption JWKS #%d (decryption_jwks, JSON decryption_jwks[%d])", i+1, i)
		path, err := repl.ReplaceOrErr(raw, true, true)
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		keys, err := kayle.LoadJWKSFile(path)
		if err != nil {
			return fmt.Errorf("%s: %v", name, err)
		}
		for _, k := range keys {
			if err := h.keys.Add(k.KID, k.Private); err != nil {
				return fmt.Errorf("%s: %v", name, err)
			}
		}
	}
	if len(h.keys.Keys) == 0 {
		return errors.New("no decryption_key (JSON decryption_keys) or decryption_jwks (JSON decryption_jwks) configured")
	}
	return nil
}

func (h *Handler) provisionDedupe(ctx caddy.Context) error {
	window := time.Duration(h.DedupeWindow) // checked by Validate
	if window == 0 {
		window = defaultDedupeWindow
	}
	if h.DedupePrefix == "" {
		h.DedupePrefix = defaultDedupePrefix
	}
	prefix, err := cleanPrefix(h.DedupePrefix)
	if err != nil {
		return fmt.Errorf("%v (JSON dedupe_prefix)", err)
	}
	var storage certmagic.Storage
	storageRaw := h.StorageRaw // LoadModule clears it
	if h.StorageRaw != nil {
		mod, err := ctx.LoadModule(h, "StorageRaw")
		if err != nil {
			return fmt.Errorf("loading dedupe storage module (storage, JSON storage): %v", err)
		}
		storage, err = mod.(caddy.StorageConverter).CertMagicStorage()
		if err != nil {
			return fmt.Errorf("opening dedupe storage (storage, JSON storage): %v", err)
		}
	} else {
		storage = ctx.Storage()
	}
	d := newDeduper(storage, prefix, window, h.logger, h.now)
	if h.timing != nil {
		d.timing = h.timing.lock
	}
	if err := probeExclusion(storage, storageIdentity(storage, storageRaw, prefix), h.logger); err != nil {
		return fmt.Errorf("dedupe storage %s: %w; use a storage whose lock excludes (see the storage table in docs/clusters.md), or set dedupe off", storageName(storageRaw, storage), err)
	}
	d.storageConfig = storageRaw
	d.register()
	h.dedupe = d
	h.dedupe.startSweeper(ctx)
	return nil
}

// storageName names a dedupe storage for an error: its module name when
// the handler configures one, else the global storage's type.
func storageName(raw json.RawMessage, storage certmagic.Storage) string {
	var mod struct {
		Module string `json:"module"`
	}
	if json.Unmarshal(raw, &mod) == nil && mod.Module != "" {
		return "caddy.storage." + mod.Module
	}
	return fmt.Sprintf("(the global storage, %T)", storage)
}

// setLogger sets the handler's logger. A flood of forged requests must not
// become a flood of log lines (nor cost one each): refusals are logged at
// most rejectLogBurst a second, and every one is still counted.
func (h *Handler) setLogger(logger *zap.Logger) {
	h.logger = logger
	h.rejectLogger = logger.WithOptions(zap.WrapCore(func(core zapcore.Core) zapcore.Core {
		return zapcore.NewSamplerWithOptions(core, time.Second, rejectLogBurst, 0)
	}))
}

// Validate checks the configuration for values that can never work: every
// range check of a setting is here, so a JSON config gets the same ones as
// a Caddyfile (whose parser checks the same ranges, to point at the line).
// Zero is each setting's default. Provision calls it first too.
func (h *Handler) Validate() error {
	if h.MaxBodySize < 0 || (h.MaxBodySize != 0 && !validMaxBodySize(uint64(h.MaxBodySize))) {
		return errMaxBodySizeRange(strconv.FormatInt(h.MaxBodySize, 10) + " bytes")
	}
	if h.Tolerance < 0 {
		return fmt.Errorf("tolerance (JSON tolerance) is %s; it must not be negative", time.Duration(h.Tolerance))
	}
	if h.Queue != nil {
		if err := h.Queue.validate(h.DedupeDisabled); err != nil {
			return err
		}
	}
	if !h.DedupeDisabled && h.DedupeWindow != 0 && time.Duration(h.DedupeWindow) < minDedupeWindow {
		return fmt.Errorf("dedupe_window (JSON dedupe_window) %s is shorter than Kayle's retry and replay horizon; use at least 8d", time.Duration(h.DedupeWindow))
	}
	return nil
}

// validMaxBodySize is max_body_size's range: from 1 byte to 1 GiB.
func validMaxBodySize(size uint64) bool { return size >= 1 && size <= maxMaxBodySize }

// errMaxBodySizeRange refuses a max_body_size, as given, outside its range.
func errMaxBodySizeRange(given string) error {
	return fmt.Errorf("max_body_size (JSON max_body_size) is %s; it must be between 1 byte and 1GiB", given)
}

// hasControlByte reports whether s holds an ASCII control byte (below 0x20,
// or DEL).
func hasControlByte(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return true
		}
	}
	return false
}
