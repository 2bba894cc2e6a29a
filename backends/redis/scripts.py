"""The Lua scripts of the Redis stores, read from the ``lua/`` files installed beside
this module.

Every write is one script, so a member's event, current state, idempotency key
and change (its entry in the feed) change together or not at all.
``lua/functions.lua`` holds the functions the write and read scripts share; it is
put in front of each script that uses them.
"""

from __future__ import annotations

from importlib.resources import files

_LUA = files(__package__).joinpath("lua")


def _read(name: str) -> str:
    return _LUA.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _with_functions(name: str) -> str:
    return _read("functions") + "\n" + _read(name)


#: One write (``set``), its change included. See ``lua/set.lua`` for its KEYS, ARGV and reply.
SET = _with_functions("set")
#: One read (``get``): the state value and the current event's history member.
GET = _with_functions("get")
#: Many events of any members, each all or nothing (one server or Sentinel only).
IMPORT = _with_functions("import")
#: The events of many history keys at or after a time (one call per SCAN page).
RANGES = _read("ranges")
#: How many events many history keys hold together.
COUNT = _read("count")
#: One member's part of a rebuilt feed (``lua/rebuild.lua``).
REBUILD = _with_functions("rebuild")
#: Removes a feed stream's old entries and records the greatest id removed.
PRUNE = _read("prune")
#: A compare-and-set of one value (the webhook deliverer's state).
SAVE_STATE = _read("save_state")
