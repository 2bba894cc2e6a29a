"""Benchmark ``optin migrate``: SQLite -> Redis -> SQLite, N members with E events each.

It builds an SQLite source through ``SQLiteStore.import_events`` in big batches,
starts a redis-server of its own on a free loopback port in a temp dir (no AOF,
no RDB snapshots: this measures the CLI, not the disk), then runs the console
script ``optin migrate --to ...`` as a subprocess each way, so the peak RSS
measured (``wait4`` on that child) is the CLI's own. It checks the summary line's
counts, compares the final SQLite copy with the source row for row, prints a
table and writes ``bench/results/migrate.json``.

Targets: at least 50,000 events/s each way, process start to exit, and a peak RSS
under 150 MB; the exit code is 0 only if both are met each way. The default
1,000,000 members x 2 events takes about 2 minutes on 2 cores, ``--members
100000`` about 15 seconds. Needs ``redis-server``.

``--postgres`` puts PostgreSQL in the middle instead of Redis (SQLite -> PostgreSQL
-> SQLite): a server of its own (Debian's postgresql, ``initdb`` and ``pg_ctl`` as
the ``postgres`` user, its default settings: fsync and synchronous_commit on), with
a target of 100,000 events/s each way; results in ``bench/results/migrate-postgres.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servers import LOOPBACK, cpu_seconds, redis_server  # noqa: E402  (bench/servers.py)

RESULTS = ROOT / "bench" / "results" / "migrate.json"
TARGET_RATE = 50_000  # events/s, each way
TARGET_RATE_POSTGRES = 100_000
TARGET_RSS_MB = 150
GENERATE_BATCH = 100_000
SOURCES = ("API", "WEB", "CLI", "SMS")
START_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
DAY_US = 86_400_000_000
COPIED = re.compile(
    r"copied (\d+) events \((\d+) new\) to (\S+) in ([\d.]+) s \(([\d,]+) events/s\); "
    r"target holds (\d+) events"
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the source ----------------------------------------------------------------------


def events(members: int, per_member: int):
    """Member ``i``'s events, a day apart; a third of them declined; UUID-sized request ids."""
    from optin_service.storage import OptInRecord

    for i in range(members):
        cid = f"member-{i:07d}"
        base = START_US + i * 997_003  # about a second apart, never on a whole second
        for j in range(per_member):
            n = i * per_member + j
            yield OptInRecord.from_us(
                cid,
                "declined" if n % 3 == 0 else "accepted",
                base + j * DAY_US,
                f"00000000-0000-4000-8000-{n:012x}",
                SOURCES[n % len(SOURCES)],
            )


def generate(path: Path, members: int, per_member: int) -> None:
    """Fill an SQLite store at ``path`` through its own import_events (in this process)."""
    from backends.sqlite import SQLiteStore

    store = SQLiteStore(str(path), synchronous="NORMAL")
    batch = []
    total = members * per_member
    done = 0
    for record in events(members, per_member):
        batch.append(record)
        if len(batch) == GENERATE_BATCH:
            done += store.import_events(batch)
            batch = []
            if done % 1_000_000 == 0:
                log(f"  generated {done:,} / {total:,} events")
    done += store.import_events(batch)
    count = store.count_events()
    store.close()
    if done != total or count != total:
        raise SystemExit(f"source has {count} events ({done} new), expected {total}")


def generate_in_child(path: Path, members: int, per_member: int) -> float:
    """:func:`generate` in a child process; seconds taken.

    A child's ``ru_maxrss`` starts from its parent's peak RSS (Linux carries the
    old address space's high-water mark across ``exec``, and ``subprocess`` uses
    vfork), so the parent must stay small for the CLI's peak to be its own.
    """
    started = time.monotonic()
    args = [sys.executable, __file__, "--members", str(members)]
    args += ["--events-per-member", str(per_member), "--generate-only", str(path)]
    subprocess.run(args, check=True)
    return time.monotonic() - started


# --- redis-server --------------------------------------------------------------------


def redis_info(url: str) -> dict[str, object]:
    import redis

    client = redis.Redis.from_url(url.split("?", 1)[0])
    try:
        memory = client.info("memory")
        return {
            "version": client.info("server")["redis_version"],
            "keys": client.dbsize(),
            "used_memory_mb": round(memory["used_memory"] / 2**20, 1),
        }
    finally:
        client.close()


# --- PostgreSQL ------------------------------------------------------------------------


@contextlib.contextmanager
def middle_server(postgres: bool, workdir: Path) -> Iterator[tuple[str, object]]:
    """The store in the middle: (its URL, the PostgreSQL server or None for Redis)."""
    if not postgres:
        with redis_server(workdir) as port:
            log(f"redis-server on {LOOPBACK}:{port}, AOF off, no RDB snapshots")
            yield f"redis://{LOOPBACK}:{port}/0?prefix=bench:", None
        return
    from tests.servers import PostgresServer  # initdb and pg_ctl, as the tests run them

    server = PostgresServer().start()
    try:
        log(f"postgresql on {LOOPBACK}:{server.port}, default settings")
        yield server.url(), server
    finally:
        server.cleanup()


def postgres_info(server) -> dict[str, object]:
    version, events, size = server.execute(
        "SELECT current_setting('server_version'), (SELECT count(*) FROM optin_event), "
        "pg_database_size(current_database())"
    )[0]
    return {"version": version, "events": events, "database_mb": round(size / 2**20, 1)}


def server_cpu_seconds(server) -> float:
    """CPU the PostgreSQL server used so far: its processes, and those that exited."""
    if server is None:
        return 0.0
    total = 0.0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and _parent(entry.name) == server.pid:
                total += cpu_seconds(int(entry.name))
        except OSError:  # exited meanwhile: counted in the postmaster's children's time
            continue
    fields = Path(f"/proc/{server.pid}/stat").read_text().rpartition(")")[2].split()
    children = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime
    return total + cpu_seconds(server.pid) + children


def _parent(pid: str) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def hiredis_in_use() -> bool:
    """Whether redis-py in the CLI's interpreter parses replies with hiredis (C)."""
    code = "import redis.utils; print(redis.utils.HIREDIS_AVAILABLE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() == "True"


# --- one migration -------------------------------------------------------------------


def migrate(source_url: str, target_url: str, expected: int, workdir: Path) -> dict:
    """``optin migrate --to target_url`` on ``source_url``, as a child we wait4 on."""
    optin = Path(sys.executable).parent / "optin"
    if not optin.exists():
        raise SystemExit(f"no console script at {optin}: pip install -e . first")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIN_", "FLASK_"))}
    env["OPTIN_STORAGE_URL"] = source_url
    err_path = workdir / "migrate.stderr"
    with open(err_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(optin), "migrate", "--to", target_url],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"optin migrate exited with {proc.returncode}:\n{stderr}")
    match = COPIED.search(stderr)
    if match is None:
        raise SystemExit(f"no summary line in the output of optin migrate:\n{stderr}")
    copied, added, _, seconds, rate, holds = match.groups()
    counts = {"copied": int(copied), "new": int(added), "target_holds": int(holds)}
    if any(value != expected for value in counts.values()):
        raise SystemExit(f"expected {expected} events each, got {counts}:\n{stderr}")
    return {
        **counts,
        "summary": match.group(0),
        "wall_seconds": round(wall, 2),
        "copy_seconds": float(seconds),
        "events_per_second_wall": round(expected / wall),
        "events_per_second_copy": int(rate.replace(",", "")),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        # The floor of the figure above (see generate_in_child): must stay well below it.
        "bench_parent_peak_rss_mb": round(parent_peak / 1024, 1),
        "peak_rss_is_the_clis_own": usage.ru_maxrss > parent_peak,
        "user_cpu_seconds": round(usage.ru_utime, 2),
        "system_cpu_seconds": round(usage.ru_stime, 2),
        # What one core could do if the CLI had it to itself: a busy machine lowers
        # events/s but hardly this.
        "events_per_cpu_second": round(expected / (usage.ru_utime + usage.ru_stime)),
    }


def same_sqlite(source: Path, target: Path) -> dict[str, int]:
    """Rows of each table present in one file and not the other (both ways).

    Compared on the columns both files have, so a source built by an older
    version of the schema still compares.
    """
    conn = sqlite3.connect(source)
    try:
        conn.execute("ATTACH DATABASE ? AS target", (str(target),))
        differences = {}
        for table in ("optin_event", "optin"):
            columns = [
                [row[1] for row in conn.execute(f"PRAGMA {db}.table_info({table})")]
                for db in ("main", "target")
            ]
            common = ", ".join(c for c in columns[0] if c in columns[1])
            differences[table] = sum(
                conn.execute(
                    f"SELECT COUNT(*) FROM (SELECT {common} FROM {a}.{table} "
                    f"EXCEPT SELECT {common} FROM {b}.{table})"
                ).fetchone()[0]
                for a, b in (("main", "target"), ("target", "main"))
            )
        return differences
    finally:
        conn.close()


# --- main ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench/migrate.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--members", type=int, default=1_000_000, help="(1,000,000)")
    parser.add_argument("--events-per-member", type=int, default=2, help="(2)")
    parser.add_argument(
        "--workdir", type=Path, help="where to put the files, kept (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir afterwards")
    parser.add_argument("--no-verify", action="store_true", help="skip the row-by-row check")
    parser.add_argument(
        "--postgres", action="store_true", help="PostgreSQL in the middle instead of Redis"
    )
    parser.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    middle = "postgres" if args.postgres else "redis"
    target_rate = TARGET_RATE_POSTGRES if args.postgres else TARGET_RATE
    results = RESULTS.with_name("migrate-postgres.json") if args.postgres else RESULTS
    total = args.members * args.events_per_member
    if args.generate_only:
        generate(args.generate_only, args.members, args.events_per_member)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="optin-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source_db, target_db = workdir / "source.db", workdir / "target.db"
    for path in [*workdir.glob("source.db*"), *workdir.glob("target.db*")]:
        path.unlink()
    started = time.monotonic()
    try:
        log(f"generating {args.members:,} members x {args.events_per_member} events in {workdir}")
        load_before = os.getloadavg()
        hiredis = hiredis_in_use()
        generate_seconds = generate_in_child(source_db, args.members, args.events_per_member)
        log(f"  {total:,} events in {generate_seconds:.1f} s")

        with middle_server(args.postgres, workdir) as (middle_url, postgres):
            log(f"optin migrate: sqlite -> {middle}")
            cpu = server_cpu_seconds(postgres)
            to_middle = migrate(f"sqlite:///{source_db}", middle_url, total, workdir)
            if postgres:
                to_middle["server_cpu_seconds"] = round(server_cpu_seconds(postgres) - cpu, 2)
            log(f"  {to_middle['summary']}")
            middle_after = postgres_info(postgres) if postgres else redis_info(middle_url)

            log(f"optin migrate: {middle} -> sqlite")
            cpu = server_cpu_seconds(postgres)
            to_sqlite = migrate(middle_url, f"sqlite:///{target_db}", total, workdir)
            if postgres:
                to_sqlite["server_cpu_seconds"] = round(server_cpu_seconds(postgres) - cpu, 2)
            log(f"  {to_sqlite['summary']}")

        differences = None
        if not args.no_verify:
            log("comparing the SQLite copy with the source, row by row")
            differences = same_sqlite(source_db, target_db)
            if any(differences.values()):
                raise SystemExit(f"the copy differs from the source: {differences}")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    total_seconds = time.monotonic() - started

    runs = {f"sqlite_to_{middle}": to_middle, f"{middle}_to_sqlite": to_sqlite}
    passed = {
        name: {
            "rate": run["events_per_second_wall"] >= target_rate,
            "rss": run["peak_rss_mb"] < TARGET_RSS_MB,
        }
        for name, run in runs.items()
    }
    result = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "members": args.members,
        "events_per_member": args.events_per_member,
        "events": total,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            middle: middle_after["version"],
            "hiredis": hiredis,
        },
        f"{middle}_persistence": (
            "defaults (fsync on, synchronous_commit on)"
            if args.postgres
            else "none (appendonly no, save '')"
        ),
        "target_sqlite_url_options": "none (synchronous=FULL, WAL)",
        "load_average_before": [round(x, 2) for x in load_before],
        "generate_seconds": round(generate_seconds, 1),
        f"{middle}_after_first_copy": middle_after,
        "runs": runs,
        "verified_rows_differing": differences,
        "targets": {"events_per_second": target_rate, "peak_rss_mb": TARGET_RSS_MB},
        "passed": passed,
        "total_seconds": round(total_seconds, 1),
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(
        f"optin migrate, {total:,} events ({args.members:,} members x "
        f"{args.events_per_member}); {os.cpu_count()} CPUs, load average "
        f"{load_before[0]:.2f} before; {middle} {middle_after['version']} with "
        + ("default settings" if args.postgres else "AOF off and no snapshots")
        + f"; hiredis {'on' if hiredis else 'off'}"
    )
    header = (
        "direction", "events/s", "copy loop", "wall s", "CPU s", "events/CPU-s", "peak RSS MB",
        "met",
    )  # fmt: skip
    rows = [header]
    for name, run in runs.items():
        ok = passed[name]["rate"] and passed[name]["rss"]
        cpu = run["user_cpu_seconds"] + run["system_cpu_seconds"]
        rows.append(
            (
                name.replace("_to_", " -> "),
                f"{run['events_per_second_wall']:,}",
                f"{run['events_per_second_copy']:,}/s",
                f"{run['wall_seconds']:.1f}",
                f"{cpu:.1f}",
                f"{run['events_per_cpu_second']:,}",
                f"{run['peak_rss_mb']:.1f}",
                "yes" if ok else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = zip(row, widths, strict=True)
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
    print(
        "events/s: end to end, process start to exit (counts before and after included); "
        "copy loop: the CLI's own figure. CPU s: the CLI's user + system time;\n"
        "events/CPU-s: events per second of that CPU time, the rate with a core to itself "
        "(an upper bound for events/s on a busy machine)."
    )
    for name, run in runs.items():
        if "server_cpu_seconds" in run:
            server = run["server_cpu_seconds"]
            print(
                f"{name.replace('_to_', ' -> ')}: the PostgreSQL server used {server:.1f} CPU s "
                f"({total / server if server else 0:,.0f} events per server CPU-second)"
            )
    print(f"targets: >= {target_rate:,} events/s each way, peak RSS < {TARGET_RSS_MB} MB")
    if not all(run["peak_rss_is_the_clis_own"] for run in runs.values()):
        print("WARNING: peak RSS not above this script's own peak; it may be inherited")
    if differences is not None:
        print("the SQLite copy equals the source row for row (events and current states)")
    print(f"source generated in {generate_seconds:.1f} s; total {total_seconds:.1f} s")
    print(f"results: {results.relative_to(ROOT)}")
    return 0 if all(all(p.values()) for p in passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
