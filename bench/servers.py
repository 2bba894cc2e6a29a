"""The processes the benchmarks start, and what Linux says about them.

Not a script: ``bench/load.py``, ``bench/inproc.py``, ``bench/storage.py`` and
``bench/migrate.py`` import it. It starts gunicorn the way production does
(from the repository root, with the shipped ``gunicorn.conf.py``), a private
``redis-server`` that keeps nothing on disk, a private PostgreSQL with its default
settings, and ``wrk`` with ``bench/put.lua``; and it reads a process's RSS and CPU
time from ``/proc``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LOOPBACK = "127.0.0.1"
PUT_LUA = ROOT / "bench" / "put.lua"
VENV_BIN = Path(sys.executable).parent
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
READINESS_PATH = "/client/users/bench-ready/profile/optin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def benchmark_env() -> dict[str, str]:
    """This environment without the service's settings, so a server gets only what is given."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OPTIN_", "PROMETHEUS_", "FLASK_"))
    }
    env.pop("GUNICORN_CMD_ARGS", None)
    return env


# --- redis-server --------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    """A private ``redis-server`` on a free loopback port; yields the port.

    AOF off and no RDB snapshots: the benchmarks measure the service, not the disk.
    Readiness is checked with a raw ``PING`` so this process need not import redis-py
    (``bench/migrate.py`` keeps its own RSS small).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    args = [
        binary,
        "--bind", LOOPBACK,
        "--port", str(port),
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--logfile", str(workdir / "redis.log"),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_redis(proc, port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_redis(proc: subprocess.Popen, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"redis-server did not answer PING within {timeout:.0f} s")


# --- PostgreSQL ----------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_server() -> Iterator:
    """A private PostgreSQL on a free loopback port, started as the tests start theirs
    (``tests/servers.py`` ``PostgresServer``: ``initdb`` and ``pg_ctl`` from Debian's
    ``postgresql``, as the ``postgres`` user when run as root, in a temp dir of its own);
    yields it (``.port``, ``.execute(...)``) and removes it afterwards.

    Its settings are PostgreSQL's defaults (``fsync`` and ``synchronous_commit`` on,
    no standby), as a user's server would have them, but ``max_connections`` 200.
    """
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.servers import PostgresServer

    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.cleanup()


# --- gunicorn ------------------------------------------------------------------------------


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py [args] <app>`` from the repository root, as shipped.

    Bound to a free loopback port, ``workers`` sync workers unless ``args`` says
    otherwise, stdout and stderr (where the service's JSON access lines go) to
    ``log_path``, as in production. Entering waits until a PUT is answered 200.
    """

    def __init__(
        self,
        app: str,
        workers: int,
        log_path: Path,
        storage_url: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.args = args
        self.port = free_port()
        self.log_path = log_path
        self.env = benchmark_env()
        self.env["WEB_CONCURRENCY"] = str(workers)
        self.env["OPTIN_BIND"] = f"{LOOPBACK}:{self.port}"
        if storage_url:
            self.env["OPTIN_STORAGE_URL"] = storage_url
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Gunicorn:
        self._log = open(self.log_path, "wb")  # closed in __exit__
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", *self.args, self.app],
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
            self.proc.wait(timeout=35)  # gunicorn.conf.py's graceful_timeout is 30 s
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        master = self.proc.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text()
        return [int(pid) for pid in children.split()]


def wait_for_put(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """Until the server answers a PUT with 200 (or dies, or time runs out)."""
    deadline = time.monotonic() + timeout
    body = b'{"LOYALTY_OPTIN": "accepted"}'
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        try:
            conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
            conn.request("PUT", READINESS_PATH, body, {"Content-Type": "application/json"})
            status = conn.getresponse().status
            conn.close()
        except OSError:
            time.sleep(0.1)
            continue
        if status != 200:
            raise RuntimeError(f"server answered {status} to the readiness PUT")
        return
    raise RuntimeError(f"server did not answer within {timeout:.0f} s")


# --- wrk -----------------------------------------------------------------------------------


def run_wrk(port: int, threads: int, connections: int, seconds: int) -> dict:
    """``wrk`` with ``bench/put.lua`` for ``seconds``: its closing JSON line, plus ``rps``."""
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(PUT_LUA),
        f"http://{LOOPBACK}:{port}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 30)
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH "))
    data = json.loads(line.removeprefix("BENCH "))
    data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
    return data


# --- /proc ---------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of this process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime, stime


def fsync_latency_us(folder: Path, count: int = 50) -> dict[str, int]:
    """What one fsync of a 4 KiB append costs in ``folder`` now (p50, p90): with
    ``synchronous=FULL``, SQLite pays one per committed write."""
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
