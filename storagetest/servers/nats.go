package servers

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// NATS is a nats-server with JetStream of a test's own.
type NATS struct {
	*Proc
	// URL reaches it (nats://127.0.0.1:<port>).
	URL  string
	Port int
	// StoreDir is JetStream's folder: buckets survive a restart.
	StoreDir string
}

// StartNATS starts nats-server with JetStream on a free loopback port, its
// store in a temporary folder. The command:
//
//	/usr/sbin/nats-server -js -sd <dir>/jetstream -a 127.0.0.1 -p <port>
func StartNATS(t testing.TB) *NATS {
	t.Helper()
	bin := Find(t, "nats-server", "/usr/sbin/nats-server", "/usr/bin/nats-server")
	dir, err := os.MkdirTemp("", "kayle-nats-")
	if err != nil {
		t.Fatal(err)
	}
	n := &NATS{StoreDir: filepath.Join(dir, "jetstream")}
	n.Proc, n.Port = start(t, func() { _ = os.RemoveAll(dir) }, func(port int) *Proc {
		url := fmt.Sprintf("nats://127.0.0.1:%d", port)
		n.URL = url
		return &Proc{
			Name:  "nats-server",
			argv:  []string{bin, "-js", "-sd", n.StoreDir, "-a", "127.0.0.1", "-p", strconv.Itoa(port)},
			dir:   dir,
			ready: func(ctx context.Context) error { return natsPing(ctx, url) },
			// Debian's unit stops it with SIGINT
			stopSignal: syscall.SIGINT,
		}
	})
	return n
}

// CreateBucket makes a JetStream KV bucket as `nats kv add <bucket>` does
// by default (history 1, no TTL, file storage, one replica); ttl > 0 sets
// the bucket's max age (a test's choice: no operator should expire records).
func (n *NATS) CreateBucket(t testing.TB, bucket string, ttl time.Duration) {
	t.Helper()
	nc, err := nats.Connect(n.URL, nats.Timeout(5*time.Second), nats.NoReconnect())
	if err != nil {
		t.Fatalf("connecting to %s: %v", n.URL, err)
	}
	defer nc.Close()
	js, err := nc.JetStream(nats.MaxWait(10 * time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateKeyValue(&nats.KeyValueConfig{Bucket: bucket, History: 1, TTL: ttl, Storage: nats.FileStorage, Replicas: 1}); err != nil {
		t.Fatalf("creating bucket %q: %v", bucket, err)
	}
}

// natsPing succeeds once the server accepts a connection and JetStream
// answers (it recovers its streams after the listener is up).
func natsPing(ctx context.Context, url string) error {
	nc, err := nats.Connect(url, nats.Timeout(time.Second), nats.NoReconnect())
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := nc.JetStream()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	_, err = js.AccountInfo(nats.Context(ctx))
	return err
}
