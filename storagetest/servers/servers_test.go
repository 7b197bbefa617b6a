package servers

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
)

// fatalRecorder is a testing.TB whose Fatalf records the message and ends
// the goroutine, as the real one does.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (f *fatalRecorder) Helper() {}
func (f *fatalRecorder) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func TestFindFailsNamingTheInstallScript(t *testing.T) {
	rec := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Find(rec, "kayle-no-such-server", "/nonexistent/kayle-no-such-server")
	}()
	<-done
	if !strings.Contains(rec.msg, ".ci/storage-servers") {
		t.Errorf("a missing server fails with %q, want it to name .ci/storage-servers", rec.msg)
	}
}

// pgQuery runs one statement, bounded.
func pgQuery(t *testing.T, connString, sql string, limit time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql)
	return err
}

func TestPostgresLifecycle(t *testing.T) {
	t.Parallel()
	pg := StartPostgres(t)
	if err := pgQuery(t, pg.ConnString, "CREATE TABLE kept (x int)", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	pg.Pause(t)
	if err := pgQuery(t, pg.ConnString, "SELECT 1", time.Second); err == nil {
		t.Error("a paused server answered")
	}
	pg.Resume(t)
	if err := pgQuery(t, pg.ConnString, "SELECT 1", 5*time.Second); err != nil {
		t.Fatalf("after Resume: %v", err)
	}
	pg.Stop(t)
	if err := pgQuery(t, pg.ConnString, "SELECT 1", time.Second); err == nil {
		t.Error("a stopped server answered")
	}
	pg.Start(t)
	if err := pgQuery(t, pg.ConnString, "SELECT * FROM kept", 5*time.Second); err != nil {
		t.Fatalf("the data after a restart: %v", err)
	}
	// stopping a frozen server thaws it to let it stop
	pg.Pause(t)
	pg.Restart(t)
	if err := pgQuery(t, pg.ConnString, "SELECT * FROM kept", 5*time.Second); err != nil {
		t.Fatalf("after Restart: %v", err)
	}
	pg.Pause(t) // the test's end kills a frozen server too
}

func natsBucket(url, bucket string) error {
	nc, err := nats.Connect(url, nats.Timeout(time.Second), nats.NoReconnect())
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := nc.JetStream(nats.MaxWait(time.Second))
	if err != nil {
		return err
	}
	_, err = js.KeyValue(bucket)
	return err
}

func TestNATSLifecycle(t *testing.T) {
	t.Parallel()
	n := StartNATS(t)
	n.CreateBucket(t, "kept", 0)
	n.Pause(t)
	if err := natsBucket(n.URL, "kept"); err == nil {
		t.Error("a paused server answered")
	}
	n.Resume(t)
	if err := natsBucket(n.URL, "kept"); err != nil {
		t.Fatalf("after Resume: %v", err)
	}
	n.Stop(t)
	if err := natsBucket(n.URL, "kept"); err == nil {
		t.Error("a stopped server answered")
	}
	n.Start(t)
	if err := natsBucket(n.URL, "kept"); err != nil {
		t.Fatalf("the bucket after a restart: %v", err)
	}
	n.Pause(t)
	n.Restart(t)
	if err := natsBucket(n.URL, "kept"); err != nil {
		t.Fatalf("after Restart: %v", err)
	}
	n.Pause(t)
}
