package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// nodeReceiver follows Kayle's recipe: node:http, an HMAC check in constant
// time, then jose's compactDecrypt with the key the kid names, JSON.parse
// and metadata.event_id.
const nodeReceiver = `import http from 'node:http';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { compactDecrypt, importPKCS8 } from 'jose';

const [port, secret, ...keyFiles] = process.argv.slice(2);
const keys = {};
for (const f of keyFiles) {
  const kid = f.split('/').pop().replace(/\.pem$/, '');
  keys[kid] = await importPKCS8(fs.readFileSync(f, 'utf8'), 'RSA-OAEP-256');
}

function verify(header, body) {
  const parts = Object.fromEntries((header || '').split(',').map((p) => p.split('=')));
  const t = Number(parts.t);
  if (!Number.isFinite(t) || Math.abs(Date.now() / 1000 - t) > 300 || !parts.v1) return false;
  const want = crypto.createHmac('sha256', secret).update(parts.t + '.').update(body).digest();
  const got = Buffer.from(parts.v1, 'hex');
  return got.length === want.length && crypto.timingSafeEqual(got, want);
}

http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    const body = Buffer.concat(chunks);
    if (!verify(req.headers['x-kayle-signature'], body)) { res.writeHead(400).end(); return; }
    try {
      const { plaintext } = await compactDecrypt(body.toString('latin1'), (h) => keys[h.kid]);
      const event = JSON.parse(new TextDecoder().decode(plaintext));
      if (!event.metadata || typeof event.metadata.event_id !== 'string') throw new Error('no event id');
      res.writeHead(204).end();
    } catch {
      res.writeHead(422).end();
    }
  });
}).listen(Number(port), '127.0.0.1');
`

// installNode puts the receiver and npm's jose in dir and says which jose.
func installNode(dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "receiver.mjs"), []byte(nodeReceiver), 0o600); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "package.json"), []byte(`{"private":true}`), 0o600); err != nil {
		return "", err
	}
	cmd := exec.Command("npm", "install", "--no-audit", "--no-fund", "--silent", "jose")
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	t0 := time.Now()
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("npm install jose: %v", err)
	}
	nodeVersion, _ := exec.Command("node", "--version").Output()
	pkg, _ := os.ReadFile(filepath.Join(dir, "node_modules", "jose", "package.json"))
	version := "?"
	if _, rest, ok := strings.Cut(string(pkg), `"version": "`); ok {
		version, _, _ = strings.Cut(rest, `"`)
	}
	logf("installed jose %s in %s", version, time.Since(t0).Round(time.Second))
	return fmt.Sprintf("Node %s, jose %s", strings.TrimSpace(string(nodeVersion)), version), nil
}
