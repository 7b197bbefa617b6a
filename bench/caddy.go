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

// gatewayPorts are the sites of one Caddy process.
type gatewayPorts struct {
	admin, off, tmpfs, disk, refuse int
}

func (g gatewayPorts) url(port int) string { return fmt.Sprintf("http://127.0.0.1:%d/kayle", port) }

// caddyfile is one Caddy with a site per gateway mode, all with both keys,
// and a `respond 400` site for the forged-flood comparison.
func caddyfile(g gatewayPorts, keys []keyPair, secretFile, backend, tmpfsDir, diskDir string) string {
	var kw strings.Builder
	kw.WriteString("\t\tsigning_secret {file." + secretFile + "}\n")
	for _, k := range keys {
		fmt.Fprintf(&kw, "\t\tdecryption_key %s %s\n", k.kid, k.file)
	}
	site := func(port int, extra string) string {
		return fmt.Sprintf("http://127.0.0.1:%d {\n\tbind 127.0.0.1\n\tkayle_webhook {\n%s%s\t}\n\treverse_proxy %s\n}\n", port, kw.String(), extra, backend)
	}
	return fmt.Sprintf("{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n\tauto_https off\n}\n", g.admin) +
		site(g.off, "\t\tdedupe off\n") +
		site(g.tmpfs, "\t\tstorage file_system "+tmpfsDir+"\n") +
		site(g.disk, "\t\tstorage file_system "+diskDir+"\n") +
		fmt.Sprintf("http://127.0.0.1:%d {\n\tbind 127.0.0.1\n\trespond 400\n}\n", g.refuse)
}

func newGatewayPorts() (gatewayPorts, error) {
	var g gatewayPorts
	for _, p := range []*int{&g.admin, &g.off, &g.tmpfs, &g.disk, &g.refuse} {
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
	if err := waitHTTP(fmt.Sprintf("http://127.0.0.1:%d/config/", g.admin), p, 30*time.Second); err != nil {
		p.stop()
		return nil, fmt.Errorf("%v (log: %s)", err, filepath.Join(dir, "caddy.log"))
	}
	return p, nil
}
