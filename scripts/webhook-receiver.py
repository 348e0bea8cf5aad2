#!/usr/bin/env python3
"""A receiver for tidewatch's `webhook` sink, as a starting point for your own.

It checks the HMAC-SHA256 signature (401 when it does not verify or is stale), drops
events whose Idempotency-Key it has already processed (answering 200, so tidewatch stops
retrying), and prints one JSON line per new event on standard output:

    {"key": "...", "status": "firing", "device": "pump-7", "body": {...}}

Usage:

    TIDEWATCH_WEBHOOK_SECRET=... scripts/webhook-receiver.py [--bind 127.0.0.1] [--port 8080]

Without TIDEWATCH_WEBHOOK_SECRET, signatures are not checked. It prints
"listening on http://HOST:PORT" on standard error once it accepts requests (--port 0 picks a
free port). Standard library only. docs/reference/sources-and-sinks.md#webhook-sink
"""

import argparse
import hashlib
import hmac
import json
import os
import sys
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock


def verified(secret: bytes, headers, body: bytes, max_age_s: int = 300) -> bool:
    timestamp = headers.get("X-Tidewatch-Timestamp", "")
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) <= max_age_s
    return fresh and hmac.compare_digest(expected, headers.get("X-Tidewatch-Signature", ""))


# Serializes the lines printed by the request threads: print() writes the text and the line end
# separately, so two threads could interleave them.
OUTPUT = Lock()


class Seen:
    """The keys processed recently (bounded, oldest forgotten first)."""

    def __init__(self, capacity: int = 100_000):
        self.keys, self.capacity, self.lock = OrderedDict(), capacity, Lock()

    def first_time(self, key: str) -> bool:
        with self.lock:
            if key in self.keys:
                return False
            self.keys[key] = True
            if len(self.keys) > self.capacity:
                self.keys.popitem(last=False)
            return True


def handler(secret, seen):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if secret and not verified(secret, self.headers, body):
                return self.answer(401)
            key = self.headers.get("Idempotency-Key", "")
            if key and not seen.first_time(key):
                return self.answer(200)  # already processed: acknowledge, do nothing
            try:
                payload = json.loads(body)
            except ValueError:
                return self.answer(400)
            alert = (payload.get("alerts") or [{}])[0]
            event = {
                "key": key,
                "status": payload.get("status"),
                "device": alert.get("labels", {}).get("device"),
                "body": payload,
            }
            line = json.dumps(event) + "\n"  # act on the event here
            with OUTPUT:  # one whole line per event, whatever the threads do
                sys.stdout.write(line)
                sys.stdout.flush()
            self.answer(200)

        def answer(self, code):
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    secret = os.environ.get("TIDEWATCH_WEBHOOK_SECRET", "").encode()
    server = ThreadingHTTPServer((args.bind, args.port), handler(secret, Seen()))
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
