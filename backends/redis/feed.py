"""The change feed of the Redis stores, and the webhook deliverer's state.

Changes live in feed streams, one per *group* of members: a single Redis (or a
Sentinel's master) has one group and one stream; a Cluster has
:data:`~backends.redis.cluster.GROUPS` of them (a script reaches one slot, so a
member's keys and its group's stream share a hash tag). Per group:

- ``<feed>``: the stream. The write script that makes an event its member's
  state appends the change in the same call (``lua/functions.lua``), with the id
  ``<µs of the server's clock>-<n>``, greater than every id the stream gave out.
  One server runs one script at a time, so a stream's order is its commit order;
- ``<feed>:pruned``: the greatest id :meth:`~RedisFeed.prune_changes` removed (a
  cursor below it points into removed changes, and new ids stay above it).

``<prefix>feed:generation`` names the feed (absent: ``0``); a rebuild writes a
new one first, so every earlier cursor expires. A cursor holds the generation
and one position per group, ``encode_cursor("<generation>.<id>,<id>,...")``
(``""`` for ``0-0``). A page merges the groups' streams by id: each group is
read on from its own position, so a change that commits in one group with a
smaller id than one already read from another is still read, later, exactly
once. On one server that is commit order; across a Cluster's groups it is the
order of the masters' clocks.

The deliverer's values are ``<prefix>state:<key>``.
"""

from __future__ import annotations

import abc
import re
import secrets
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, ClassVar

from optin_service.feed import (
    Change,
    ChangePage,
    CursorExpired,
    CursorInvalid,
    decode_cursor,
    encode_cursor,
    sorted_for_import,
)
from optin_service.storage import UNSET, OptInRecord, OptInStore, StorageUnavailable, batched

from . import codec, scripts

#: A stream id: ``<µs>-<n>``, each below 2**64, in decimal without leading zeros.
_ID = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
_GENERATION = re.compile(r"[0-9A-Za-z]{1,32}")
_ID_LIMIT = 2**64
#: The generation of a feed no rebuild has replaced.
FIRST_GENERATION = "0"
#: Members per rebuild pipeline.
REBUILD_BATCH = 500

Position = tuple[int, int]
_START: Position = (0, 0)
#: One script call: KEYS and ARGV.
Call = tuple[list[str], list[object]]


class _Group:
    """What one read of a group's stream found."""

    __slots__ = ("entries", "last", "marker")

    def __init__(self, entries: list, last: list, marker: bytes | None) -> None:
        self.entries = [(_position(entry_id), fields) for entry_id, fields in entries]
        self.marker = _START if marker is None else _position(marker)
        #: The greatest position a cursor of this group may hold.
        self.last = max(self.marker, _position(last[0][0])) if last else self.marker


class RedisFeed(OptInStore):
    """The feed methods of the Redis stores (:class:`~backends.redis.store.RedisStore`
    gives the client, the key layout and the script runner)."""

    #: How many feed streams the store has.
    groups: ClassVar[int] = 1
    #: Whether the generation and every group can be read in one pipeline, in order
    #: (one server); else the generation is read before and after the groups.
    _one_server: ClassVar[bool] = True
    client: Any
    prefix: str

    def _feed_keys(self, group: int) -> list[str]:
        """A group's stream and its marker (``<feed>:pruned``)."""
        return [f"{self.prefix}feed", f"{self.prefix}feed:pruned"]

    def _group_of(self, correlation_id: str) -> int:
        return 0

    def _generation_key(self) -> str:
        return f"{self.prefix}feed:generation"

    @abc.abstractmethod
    def _run_calls(self, script: str, calls: Sequence[Call]) -> list:
        """Run ``script`` once per call (keys, args), each on its keys' node; the replies."""

    @abc.abstractmethod
    def _refuse_if_evicting(self) -> None:
        """Raise StorageUnavailable while the server may evict keys without a TTL."""

    @abc.abstractmethod
    def _history_keys(self) -> Iterator[list[bytes]]:
        """Every member's history key, a SCAN page at a time."""

    @abc.abstractmethod
    def _escaped_id(self, history_key: bytes) -> bytes | None:
        """The escaped member id in a history key (None: not one of this store's)."""

    @abc.abstractmethod
    def key(self, correlation_id: str) -> str:
        """The key holding a member's current state."""

    # --- reading -----------------------------------------------------------------

    def changes(self, after: str | None, limit: int) -> ChangePage:
        if limit < 1:
            raise ValueError(f"limit must be 1 or more, not {limit}")
        wanted = None if after is None else self._parse_cursor(after)
        # One stream: all of it in order. Several: a few entries from each (a page
        # ends where a group may hold more unread), so a page fetches at most about
        # twice its length, plus 8 entries a group.
        count = limit if self.groups == 1 else min(limit, -(-2 * limit // self.groups) + 8)
        if wanted is None:
            starts = ["-"] * self.groups  # from the oldest change kept
        else:
            starts = [f"({us}-{n}" for us, n in wanted[1]]  # after the position
        for _ in range(3):
            before, generation, found = self._read_feed(starts, count)
            if before == generation:
                break
            if wanted is not None:  # a rebuild began: the cursor's feed is gone
                raise CursorExpired("the feed was rebuilt: read it again from the start")
        else:
            raise StorageUnavailable("redis: the change feed is being rebuilt")
        if wanted is None:
            positions = [group.marker for group in found]
        else:
            if wanted[0] != generation:
                raise CursorExpired("the feed was rebuilt: read it again from the start")
            positions = list(wanted[1])
            for position, group in zip(positions, found, strict=True):
                if position > group.last:
                    raise CursorInvalid("cursor is not one this service gave out")
            for position, group in zip(positions, found, strict=True):
                if position < group.marker:
                    raise CursorExpired("the changes after this cursor are no longer kept")
        # A group that gave all it was asked for may hold more: read no further than
        # the first such group's last entry, so a page is in id order.
        cut = min(
            (group.entries[-1][0] for group in found if len(group.entries) == count),
            default=None,
        )
        merged = sorted(
            (position, g, fields)
            for g, group in enumerate(found)
            for position, fields in group.entries
            if cut is None or position <= cut
        )[:limit]
        page = []
        for position, g, fields in merged:
            positions[g] = position
            record, previous, version = codec.change(fields)
            page.append(Change(record, previous, version, self._cursor(generation, positions)))
        next_cursor = page[-1].cursor if page else self._cursor(generation, positions)
        return ChangePage(page, next_cursor)

    def _read_feed(self, starts: list[str], count: int) -> tuple[str, str, list[_Group]]:
        """The generation before and after reading each group from ``starts`` (an
        XRANGE start), up to ``count`` entries each."""
        gen_key = self._generation_key()
        pipe = self.client.pipeline(transaction=False)
        if self._one_server:
            pipe.get(gen_key)
        for group, start in enumerate(starts):
            stream, marker = self._feed_keys(group)
            # The marker after the entries: a prune in between shows, never a gap.
            pipe.xrange(stream, start, "+", count=count)
            pipe.xrevrange(stream, "+", "-", count=1)
            pipe.get(marker)
        if self._one_server:
            pipe.get(gen_key)
            replies = pipe.execute()
            before, after, replies = replies[0], replies[-1], replies[1:-1]
        else:
            before = self.client.get(gen_key)
            replies = pipe.execute()
            after = self.client.get(gen_key)
        groups = [_Group(*replies[i : i + 3]) for i in range(0, len(replies), 3)]
        return _generation(before), _generation(after), groups

    def _cursor(self, generation: str, positions: list[Position]) -> str:
        return encode_cursor(f"{generation}." + ",".join(map(_text, positions)))

    def _parse_cursor(self, cursor: str) -> tuple[str, list[Position]]:
        generation, dot, rest = decode_cursor(cursor).partition(".")
        parts = rest.split(",")
        if not dot or not _GENERATION.fullmatch(generation) or len(parts) != self.groups:
            raise CursorInvalid("cursor is not one this service gave out")
        positions = []
        for part in parts:
            match = _ID.fullmatch(part) if part else None
            if part and (match is None or max(map(int, match.groups())) >= _ID_LIMIT):
                raise CursorInvalid("cursor is not one this service gave out")
            positions.append(_position(part) if part else _START)
        return generation, positions

    # --- retention and rebuild -----------------------------------------------------

    def prune_changes(self, before: datetime) -> int:
        cut = OptInRecord("-", "accepted", before).updated_at_us
        if cut <= 0:
            return 0
        calls = [(self._feed_keys(g), [f"{cut}-0"]) for g in range(self.groups)]
        return sum(self._run_calls(scripts.PRUNE, calls))

    def rebuild_changes(self) -> int:
        """Each member's events replayed into a new feed, one member at a time (one
        script each, members in id order). A maintenance operation: stop the writers
        first. It is not atomic across members: a write while it runs may append its
        change to the new feed before the rebuild reaches its member (whose changes
        the rebuild then appends again, with versions from 1), and readers see the
        new feed grow as it is rebuilt."""
        self._refuse_if_evicting()
        self.client.set(self._generation_key(), secrets.token_hex(8))
        pipe = self.client.pipeline(transaction=False)
        for group in range(self.groups):
            for key in self._feed_keys(group):
                pipe.delete(key)
        pipe.execute()
        total = 0
        for batch in batched(self._member_ids(), REBUILD_BATCH):
            calls = []
            for cid in batch:
                key = self.key(cid)
                feed = self._feed_keys(self._group_of(cid))
                calls.append(([key, key + ":h", *feed], [cid]))
            total += sum(self._run_calls(scripts.REBUILD, calls))
        return total

    def _member_ids(self) -> Iterator[str]:
        """Every member's id, sorted, each once (SCAN may give a key twice)."""
        # sorted_for_import keeps the first row of each identity (member, µs, request
        # id), in member order: one row per id gives the ids sorted and unique.
        rows = (
            (codec.unescape(escaped.decode()), 0, "", "accepted", "", "")
            for keys in self._history_keys()
            for key in keys
            if (escaped := self._escaped_id(key)) is not None
        )
        for row in sorted_for_import(rows):
            yield row[0]

    # --- the deliverer's state -----------------------------------------------------

    def _state_key(self, key: str) -> str:
        return f"{self.prefix}state:{key}"

    def load_state(self, key: str) -> str | None:
        value = self.client.get(self._state_key(key))
        return None if value is None else value.decode()

    def save_state(self, key: str, value: str | None, *, expected: object = UNSET) -> bool:
        if expected is UNSET:
            mode, compare = "any", ""
        elif expected is None:
            mode, compare = "absent", ""
        else:
            mode, compare = "equal", str(expected)
        self._refuse_if_evicting()
        args = [mode, compare, 1 if value is None else 0, "" if value is None else value]
        return bool(self.client.eval(scripts.SAVE_STATE, 1, self._state_key(key), *args))


def _position(entry_id: bytes | str) -> Position:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    us, _, n = text.partition("-")
    return int(us), int(n)


def _text(position: Position) -> str:
    return "" if position == _START else f"{position[0]}-{position[1]}"


def _generation(value: bytes | None) -> str:
    return FIRST_GENERATION if value is None else value.decode()
