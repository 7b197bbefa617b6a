<?php
// A backend for the kayle_webhook gateway, in plain PHP (no extension beyond the
// defaults). It checks the gateway's Standard Webhooks signature itself, processes
// each event once (keyed by X-Kayle-Event-Id), and answers non-2xx on failure so
// Kayle retries. PHP forgets everything between requests: processed ids are files.

const TOLERANCE = 300; // seconds either way, as the Standard Webhooks libraries
// The session status each event type sets; other types are only acknowledged.
const STATUS_OF = [
    'verification.session.succeeded' => 'verified',
    'verification.session.failed' => 'failed',
    'verification.session.expired' => 'expired',
    'verification.session.cancelled' => 'cancelled',
];

function answer(int $code, string $status): void
{
    http_response_code($code);
    header('Content-Type: application/json');
    echo json_encode(['status' => $status]), "\n";
}

function signed_by_gateway(string $key, string $eventId, string $body): bool
{
    $id = $_SERVER['HTTP_WEBHOOK_ID'] ?? '';
    $timestamp = $_SERVER['HTTP_WEBHOOK_TIMESTAMP'] ?? '';
    // the idempotency key must be the id the signature covers
    if ($id === '' || $id !== $eventId || !ctype_digit($timestamp)
        || abs(time() - (int) $timestamp) > TOLERANCE) {
        return false;
    }
    $expected = 'v1,' . base64_encode(hash_hmac('sha256', "$id.$timestamp.$body", $key, true));
    // several values during a secret rotation: one match is enough
    foreach (explode(' ', $_SERVER['HTTP_WEBHOOK_SIGNATURE'] ?? '') as $signature) {
        if (hash_equals($expected, $signature)) {
            return true;
        }
    }
    return false;
}

if ($_SERVER['REQUEST_METHOD'] !== 'POST') {
    return answer(405, 'POST only');
}
$key = base64_decode(preg_replace('/^whsec_/', '', getenv('KAYLE_FORWARD_SECRET') ?: ''), true);
if ($key == '') {
    error_log("KAYLE_FORWARD_SECRET must be the gateway's whsec_ forward_signature secret");
    return answer(500, 'misconfigured');
}
$body = file_get_contents('php://input');
$eventId = $_SERVER['HTTP_X_KAYLE_EVENT_ID'] ?? '';
if (!signed_by_gateway($key, $eventId, $body)) {
    return answer(401, 'bad signature');
}
$event = json_decode($body, true);
if (!is_string($event['type'] ?? null)) {
    return answer(400, 'not a Kayle event');
}

$state = getenv('KAYLE_STATE_DIR') ?: sys_get_temp_dir() . '/kayle-php-example';
is_dir($state) || mkdir($state, 0700, true);
flock($lock = fopen("$state/.lock", 'c'), LOCK_EX); // one event at a time; freed when the request ends
$seen = "$state/" . hash('sha256', $eventId); // a real application keeps ids in its database
if (file_exists($seen)) {
    return answer(200, 'duplicate');
}
$status = STATUS_OF[$event['type']] ?? 'ignored';
// your application: set the verification session's status
// (metadata.verification_session_id); the consented claims are in data.claims
$line = json_encode(['event_id' => $eventId, 'type' => $event['type'], 'status' => $status]) . "\n";
file_put_contents(getenv('KAYLE_PROCESSED_LOG') ?: 'php://stdout', $line, FILE_APPEND);
touch($seen);
answer(200, $status);
