"""How an event is written into Redis values and read back: the scripts' arguments,
the history member, the state value, and the escaping of member ids in keys.

A member's history is a sorted set scored by µs; each member is
``<request id> <status> <source>[\\n<client>[\\n<µs>]]``. The client (who recorded
the event) follows a newline, with its own backslashes and newlines escaped as
``\\\\`` and ``\\n``; ``\\n<µs>`` is added by the write script when the same words
are already stored at another time. The state value is ``<µs><1 if declined else 0>``,
then ``:<version>`` (the member's change count) once it is 2 or more: a member who
answered once keeps a value of digits only, which Redis stores as an integer.

A change is a feed stream entry (read by :func:`change`); its stream id
(``<µs>-<n>``) is its position in the feed.
"""

from __future__ import annotations

import re

from optin_service.storage import IDEMPOTENCY_TTL, EventRow, OptInRecord, Status, StorageError

#: An idempotency key's TTL in seconds.
KEY_TTL = int(IDEMPOTENCY_TTL.total_seconds())
#: µs beyond which a sorted-set score (a double) rounds (storage.EARLIEST/LATEST).
_EXACT = 2**53


def event_args(row: EventRow) -> list[object]:
    """An event's ARGV for the write scripts: µs, history member, state value,
    1 if declined, request id, correlation id, source, client."""
    correlation_id, us, request_id, status, source, client = row
    if not -_EXACT <= us <= _EXACT:  # rows skip OptInRecord's own check
        raise StorageError(f"redis: a time of {us} µs since the epoch cannot be scored exactly")
    # The history member is "<request id> <status> <source>": a source that is empty
    # or holds a space or newline, or a request id holding a newline, would be read
    # back as another event (the API and import never make one; a caller may).
    if not source or " " in source or "\n" in source or "\n" in request_id:
        raise StorageError(
            f"redis: cannot store source {source!r} with request id {request_id!r}: "
            "a source must be one word, and neither may hold a newline"
        )
    # The caller (client) follows a newline, which no other part can hold (the
    # client's own newlines and backslashes are escaped); an event without a
    # client has no newline part.
    caller = f"\n{_escape_client(client)}" if client else ""
    declined = 1 if status == "declined" else 0
    member = f"{request_id} {status} {source}{caller}"
    return [us, member, f"{us}{declined}", declined, request_id, correlation_id, source, client]


def set_args(row: EventRow, *, touch: bool = False) -> list[object]:
    """The set script's ARGV: the event's, the fingerprint, the key's TTL[, touch]."""
    args = event_args(row)
    args += (f"{row[3]}|{row[4]}", KEY_TTL)  # OptInRecord.fingerprint
    if touch:
        args.append(1)
    return args


def current(correlation_id: str, state: bytes | None, member: bytes | None) -> OptInRecord:
    """The current record from a state value (``<µs><0|1>[:<version>]``) and its event's
    history member."""
    if state is None or member is None:
        what = "a state" if state is None else f"an event for its state {state!r}"
        raise StorageError(f"redis: member {correlation_id!r} has no {what}")
    return event(correlation_id, member, int(state.partition(b":")[0][:-1]))


def change(fields: dict[bytes, bytes]) -> tuple[OptInRecord, Status | None, int]:
    """The event, previous status and version of a feed stream entry, whose fields
    ``lua/functions.lua``'s ``append`` writes: correlation_id, us, status, previous
    ("" for none), request_id, source, client, version."""
    text = {name.decode(): value.decode() for name, value in fields.items()}
    record = OptInRecord.from_us(
        text["correlation_id"],
        text["status"],  # type: ignore[arg-type]
        int(text["us"]),
        text["request_id"],
        text["source"],
        text["client"],
    )
    previous = text["previous"] or None
    return record, previous, int(text["version"])  # type: ignore[return-value]


def event(correlation_id: str, member: bytes, us: int) -> OptInRecord:
    """The record a history member holds, at its score ``us``."""
    return OptInRecord.from_row(event_row(correlation_id, member, us))


def event_row(correlation_id: str, member: bytes, score: bytes | float) -> EventRow:
    """The :data:`EventRow` a history member holds, at its score."""
    # "<request id> <status> <source>[\n<client>[\n<µs>]]": the µs only when the
    # same words were already stored at another time.
    text, _, rest = member.decode().partition("\n")
    client = _unescape_client(rest.split("\n", 1)[0]) if rest else ""
    request_id, status, source = text.rsplit(" ", 2)
    try:
        us = int(score)
    except ValueError:  # a score Redis wrote in exponent form
        us = int(float(score))
    return (correlation_id, us, request_id, status, source, client)


_CLIENT_UNESCAPES = re.compile(r"\\([\\n])")


def _escape_client(client: str) -> str:
    return client.replace("\\", "\\\\").replace("\n", "\\n")


def _unescape_client(escaped: str) -> str:
    if "\\" not in escaped:
        return escaped
    return _CLIENT_UNESCAPES.sub(lambda m: "\n" if m[1] == "n" else "\\", escaped)


_ESCAPES = {"%": "%25", "}": "%7D"}
_UNESCAPES = re.compile("%(25|7D)")


def escape(correlation_id: str) -> str:
    """A member id as it goes into its keys' hash tag: ``%`` and ``}`` (which the
    API never accepts) escaped, so the tag is the whole id."""
    if "%" not in correlation_id and "}" not in correlation_id:
        return correlation_id
    return "".join(_ESCAPES.get(c, c) for c in correlation_id)


def unescape(escaped: str) -> str:
    """The member id :func:`escape` made ``escaped`` from."""
    if "%" not in escaped:
        return escaped
    return _UNESCAPES.sub(lambda m: "%" if m[1] == "25" else "}", escaped)
