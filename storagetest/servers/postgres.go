package servers

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// PostgresBin is where Debian's postgresql-15 package puts the server.
const PostgresBin = "/usr/lib/postgresql/15/bin"

// Postgres is a PostgreSQL 15 server of a test's own.
type Postgres struct {
	*Proc
	// Port is its loopback TCP port (127.0.0.1 only).
	Port int
	// ConnString reaches it as the superuser "postgres" (trust auth).
	ConnString string
	// Dir holds the data folder ("data") and the unix socket ("sock").
	Dir string
}

// StartPostgres initialises a database cluster in a temporary folder and
// starts PostgreSQL on a free loopback port, trusting local connections.
// As root, initdb and postgres run as the "postgres" user (initdb refuses
// root); as another user, as that user.
//
// The commands it runs, as the postgres user:
//
//	/usr/lib/postgresql/15/bin/initdb -D <dir>/data -U postgres -A trust -E UTF8 --no-locale --no-sync --no-instructions
//	/usr/lib/postgresql/15/bin/postgres -D <dir>/data -h 127.0.0.1 -p <port> -k <dir>/sock -c fsync=off
//
// They get the user through the process's credentials, not runuser:
// runuser mirrors its child's job-control stops (a SIGSTOPped child stops
// runuser itself, for good once the group is continued), after which it
// never reaps the server and a Stop after Pause/Resume hangs.
func StartPostgres(t testing.TB) *Postgres {
	t.Helper()
	initdb := Find(t, "initdb", filepath.Join(PostgresBin, "initdb"))
	postgres := Find(t, "postgres", filepath.Join(PostgresBin, "postgres"))

	// Not t.TempDir: its parent folder is private to the test's user, and
	// the postgres user must reach the data and socket folders.
	dir, err := os.MkdirTemp("", "kayle-postgres-")
	if err != nil {
		t.Fatal(err)
	}
	removeDir := func() { _ = os.RemoveAll(dir) }
	var cred *syscall.Credential // nil: as the test's user
	if os.Geteuid() == 0 {
		uid, gid := postgresUser(t)
		if err := os.Chown(dir, uid, gid); err != nil {
			removeDir()
			t.Fatal(err)
		}
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	data, sock := filepath.Join(dir, "data"), filepath.Join(dir, "sock")
	for _, argv := range [][]string{
		{"mkdir", "-m", "0700", sock},
		{initdb, "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale",
			// test data: nothing to keep across an OS crash
			"--no-sync", "--no-instructions"},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), StartLimit)
		cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
		cmd.Dir = dir
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			removeDir()
			t.Fatalf("%v: %v\n%s", argv, err, out)
		}
	}

	pg := &Postgres{Dir: dir}
	pg.Proc, pg.Port = start(t, removeDir, func(port int) *Proc {
		cs := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=postgres sslmode=disable connect_timeout=5", port)
		pg.ConnString = cs
		return &Proc{
			Name: "postgres",
			argv: []string{postgres,
				"-D", data, "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-k", sock,
				// test data: no fsync (a stop still writes everything out)
				"-c", "fsync=off"},
			dir:   dir,
			cred:  cred,
			ready: func(ctx context.Context) error { return pgPing(ctx, cs) },
			// pg_ctl's (and Debian's unit's) "fast" shutdown
			stopSignal: syscall.SIGINT,
			// "immediate" shutdown: still removes its shared memory
			quitSignal: syscall.SIGQUIT,
		}
	})
	return pg
}

func postgresUser(t testing.TB) (uid, gid int) {
	t.Helper()
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatalf("no postgres user (%v): run .ci/storage-servers as root, which installs PostgreSQL", err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid
}

// pgPing succeeds once the server accepts a connection and a query (not
// while it is still starting up or recovering).
func pgPing(ctx context.Context, connString string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, connString)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	var one int
	return conn.QueryRow(ctx, "SELECT 1").Scan(&one)
}
