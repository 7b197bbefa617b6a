package kaylewebhook

// The demo material in testdata/demo is published with the source, so
// anyone can sign and encrypt deliveries that it accepts. Caddyfile.example
// falls back to it for each unset variable; this file makes sure such a
// fallback never guards a real endpoint unnoticed.

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayle"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

const (
	// demoPublicEnv, set to a true value in Caddy's environment, lets the
	// demo material run on a listener that is not loopback-only.
	demoPublicEnv = "KAYLE_DEMO_PUBLIC"
	// demoVariables is what to check in Caddyfile.example.
	demoVariables = "Caddyfile.example: KAYLE_SIGNING_SECRET_FILE, KAYLE_KEY_ID, KAYLE_KEY_FILE"
)

// checkDemoMaterial refuses the demo material beside material of the
// user's own (a variable meant to replace the demo's is unset or
// misspelled), and on a listener that is not loopback-only unless
// KAYLE_DEMO_PUBLIC acknowledges it. Demo material it lets through is named
// in a WARN, at every provisioning: start and reload.
func (h *Handler) checkDemoMaterial(ctx caddy.Context) error {
	m := kayle.ClassifyMaterial(h.secrets, h.keys.Keys)
	if len(m.Demo) > 0 && len(m.Own) > 0 {
		return fmt.Errorf("refusing a mix of the published DEMO material in testdata/demo (%s) and material of your own (%s): "+
			"a variable meant to replace the demo's is probably unset or misspelled (%s); configure your own secret and key throughout, or the demo's alone",
			strings.Join(m.Demo, ", "), strings.Join(m.Own, ", "), demoVariables)
	}
	if m.OwnKeyUnderDemoKID {
		return fmt.Errorf("decryption key %q is not the published demo key, but %q is the demo's kid (testdata/demo): "+
			"KAYLE_KEY_ID is probably unset or misspelled; configure your key under the key_id you registered it with at Kayle",
			kayle.DemoKID, kayle.DemoKID)
	}
	if len(m.Demo) == 0 {
		return nil
	}
	listen, inServer := serverListen(ctx)
	acknowledged, _ := strconv.ParseBool(os.Getenv(demoPublicEnv))
	public := inServer && !loopbackOnly(listen)
	if public && !acknowledged {
		return fmt.Errorf("refusing the published DEMO material in testdata/demo (%s) on a listener that is not loopback-only (%s): anyone can sign deliveries for it. "+
			"Configure your own secret and key (%s), bind the site to 127.0.0.1 and ::1, or set %s=1 in Caddy's environment to run the demo there anyway",
			strings.Join(m.Demo, ", "), strings.Join(listen, " "), demoVariables, demoPublicEnv)
	}
	h.logger.Warn("this endpoint uses the published DEMO signing secret and key (testdata/demo): anyone can sign deliveries for it; configure your own before it guards anything real",
		zap.Strings("demo_material", m.Demo), zap.Strings("listen", listen), zap.Bool("public_acknowledged", public && acknowledged))
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
