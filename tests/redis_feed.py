"""What the Redis stores' runs of the feed contract share: their cursors' form."""

from __future__ import annotations

from optin_service.feed import decode_cursor, encode_cursor


def redis_cursor_past_the_end(cursor: str) -> str:
    """A Redis store's cursor (``<generation>.<id>,<id>,...``, one stream id per group)
    with its last group's position about 3,000 years (of µs) past the one it holds."""
    generation, _, positions = decode_cursor(cursor).partition(".")
    groups = positions.split(",")
    us, _, n = (groups[-1] or "0-0").partition("-")
    groups[-1] = f"{int(us) + 10**17}-{n}"
    return encode_cursor(f"{generation}.{','.join(groups)}")


class RedisCursors:
    """The feed contract's hook for the Redis stores' cursors."""

    def cursor_past_the_end(self, store: object, cursor: str) -> str:
        return redis_cursor_past_the_end(cursor)
