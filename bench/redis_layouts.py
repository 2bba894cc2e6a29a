"""What other Redis layouts of the current state would cost, in bytes per member.

From the repository root: ``.venv/bin/python bench/redis_layouts.py`` (about 20 s).

``bench/storage.py`` measures the layout ``backends/redis.py`` writes; this one
writes 100,000 current-state keys in candidate layouts straight into a private
``redis-server`` (AOF and snapshots off) and reports the ``used_memory`` delta per
member, to show which change would bring the current state under 120 bytes.
Only the current-state key is written: history is not part of these figures.
"""

from __future__ import annotations

import base64
import random
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load  # bench/load.py

N = 100_000
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def b36(n: int) -> str:
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = DIGITS[r] + out
    return out


def b64(rid: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(rid.bytes).rstrip(b"=").decode()


def _today(cid: str, st: str, us: int, rid: uuid.UUID) -> tuple[str, str]:
    return f"optin:{{{cid}}}", f"{st}:{us}:API:{rid}"


def _compact(cid: str, st: str, us: int, rid: uuid.UUID) -> tuple[str, str]:
    return f"optin:{{{cid}}}", f"{st[0]}:{b36(us)}:API:{b64(rid)}"


def _status_time(cid: str, st: str, us: int, rid: uuid.UUID) -> tuple[str, str]:
    return f"optin:{{{cid}}}", f"{st[0]}:{b36(us)}"


LAYOUTS = {
    "today: optin:{id} = status:µs:source:uuid": _today,
    "compact: optin:{id} = d:µs36:API:rid-base64 (<= 44 B: one allocation)": _compact,
    "status + time only: optin:{id} = d:µs36 (request id, source from the event)": _status_time,
}


def main() -> int:
    rng = random.Random(1)
    rows = []
    for i in range(N):
        us = 1795748634110516 + rng.randrange(10**11)
        rid = uuid.UUID(int=rng.getrandbits(128), version=4)
        rows.append((f"member-{i:07d}", "declined" if i % 3 == 0 else "accepted", us, rid))
    with tempfile.TemporaryDirectory() as tmp, load.redis_server(Path(tmp)) as (_port, client):
        for name, layout in LAYOUTS.items():
            client.flushall()
            before = int(client.info("memory")["used_memory"])
            pipe = client.pipeline(transaction=False)
            for j, row in enumerate(rows):
                pipe.set(*layout(*row))
                if j % 5000 == 4999:
                    pipe.execute()
            pipe.execute()
            after = int(client.info("memory")["used_memory"])
            key, value = layout(*rows[0])
            encoding = client.object("encoding", key).decode()
            print(
                f"{(after - before) / N:6.1f} B/member  {name}\n"
                f"{'':18}e.g. {value!r} ({len(value)} B, {encoding})"
            )
        client.flushall()
        before = int(client.info("memory")["used_memory"])
        pipe = client.pipeline(transaction=False)
        for j, (cid, st, us, rid) in enumerate(rows):
            pipe.hset(f"optin:{{b{j // 100}}}", cid, f"{st[0]}:{b36(us)}:API:{b64(rid)}")
            if j % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        after = int(client.info("memory")["used_memory"])
        print(
            f"{(after - before) / N:6.1f} B/member  hashes of 100 members each (listpack), "
            "compact value: the hash tag becomes the bucket's, not the member's"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
