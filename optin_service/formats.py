"""Value formats: what a member id, a source, a key, a request id and a client look like;
how a time is written; how a value is quoted in an error message.

Shared by the schemas, the CLI and authentication, so each rule is written once.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

#: A member id: what the path segment, the CLI and import accept. Not ``.`` or ``..``:
#: clients remove those segments from a URL path, so such a member could never be read.
#: (A lookahead with ``$`` rather than ``\Z``: the same in ECMA-262, for the OpenAPI pattern.)
CORRELATION_ID = re.compile(r"(?!\.\.?$)[A-Za-z0-9._:@-]{1,128}")
#: :data:`CORRELATION_ID` in words, for error messages and documentation.
CORRELATION_ID_RULE = "1 to 128 characters of A-Z a-z 0-9 . _ : @ -, not . or .."
#: ``X-Consent-Source``: the channel a consent came through.
SOURCE = re.compile(r"[A-Za-z0-9_-]{1,32}")
#: ``Idempotency-Key``: printable ASCII, space included.
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
#: A request id in an imported event (ours are UUID4s): printable, no spaces.
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
#: The client recorded on an event: printable ASCII, possibly empty.
CLIENT = re.compile(r"[\x20-\x7e]{0,128}")


#: Characters of a value or a key an error message quotes: an import line can be
#: megabytes long, and its message is one line of a terminal or a log. Longer than
#: any valid id (128), so a value is cut only when its length alone is wrong.
SHOWN = 130


def cut(text: str, *, quote: bool = False, limit: int = SHOWN) -> str:
    """``text`` for an error message (``repr`` with ``quote``): whole up to ``limit``
    characters, else its start and its length."""
    if len(text) <= limit:
        return repr(text) if quote else text
    head = repr(text[:limit]) if quote else text[:limit]
    return f"{head}... ({len(text)} characters)"


#: More than six fractional digits: a time finer than the µs stores keep.
SUBMICROSECOND = re.compile(r"[.,]\d{7,}")


def format_time(moment: datetime) -> str:
    """``2026-11-26T12:00:00.123456Z``: UTC, four-digit year, always six fractional digits."""
    # isoformat pads the year to four digits (strftime's %Y does not, before 1000).
    return moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat("T", "microseconds") + "Z"
