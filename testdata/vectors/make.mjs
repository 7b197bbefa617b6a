// Makes the repository's test vectors: Kayle deliveries built by an
// implementation that shares no code with the gateway (panva's jose encrypts,
// node:crypto signs and makes the keys), with fresh TEST-ONLY keys and secrets.
// The outputs are committed, so the Go tests need no node.
//
//   cd testdata/vectors && npm ci && node make.mjs
//
// Every run makes new keys, secrets, ids and ciphertexts, and rewrites
// cases.json, secret*.txt, keys/ and bodies/ (nothing else). The cases and the
// manifest's shape are those of ../shared/vectors, so one test runner
// (vectors_test.go) reads both sets; see README.md.
import { CompactEncrypt, exportJWK, exportPKCS8, generateKeyPair, importJWK } from 'jose';
import { createHmac, KeyObject, randomBytes } from 'node:crypto';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const out = dirname(fileURLToPath(import.meta.url));

// The signing time of every delivery. Fixed, so that the outputs do not
// depend on when they were made: each case carries the "now" the gateway's
// clock is pinned to (the tests give the handler that clock).
const SIGNED_AT = 1790000000; // 2026-09-21T14:13:20Z
const TOLERANCE = 300; // the gateway's default tolerance, in seconds

const TEST_MATERIAL =
  'TEST MATERIAL, NOT SECRET: a test-only key of caddy-kayle-webhook\'s test vectors ' +
  '(testdata/vectors), published with the source. Never use it to protect anything.';

const b64u = (buf) => Buffer.from(buf).toString('base64url');
const hex = (n) => randomBytes(n).toString('hex');
const id = (prefix) => `${prefix}_${hex(12)}`;

function write(name, data) {
  mkdirSync(dirname(join(out, name)), { recursive: true });
  writeFileSync(join(out, name), data);
}
const json = (value) => JSON.stringify(value, null, 2) + '\n';

// ---- keys and secrets ------------------------------------------------------

async function rsaKey(kid, modulusLength) {
  const { publicKey, privateKey } = await generateKeyPair('RSA-OAEP-256', { modulusLength, extractable: true });
  const members = { kid, alg: 'RSA-OAEP-256', use: 'enc' };
  return {
    kid,
    publicKey,
    privateKey,
    publicJWK: { ...(await exportJWK(publicKey)), ...members },
    privateJWK: { ...(await exportJWK(privateKey)), ...members },
    // PEM allows explanatory text before the block (RFC 7468); Go's
    // encoding/pem and OpenSSL skip it
    pkcs8: `${TEST_MATERIAL}\n${await exportPKCS8(privateKey)}\n`,
    pkcs1: `${TEST_MATERIAL}\n${KeyObject.from(privateKey).export({ type: 'pkcs1', format: 'pem' })}`,
  };
}

// A Kayle-shaped secret ("whsec_" and 32 more), marked in its value too.
const secretValue = () => `whsec_TestOnly${randomBytes(18).toString('base64')}`;

const k1 = await rsaKey('k1', 2048);
const k2 = await rsaKey('k2', 3072);
// encrypted to by "unknown-kid" only: the gateway does not hold it, and it is not written
const k9 = await rsaKey('k9', 2048);
const secret = secretValue();
const oldSecret = secretValue();
const unknownSecret = secretValue();

// The public key as a CryptoKey for another RSA-OAEP variant (WebCrypto binds
// the hash to the key), for the cases whose alg the gateway must refuse.
async function publicKeyFor(key, alg) {
  const { alg: _, ...jwk } = key.publicJWK;
  return importJWK(jwk, alg);
}

// ---- deliveries ------------------------------------------------------------

// Kayle's signature: HMAC-SHA256(secret, "<t>.<body>"), hex.
const v1 = (s, t, body) => createHmac('sha256', s).update(`${t}.`).update(body).digest('hex');
const signature = (s, t, body) => `t=${t},v1=${v1(s, t, body)}`;

function payload(type, data, metadata = {}) {
  const meta = { contract_version: 1, event_id: id('evt'), verification_session_id: id('vs'), ...metadata };
  for (const [k, v] of Object.entries(meta)) if (v === undefined) delete meta[k];
  return { type, metadata: meta, data };
}

const claims = (extra = {}) => ({
  claims: {
    date_of_birth: '1995-04-12',
    family_name: 'Curie',
    given_names: 'Marie',
    kayle_document_id: id('kdid'),
    age_over_18: true,
    ...extra,
  },
  selected_field_keys: [...new Set(['age_over_18', 'date_of_birth', 'family_name', 'given_names', 'kayle_document_id', ...Object.keys(extra)])].sort(),
});

const succeeded = (extra, metadata) => payload('verification.session.succeeded', claims(extra), metadata);
const failed = () => payload('verification.session.failed', { failure_code: 'selfie_face_mismatch', nfc_tries_used: 1, liveness_tries_used: 3 });
const expired = (metadata) => payload('verification.session.expired', {}, metadata);
const cancelled = () =>
  payload('verification.session.cancelled', { outcome: 'not_verified', reason: 'cancelled_after_failed_check', nfc_tries_used: 0, liveness_tries_used: 2 });

async function encrypt(plaintext, { key = k1.publicKey, header = { alg: 'RSA-OAEP-256', enc: 'A256GCM', kid: 'k1' }, crit } = {}) {
  const jwe = new CompactEncrypt(Buffer.from(plaintext)).setProtectedHeader(header);
  return jwe.encrypt(key, crit ? { crit } : undefined);
}

// Changes one base64url character of a compact JWE's part (0-4) at index i
// (never the last character, whose low bits may be padding), so the decoded
// bytes change.
function alterPart(jwe, part, i) {
  const parts = jwe.split('.');
  const p = parts[part];
  const at = Math.min(i, p.length - 2);
  parts[part] = p.slice(0, at) + (p[at] === 'A' ? 'B' : 'A') + p.slice(at + 1);
  return parts.join('.');
}

// a run replaces the previous run's outputs
for (const dir of ['keys', 'bodies']) rmSync(join(out, dir), { recursive: true, force: true });

const cases = [];
let number = 0;

// add writes a case's files and its manifest entry. plaintext is a payload
// object (serialized compactly, as Kayle does) or a string; a .json is
// written only for a case that must be forwarded. body is the JWE, or a
// function of the plaintext's bytes that returns it (by default: A256GCM to
// k1). The signature is made with sign over the JWE at SIGNED_AT, unless
// signatureHeader gives the header's value (or a function of the JWE making
// it; null: no header). afterSigning alters the body once it is signed.
async function add(name, description, opts) {
  const { plaintext, body, sign = secret, signatureHeader, afterSigning, now = SIGNED_AT, method = 'POST', headers = {}, expect, config, eventHeader } = opts;
  number++;
  const stem = `bodies/${String(number).padStart(2, '0')}-${name}`;
  const bytes = typeof plaintext === 'string' ? plaintext : JSON.stringify(plaintext);
  const jwe = typeof body === 'function' ? await body(bytes) : body ?? (await encrypt(bytes));
  write(`${stem}.jwe`, afterSigning ? afterSigning(jwe) : jwe);
  const type = typeof plaintext === 'object' ? plaintext.type : 'verification.session.succeeded';
  const request = {
    method,
    headers: {
      'Content-Type': 'application/jose',
      'X-Kayle-Delivery-Id': id('whd'),
      'X-Kayle-Event': eventHeader ?? type,
    },
    body_file: `${stem}.jwe`,
  };
  const sig = typeof signatureHeader === 'function' ? signatureHeader(jwe) : signatureHeader !== undefined ? signatureHeader : signature(sign, SIGNED_AT, jwe);
  if (sig !== null) request.headers['X-Kayle-Signature'] = sig;
  Object.assign(request.headers, headers);
  const entry = { name, description, now, request, expect };
  if (expect.outcome === 'forward') {
    write(`${stem}.json`, bytes);
    entry.expect = {
      outcome: 'forward',
      event_id: plaintext.metadata.event_id,
      event_type: plaintext.type,
      session_id: plaintext.metadata.verification_session_id,
      plaintext_file: `${stem}.json`,
    };
  }
  if (config) entry.config = config;
  cases.push(entry);
}

const forward = { outcome: 'forward' };
// the statuses docs/answers.md documents
const reject = (status, why) => ({ outcome: 'reject', status, why });

// genuine deliveries: every enc with each key
await add('succeeded-a256gcm-k1', 'verification.session.succeeded, enc A256GCM, key k1', { plaintext: succeeded(), expect: forward });
await add('failed-a256gcm-k1', 'verification.session.failed, enc A256GCM, key k1', { plaintext: failed(), expect: forward });
await add('expired-a128gcm-k1', 'verification.session.expired, enc A128GCM, key k1', {
  plaintext: expired(),
  body: (p) => encrypt(p, { header: { alg: 'RSA-OAEP-256', enc: 'A128GCM', kid: 'k1' } }),
  expect: forward,
});
await add('cancelled-a192gcm-k2', 'verification.session.cancelled, enc A192GCM, key k2', {
  plaintext: cancelled(),
  body: (p) => encrypt(p, { key: k2.publicKey, header: { alg: 'RSA-OAEP-256', enc: 'A192GCM', kid: 'k2' } }),
  expect: forward,
});
await add('succeeded-large-image', 'about 200 KB of claims carrying a base64 face image', {
  plaintext: succeeded({ document_face_image: { dataBase64: randomBytes(153600).toString('base64'), format: 'jpeg', width: 480, height: 640 } }),
  body: (p) => encrypt(p, { key: k2.publicKey, header: { alg: 'RSA-OAEP-256', enc: 'A256GCM', kid: 'k2' } }),
  expect: forward,
});
await add('succeeded-unicode', 'non-ASCII, quotes and control-like characters in claims', {
  plaintext: succeeded({ family_name: 'O\'Brien "Quote" \\ Backslash\ttab', given_names: 'Zoë Ångström 李小龍 \u202e 🦊' }),
  expect: forward,
});
await add('no-kid', 'JWE without kid, encrypted to k2 (the second key): each configured key may be tried', {
  plaintext: expired(),
  body: (p) => encrypt(p, { key: k2.publicKey, header: { alg: 'RSA-OAEP-256', enc: 'A256GCM' } }),
  expect: forward,
});

// signatures and secret rotation
const twoV1 = succeeded();
await add('two-v1-one-valid', 'two v1 values, the first made with an old secret: any valid v1 is enough', {
  plaintext: twoV1,
  signatureHeader: (jwe) => `t=${SIGNED_AT},v1=${v1(oldSecret, SIGNED_AT, jwe)},v1=${v1(secret, SIGNED_AT, jwe)}`,
  expect: forward,
});
await add('old-secret', 'signed with the previous signing secret, which the configuration still accepts during rotation', {
  plaintext: failed(),
  sign: oldSecret,
  config: { secrets: ['secret.txt', 'secret-old.txt'] },
  expect: forward,
});
await add('spoofed-headers', 'the request carries headers that only the gateway may set; the backend must see the real values', {
  plaintext: succeeded(),
  headers: {
    'X-Kayle-Event-Id': 'evt_spoofed',
    'X-Kayle-Session-Id': 'vs_spoofed',
    'X-Kayle-Verified': 'true',
    'X-Kayle-Event-Type': 'verification.session.spoofed',
    'X-Kayle-Signature-Timestamp': '1',
    'X-Kayle-Key-Id': 'k9',
    'X-Kayle-Duplicate': 'true',
  },
  expect: forward,
});
await add('event-header-lies', 'X-Kayle-Event is not signed; the decrypted type wins', {
  plaintext: succeeded(),
  eventHeader: 'verification.session.expired',
  expect: forward,
});

await add('bad-signature', 'one hex digit of v1 changed', {
  plaintext: succeeded(),
  signatureHeader: (jwe) => {
    const mac = v1(secret, SIGNED_AT, jwe);
    return `t=${SIGNED_AT},v1=${mac.slice(0, 10)}${mac[10] === '0' ? '1' : '0'}${mac.slice(11)}`;
  },
  expect: reject(400, 'signature'),
});
await add('stale', `signed ${TOLERANCE + 1} s before now`, { plaintext: succeeded(), now: SIGNED_AT + TOLERANCE + 1, expect: reject(400, 'timestamp') });
await add('future', `signed ${TOLERANCE + 1} s after now`, { plaintext: succeeded(), now: SIGNED_AT - TOLERANCE - 1, expect: reject(400, 'timestamp') });
await add('no-signature', 'no X-Kayle-Signature header', { plaintext: succeeded(), signatureHeader: null, expect: reject(400, 'signature') });
for (const [name, header] of [
  ['sig-no-t', 'v1=00'],
  ['sig-no-v1', `t=${SIGNED_AT}`],
  ['sig-garbage', 'garbage'],
  ['sig-t-not-number', 't=abc,v1=00'],
  ['sig-v1-not-hex', `t=${SIGNED_AT},v1=zz`],
]) {
  await add(name, `malformed signature header: ${header}`, { plaintext: succeeded(), signatureHeader: header, expect: reject(400, 'signature') });
}

// the JWE
await add('tampered-ciphertext', 'signed correctly, but the ciphertext was altered: the GCM tag must fail', {
  plaintext: succeeded(),
  body: async (p) => alterPart(await encrypt(p), 3, 20),
  expect: reject(422, 'decrypt'),
});
await add('alg-rsa-oaep-sha1', 'alg RSA-OAEP (SHA-1) is outside the allowed list', {
  plaintext: succeeded(),
  body: async (p) => encrypt(p, { key: await publicKeyFor(k1, 'RSA-OAEP'), header: { alg: 'RSA-OAEP', enc: 'A256GCM', kid: 'k1' } }),
  expect: reject(422, 'algorithm'),
});
await add('unknown-kid', 'encrypted to a key the gateway does not hold', {
  plaintext: succeeded(),
  body: (p) => encrypt(p, { key: k9.publicKey, header: { alg: 'RSA-OAEP-256', enc: 'A256GCM', kid: 'k9' } }),
  expect: reject(500, 'key'),
});

// the payload
await add('plaintext-not-json', 'decrypts to something that is not JSON', {
  plaintext: 'verification.session.succeeded for evt_1, but not as JSON',
  expect: reject(422, 'payload'),
});
await add('no-event-id', 'payload without metadata.event_id cannot be deduplicated', {
  plaintext: expired({ event_id: undefined }),
  expect: reject(422, 'payload'),
});
await add('event-id-path', 'an event_id shaped like a path must not escape the storage prefix', {
  plaintext: expired({ event_id: '../../../../etc/evt' }),
  expect: { outcome: 'forward_or_reject', event_id: '../../../../etc/evt', why: 'storage key' },
});
await add('not-a-jwe', 'signed correctly, but the body is not a compact JWE', {
  plaintext: expired(),
  body: 'not.a.jwe',
  expect: reject(422, 'payload'),
});

// Beyond ../shared/vectors: more of the same kinds.
// genuine: the encs not yet paired with each key
await add('succeeded-a192gcm-k1', 'verification.session.succeeded, enc A192GCM, key k1', {
  plaintext: succeeded(),
  body: (p) => encrypt(p, { header: { alg: 'RSA-OAEP-256', enc: 'A192GCM', kid: 'k1' } }),
  expect: forward,
});
await add('failed-a128gcm-k2', 'verification.session.failed, enc A128GCM, key k2', {
  plaintext: failed(),
  body: (p) => encrypt(p, { key: k2.publicKey, header: { alg: 'RSA-OAEP-256', enc: 'A128GCM', kid: 'k2' } }),
  expect: forward,
});
// secrets
await add('wrong-secret', 'signed with a secret the gateway does not hold (secret-unknown.txt)', {
  plaintext: succeeded(),
  sign: unknownSecret,
  expect: reject(400, 'signature'),
});
await add('old-secret-retired', 'signed with the previous secret after the rotation ended: only secret.txt is configured', {
  plaintext: failed(),
  sign: oldSecret,
  expect: reject(400, 'signature'),
});
await add('sig-unknown-scheme', 'a v0 value beside the valid v1: schemes other than v1 are ignored', {
  plaintext: succeeded(),
  signatureHeader: (jwe) => `t=${SIGNED_AT},v0=${hex(32)},v1=${v1(secret, SIGNED_AT, jwe)}`,
  expect: forward,
});
// timestamps: the tolerance's edges are inside it
await add('signed-at-tolerance-past', `signed exactly ${TOLERANCE} s before now: still inside the tolerance`, {
  plaintext: succeeded(),
  now: SIGNED_AT + TOLERANCE,
  expect: forward,
});
await add('signed-at-tolerance-future', `signed exactly ${TOLERANCE} s after now: still inside the tolerance`, {
  plaintext: succeeded(),
  now: SIGNED_AT - TOLERANCE,
  expect: forward,
});
// tampered bodies
await add('tampered-after-signing', 'the ciphertext was altered after the body was signed: the signature must fail first', {
  plaintext: succeeded(),
  afterSigning: (jwe) => alterPart(jwe, 3, 20),
  expect: reject(400, 'signature'),
});
await add('tampered-tag', 'signed correctly, but the authentication tag was altered', {
  plaintext: succeeded(),
  body: async (p) => alterPart(await encrypt(p), 4, 0),
  expect: reject(422, 'decrypt'),
});
await add('tampered-protected-header', 'the protected header re-serialized with its members in another order: the AAD is the header as sent, so the tag must fail', {
  plaintext: succeeded(),
  body: async (p) => {
    const parts = (await encrypt(p)).split('.');
    const header = JSON.parse(Buffer.from(parts[0], 'base64url'));
    parts[0] = b64u(JSON.stringify({ kid: header.kid, enc: header.enc, alg: header.alg }));
    return parts.join('.');
  },
  expect: reject(422, 'decrypt'),
});
await add('wrong-key-for-kid', 'says kid k1 but is encrypted to k2: the key under that kid does not open it', {
  plaintext: succeeded(),
  body: (p) => encrypt(p, { key: k2.publicKey, header: { alg: 'RSA-OAEP-256', enc: 'A256GCM', kid: 'k1' } }),
  expect: reject(422, 'decrypt'),
});
// algorithms and headers outside Kayle's
await add('alg-rsa-oaep-512', 'alg RSA-OAEP-512 is outside the allowed list', {
  plaintext: succeeded(),
  body: async (p) => encrypt(p, { key: await publicKeyFor(k1, 'RSA-OAEP-512'), header: { alg: 'RSA-OAEP-512', enc: 'A256GCM', kid: 'k1' } }),
  expect: reject(422, 'algorithm'),
});
await add('alg-dir', 'alg dir (a shared content key, no RSA) is outside the allowed list', {
  plaintext: succeeded(),
  body: (p) => encrypt(p, { key: randomBytes(32), header: { alg: 'dir', enc: 'A256GCM', kid: 'k1' } }),
  expect: reject(422, 'algorithm'),
});
await add('enc-a256cbc-hs512', 'enc A256CBC-HS512 is outside the allowed list', {
  plaintext: succeeded(),
  body: (p) => encrypt(p, { header: { alg: 'RSA-OAEP-256', enc: 'A256CBC-HS512', kid: 'k1' } }),
  expect: reject(422, 'algorithm'),
});
await add('zip-deflate', 'a compressed JWE (zip DEF): Kayle does not compress, and the gateway does not inflate', {
  plaintext: succeeded(),
  body: (p) => encrypt(p, { header: { alg: 'RSA-OAEP-256', enc: 'A256GCM', kid: 'k1', zip: 'DEF' } }),
  expect: reject(422, 'compression'),
});
await add('crit-header', 'a critical header extension the gateway does not understand', {
  plaintext: succeeded(),
  body: (p) =>
    encrypt(p, { header: { alg: 'RSA-OAEP-256', enc: 'A256GCM', kid: 'k1', crit: ['kayle-test-ext'], 'kayle-test-ext': true }, crit: { 'kayle-test-ext': true } }),
  expect: reject(422, 'crit'),
});
// the payload and the request
await add('empty-event-id', 'metadata.event_id is the empty string', {
  plaintext: expired({ event_id: '' }),
  expect: reject(422, 'payload'),
});
await add('spoofed-headers-other-spellings', 'gateway headers spoofed in lower case and with _ for -: removed too', {
  plaintext: succeeded(),
  headers: { 'x-kayle-verified': 'true', X_Kayle_Event_Id: 'evt_spoofed', x_kayle_session_id: 'vs_spoofed', 'X-KAYLE-DUPLICATE': 'true' },
  expect: forward,
});
await add('not-post', 'a genuine delivery sent with PUT', { plaintext: succeeded(), method: 'PUT', expect: reject(405, 'method') });

// ---- files ---------------------------------------------------------------

write('keys/k1.pkcs8.pem', k1.pkcs8);
write('keys/k1.pkcs1.pem', k1.pkcs1);
write('keys/k1.public.jwk.json', json(k1.publicJWK));
write('keys/k2.pkcs8.pem', k2.pkcs8);
write('keys/k2.private.jwk.json', json(k2.privateJWK));
write('keys/private.jwks.json', json({ keys: [k1.privateJWK, k2.privateJWK] }));
write('secret.txt', secret + '\n');
write('secret-old.txt', oldSecret + '\n');
write('secret-unknown.txt', unknownSecret + '\n');

write(
  'cases.json',
  json({
    about:
      'TEST MATERIAL: the keys and secrets beside this file are test-only and published. ' +
      'Kayle deliveries made by an independent implementation (panva/jose on Node.js, by make.mjs). ' +
      "Each case pins the clock to 'now' (Unix seconds). Unless a case has 'config', the gateway holds keys k1 and k2 " +
      "and accepts only secret.txt. outcome 'forward': the backend receives exactly the plaintext file with the event's headers; " +
      "'reject': the backend receives nothing and the sender gets a non-2xx status ('status', where given, is exact); " +
      "'forward_or_reject': either, but nothing is written outside the storage prefix.",
    signed_at: SIGNED_AT,
    secret_file: 'secret.txt',
    keys: { k1: 'keys/k1.pkcs8.pem', k2: 'keys/k2.pkcs8.pem' },
    other_key_files: ['keys/k1.pkcs1.pem', 'keys/k1.public.jwk.json', 'keys/k2.private.jwk.json', 'keys/private.jwks.json'],
    cases,
  }),
);
console.log(`${cases.length} cases written to ${out}`);
