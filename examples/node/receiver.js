// A backend for the kayle_webhook gateway: node:http and the standardwebhooks package.
// It checks the gateway's Standard Webhooks signature, processes each event once
// (keyed by X-Kayle-Event-Id), and answers non-2xx on failure so Kayle retries.
"use strict";
const fs = require("node:fs");
const http = require("node:http");
const { Webhook, WebhookVerificationError } = require("standardwebhooks");

const webhook = new Webhook(process.env.KAYLE_FORWARD_SECRET);
const processedLog = process.env.KAYLE_PROCESSED_LOG;

// The session status each event type leads to; other types are acknowledged only.
const statusOf = new Map([
  ["verification.session.succeeded", "verified"],
  ["verification.session.failed", "failed"],
  ["verification.session.expired", "expired"],
  ["verification.session.cancelled", "cancelled"],
]);

const processed = new Set(); // event ids: a real application keeps them in its database

function answer(res, code, status) {
  res.writeHead(code, { "Content-Type": "application/json" });
  res.end(JSON.stringify({ status }));
}

async function receive(req, res) {
  if (req.method !== "POST") return answer(res, 405, "POST only");
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const body = Buffer.concat(chunks).toString("utf8");
  const eventId = req.headers["x-kayle-event-id"];
  let event;
  try {
    // checks webhook-id/-timestamp/-signature (5 minutes' tolerance), then parses the JSON
    event = webhook.verify(body, req.headers);
  } catch (err) {
    if (err instanceof WebhookVerificationError) return answer(res, 401, "bad signature");
    return answer(res, 400, "not JSON");
  }
  // the idempotency key must be the id the signature covers
  if (!eventId || eventId !== req.headers["webhook-id"]) return answer(res, 401, "bad signature");
  if (typeof event?.type !== "string") return answer(res, 400, "not a Kayle event");

  // no await from here on: one copy of an event at a time
  if (processed.has(eventId)) return answer(res, 200, "duplicate");
  const status = statusOf.get(event.type) ?? "ignored";
  // your application: set the verification session's status
  // (metadata.verification_session_id); the consented claims are in data.claims
  const line = JSON.stringify({ event_id: eventId, type: event.type, status });
  if (processedLog) fs.appendFileSync(processedLog, line + "\n");
  else console.log(line);
  processed.add(eventId);
  answer(res, 200, status);
}

const port = Number(process.env.PORT ?? 9000);
http
  .createServer((req, res) => receive(req, res).catch(() => answer(res, 500, "error")))
  .listen(port, "127.0.0.1");
