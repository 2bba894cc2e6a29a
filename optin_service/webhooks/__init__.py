"""Webhooks: every change of the feed pushed to one receiver, signed (Standard
Webhooks), at least once, in feed order.

``optin webhooks run`` (:mod:`.cli`) runs a :class:`Deliverer` beside the
service. Its state (position, lease, retries, failures, disabled) lives in the
store (:mod:`.state`), so any deliverer process resumes it. See ``docs/webhooks.md``.
"""

from __future__ import annotations

from .config import WebhookSettings
from .deliverer import Deliverer
from .message import EVENT_TYPE, Sender, change_data, payload, webhook_id

__all__ = [
    "EVENT_TYPE",
    "Deliverer",
    "Sender",
    "WebhookSettings",
    "change_data",
    "payload",
    "webhook_id",
]
