package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// buildCaddy builds ./cmd/caddy into dir, the pure-Go and the BoringCrypto
// flavour, exactly as docs/development.md tells operators to.
func buildCaddy(dir string, boring bool) (string, error) {
	out := filepath.Join(dir, "bin", "caddy")
	env := os.Environ()
	if boring {
		out += "-boring"
		env = append(env, "GOEXPERIMENT=boringcrypto", "CGO_ENABLED=1")
	}
	cmd := exec.Command("go", "build", "-o", out, "./cmd/caddy")
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	t0 := time.Now()
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build (boringcrypto=%v): %v", boring, err)
	}
	logf("built %s in %s", out, time.Since(t0).Round(time.Second))
	if boring {
		v, err := exec.Command("go", "version", "-m", out).Output()
		if err != nil || !strings.Contains(string(v), "boringcrypto") {
			return "", fmt.Errorf("%s is not a boringcrypto build", out)
		}
	}
	return out, nil
}

// buildStorageCaddy builds storagetest/caddy, Caddy with the plugin and the
// storage modules the storage matrix runs (pberkel/caddy-storage-redis
// among them), from that module, so the root module's dependencies stay
// as they are.
func buildStorageCaddy(dir string) (string, error) {
	out := filepath.Join(dir, "bin", "caddy-storage")
	cmd := exec.Command("go", "build", "-o", out, "./caddy")
	cmd.Dir = "storagetest"
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	t0 := time.Now()
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build storagetest/caddy: %v", err)
	}
	logf("built %s in %s", out, time.Since(t0).Round(time.Second))
	return out, nil
}

// gatewayPorts are the sites of one Caddy process; qtmpfs and qdisk, the
// queue-mode sites, only in the gateway the queue rows run against (0:
// none).
type gatewayPorts struct {
	admin, off, tmpfs, disk, refuse int
	qtmpfs, qdisk                   int
}

func (g gatewayPorts) url(port int) string { return fmt.Sprintf("http://127.0.0.1:%d/kayle", port) }

// kayleOptions are the kayle_webhook lines every site of the run shares:
// the secret and both keys.
func kayleOptions(keys []keyPair, secretFile string) string {
	var kw strings.Builder
	kw.WriteString("\t\tsigning_secret {file." + secretFile + "}\n")
	for _, k := range keys {
		fmt.Fprintf(&kw, "\t\tdecryption_key %s %s\n", k.kid, k.file)
	}
	return kw.String()
}

// syncSite is a site whose kayle_webhook forwards while Kayle waits (no
// queue), through the reverse_proxy after it.
func syncSite(port int, kw, extra, backend string) string {
	return fmt.Sprintf("http://127.0.0.1:%d {\n\tbind 127.0.0.1\n\tkayle_webhook {\n%s%s\t}\n\treverse_proxy %s\n}\n", port, kw, extra, backend)
}

// queueSite is a site in queue mode: kayle_webhook answers 202 once the
// delivery is stored, and its queue forwards to backend with concurrency
// forwards in flight (max_backoff and horizon: the defaults).
func queueSite(port int, kw, extra, backend string, concurrency int) string {
	return fmt.Sprintf("http://127.0.0.1:%d {\n\tbind 127.0.0.1\n\tkayle_webhook {\n%s%s"+
		"\t\tqueue {\n\t\t\tforward {\n\t\t\t\treverse_proxy %s\n\t\t\t}\n\t\t\tconcurrency %d\n\t\t}\n\t}\n}\n",
		port, kw, extra, backend, concurrency)
}

// globalOptions is a Caddyfile's global block: the admin endpoint on
// loopback, nothing persisted, no certificates.
func globalOptions(admin int) string {
	return fmt.Sprintf("{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n\tauto_https off\n}\n", admin)
}

// caddyfile is one Caddy with a site per gateway mode, all with both keys,
// a `respond 400` site for the forged-flood comparison, and the queue-mode
// sites if g has their ports (their own folders beside the dedupe ones,
// the queue's concurrency that of the closed loop).
func caddyfile(g gatewayPorts, keys []keyPair, secretFile, backend, tmpfsDir, diskDir string, concurrency int) string {
	kw := kayleOptions(keys, secretFile)
	out := globalOptions(g.admin) +
		syncSite(g.off, kw, "\t\tdedupe off\n", backend) +
		syncSite(g.tmpfs, kw, "\t\tstorage file_system "+tmpfsDir+"\n", backend) +
		syncSite(g.disk, kw, "\t\tstorage file_system "+diskDir+"\n", backend) +
		fmt.Sprintf("http://127.0.0.1:%d {\n\tbind 127.0.0.1\n\trespond 400\n}\n", g.refuse)
	if g.qtmpfs != 0 {
		out += queueSite(g.qtmpfs, kw, "\t\tstorage file_system "+tmpfsDir+"-queue\n", backend, concurrency)
	}
	if g.qdisk != 0 {
		out += queueSite(g.qdisk, kw, "\t\tstorage file_system "+diskDir+"-queue\n", backend, concurrency)
	}
	return out
}

// newGatewayPorts picks the ports of a gateway, with the queue-mode sites
// if queue.
func newGatewayPorts(queue bool) (gatewayPorts, error) {
	var g gatewayPorts
	ports := []*int{&g.admin, &g.off, &g.tmpfs, &g.disk, &g.refuse}
	if queue {
		ports = append(ports, &g.qtmpfs, &g.qdisk)
	}
	for _, p := range ports {
		port, err := freePort()
		if err != nil {
			return g, err
		}
		*p = port
	}
	return g, nil
}

// startCaddy writes the Caddyfile and runs binary with it, its data and
// config in work so nothing of the user's is touched.
func startCaddy(name, binary, work string, g gatewayPorts, config string) (*proc, error) {
	return startCaddyAdmin(name, binary, work, g.admin, config)
}

// startCaddyAdmin is startCaddy for a config whose admin endpoint is on
// port admin.
func startCaddyAdmin(name, binary, work string, admin int, config string) (*proc, error) {
	dir := filepath.Join(work, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	file := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(file, []byte(config), 0o600); err != nil {
		return nil, err
	}
	p, err := start(name, filepath.Join(dir, "caddy.log"),
		[]string{"XDG_DATA_HOME=" + dir, "XDG_CONFIG_HOME=" + dir},
		binary, "run", "--config", file, "--adapter", "caddyfile")
	if err != nil {
		return nil, err
	}
	if err := waitHTTP(fmt.Sprintf("http://127.0.0.1:%d/config/", admin), p, 30*time.Second); err != nil {
		p.stop()
		return nil, fmt.Errorf("%v (log: %s)", err, filepath.Join(dir, "caddy.log"))
	}
	return p, nil
}
