"""A webhook receiver on loopback for tests: verifies every request with the
``standardwebhooks`` library (as a real receiver would) and records it.

How it answers is a function of the request (``answer``), so a test scripts
refusals, 410s and slow answers per change or per attempt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

from tests.servers import LOOPBACK

#: A valid secret for tests (32 bytes); nothing else knows it.
SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


@dataclass(frozen=True)
class Request:
    """One request as the receiver saw it."""

    path: str
    msg_id: str
    timestamp: int
    body: dict[str, Any]
    #: ``Webhook(SECRET).verify`` accepted it.
    verified: bool
    content_type: str
    #: Which attempt of this webhook-id it was (1 for the first).
    attempt: int
    #: The status answered.
    status: int


class Receiver:
    """``with Receiver() as r:``: an HTTP server on a free loopback port."""

    def __init__(
        self,
        answer: Callable[[Request], int] | None = None,
        secret: str = SECRET,
        delay: Callable[[Request], float] | None = None,
    ) -> None:
        self.answer = answer or (lambda request: 204)
        self.delay = delay
        self.webhook = Webhook(secret)
        self.requests: list[Request] = []
        self._arrivals: dict[str, int] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k: v for k, v in self.headers.items()}
                try:
                    body = receiver.webhook.verify(raw, headers)
                    verified = True
                except WebhookVerificationError:
                    body, verified = json.loads(raw or b"null"), False
                msg_id = self.headers.get("webhook-id", "")
                with receiver._lock:  # counted on arrival (a slow answer is recorded later)
                    attempt = receiver._arrivals[msg_id] = receiver._arrivals.get(msg_id, 0) + 1
                request = Request(
                    self.path,
                    msg_id,
                    int(self.headers.get("webhook-timestamp", "0") or 0),
                    body,
                    verified,
                    self.headers.get("Content-Type", ""),
                    attempt,
                    0,
                )
                if receiver.delay is not None:
                    time.sleep(receiver.delay(request))
                status = receiver.answer(request)
                request = dataclasses.replace(request, status=status)
                with receiver._changed:
                    receiver.requests.append(request)
                    receiver._changed.notify_all()
                with contextlib.suppress(OSError):  # the sender may have given up
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")

            do_GET = do_POST  # a followed redirect would arrive as a GET: recorded too

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{LOOPBACK}:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def accepted(self) -> list[Request]:
        """The requests answered 2xx, in arrival order."""
        with self._lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def wait(self, predicate: Callable[[list[Request]], bool], timeout: float = 20.0) -> None:
        """Block until ``predicate(requests)`` holds (or fail with what arrived)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.requests):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    summary = [(r.msg_id, r.status) for r in self.requests]
                    raise AssertionError(f"receiver did not see what was expected: {summary}")
                self._changed.wait(remaining)

    def wait_accepted(self, count: int, timeout: float = 20.0) -> list[Request]:
        self.wait(lambda requests: sum(200 <= r.status < 300 for r in requests) >= count, timeout)
        return self.accepted()
