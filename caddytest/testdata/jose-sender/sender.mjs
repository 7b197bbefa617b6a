// An independent Kayle sender: encrypts stdin to a public JWK with panva's
// jose (RSA-OAEP-256, A256GCM, the JWK's kid) and signs the JWE as Kayle
// does, with node:crypto. Prints the X-Kayle-Signature value, then the body.
// Usage: node sender.mjs <public.jwk> <signing-secret-file> < plaintext
import { CompactEncrypt, importJWK } from 'jose';
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';

const [jwkFile, secretFile] = process.argv.slice(2);
const jwk = JSON.parse(readFileSync(jwkFile, 'utf8'));
// as Caddy's {file.*} placeholder reads it: one trailing newline dropped
const secret = readFileSync(secretFile, 'utf8').replace(/\r?\n$/, '');
const plaintext = readFileSync(0);

const key = await importJWK(jwk, jwk.alg);
const jwe = await new CompactEncrypt(plaintext)
  .setProtectedHeader({ alg: jwk.alg, enc: 'A256GCM', kid: jwk.kid })
  .encrypt(key);
const t = Math.floor(Date.now() / 1000);
const v1 = createHmac('sha256', secret).update(`${t}.${jwe}`).digest('hex');
process.stdout.write(`t=${t},v1=${v1}\n${jwe}\n`);
