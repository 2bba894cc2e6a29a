"""Load benchmark: the service on each backend beside a bare Flask reference and its ceilings.

Every server is started the same way, from the repository root, with the shipped
config (``gunicorn -c gunicorn.conf.py <app>``: sync workers, stderr to a file) on
a free loopback port. Each configuration (``bench/configs.py``) is paired with the
reference (``bench/reference_app.py``) of its worker count: both start on empty
storage, get ``--warmup`` seconds of load, then ``wrk -t1 -c16`` with
``bench/put.lua`` (PUTs of random members) loads them in turn, ``--slice`` seconds
each (A B A B ...) until each had ``--duration`` seconds, so the drift of a shared
machine falls on both sides of each ratio. ``--rounds`` repeats every pair.

Per server: requests/s, p50 and p99 latency (median of the slices' percentiles),
RSS per worker after the load, the workers' CPU time per request; each as a ratio
to its paired reference, per round, then median [min, max] over the rounds; and
each service over its ceiling (requests/s and p99) when both ran. The default run
(10 configurations, 3 rounds of 10 s) takes about 15 minutes: each pair costs
about 2 x (warmup + duration) + 6 seconds. Results go to ``bench/results/load.json``
and a timestamped copy. Needs ``wrk`` (Debian's) and, for Redis, ``redis-server``;
for PostgreSQL, Debian's ``postgresql`` (a server of its own is started, as the tests do).
The exit code is 0 whether or not targets are met: the tables say.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from configs import CEILING_OF, CONFIGS, DEFAULT_CONFIGS, P99_TARGET, RSS_TARGET, Config, reference
from servers import (
    RESULTS,
    ROOT,
    Gunicorn,
    cpu_seconds,
    fsync_latency_us,
    postgres_server,
    redis_server,
    rss_mib,
    run_wrk,
)

# --- one pair: the reference and a server, in alternating slices ---------------------------


def reset_storage(config: Config, workdir: Path, redis_client, postgres) -> None:
    """Each server starts on empty storage."""
    if config.uses_redis:
        redis_client.flushall()
    if config.uses_postgres:  # the service's tables and the ceiling's are in "public"
        postgres.execute("DROP SCHEMA public CASCADE", "CREATE SCHEMA public")
    for name in ("full.db", "normal.db"):
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (workdir / (name + suffix)).unlink()


def alternate_slices(servers: list[Gunicorn], pids: list[list[int]], args) -> dict:
    """wrk on each server in turn, ``--slice`` seconds each, until each had ``--duration``.

    Returns each server's slices (wrk's figures) and its workers' CPU seconds during
    them (per worker, to see how evenly they shared the load), and the load average
    before and after every turn.
    """
    slices: list[list[dict]] = [[] for _ in servers]
    cpu_per_worker = [[0.0] * len(each) for each in pids]
    loads = [os.getloadavg()[0]]
    for _ in range(max(1, round(args.duration / args.slice))):
        for i, server in enumerate(servers):
            before = [cpu_seconds(pid) for pid in pids[i]]
            slices[i].append(run_wrk(server.port, args.threads, args.connections, args.slice))
            for k, pid in enumerate(pids[i]):
                cpu_per_worker[i][k] += cpu_seconds(pid) - before[k]
        loads.append(os.getloadavg()[0])
    return {"slices": slices, "cpu_per_worker": cpu_per_worker, "loads": loads}


def server_result(config: Config, slices: list[dict], cpu_per_worker: list[float]) -> dict:
    """One server's figures over its slices."""
    requests = sum(x["requests"] for x in slices)
    seconds = sum(x["duration_us"] for x in slices) / 1e6
    cpu = sum(cpu_per_worker)
    return {
        "config": config.name,
        "workers": config.workers,
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds,
        "latency_us": {
            q: statistics.median(x["latency_us"][q] for x in slices) for q in ("p50", "p90", "p99")
        },
        "errors": {k: sum(x["errors"][k] for x in slices) for k in slices[0]["errors"]},
        "cpu_us_per_request": cpu / max(requests, 1) * 1e6,
        # The busiest worker's share of the workers' CPU time (0.5 is even for 2).
        "busiest_worker_cpu_share": max(cpu_per_worker) / cpu if cpu else float("nan"),
        "slices": slices,
    }


def measure_pair(
    configs: tuple[Config, Config],
    args,
    workdir: Path,
    redis_port,
    redis_client,
    postgres,
    tag: str,
) -> list[dict]:
    """The reference and a server, both started fresh and warmed up, then sliced."""
    for config in configs:
        reset_storage(config, workdir, redis_client, postgres)
    postgres_port = postgres.port if postgres is not None else None
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                Gunicorn(
                    c.app,
                    c.workers,
                    workdir / f"{tag}-{c.name}.stderr",
                    c.storage_url(workdir, redis_port, postgres_port),
                    c.gunicorn_args,
                )
            )
            for c in configs
        ]
        pids = [server.worker_pids() for server in servers]
        if args.warmup > 0:
            for server in servers:
                run_wrk(server.port, args.threads, args.connections, args.warmup)
        fsync = fsync_latency_us(workdir)
        load = alternate_slices(servers, pids, args)
        rss = [[rss_mib(pid) for pid in each] for each in pids]
    results = []
    for i, (config, server) in enumerate(zip(configs, servers, strict=True)):
        result = server_result(config, load["slices"][i], load["cpu_per_worker"][i])
        result["rss_mib"] = statistics.mean(rss[i])
        result["rss_mib_each"] = rss[i]
        result["load"] = statistics.mean(load["loads"])
        result["stderr_bytes"] = server.log_path.stat().st_size
        result["fsync_us"] = fsync
        server.log_path.unlink()
        results.append(result)
    return results


# --- the figures of a round, and over the rounds -----------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def pair_row(config: Config, ref: dict, svc: dict, round_no: int) -> dict:
    """A server beside its reference in one round."""
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


def median_min_max(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(pairs: list[dict]) -> list[dict]:
    """Per config: the median of its figures over the rounds, and of each ratio [min, max]."""
    out = []
    for name in dict.fromkeys(p["config"] for p in pairs):
        rows = [p for p in pairs if p["config"] == name]
        row = {"config": name, "workers": rows[0]["workers"], "rounds": len(rows)}
        figures = ("rps", "p50_ms", "p99_ms", "rss_mib", "cpu_us")
        for key in (*figures, *("ref_" + k for k in figures)):
            row[key] = statistics.median(r[key] for r in rows)
        for key in ("rps_ratio", "p99_ratio", "rss_ratio", "cpu_ratio"):
            row[key], row[key + "_min"], row[key + "_max"] = median_min_max([r[key] for r in rows])
        row["target"] = rows[0]["target"]
        row["met"] = {
            "rps": None if row["target"] is None else row["rps_ratio"] >= row["target"],
            "p99": row["p99_ratio"] <= P99_TARGET,
            "rss": row["rss_ratio"] <= RSS_TARGET,
        }
        out.append(row)
    return out


def over_ceilings(pairs: list[dict]) -> list[dict]:
    """Each service over its ceiling, round by round (both ran in the same rounds)."""
    by_round = {(p["round"], p["config"]): p for p in pairs}
    out = []
    for service, (ceiling, rps_target, p99_target) in CEILING_OF.items():
        rounds = sorted(r for r, name in by_round if name == service and (r, ceiling) in by_round)
        if not rounds:
            continue
        svc = [by_round[r, service] for r in rounds]
        top = [by_round[r, ceiling] for r in rounds]
        rps = median_min_max([ratio(s["rps"], c["rps"]) for s, c in zip(svc, top, strict=True)])
        p99 = median_min_max(
            [ratio(s["p99_ms"], c["p99_ms"]) for s, c in zip(svc, top, strict=True)]
        )
        out.append(
            {
                "service": service,
                "ceiling": ceiling,
                "rounds": len(rounds),
                "rps_ratio": rps,
                "rps_target": rps_target,
                "p99_ratio": p99,
                "p99_target": p99_target,
            }
        )
    return out


# --- printing -----------------------------------------------------------------------------


def mark(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def spread(figures: tuple[float, float, float], bold: bool = False) -> str:
    """``median [min, max]``, the median in bold if asked."""
    median = f"**{figures[0]:.2f}**" if bold else f"{figures[0]:.2f}"
    return f"{median} [{figures[1]:.2f}, {figures[2]:.2f}]"


def print_progress(round_no: int, result: dict) -> None:
    print(
        f"  round {round_no} {result['config']:<16} {result['rps']:7.0f} req/s  "
        f"p50 {result['latency_us']['p50'] / 1000:6.2f} ms  "
        f"p99 {result['latency_us']['p99'] / 1000:6.2f} ms  "
        f"RSS {result['rss_mib']:5.1f} MiB  "
        f"CPU {result['cpu_us_per_request']:4.0f} µs/req  "
        f"busiest worker {result['busiest_worker_cpu_share']:.2f}  "
        f"load {result['load']:.1f}  fsync p50 {result['fsync_us']['p50']} µs",
        flush=True,
    )


def print_rounds(pairs: list[dict]) -> None:
    print(
        f"{'round':>5} {'config':<16} {'w':>1} {'ref req/s':>9} {'req/s':>7} {'ratio':>6} "
        f"{'ref p50':>7} {'p50':>6} {'ref p99':>7} {'p99':>6} {'p99 x':>6} "
        f"{'ref RSS':>7} {'RSS':>6} {'RSS x':>6} "
        f"{'ref CPU':>7} {'CPU':>5} {'CPU x':>5} {'errors':>6}"
    )
    for p in pairs:
        errors = sum(p["errors"].values())
        print(
            f"{p['round']:>5} {p['config']:<16} {p['workers']:>1} {p['ref_rps']:>9.0f} "
            f"{p['rps']:>7.0f} {p['rps_ratio']:>6.3f} {p['ref_p50_ms']:>7.2f} {p['p50_ms']:>6.2f} "
            f"{p['ref_p99_ms']:>7.2f} {p['p99_ms']:>6.2f} {p['p99_ratio']:>6.2f} "
            f"{p['ref_rss_mib']:>7.1f} {p['rss_mib']:>6.1f} {p['rss_ratio']:>6.2f} "
            f"{p['ref_cpu_us']:>7.0f} {p['cpu_us']:>5.0f} {p['cpu_ratio']:>5.2f} {errors:>6}"
        )


def reference_table(summary: list[dict]) -> str:
    """Markdown: each server over its reference, medians over the rounds with [min, max]."""
    lines = [
        "| Server (workers) | req/s (ref) | req/s ratio [min, max] | target | "
        "p99 ms (ref) | p99 ratio [min, max] | RSS/worker MiB (ref) | RSS ratio [min, max] | "
        "CPU µs/req (ref) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        met = r["met"]
        target = "-" if r["target"] is None else f"≥ {r['target']:.2f}"
        figures = {
            k: (r[f"{k}_ratio"], r[f"{k}_ratio_min"], r[f"{k}_ratio_max"])
            for k in ("rps", "p99", "rss")
        }
        lines.append(
            f"| {r['config']} ({r['workers']}) | {r['rps']:,.0f} ({r['ref_rps']:,.0f}) | "
            f"{spread(figures['rps'], bold=True)}{mark(met['rps'])} | {target} | "
            f"{r['p99_ms']:.1f} ({r['ref_p99_ms']:.1f}) | {spread(figures['p99'])}"
            f"{mark(met['p99'])} | {r['rss_mib']:.1f} ({r['ref_rss_mib']:.1f}) | "
            f"{spread(figures['rss'])}{mark(met['rss'])} | "
            f"{r['cpu_us']:.0f} ({r['ref_cpu_us']:.0f}) |"
        )
    return "\n".join(lines)


def ceiling_table(rows: list[dict]) -> str:
    """Markdown: each service over its ceiling, medians over the rounds with [min, max]."""
    lines = [
        "| Service | its ceiling | req/s ratio [min, max] | target "
        "| p99 ratio [min, max] | target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rps_ok = None if r["rps_target"] is None else r["rps_ratio"][0] >= r["rps_target"]
        p99_ok = None if r["p99_target"] is None else r["p99_ratio"][0] <= r["p99_target"]
        rps_target = "-" if r["rps_target"] is None else f"≥ {r['rps_target']:.2f}"
        p99_target = "-" if r["p99_target"] is None else f"≤ {r['p99_target']:.2f}"
        lines.append(
            f"| {r['service']} | {r['ceiling']} | "
            f"{spread(r['rps_ratio'], bold=True)}{mark(rps_ok)} | "
            f"{rps_target} | {spread(r['p99_ratio'])}{mark(p99_ok)} | {p99_target} |"
        )
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------


def run_metadata(args) -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(
            ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    try:
        import hiredis  # noqa: F401

        has_hiredis = True
    except ImportError:
        has_hiredis = False
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["bench/load.py", *sys.argv[1:]]),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "hiredis": has_hiredis,
        "wrk": f"-t{args.threads} -c{args.connections} -d{args.duration}s -s bench/put.lua",
        "warmup_s": args.warmup,
        "slice_s": args.slice,
        "rounds": args.rounds,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain")),
    }


def run_rounds(chosen: list[Config], args, workdir: Path) -> tuple[list[dict], list[dict]]:
    """Every chosen configuration beside its reference, ``--rounds`` times."""
    runs: list[dict] = []
    pairs: list[dict] = []
    with contextlib.ExitStack() as stack:
        redis_port = redis_client = None
        if any(c.uses_redis for c in chosen):
            import redis

            redis_port = stack.enter_context(redis_server(workdir))
            redis_client = stack.enter_context(redis.Redis(port=redis_port))
        postgres = None
        if any(c.uses_postgres for c in chosen):
            postgres = stack.enter_context(postgres_server())
        for round_no in range(1, args.rounds + 1):
            for config in chosen:
                pair = (reference(config.workers, config.gunicorn_args), config)
                done = measure_pair(
                    pair, args, workdir, redis_port, redis_client, postgres, f"r{round_no}"
                )
                for result in done:
                    result["round"] = round_no
                    runs.append(result)
                    print_progress(round_no, result)
                pairs.append(pair_row(config, done[0], done[1], round_no))
    return runs, pairs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/load.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="times every pair runs (3)")
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per server (10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before (2)")
    parser.add_argument("--slice", type=int, default=2, help="seconds per wrk run in turn (2)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads, -t (1)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections, -c (16)")
    parser.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help=f"comma-separated, from: {', '.join(CONFIGS)} (default: {','.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument("--out", default=str(RESULTS / "load.json"), help="the JSON results")
    args = parser.parse_args(argv)
    unknown = [n for n in args.configs.split(",") if n.strip() and n.strip() not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs: {', '.join(unknown)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (apt-get install wrk)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [CONFIGS[name.strip()] for name in args.configs.split(",") if name.strip()]
    meta = run_metadata(args)
    print(
        f"{meta['started']}  python {meta['python']}  {meta['cpus']} CPUs  "
        f"hiredis={meta['hiredis']}  wrk {meta['wrk']}  "
        f"commit {meta['commit'][:10]}{' (dirty)' if meta['dirty'] else ''}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="optin-load-") as tmp:
        runs, pairs = run_rounds(chosen, args, Path(tmp))
    summary = summarize(pairs)
    ceilings = over_ceilings(pairs)
    tables = reference_table(summary)
    if ceilings:
        tables += "\n\nEach service over its ceiling, same rounds:\n\n" + ceiling_table(ceilings)
    print()
    print_rounds(pairs)
    print()
    print(tables)
    doc = {
        "meta": meta,
        "summary": summary,
        "over_ceilings": ceilings,
        "pairs": pairs,
        "runs": runs,
        "markdown": tables,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    stamped = out.with_name(f"{out.stem}-{time.strftime('%Y%m%d-%H%M%S')}{out.suffix}")
    stamped.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out} and {stamped.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
