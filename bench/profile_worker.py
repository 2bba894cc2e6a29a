"""Profile one gunicorn worker under load with py-spy, and print the top frames.

From the repository root (``pip install py-spy`` into the venv first):

    .venv/bin/python bench/profile_worker.py                    # the service on memory://
    .venv/bin/python bench/profile_worker.py --config sqlite-full --seconds 15
    .venv/bin/python bench/profile_worker.py --config reference-1w

The server is started as ``bench/load.py`` starts it (shipped gunicorn.conf.py,
stderr to a file), with 1 worker so that one process holds every request. wrk
loads it with ``bench/put.lua`` while ``py-spy record`` samples the worker
(idle time, waiting in ``accept``/``select``, is not sampled). The collapsed
stacks go to ``bench/results/profile-<config>.txt``; the script prints the
functions with the most samples on top of the stack ("self") and anywhere in it
("total"), as a share of the busy samples.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load


def frame_name(frame: str) -> str:
    """``put_optin (optin_service/api.py:99)`` -> ``put_optin (optin_service/api.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, _line = where.rpartition(":")
    for marker in ("site-packages/", "/lib/python3", str(load.ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib/python3"):
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{name} ({path})" if path else name


def top_frames(collapsed: str, n: int, below: str = "Flask.wsgi_app") -> tuple[int, list, list]:
    """Busy samples; the top ``n`` functions by self samples; and by inclusive
    samples, counting only frames under ``below`` (the WSGI app: the gunicorn
    frames above it are in every sample and say nothing)."""
    self_count: collections.Counter[str] = collections.Counter()
    total_count: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        # py-spy can write a frame whose name holds newlines (an object's repr): its
        # stack spans several lines, and only the last ends with the count. Skipped.
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")]
        # py-spy's first frame is the thread ("process 123:..." with some options).
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        self_count[frames[-1]] += count
        names = [f.split(" (")[0] for f in frames]
        if below in names:
            for name in set(frames[names.index(below) :]):
                total_count[name] += count
    return samples, self_count.most_common(n), total_count.most_common(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [*load.CONFIGS, "reference-1w"]
    parser.add_argument("--config", default="memory", choices=names)
    parser.add_argument("--seconds", type=int, default=10, help="seconds sampled")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--native", action="store_true", help="py-spy --native")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--from", dest="source", default=None, help="only print the tables of a saved profile"
    )
    args = parser.parse_args(argv)
    if args.source:
        print_tables(Path(args.source).read_text(), args.top)
        return 0
    if args.config == "reference-1w":
        config = load.reference(1)
    else:
        config = dataclasses.replace(load.CONFIGS[args.config], workers=1)
    out = Path(args.out or load.RESULTS / f"profile-{args.config}.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    py_spy = str(load.BIN / "py-spy")
    with tempfile.TemporaryDirectory(prefix="optin-profile-") as tmp:
        workdir = Path(tmp)
        redis_ctx = load.redis_server(workdir) if "redis" in (config.storage or "") else None
        redis_port = None
        if redis_ctx is not None:
            redis_port, _client = redis_ctx.__enter__()
        try:
            with load.Server(config, workdir, redis_port, "profile") as server:
                assert server.proc is not None
                (worker,) = load.worker_pids(server.proc.pid)
                load.run_wrk(server.port, 1, args.connections, 2)  # warm-up
                result: dict = {}
                loader = threading.Thread(
                    target=lambda: result.update(
                        load.run_wrk(server.port, 1, args.connections, args.seconds + 2)
                    )
                )
                loader.start()
                cmd = [
                    py_spy,
                    "record",
                    "--pid",
                    str(worker),
                    "--duration",
                    str(args.seconds),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                    "--nonblocking",
                ]
                if args.native:
                    cmd.append("--native")
                subprocess.run(cmd, check=True, capture_output=True)
                loader.join()
        finally:
            if redis_ctx is not None:
                redis_ctx.__exit__(None, None, None)
    rps = result.get("rps", 0)
    print(
        f"{config.name} ({config.storage or config.app}), 1 worker: {rps:.0f} req/s under "
        f"py-spy; {samples_in(out.read_text())} busy samples in {args.seconds} s at {args.rate}/s"
    )
    print_tables(out.read_text(), args.top)
    print(f"\ncollapsed stacks: {out}")
    return 0


def samples_in(collapsed: str) -> int:
    return top_frames(collapsed, 0)[0]


def print_tables(collapsed: str, top: int) -> None:
    samples, by_self, by_total = top_frames(collapsed, top)
    titles = ("self", "total (inclusive, within the WSGI app)")
    for title, rows in zip(titles, (by_self, by_total), strict=True):
        print(f"\ntop {top} by {title}, % of busy samples:")
        for name, count in rows:
            print(f"  {100 * count / samples:5.1f}%  {name}")


if __name__ == "__main__":
    sys.exit(main())
