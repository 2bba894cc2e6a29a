"""Old code against new code, side by side under gunicorn, in one run.

From the repository root:

    .venv/bin/python bench/ab.py --old HEAD~1 --config memory
    .venv/bin/python bench/ab.py --old 31961c7 --config sqlite-normal --slices 10

``--old`` is checked out into a temporary git worktree; the new side is this
working tree. Three servers are started as ``bench/load.py`` starts them (the
reference, the old service, the new service, 1 worker each unless the
configuration says otherwise; one private redis-server for both sides of a
Redis configuration), warmed up, then loaded in turn by ``wrk`` in
``--slice``-second slices, round robin, ``--slices`` times. It prints requests/s
and the workers' CPU time per request of each: the figure a change to the
request path moves, and the one that moves least when the machine is busy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default="HEAD~1", help="the git revision to compare with")
    parser.add_argument("--config", default="memory", help="a bench/load.py configuration")
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--slice", type=int, default=2, help="seconds per slice")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    new = load_module(ROOT / "bench" / "load.py", "load_new")
    with tempfile.TemporaryDirectory(prefix="optin-ab-") as tmp:
        tree = Path(tmp) / "old"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), args.old], cwd=ROOT, check=True
        )
        try:
            old = load_module(tree / "bench" / "load.py", "load_old")
            config = new.CONFIGS[args.config]
            sides = [
                ("reference", new, new.reference(config.workers)),
                (f"old {args.old}", old, old.CONFIGS[args.config]),
                ("new (working tree)", new, config),
            ]
            with contextlib.ExitStack() as stack:
                redis_port = None
                if (config.storage or "").startswith("redis"):
                    redis_port, _client = stack.enter_context(new.redis_server(Path(tmp)))
                running = []
                for name, module, cfg in sides:
                    tag = name.split()[0]
                    server = stack.enter_context(module.Server(cfg, Path(tmp), redis_port, tag))
                    module.run_wrk(server.port, 1, args.connections, 2)  # warm-up
                    pids = module.worker_pids(server.proc.pid)
                    running.append((name, module, server, pids, [0.0, 0, 0.0]))
                for _ in range(args.slices):
                    for _name, module, server, pids, acc in running:
                        before = new.cpu_seconds(pids)
                        result = module.run_wrk(server.port, 1, args.connections, args.slice)
                        acc[0] += new.cpu_seconds(pids) - before
                        acc[1] += result["requests"]
                        acc[2] += result["duration_us"] / 1e6
            print(f"{args.config}, {args.slices} slices of {args.slice} s each, round robin:")
            for name, _module, _server, _pids, (cpu, requests, seconds) in running:
                print(
                    f"  {name:<24} {requests / seconds:7.0f} req/s  "
                    f"{cpu / requests * 1e6:6.0f} µs CPU/request"
                )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
