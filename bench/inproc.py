"""CPU per request inside the WSGI app, without gunicorn or the network.

From the repository root:

    .venv/bin/python bench/inproc.py                           # reference and service, memory://
    .venv/bin/python bench/inproc.py --configs memory,sqlite-normal --requests 50000

The load benchmark (``bench/load.py``) is the one that counts; this one is its
microscope. Each configuration runs in its own process, set up as a gunicorn
worker would be (``PROMETHEUS_MULTIPROC_DIR`` pointing at an empty folder,
stderr, where the JSON access log goes, redirected to a file). The process calls
the WSGI app directly with the same PUTs as ``bench/put.lua`` (random member,
random answer), after a warm-up, and reports the CPU time per request
(``time.process_time``), the median of ``--repeats`` batches. On a shared,
noisy machine CPU time moves far less than requests/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import load  # noqa: E402  (bench/load.py)

BODIES = (b'{"LOYALTY_OPTIN": "accepted"}', b'{"LOYALTY_OPTIN": "declined"}')


def put_caller(app: Callable, statuses: dict[str, int] | None = None) -> Callable[[], None]:
    """A function calling ``app`` with one PUT as ``bench/put.lua`` sends it (random member,
    random answer), counting the statuses in ``statuses``. Werkzeug's test module is
    imported here, after the app, so the app's own imports happen as in a worker."""
    from werkzeug.test import EnvironBuilder

    base = EnvironBuilder(
        path="/", method="PUT", headers={"Content-Type": "application/json"}, data=BODIES[0]
    ).get_environ()
    base["REMOTE_ADDR"] = "127.0.0.1"
    rng = random.Random(1)
    counts = statuses if statuses is not None else {}

    def start_response(status: str, headers: list, exc_info: object = None) -> None:
        counts[status] = counts.get(status, 0) + 1

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


def child(app_spec: str, requests: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    module, _, name = app_spec.partition(":")
    app = getattr(__import__(module, fromlist=[name]), name)
    statuses: dict[str, int] = {}
    one = put_caller(app, statuses)

    for _ in range(min(2000, requests)):  # warm-up
        one()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(requests):
            one()
        cpu.append((time.process_time() - c0) / requests * 1e6)
        wall.append((time.perf_counter() - w0) / requests * 1e6)
    return {
        "cpu_us": statistics.median(cpu),
        "cpu_us_min": min(cpu),
        "wall_us": statistics.median(wall),
        "statuses": statuses,
    }


def run(config: load.Config, requests: int, repeats: int, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIN_", "PROMETHEUS_"))}
    metrics = workdir / f"metrics-{config.name}"
    metrics.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    if config.storage:
        env["OPTIN_STORAGE_URL"] = config.storage.format(
            dir=workdir, redis_port=os.environ.get("BENCH_REDIS_PORT")
        )
    with open(workdir / f"{config.name}.stderr", "wb") as err:
        out = subprocess.run(
            [sys.executable, __file__, "--child", config.app, str(requests), str(repeats)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            check=True,
        )
    result = json.loads(out.stdout)
    result["stderr_bytes_per_request"] = (workdir / f"{config.name}.stderr").stat().st_size / (
        requests * repeats + min(2000, requests)
    )
    return result


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="memory")
    parser.add_argument("--requests", type=int, default=20000, help="per batch")
    parser.add_argument("--repeats", type=int, default=5, help="batches; the median is kept")
    args = parser.parse_args(argv)
    configs = [load.reference(1)] + [load.CONFIGS[c] for c in args.configs.split(",") if c]
    results = {}
    with tempfile.TemporaryDirectory(prefix="optin-inproc-") as tmp:
        for config in configs:
            r = run(config, args.requests, args.repeats, Path(tmp))
            results[config.name] = r
            print(
                f"{config.name:<18} {r['cpu_us']:7.1f} µs CPU/request (min {r['cpu_us_min']:.1f}), "
                f"{r['wall_us']:7.1f} µs wall, "
                f"{r['stderr_bytes_per_request']:.0f} B of log/request, "
                f"statuses {r['statuses']}",
                flush=True,
            )
    load.RESULTS.mkdir(parents=True, exist_ok=True)
    (load.RESULTS / "inproc.json").write_text(
        json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
