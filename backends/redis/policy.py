"""Whether a Redis server may evict a member's keys.

A member's keys have no TTL, so under an ``allkeys-*`` eviction policy Redis may
drop them to free memory: consent acknowledged, then gone. The stores read
``maxmemory_policy`` from ``INFO memory`` (``CONFIG`` is often disabled on managed
Redis, and the policy can change at runtime) before writing, at most once a
second while it is safe, and refuse to write (:class:`StorageUnavailable`) under
any policy but ``noeviction`` and ``volatile-*``. A server that does not answer
``INFO`` (a proxy, an ACL without it) cannot be checked: writes go ahead, and a
warning says so once per store.
"""

from __future__ import annotations

import logging
import re

import redis

from optin_service.storage import StorageUnavailable

#: The eviction policies that never evict a key without a TTL (a member's state and
#: history have none); any other (``allkeys-*``, or one we do not know) may.
_KEEPING_POLICIES = re.compile(r"noeviction|volatile-[a-z]+")
log = logging.getLogger(__package__)  # "backends.redis", for every Redis store


def policy_of(client: redis.Redis) -> str | None:
    """The server's ``maxmemory_policy`` from ``INFO memory``; ``None`` if it does not
    answer INFO (unknown to a proxy or to fakeredis, or denied by an ACL)."""
    try:
        info = client.info("memory")
    except redis.exceptions.NoPermissionError:
        return None
    except redis.ResponseError as exc:
        if str(exc).lower().startswith("unknown command"):
            return None
        raise
    return info.get("maxmemory_policy")


def refuse_if_evicting(server: str, policy: str) -> None:
    """Raise :class:`StorageUnavailable` if ``policy`` may evict keys without a TTL."""
    if not _KEEPING_POLICIES.fullmatch(policy):
        raise StorageUnavailable(
            f"redis: {server} has maxmemory-policy {policy}, under which Redis may "
            "evict a member's consent to free memory; refusing to write until it is "
            "noeviction (or a volatile-* policy)",
            reason=f"Redis's maxmemory-policy {policy} may evict consent records; "
            "writes are refused until it is noeviction or a volatile-* policy",
        )


def warn_unread(servers: list[str]) -> None:
    log.warning(
        "redis: %s does not answer INFO memory, so its maxmemory-policy cannot be "
        "checked; make sure it is noeviction (allkeys-* policies evict consent)",
        ", ".join(servers),
    )
