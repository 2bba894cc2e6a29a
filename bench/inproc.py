"""In-process benchmark: the request path's cost per PUT, without gunicorn or the network.

Each configuration (``bench/configs.py``; the reference always comes first) runs
in its own process, set up as a gunicorn worker would be: ``PROMETHEUS_MULTIPROC_DIR``
an empty folder, stderr (where the JSON access lines go) to a file. The process
calls the WSGI app directly with the PUTs ``bench/put.lua`` sends (a random member
of a million, a random answer; the random sequence is seeded, so every run sends
the same PUTs) and reports, per PUT:

- **calls**: the Python and built-in function calls ``cProfile`` counts over
  ``--count-requests`` PUTs, divided by their number, after 1,000 PUTs of warm-up.
  It is the same from run to run for the same code and options (hash seed fixed,
  garbage collector paused while counting), however busy the machine: a change
  that adds work to the request path shows as a larger number. Compare it only
  between runs with the same ``--count-requests``.
- **CPU µs**: ``time.process_time`` per PUT, the median of ``--repeats`` batches of
  ``--requests`` PUTs, run after the count without the profiler. It moves with the
  machine's load far less than requests/s do, but it does move.
- **wall µs**, the bytes of access log written per PUT, and the statuses answered.

About 4 seconds per configuration with the defaults; results also go to
``bench/results/inproc.json``. Not part of the test suite: speed is checked here.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from configs import CONFIGS, Config, reference
from servers import RESULTS, ROOT, benchmark_env, postgres_server, redis_server

BODIES = (b'{"LOYALTY_OPTIN": "accepted"}', b'{"LOYALTY_OPTIN": "declined"}')
WARMUP = 1000


def put_caller(app: Callable, statuses: dict[str, int]) -> Callable[[], None]:
    """A function calling ``app`` with one PUT as ``bench/put.lua`` sends it, counting the
    statuses answered. Werkzeug's test module is imported here, after the app, so the
    app's own imports happen as in a worker."""
    from werkzeug.test import EnvironBuilder

    base = EnvironBuilder(
        path="/", method="PUT", headers={"Content-Type": "application/json"}, data=BODIES[0]
    ).get_environ()
    base["REMOTE_ADDR"] = "127.0.0.1"
    rng = random.Random(1)

    def start_response(status: str, headers: list, exc_info: object = None) -> None:
        statuses[status] = statuses.get(status, 0) + 1

    def one() -> None:
        environ = dict(base)
        environ["PATH_INFO"] = f"/client/users/member-{rng.randrange(1_000_000):07d}/profile/optin"
        body = BODIES[rng.randrange(2)]
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input"] = io.BytesIO(body)
        result = app(environ, start_response)
        b"".join(result)
        if hasattr(result, "close"):
            result.close()

    return one


def load_app(spec: str) -> Callable:
    """gunicorn's app spec: ``module:name`` or ``module:factory()``."""
    module, _, name = spec.partition(":")
    factory = name.endswith("()")
    target = getattr(__import__(module, fromlist=[name]), name.removesuffix("()"))
    return target() if factory else target


def calls_per_request(one: Callable[[], None], requests: int) -> float:
    """Function calls per PUT under cProfile; the collector is paused so that no
    finalizer runs at a moment that depends on anything but the code."""
    gc.collect()
    gc.disable()
    profiler = cProfile.Profile()
    try:
        profiler.enable()
        for _ in range(requests):
            one()
        profiler.disable()
    finally:
        gc.enable()
    return pstats.Stats(profiler).total_calls / requests


def child(app_spec: str, count_requests: int, requests: int, repeats: int) -> dict:
    """In the configuration's own process: warm up, count calls, then time."""
    sys.path.insert(0, str(ROOT))
    statuses: dict[str, int] = {}
    one = put_caller(load_app(app_spec), statuses)
    for _ in range(WARMUP):
        one()
    calls = calls_per_request(one, count_requests)
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(requests):
            one()
        cpu.append((time.process_time() - c0) / requests * 1e6)
        wall.append((time.perf_counter() - w0) / requests * 1e6)
    return {
        "calls_per_request": calls,
        "cpu_us": statistics.median(cpu),
        "cpu_us_min": min(cpu),
        "wall_us": statistics.median(wall),
        "statuses": statuses,
        "requests": WARMUP + count_requests + requests * repeats,
    }


def run(
    config: Config, args, workdir: Path, redis_port: int | None, postgres_port: int | None
) -> dict:
    """``child`` for one configuration in a fresh interpreter, set up as a worker."""
    env = benchmark_env()
    env["PYTHONHASHSEED"] = "0"  # set iteration order, hence the calls, the same every run
    metrics = workdir / f"metrics-{config.name}"
    metrics.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    storage = config.storage_url(workdir, redis_port, postgres_port)
    if storage:
        env["OPTIN_STORAGE_URL"] = storage
    counts = (args.count_requests, args.requests, args.repeats)
    log_path = workdir / f"{config.name}.stderr"
    with open(log_path, "wb") as err:
        out = subprocess.run(
            [sys.executable, __file__, "--child", config.app, *map(str, counts)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            check=True,
        )
    result = json.loads(out.stdout)
    result["log_bytes_per_request"] = log_path.stat().st_size / result["requests"]
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/inproc.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--configs",
        default="memory",
        help=f"comma-separated, beside the reference, from: {', '.join(CONFIGS)} (memory)",
    )
    parser.add_argument(
        "--count-requests", type=int, default=2000, help="PUTs counted under cProfile (2,000)"
    )
    parser.add_argument("--requests", type=int, default=5000, help="PUTs per timed batch (5,000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches; the median (5)")
    parser.add_argument("--out", default=str(RESULTS / "inproc.json"), help="the JSON results")
    args = parser.parse_args(argv)
    unknown = [n for n in args.configs.split(",") if n and n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs: {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        spec, *counts = sys.argv[2:]
        print(json.dumps(child(spec, *map(int, counts))))
        return 0
    args = parse_args(argv)
    configs = [reference(1)] + [CONFIGS[name] for name in args.configs.split(",") if name]
    results = {}
    with tempfile.TemporaryDirectory(prefix="optin-inproc-") as tmp:
        workdir = Path(tmp)
        with contextlib.ExitStack() as stack:
            redis_port = postgres_port = None
            if any(c.uses_redis for c in configs):
                redis_port = stack.enter_context(redis_server(workdir))
            if any(c.uses_postgres for c in configs):
                postgres_port = stack.enter_context(postgres_server()).port
            for config in configs:
                r = results[config.name] = run(config, args, workdir, redis_port, postgres_port)
                print(
                    f"{config.name:<22} {r['calls_per_request']:8.1f} calls/PUT  "
                    f"{r['cpu_us']:7.1f} µs CPU/PUT (min {r['cpu_us_min']:.1f})  "
                    f"{r['wall_us']:7.1f} µs wall  "
                    f"{r['log_bytes_per_request']:.0f} B of log/PUT  statuses {r['statuses']}",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args), "results": results}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
