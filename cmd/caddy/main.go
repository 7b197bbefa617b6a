// Command caddy is Caddy with its standard modules and the kayle_webhook plugin,
// so that `go run ./cmd/caddy run --config Caddyfile.example` needs no xcaddy.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func main() {
	caddycmd.Main()
}
