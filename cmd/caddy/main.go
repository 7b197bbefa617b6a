// Command caddy is Caddy with its standard modules and the kayle_webhook
// plugin, so that `go run ./cmd/caddy run --config Caddyfile.example` needs no
// xcaddy. Production builds can use xcaddy instead (see xcaddy.md).
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddy-kayle-webhook/caddy-kayle-webhook"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func main() {
	caddycmd.Main()
}
