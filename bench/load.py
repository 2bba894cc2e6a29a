"""Load benchmark: the service on each backend beside a bare Flask reference, in one run.

From the repository root:

    .venv/bin/python bench/load.py                       # 3 rounds of 10 s per server
    .venv/bin/python bench/load.py --rounds 1 --duration 5 --configs memory

Every server is started the same way, from the repository root, with the shipped
config: ``gunicorn -c gunicorn.conf.py <module>:app``, bound to a free port on
127.0.0.1, sync workers, stderr (the app's JSON access log) redirected to a file
as in production. The reference is ``bench/reference_app.py`` (the same PUT into
a dict, in plain Flask). Each service configuration is paired with a reference
of the same worker count: both are started fresh (empty storage), warmed up,
then loaded by ``wrk`` with ``bench/put.lua`` (PUTs of random member ids) in
alternating slices, reference then service, ``--slice`` seconds each (A B A B
...), until each has had ``--duration`` seconds. On this shared 2-core machine
the load from other processes moves within seconds: slicing makes that drift
hit both sides of each ratio alike. Rounds repeat every pair.

It prints requests/s, p50 and p99 latency (the median of the per-slice
percentiles), RSS per worker after the load, the workers' CPU time per request,
and each one's ratio to the paired reference, per round and summed up (median, min, max over the
rounds), and writes the same to ``bench/results/load.json`` (and a timestamped
copy). The exit code is 0 whether or not targets are met: the table says.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LUA = ROOT / "bench" / "put.lua"
BIN = Path(sys.executable).parent
REFERENCE_APP = "bench.reference_app:app"
SERVICE_APP = "wsgi:app"
PUT_PATH = "/client/users/bench-ready/profile/optin"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    app: str
    workers: int
    storage: str | None = None  # OPTIN_STORAGE_URL template ({dir}, {redis_port})
    env: tuple[tuple[str, str], ...] = ()
    #: Targets: requests/s ratio to the paired reference (None for a reference).
    target: float | None = None
    note: str = ""
    #: Given to gunicorn after the shipped config, for this server and its reference.
    gunicorn_args: tuple[str, ...] = ()

    @property
    def is_reference(self) -> bool:
        return self.app == REFERENCE_APP


def reference(workers: int, gunicorn_args: tuple[str, ...] = ()) -> Config:
    suffix = "-" + "".join(gunicorn_args[1:2]) if gunicorn_args else ""
    return Config(
        f"reference-{workers}w{suffix}",
        REFERENCE_APP,
        workers,
        note="bench/reference_app.py",
        gunicorn_args=gunicorn_args,
    )


# Threaded workers, which keep connections alive (wrk reuses its 16): not the shipped
# default; run beside the sync rows to see what the choice of worker class costs.
GTHREAD = ("--worker-class", "gthread", "--threads", "4")


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("memory", SERVICE_APP, 1, "memory://", target=0.92, note="1 worker vs 1"),
        Config(
            "sqlite-full",
            SERVICE_APP,
            2,
            "sqlite:///{dir}/full.db",
            target=0.70,
            note="synchronous=FULL (default)",
        ),
        Config(
            "sqlite-normal",
            SERVICE_APP,
            2,
            "sqlite:///{dir}/normal.db?synchronous=NORMAL",
            target=0.85,
            note="synchronous=NORMAL",
        ),
        Config(
            "redis",
            SERVICE_APP,
            2,
            "redis://127.0.0.1:{redis_port}/0?prefix=bench:",
            target=0.80,
            note="local redis-server, AOF off",
        ),
        # The reference answering with the contract's headers: the ceiling of memory://
        # (a dict store needs no more than the reference's).
        Config(
            "reference-headers",
            "bench.reference_headers_app:app",
            1,
            target=0.92,
            note="reference + the 15 response headers",
        ),
        # Not in the default run: the same with gthread workers and keep-alive.
        *(
            Config(
                f"{name}-gthread",
                SERVICE_APP,
                workers,
                storage,
                note="gthread, 4 threads per worker, keep-alive",
                gunicorn_args=GTHREAD,
            )
            for name, workers, storage in (
                ("memory", 1, "memory://"),
                ("sqlite-full", 2, "sqlite:///{dir}/full.db"),
                ("sqlite-normal", 2, "sqlite:///{dir}/normal.db?synchronous=NORMAL"),
                ("redis", 2, "redis://127.0.0.1:{redis_port}/0?prefix=bench:"),
            )
        ),
        # The ceilings (bench/ceiling_app.py): the reference plus one write to the
        # storage, with the contract's headers or without; with a history event in the
        # same write; with DESIGN.md's libraries imported (RSS). Some run by default.
        *(
            Config(
                f"ceiling{suffix}-{name}",
                f"bench.ceiling_app:{factory}()",
                2,
                storage,
                target=target,
                note=f"reference + one {name} write{note}",
            )
            for name, storage, target in (
                ("sqlite-full", "sqlite:///{dir}/full.db", 0.70),
                ("sqlite-normal", "sqlite:///{dir}/normal.db?synchronous=NORMAL", 0.85),
                ("redis", "redis://127.0.0.1:{redis_port}/0", 0.80),
            )
            for suffix, factory, note in (
                ("", "headers", " + the 15 headers"),
                ("-bare", "bare", ""),
                ("-history", "history", " and its history event + the 15 headers"),
                ("-libs", "libraries", " + the 15 headers + DESIGN.md's libraries"),
            )
        ),
    )
}
# Each target's service, then its ceiling: what the reference does plus the least
# the contract and the storage add (no implementation of the service can do better).
DEFAULT_CONFIGS = (
    "memory",
    "reference-headers",
    "sqlite-full",
    "ceiling-sqlite-full",
    "sqlite-normal",
    "ceiling-sqlite-normal",
    "redis",
    "ceiling-redis",
    "ceiling-history-redis",
    "ceiling-libs-redis",
)
P99_TARGET = 1.5
RSS_TARGET = 1.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_put(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until the server answers a PUT with 200 (or dies, or time runs out)."""
    deadline = time.monotonic() + timeout
    body = b'{"LOYALTY_OPTIN": "accepted"}'
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("PUT", PUT_PATH, body, {"Content-Type": "application/json"})
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
            raise RuntimeError(f"server answered {status} to the readiness PUT")
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer within {timeout:.0f} s")


def worker_pids(master: int) -> list[int]:
    path = Path(f"/proc/{master}/task/{master}/children")
    return [int(p) for p in path.read_text().split()]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICK


def fsync_latency_us(folder: Path, count: int = 50) -> dict:
    """What one fsync of a 4 KiB append costs in ``folder`` now (p50, p90): with
    synchronous=FULL, SQLite pays one per committed write."""
    path = folder / "fsync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - started) * 1e6)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return {"p50": round(times[count // 2]), "p90": round(times[count * 9 // 10])}


def run_wrk(port: int, threads: int, connections: int, seconds: int) -> dict:
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 30)
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH "))
    data = json.loads(line[len("BENCH ") :])
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    return data


class Server:
    """One gunicorn, started from the repo root with the shipped gunicorn.conf.py."""

    def __init__(self, config: Config, workdir: Path, redis_port: int | None, tag: str) -> None:
        self.config = config
        self.port = free_port()
        self.log_path = workdir / f"{tag}.stderr"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTIN_", "PROMETHEUS_"))}
        env.pop("GUNICORN_CMD_ARGS", None)
        env["WEB_CONCURRENCY"] = str(config.workers)
        env["OPTIN_BIND"] = f"127.0.0.1:{self.port}"
        if config.storage:
            env["OPTIN_STORAGE_URL"] = config.storage.format(dir=workdir, redis_port=redis_port)
        env.update(config.env)
        self.env = env
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        gunicorn = str(BIN / "gunicorn")
        self._log = open(self.log_path, "wb")  # closed in __exit__
        self.proc = subprocess.Popen(
            [gunicorn, "-c", "gunicorn.conf.py", *self.config.gunicorn_args, self.config.app],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=self._log,
        )
        wait_for_put(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=35)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def redis_server(workdir: Path):
    """A private redis-server on a free port: AOF off, no snapshots."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--appendonly",
            "no",
            "--save",
            "",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    try:
        yield port, client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def reset_storage(config: Config, workdir: Path, redis_client) -> None:
    """Each server starts on empty storage."""
    if config.storage and config.storage.startswith("redis"):
        redis_client.flushall()
    for name in ("full.db", "normal.db"):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (workdir / (name + suffix)).unlink()


def measure_pair(
    configs: tuple[Config, Config], args, workdir: Path, redis_port, redis_client, tag: str
) -> list[dict]:
    """The reference and a service, both started fresh and warmed up, then loaded in
    alternating slices (A B A B ...) of ``--slice`` seconds until each had
    ``--duration`` seconds: drift of the machine within the pair hits both."""
    for config in configs:
        reset_storage(config, workdir, redis_client)
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(Server(c, workdir, redis_port, f"{tag}-{c.name}")) for c in configs
        ]
        pids = [worker_pids(s.proc.pid) for s in servers]  # type: ignore[union-attr]
        if args.warmup > 0:
            for server in servers:
                run_wrk(server.port, args.threads, args.connections, args.warmup)
        fsync = fsync_latency_us(workdir)
        slices: list[list[dict]] = [[], []]
        cpu_each = [[0.0] * len(each) for each in pids]  # per worker: how evenly they share
        loads = [os.getloadavg()[0]]
        n_slices = max(1, round(args.duration / args.slice))
        for _ in range(n_slices):
            for i, server in enumerate(servers):
                before = [cpu_seconds([pid]) for pid in pids[i]]
                slices[i].append(run_wrk(server.port, args.threads, args.connections, args.slice))
                for k, pid in enumerate(pids[i]):
                    cpu_each[i][k] += cpu_seconds([pid]) - before[k]
            loads.append(os.getloadavg()[0])
        cpu = [sum(each) for each in cpu_each]
        rss = [[rss_mib(pid) for pid in each] for each in pids]
    results = []
    for i, (config, server) in enumerate(zip(configs, servers, strict=True)):
        log_bytes = server.log_path.stat().st_size
        server.log_path.unlink()
        requests = sum(x["requests"] for x in slices[i])
        seconds = sum(x["duration_us"] for x in slices[i]) / 1e6
        results.append(
            {
                "config": config.name,
                "workers": config.workers,
                "requests": requests,
                "seconds": seconds,
                "rps": requests / seconds,
                # Per-slice percentiles, their median over the slices.
                "latency_us": {
                    q: statistics.median(x["latency_us"][q] for x in slices[i])
                    for q in ("p50", "p90", "p99")
                },
                "errors": {
                    k: sum(x["errors"][k] for x in slices[i]) for k in slices[i][0]["errors"]
                },
                "cpu_us_per_request": cpu[i] / max(requests, 1) * 1e6,
                # The busiest worker's share of the workers' CPU time (0.5 is even for 2).
                "busiest_worker_cpu_share": max(cpu_each[i]) / cpu[i] if cpu[i] else float("nan"),
                "rss_mib": statistics.mean(rss[i]),
                "rss_mib_each": rss[i],
                "load": statistics.mean(loads),
                "stderr_bytes": log_bytes,
                "fsync_us": fsync,
                "slices": slices[i],
            }
        )
    return results


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarize(pairs: list[dict]) -> list[dict]:
    """Per config: median, min and max over rounds of each ratio."""
    out = []
    for name in dict.fromkeys(p["config"] for p in pairs):
        rows = [p for p in pairs if p["config"] == name]
        row = {"config": name, "workers": rows[0]["workers"], "rounds": len(rows)}
        medians = ("rps", "p50_ms", "p99_ms", "rss_mib", "cpu_us")
        for key in (*medians, *("ref_" + k for k in medians)):
            row[key] = statistics.median(r[key] for r in rows)
        for key in ("rps_ratio", "p99_ratio", "rss_ratio", "cpu_ratio"):
            values = [r[key] for r in rows]
            row[key] = statistics.median(values)
            row[key + "_min"] = min(values)
            row[key + "_max"] = max(values)
        row["target"] = rows[0]["target"]
        row["met"] = {
            "rps": None if row["target"] is None else row["rps_ratio"] >= row["target"],
            "p99": row["p99_ratio"] <= P99_TARGET,
            "rss": row["rss_ratio"] <= RSS_TARGET,
        }
        out.append(row)
    return out


def pair_row(config: Config, ref: dict, svc: dict, round_no: int) -> dict:
    return {
        "round": round_no,
        "config": config.name,
        "workers": config.workers,
        "target": config.target,
        "note": config.note,
        "rps": svc["rps"],
        "p50_ms": svc["latency_us"]["p50"] / 1000,
        "p99_ms": svc["latency_us"]["p99"] / 1000,
        "rss_mib": svc["rss_mib"],
        "ref_rps": ref["rps"],
        "ref_p50_ms": ref["latency_us"]["p50"] / 1000,
        "ref_p99_ms": ref["latency_us"]["p99"] / 1000,
        "ref_rss_mib": ref["rss_mib"],
        "rps_ratio": ratio(svc["rps"], ref["rps"]),
        "p99_ratio": ratio(svc["latency_us"]["p99"], ref["latency_us"]["p99"]),
        "rss_ratio": ratio(svc["rss_mib"], ref["rss_mib"]),
        "cpu_us": svc["cpu_us_per_request"],
        "ref_cpu_us": ref["cpu_us_per_request"],
        "cpu_ratio": ratio(svc["cpu_us_per_request"], ref["cpu_us_per_request"]),
        "errors": svc["errors"],
        "ref_errors": ref["errors"],
        "fsync_us": svc["fsync_us"],
    }


def print_rounds(pairs: list[dict]) -> None:
    head = (
        f"{'round':>5} {'config':<16} {'w':>1} {'ref req/s':>9} {'req/s':>7} {'ratio':>6} "
        f"{'ref p50':>7} {'p50':>6} {'ref p99':>7} {'p99':>6} {'p99 x':>6} "
        f"{'ref RSS':>7} {'RSS':>6} {'RSS x':>6} "
        f"{'ref CPU':>7} {'CPU':>5} {'CPU x':>5} {'errors':>6}"
    )
    print(head)
    for p in pairs:
        errors = sum(p["errors"].values())
        print(
            f"{p['round']:>5} {p['config']:<16} {p['workers']:>1} {p['ref_rps']:>9.0f} "
            f"{p['rps']:>7.0f} {p['rps_ratio']:>6.3f} {p['ref_p50_ms']:>7.2f} {p['p50_ms']:>6.2f} "
            f"{p['ref_p99_ms']:>7.2f} {p['p99_ms']:>6.2f} {p['p99_ratio']:>6.2f} "
            f"{p['ref_rss_mib']:>7.1f} {p['rss_mib']:>6.1f} {p['rss_ratio']:>6.2f} "
            f"{p['ref_cpu_us']:>7.0f} {p['cpu_us']:>5.0f} {p['cpu_ratio']:>5.2f} {errors:>6}"
        )


def markdown_table(summary: list[dict]) -> str:
    """The README table: medians over the rounds, ratios with [min, max]."""

    def mark(ok: bool | None) -> str:
        return "" if ok is None else (" ✓" if ok else " ✗")

    lines = [
        "| Service (workers) | req/s (ref) | req/s ratio [min, max] | target | "
        "p99 ms (ref) | p99 ratio [min, max] | RSS/worker MiB (ref) | RSS ratio [min, max] | "
        "CPU µs/req (ref) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        met = r["met"]
        target = "-" if r["target"] is None else f"≥ {r['target']:.2f}"
        lines.append(
            f"| {r['config']} ({r['workers']}) | {r['rps']:,.0f} ({r['ref_rps']:,.0f}) | "
            f"**{r['rps_ratio']:.2f}** [{r['rps_ratio_min']:.2f}, {r['rps_ratio_max']:.2f}]"
            f"{mark(met['rps'])} | {target} | {r['p99_ms']:.1f} ({r['ref_p99_ms']:.1f}) | "
            f"{r['p99_ratio']:.2f} [{r['p99_ratio_min']:.2f}, {r['p99_ratio_max']:.2f}]"
            f"{mark(met['p99'])} | {r['rss_mib']:.1f} ({r['ref_rss_mib']:.1f}) | "
            f"{r['rss_ratio']:.2f} [{r['rss_ratio_min']:.2f}, {r['rss_ratio_max']:.2f}]"
            f"{mark(met['rss'])} | {r['cpu_us']:.0f} ({r['ref_cpu_us']:.0f}) |"
        )
    return "\n".join(lines)


def git_state() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each")
    parser.add_argument(
        "--slice", type=int, default=2, help="seconds per slice: A and B alternate by slice"
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (-t)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (-c)")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, from: {', '.join(CONFIGS)}",
    )
    parser.add_argument("--out", default=str(RESULTS / "load.json"))
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    chosen = [CONFIGS[name.strip()] for name in args.configs.split(",") if name.strip()]
    try:
        import hiredis  # noqa: F401

        has_hiredis = True
    except ImportError:
        has_hiredis = False
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "hiredis": has_hiredis,
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration}s -s bench/put.lua",
        "warmup_s": args.warmup,
        "slice_s": args.slice,
        "rounds": args.rounds,
        "worker_class": "sync",
        **git_state(),
    }
    print(
        f"{meta['started']}  python {meta['python']}  {meta['cpus']} CPUs  hiredis={has_hiredis}  "
        f"wrk {meta['wrk']}  commit {meta['commit'][:10]}{' (dirty)' if meta['dirty'] else ''}",
        flush=True,
    )
    runs: list[dict] = []
    pairs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="optin-load-") as tmp:
        workdir = Path(tmp)
        needs_redis = any(c.storage and c.storage.startswith("redis") for c in chosen)
        with contextlib.ExitStack() as stack:
            redis_port = redis_client = None
            if needs_redis:
                redis_port, redis_client = stack.enter_context(redis_server(workdir))
            for round_no in range(1, args.rounds + 1):
                for config in chosen:
                    ref_config = reference(config.workers, config.gunicorn_args)
                    done = measure_pair(
                        (ref_config, config),
                        args,
                        workdir,
                        redis_port,
                        redis_client,
                        f"r{round_no}",
                    )
                    for result in done:
                        result["round"] = round_no
                        runs.append(result)
                        print(
                            f"  round {round_no} {result['config']:<16} "
                            f"{result['rps']:7.0f} req/s  "
                            f"p50 {result['latency_us']['p50'] / 1000:6.2f} ms  "
                            f"p99 {result['latency_us']['p99'] / 1000:6.2f} ms  "
                            f"RSS {result['rss_mib']:5.1f} MiB  "
                            f"CPU {result['cpu_us_per_request']:4.0f} µs/req  "
                            f"busiest worker {result['busiest_worker_cpu_share']:.2f}  "
                            f"load {result['load']:.1f}  "
                            f"fsync p50 {result['fsync_us']['p50']} µs",
                            flush=True,
                        )
                    pairs.append(pair_row(config, done[0], done[1], round_no))
    summary = summarize(pairs)
    print()
    print_rounds(pairs)
    print()
    table = markdown_table(summary)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "summary": summary, "pairs": pairs, "runs": runs, "markdown": table}
    out = Path(args.out)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    stamped = out.with_name(f"{out.stem}-{time.strftime('%Y%m%d-%H%M%S')}{out.suffix}")
    stamped.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out} and {stamped.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
