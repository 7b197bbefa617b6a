"""A backend for the kayle_webhook gateway, in Python's standard library only.

It checks the gateway's Standard Webhooks signature itself, processes each event
once (keyed by X-Kayle-Event-Id), and answers non-2xx on failure so Kayle retries.
"""
import base64
import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY = base64.b64decode(os.environ.get("KAYLE_FORWARD_SECRET", "").removeprefix("whsec_"), validate=True)
if not KEY:
    raise SystemExit("KAYLE_FORWARD_SECRET must be the gateway's whsec_ forward_signature secret")
TOLERANCE = 5 * 60  # seconds either way, as the Standard Webhooks libraries
PROCESSED_LOG = os.environ.get("KAYLE_PROCESSED_LOG")

# The session status each event type leads to; other types are acknowledged only.
STATUS_OF = {
    "verification.session.succeeded": "verified",
    "verification.session.failed": "failed",
    "verification.session.expired": "expired",
    "verification.session.cancelled": "cancelled",
}

processed = set()  # event ids: a real application keeps them in its database
lock = threading.Lock()


def signed_by_gateway(headers, body):
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    # the idempotency key must be the id the signature covers
    if not msg_id or msg_id != headers.get("X-Kayle-Event-Id"):
        return False
    if not (timestamp.isascii() and timestamp.isdigit()) or abs(time.time() - int(timestamp)) > TOLERANCE:
        return False
    mac = hmac.new(KEY, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    expected = "v1," + base64.b64encode(mac.digest()).decode()
    # several values during a secret rotation: one match is enough
    return any(hmac.compare_digest(sig, expected) for sig in headers.get("webhook-signature", "").split())


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not signed_by_gateway(self.headers, body):
            return self.answer(401, "bad signature")
        try:
            event_type = json.loads(body)["type"]
        except (ValueError, KeyError, TypeError):
            return self.answer(400, "not a Kayle event")
        if not isinstance(event_type, str):
            return self.answer(400, "not a Kayle event")
        event_id = self.headers["X-Kayle-Event-Id"]
        with lock:  # one copy of an event at a time
            if event_id in processed:
                return self.answer(200, "duplicate")
            status = STATUS_OF.get(event_type, "ignored")
            # your application: set the verification session's status
            # (metadata.verification_session_id); the consented claims are in data.claims
            line = json.dumps({"event_id": event_id, "type": event_type, "status": status})
            if PROCESSED_LOG:
                with open(PROCESSED_LOG, "a") as log:
                    log.write(line + "\n")
            else:
                print(line, flush=True)
            processed.add(event_id)
        self.answer(200, status)

    def answer(self, code, status):
        body = json.dumps({"status": status}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "9000"))), Receiver).serve_forever()
