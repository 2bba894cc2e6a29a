"""What the change feed's commit order costs PostgreSQL writes: PUT-sized writes per second
(``PostgresStore.set``, one statement and one COMMIT each) by 1, 2 and 4 writer
processes, on a server of its own (Debian's postgresql, default settings: fsync and
synchronous_commit on), three ways:

- ``feed``: as shipped, each append under the feed's advisory lock, held to COMMIT;
- ``feed, no lock``: the same with ``optin_feed_lock()`` made a no-op (NOT commit-ordered:
  what the lock itself costs);
- ``no feed``: the state's triggers disabled (what the whole feed costs).

The lock serialises the appends and their COMMITs, so writers no longer share one
WAL flush (group commit): expect the gap to grow with writers and with the flush's
latency (the disk, a synchronous standby). Prints a table and writes
``bench/results/feed-postgres.json``; about 1 minute with the defaults.

    .venv/bin/python bench/feed_postgres.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "feed-postgres.json"
sys.path.insert(0, str(ROOT))

from backends.postgres import PostgresStore  # noqa: E402
from optin_service.storage import OptInRecord  # noqa: E402
from tests.servers import PostgresServer  # noqa: E402  (initdb and pg_ctl, as the tests run them)

WAYS = {
    "feed": [],
    "feed, no lock": [
        "CREATE OR REPLACE FUNCTION optin_feed_lock() RETURNS void AS '' LANGUAGE sql"
    ],
    "no feed": ["ALTER TABLE optin DISABLE TRIGGER USER"],
}


def _writer(url: str, seconds: float, start: float, counts) -> None:
    store = PostgresStore.from_url(url)
    store.get("warm-up")
    while time.time() < start:
        time.sleep(0.001)
    done, tag = 0, uuid.uuid4().hex[:8]
    while time.time() < start + seconds:
        store.set(OptInRecord.now(f"member-{tag}-{done % 1000}", "accepted", f"{tag}-{done}"))
        done += 1
    counts.put(done)
    store.close()


def measure(url: str, writers: int, seconds: float) -> float:
    counts = multiprocessing.get_context("fork").Queue()
    start = time.time() + 1.0
    procs = [
        multiprocessing.get_context("fork").Process(
            target=_writer, args=(url, seconds, start, counts)
        )
        for _ in range(writers)
    ]
    for p in procs:
        p.start()
    total = sum(counts.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    server = PostgresServer().start()
    try:
        print(f"figures on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        load_before = os.getloadavg()[0]
        results: dict[str, dict[str, float]] = {}
        print(f"{'writers':>7}  " + "  ".join(f"{way:>14}" for way in WAYS))

        for writers in (1, 2, 4):
            rates = []
            for statements in WAYS.values():
                schema = f"b_{uuid.uuid4().hex[:8]}"
                server.execute(f"CREATE SCHEMA {schema}")
                url = server.url(options=f"-c search_path={schema}")
                PostgresStore.from_url(url).upgrade()
                for statement in statements:
                    server.execute(f"SET search_path = {schema}; {statement}")
                rates.append(measure(url, writers, args.seconds))

            print(f"{writers:>7}  " + "  ".join(f"{rate:>12,.0f}/s" for rate in rates))
            results[str(writers)] = dict(zip(WAYS, (round(rate) for rate in rates), strict=True))
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        RESULTS.parent.mkdir(exist_ok=True)
        summary = {"writes_per_second": results, "seconds": args.seconds}
        summary["load_average"] = [load_before, os.getloadavg()[0]]
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
