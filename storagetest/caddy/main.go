// Command caddy is the gateway the storage matrix runs: Caddy with its
// standard modules, the kayle_webhook plugin, and the storage modules the
// matrix tests the plugin's dedupe on.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddy-kayle-webhook/caddy-kayle-webhook"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/pberkel/caddy-storage-redis"

	// stand-ins for the PostgreSQL and NATS modules, which this machine's
	// module proxy does not serve: their lock semantics on the real servers
	_ "github.com/caddy-kayle-webhook/caddy-kayle-webhook/storagetest/natskvstorage"
	_ "github.com/caddy-kayle-webhook/caddy-kayle-webhook/storagetest/pglockstorage"
)

func main() {
	caddycmd.Main()
}
