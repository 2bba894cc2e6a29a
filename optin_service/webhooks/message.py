"""One change as a signed Standard Webhooks request, and one attempt to deliver it.

The body and the ``webhook-id`` depend only on the change, so every attempt,
redelivery and replay of a change sends the same bytes under the same id; only
``webhook-timestamp`` and the signature differ between attempts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

from standardwebhooks import Webhook

from ..feed import Change
from ..schemas import dump_event
from ..version import __version__
from .config import WebhookSettings

#: The ``type`` of every payload.
EVENT_TYPE = "optin.changed"
#: How much of an answer's body is read (and dropped): receivers answer a few bytes.
_ANSWER_READ = 64 * 1024


def change_data(change: Change) -> dict[str, Any]:
    """The change as the feed's HTTP items show it (``data`` of the payload)."""
    event = dump_event(change.event)
    return {
        "correlationId": event["correlationId"],
        "LOYALTY_OPTIN": event["LOYALTY_OPTIN"],
        "previous": change.previous,
        "updatedAt": event["updatedAt"],
        "requestId": event["requestId"],
        "source": event["source"],
        "client": event["client"],
        "version": change.version,
    }


def payload(change: Change) -> bytes:
    """The request body: ``{"type","timestamp","data"}``, compact JSON, UTF-8."""
    data = change_data(change)
    body = {"type": EVENT_TYPE, "timestamp": data["updatedAt"], "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def webhook_id(change: Change) -> str:
    """``msg_`` + 32 hex digits of a hash of the event's identity (member, µs, request
    id) and the change's version: the same for every delivery of this change, and
    different for any other change of any member."""
    event = change.event
    identity = "\n".join(
        (event.correlation_id, str(event.updated_at_us), event.request_id, str(change.version))
    )
    return "msg_" + hashlib.sha256(identity.encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Result:
    """What one attempt got."""

    #: The answer's HTTP status; ``None`` when there was none (timeout, refused...).
    status: int | None
    #: Why it failed, for logs and ``optin webhooks status``; ``None`` on a 2xx.
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        """410 Gone: the receiver asks for nothing more to be sent."""
        return self.status == 410


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is a failed attempt (the Standard Webhooks advice): urllib would otherwise
    follow 301/302/303 by sending a GET without the body, and report success."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Sender:
    """Signs and POSTs a body to the receiver (``urllib.request``: one request at a
    time needs no more; proxies from ``HTTPS_PROXY``/``NO_PROXY`` apply)."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.url = settings.url
        self.timeout = settings.timeout
        self._signer = Webhook(settings.key)
        self._opener = urllib.request.build_opener(_RefuseRedirects)

    def headers(self, msg_id: str, body: bytes, at: float | None = None) -> dict[str, str]:
        """The request's headers, signed for the attempt at Unix time ``at`` (now)."""
        seconds = int(time.time() if at is None else at)
        moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
        return {
            "Content-Type": "application/json",
            "User-Agent": f"optin-service/{__version__} (webhooks)",
            "webhook-id": msg_id,
            "webhook-timestamp": str(seconds),
            "webhook-signature": self._signer.sign(msg_id, moment, body),
        }

    def send(self, msg_id: str, body: bytes) -> Result:
        """One attempt; never raises for what the network or the receiver does."""
        request = urllib.request.Request(
            self.url, data=body, headers=self.headers(msg_id, body), method="POST"
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                answer.read(_ANSWER_READ)
                return Result(answer.status)
        except urllib.error.HTTPError as exc:  # any status outside 2xx, redirects included
            exc.close()
            reason = " (redirects are not followed)" if 300 <= exc.code < 400 else ""
            return Result(exc.code, f"HTTP {exc.code}{reason}")
        except urllib.error.URLError as exc:
            return Result(None, _describe(exc.reason))
        except (OSError, http.client.HTTPException) as exc:
            return Result(None, _describe(exc))

    def close(self) -> None:
        self._opener.close()


def _describe(reason: object) -> str:
    """A failure without an HTTP status, in a few words."""
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, BaseException):
        text = str(reason) or type(reason).__name__
        return f"{type(reason).__name__}: {text}"[:300]
    return str(reason)[:300]
