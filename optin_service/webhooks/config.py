"""The deliverer's settings, checked once at start: a bad one stops it with a clear message.

The secret is kept out of every message, ``repr`` and log line: an error says
what is wrong with it (prefix, alphabet, length), never what it is.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

#: The Standard Webhooks form of a symmetric secret: this prefix, then base64.
SECRET_PREFIX = "whsec_"
#: The spec asks for at least 24 random bytes (192 bits).
MIN_SECRET_BYTES = 24


@dataclasses.dataclass(frozen=True)
class WebhookSettings:
    """Where to deliver, how to sign, how long to wait, when to retry."""

    url: str
    #: The signing key, decoded from ``whsec_...`` (never shown).
    key: bytes = dataclasses.field(repr=False)
    #: Seconds a connection, the request or each read of the answer may take.
    timeout: float = 15.0
    #: Seconds to wait before each retry; the first attempt is immediate, so a change
    #: is tried ``len(schedule) + 1`` times before it is marked failed.
    schedule: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WebhookSettings:
        """The settings in an app's config (``OPTIN_WEBHOOK_*``), or ``ValueError``
        naming the setting that is wrong."""
        return cls(
            url=parse_url(config.get("OPTIN_WEBHOOK_URL") or ""),
            key=parse_secret(config.get("OPTIN_WEBHOOK_SECRET") or ""),
            timeout=parse_timeout(config.get("OPTIN_WEBHOOK_TIMEOUT_SECONDS", 15)),
            schedule=parse_schedule(config.get("OPTIN_WEBHOOK_RETRY_SCHEDULE", "")),
        )


def parse_url(raw: str) -> str:
    """``OPTIN_WEBHOOK_URL``: an absolute ``http`` or ``https`` URL."""
    if not raw:
        raise ValueError("OPTIN_WEBHOOK_URL is not set: the receiver's URL (https://...)")
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("OPTIN_WEBHOOK_URL must be an absolute http:// or https:// URL")
    return raw


def parse_secret(raw: str) -> bytes:
    """The key in ``OPTIN_WEBHOOK_SECRET`` (``whsec_`` + base64 of 24 or more bytes).

    Checked strictly: the ``standardwebhooks`` library skips characters that are
    not base64 and accepts a secret without the prefix, so a mistyped secret
    would sign with a key the receiver does not have, and every delivery would
    fail its verification.
    """
    setting = "OPTIN_WEBHOOK_SECRET"
    if not raw:
        raise ValueError(f"{setting} is not set: the signing secret, whsec_ + base64")
    if not raw.startswith(SECRET_PREFIX):
        raise ValueError(f"{setting} must start with {SECRET_PREFIX} (Standard Webhooks form)")
    encoded = raw[len(SECRET_PREFIX) :].strip()
    try:
        # Unpadded base64 is common in generated secrets: pad it, then insist on the alphabet.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{setting} must be {SECRET_PREFIX} followed by standard base64 "
            "(A-Z a-z 0-9 + /, = padding); the value set is not"
        ) from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"{setting} decodes to {len(key)} bytes; Standard Webhooks asks for at least "
            f'{MIN_SECRET_BYTES} random bytes (e.g. python -c "import base64, os; '
            f"print('{SECRET_PREFIX}' + base64.b64encode(os.urandom(32)).decode())\")"
        )
    return key


def parse_timeout(raw: Any) -> float:
    """``OPTIN_WEBHOOK_TIMEOUT_SECONDS``: a positive number."""
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"OPTIN_WEBHOOK_TIMEOUT_SECONDS must be a positive number, not {raw!r}")
    return seconds


def parse_schedule(raw: Any) -> tuple[float, ...]:
    """``OPTIN_WEBHOOK_RETRY_SCHEDULE``: seconds before each retry, comma-separated
    (empty: no retry, a refused change is marked failed at once)."""
    if isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        items = [part.strip() for part in str(raw).split(",") if part.strip()]
    schedule = []
    for item in items:
        try:
            seconds = float(item)
        except (TypeError, ValueError):
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(
                "OPTIN_WEBHOOK_RETRY_SCHEDULE must be seconds separated by commas "
                f"(e.g. 5,300,1800), not {raw!r}"
            )
        schedule.append(seconds)
    return tuple(schedule)
