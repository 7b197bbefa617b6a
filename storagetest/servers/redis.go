package servers

import (
	"context"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"

	"github.com/caddy-kayle-webhook/caddy-kayle-webhook/internal/kayletest"
)

// Redis is a redis-server of a test's own.
type Redis struct {
	*Proc
	// Addr reaches it (127.0.0.1:<port>).
	Addr string
}

// StartRedis starts redis-server on a free loopback port as an operator
// running it for Caddy's storage would set it up: data persisted (an
// append-only file), so a restart keeps the records, and no eviction.
func StartRedis(t testing.TB) *Redis {
	t.Helper()
	bin := Find(t, "redis-server", "/usr/bin/redis-server")
	dir, err := os.MkdirTemp("", "kayle-redis-")
	if err != nil {
		t.Fatal(err)
	}
	r := &Redis{}
	r.Proc, _ = start(t, func() { _ = os.RemoveAll(dir) }, func(port int) *Proc {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		r.Addr = addr
		return &Proc{
			Name: "redis-server",
			argv: []string{bin,
				"--bind", "127.0.0.1", "--port", strconv.Itoa(port),
				"--dir", dir, "--appendonly", "yes", "--save", "",
				"--maxmemory-policy", "noeviction",
				"--daemonize", "no", "--logfile", "",
			},
			dir:   dir,
			ready: func(ctx context.Context) error { return kayletest.RedisPing(ctx, addr) },
			// as its service manager stops it; it saves and exits
			stopSignal: syscall.SIGTERM,
		}
	})
	return r
}
