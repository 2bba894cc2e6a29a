"""How long an API write waits while ``optin import``/``migrate`` merges into SQLite.

From the repository root::

    .venv/bin/python bench/sqlite_import_beside_writes.py

Imports 200,000 events into a file that holds 100,000, while another store on the
same file (as another gunicorn worker would) writes one event every 5 ms, and
prints the import's time and the writes' longest and median waits.
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.sqlite import SQLiteStore
from optin_service.storage import OptInRecord


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="optin-import-lock-") as tmp:
        path = Path(tmp) / "optin.db"
        importer = SQLiteStore(str(path))
        rng = random.Random(0)
        base = 1_767_225_600_000_000
        rows = [
            (
                f"member-{rng.randrange(10**6)}",
                base + rng.randrange(10**9),
                f"r{i}",
                "accepted",
                "API",
                "",
            )
            for i in range(300_000)
        ]
        importer.import_rows(rows[:100_000])
        waits: list[float] = []
        done = threading.Event()

        def write() -> None:
            writer = SQLiteStore(str(path))
            i = 0
            while not done.is_set():
                started = time.monotonic()
                writer.set(OptInRecord.now(f"api-{i}", "declined", f"w{i}"))
                waits.append(time.monotonic() - started)
                i += 1
                time.sleep(0.005)
            writer.close()

        thread = threading.Thread(target=write)
        thread.start()
        started = time.monotonic()
        importer.import_rows(rows[100_000:])
        took = time.monotonic() - started
        done.set()
        thread.join()
        importer.close()
        waits.sort()
        print(
            f"import of 200,000 events: {took:.2f} s; {len(waits)} writes beside it: "
            f"longest wait {waits[-1] * 1000:.0f} ms, median {waits[len(waits) // 2] * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
