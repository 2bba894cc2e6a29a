"""Storage benchmark: bytes per member in Redis and in the SQLite file.

Both stores get ``--members`` members with one consent event each, written
through the backend itself (``import_events``, in batches), so the layout is
exactly the one the service writes. Then:

- **Redis** (a private ``redis-server``, AOF and snapshots off): ``used_memory``
  from ``INFO memory`` before and after, divided by the member count. "With one
  history event" is the store as written (current state, history, everything).
  "Current state alone" keeps only the keys the backend names for the current
  state (``store.key(id)``): they are ``DUMP``ed, the database flushed, and they
  are ``RESTORE``d byte for byte and encoding for encoding, so the figure also
  has the main hash table sized for those keys only.
- **SQLite** (a file with the default URL options: WAL, ``synchronous=FULL``):
  the file's size after a checkpoint, minus the empty file's, per member; and
  per table from ``dbstat`` (the ``optin`` table is the current state, the
  ``optin_event`` table the history). Also after ``VACUUM`` (pages packed full,
  a lower bound: rows written in random order leave pages partly empty).

Prints a table and writes ``bench/results/storage.json``. About 15 seconds for
the default 100,000 members; needs ``redis-server``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servers import RESULTS, redis_server  # noqa: E402  (bench/servers.py)

from backends.redis import RedisStore  # noqa: E402
from backends.sqlite import SQLiteStore  # noqa: E402
from optin_service.storage import OptInRecord  # noqa: E402

REDIS_TARGET = 120  # bytes per member, current state
BATCH = 5000


def records(members: int, seed: int = 7) -> list[OptInRecord]:
    """One event per member: UUID request ids, server-like times, a third declined."""
    rng = random.Random(seed)
    start = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
    out = []
    for i in range(members):
        out.append(
            OptInRecord(
                f"member-{i:07d}",
                "declined" if i % 3 == 0 else "accepted",
                start + timedelta(microseconds=rng.randrange(86_400_000_000)),
                str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "API",
                "",
            )
        )
    rng.shuffle(out)  # the service writes members in no particular order
    return out


def batches(items: list, size: int = BATCH):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


def bench_redis(recs: list[OptInRecord], workdir: Path) -> dict:
    n = len(recs)
    import redis

    with redis_server(workdir) as port, redis.Redis(port=port) as client:
        store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0")
        client.flushall()
        empty = used_memory(client)
        started = time.perf_counter()
        for batch in batches(recs):
            store.import_events(batch)
        seconds = time.perf_counter() - started
        full = used_memory(client)
        keys = client.dbsize()
        sample = recs[0].correlation_id
        key = store.key(sample)
        per_key = {}
        for k in client.scan_iter(match=key.replace("{", "\\{").replace("}", "\\}") + "*"):
            per_key[k.decode()] = {
                "memory_usage": client.memory_usage(k, samples=0),
                "encoding": client.object("encoding", k).decode(),
                "type": client.type(k).decode(),
            }
        value = client.get(key) if client.type(key) == b"string" else None

        # Current state alone: DUMP the current-state keys, flush, RESTORE them.
        dumps = []
        for batch in batches(recs):
            pipe = client.pipeline(transaction=False)
            for rec in batch:
                pipe.dump(store.key(rec.correlation_id))
            keys = [store.key(r.correlation_id) for r in batch]
            dumps.extend(zip(keys, pipe.execute(), strict=True))
        client.flushall()
        empty_again = used_memory(client)
        for batch in batches(dumps):
            pipe = client.pipeline(transaction=False)
            for k, dumped in batch:
                pipe.restore(k, 0, dumped)
            pipe.execute()
        current = used_memory(client)
        store.close()
        version = client.info("server")["redis_version"]
    return {
        "redis_version": version,
        "members": n,
        "keys_written": keys,
        "import_s": round(seconds, 2),
        "bytes_per_member_with_one_event": (full - empty) / n,
        "bytes_per_member_current_state": (current - empty_again) / n,
        "target_current_state": REDIS_TARGET,
        "sample_member": sample,
        "sample_keys": per_key,
        "sample_current_value": value.decode() if value else None,
    }


def sqlite_sizes(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
        page_size, pages = (
            conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count")
        )
    finally:
        conn.close()
    sizes = dict(rows)
    sizes["(file)"] = page_size * pages
    return sizes


def bench_sqlite(recs: list[OptInRecord], workdir: Path) -> dict:
    n = len(recs)
    path = workdir / "storage.db"
    store = SQLiteStore.from_url(f"sqlite:///{path}")
    store.check()  # creates the schema
    empty = sqlite_sizes(path)
    started = time.perf_counter()
    for batch in batches(recs):
        store.import_events(batch)
    seconds = time.perf_counter() - started
    store.close()
    written = sqlite_sizes(path)
    conn = sqlite3.connect(path)
    conn.execute("VACUUM")
    conn.close()
    vacuumed = sqlite_sizes(path)

    def per_member(sizes: dict[str, int]) -> dict[str, float]:
        return {
            "file": (sizes["(file)"] - empty["(file)"]) / n,
            "current_state": sizes.get("optin", 0) / n,
            "history": sizes.get("optin_event", 0) / n,
        }

    return {
        "sqlite_version": sqlite3.sqlite_version,
        "members": n,
        "import_s": round(seconds, 2),
        "bytes_per_member_as_written": per_member(written),
        "bytes_per_member_after_vacuum": per_member(vacuumed),
        "tables_as_written": written,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/storage.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--members", type=int, default=100_000, help="members, one event each (100,000)"
    )
    parser.add_argument("--out", default=str(RESULTS / "storage.json"), help="the JSON results")
    args = parser.parse_args(argv)
    recs = records(args.members)
    with tempfile.TemporaryDirectory(prefix="optin-storage-") as tmp:
        redis_result = bench_redis(recs, Path(tmp))
        sqlite_result = bench_sqlite(recs, Path(tmp))
    r, s = redis_result, sqlite_result
    w, v = s["bytes_per_member_as_written"], s["bytes_per_member_after_vacuum"]
    cur = r["bytes_per_member_current_state"]
    table = "\n".join(
        [
            f"Bytes per member, {args.members:,} members, one consent event each:",
            "",
            "| Store | current state alone | with one history event |",
            "|---|---|---|",
            f"| Redis {r['redis_version']} (`used_memory` delta) | **{cur:.0f}** "
            f"(target ≤ {REDIS_TARGET} {'✓' if cur <= REDIS_TARGET else '✗'}) | "
            f"{r['bytes_per_member_with_one_event']:.0f} |",
            f"| SQLite {s['sqlite_version']} file, as written | {w['current_state']:.0f} | "
            f"{w['file']:.0f} |",
            f"| SQLite file after VACUUM | {v['current_state']:.0f} | {v['file']:.0f} |",
        ]
    )
    print(table)
    print()
    print("Redis keys of one member:")
    for key, info in r["sample_keys"].items():
        print(
            f"  {key}: {info['type']} ({info['encoding']}), MEMORY USAGE {info['memory_usage']} B"
        )
    if r["sample_current_value"]:
        print(f"  current-state value: {r['sample_current_value']!r}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "pid": os.getpid(),
        "redis": redis_result,
        "sqlite": sqlite_result,
        "markdown": table,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
