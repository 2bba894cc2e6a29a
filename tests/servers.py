"""Real servers for tests: redis-server, PostgreSQL and gunicorn on free loopback ports.

Each starts on 127.0.0.1 only, waits until it answers, and is stopped by the
fixture that started it. Nothing here touches any other address.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts connections on ``port`` (or fail the test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {LOOPBACK}:{port} after {timeout}s")


def child_pids(pid: int) -> list[int]:
    """Live (non-zombie) children of ``pid``, read from ``/proc/*/stat``.

    For a gunicorn master these are its workers. Works on kernels without
    ``/proc/<pid>/task/<tid>/children`` (CONFIG_PROC_CHILDREN) and without procps.
    """
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if int(ppid) == pid and state != "Z":
            children.append(int(entry.name))
    return sorted(children)


def binary(name: str) -> str:
    """The path of a Debian redis tool, or a test failure saying how to install it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (apt-get install redis-server redis-tools)")
    return found


def client(port: int, **kwargs: object) -> redis.Redis:
    """A plain client for one server, with timeouts (tests must never hang)."""
    return redis.Redis(
        host=LOOPBACK,
        port=port,
        socket_timeout=2,
        socket_connect_timeout=2,
        decode_responses=True,
        **kwargs,
    )


class RedisProcess:
    """One redis-server (a data node or a Sentinel) in its own directory."""

    def __init__(
        self,
        workdir: Path,
        args: list[str],
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.args = args
        self.env = env  # added to this process's environment
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *extra: str) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            binary("redis-server"),
            *self.args,
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
            *extra,
        ]  # fmt: skip
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )
        wait_for_port(self.port, proc=self.proc)
        return self

    def client(self, **kwargs: object) -> redis.Redis:
        return client(self.port, **kwargs)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last fsync."""
        self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGCONT)  # a paused server ignores SIGTERM
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self, chars: int = 4000) -> str:
        path = self.workdir / "redis.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text[-chars:]


class RedisServer(RedisProcess):
    """A redis-server of our own in a temp dir, with AOF fsynced on every write so
    restarts keep every acknowledged write."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        aof = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        super().__init__(workdir, aof, port)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"


class Gunicorn:
    """``gunicorn wsgi:app`` from the project root with the shipped config."""

    def __init__(
        self, env: dict[str, str], workers: int = 2, *extra: str, app: str = "wsgi:app"
    ) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env}
        self.args = [
            sys.executable, "-m", "gunicorn",
            "-c", str(ROOT / "gunicorn.conf.py"),
            "-w", str(workers),
            "-b", f"{LOOPBACK}:{self.port}",
            *extra,
            app,
        ]  # fmt: skip
        self.cwd = ROOT
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, log_path: Path) -> Gunicorn:
        self.log_path = log_path
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=log
            )
        wait_for_port(self.port, timeout=20, proc=self.proc)
        return self

    def worker_pids(self) -> list[int]:
        """The pids of the live workers of this gunicorn (children of its master)."""
        return child_pids(self.proc.pid) if self.proc is not None else []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def access_lines(self) -> list[dict]:
        """The app's JSON access lines logged so far, oldest first."""
        return [
            json.loads(line)
            for line in self.log().splitlines()
            if line.startswith("{") and '"optin_service.access"' in line
        ]

    def answering_pids(self, after: int = 0) -> set[int]:
        """The pids of the workers that answered an API request (past the first ``after``)."""
        return {line["pid"] for line in self.access_lines()[after:]}

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code


def until_every_worker_answered(
    server: Gunicorn,
    send: Callable[[int], object],
    *,
    workers: int = 2,
    at_least: int = 1,
    limit: int = 200,
) -> int:
    """Call ``send(0)``, ``send(1)``... (one API request each, on a new connection) until
    ``workers`` distinct worker pids have answered these requests, as their access lines
    show, and at least ``at_least`` calls were made; return how many calls were made."""
    before = len(server.access_lines())
    sent = 0
    while sent < at_least or len(server.answering_pids(after=before)) < workers:
        if sent >= limit:
            raise AssertionError(
                f"{limit} requests did not reach {workers} workers:\n{server.log()}"
            )
        send(sent)
        sent += 1
    return sent


class ReadmeGunicorn(Gunicorn):
    """The README's first command, ``gunicorn wsgi:app``, as a user runs it from a clone.

    No ``-c``, ``-w`` or ``-b``: gunicorn picks ``gunicorn.conf.py`` up from the working
    directory, a copy of the clone's files in ``workdir`` (so the default store lands
    there, never in the repo). The environment is a login shell's (``PATH``, ``HOME``)
    plus ``OPTIN_BIND`` (the config's own setting, for a free port) and ``extra``:
    nothing of the test run's leaks in (no ``PROMETHEUS_MULTIPROC_DIR``, no store).
    """

    def __init__(self, workdir: Path, **extra: str) -> None:
        self.port = free_port()
        for name in ("wsgi.py", "gunicorn.conf.py"):
            shutil.copy(ROOT / name, workdir / name)
        for package in ("optin_service", "backends"):  # the source tree a clone holds
            shutil.copytree(
                ROOT / package, workdir / package, ignore=shutil.ignore_patterns("__pycache__")
            )
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", str(workdir)),
            "OPTIN_BIND": f"{LOOPBACK}:{self.port}",
            **extra,
        }
        # The venv's console script, as in ``.venv/bin/gunicorn wsgi:app``.
        self.args = [str(Path(sys.executable).parent / "gunicorn"), "wsgi:app"]
        self.cwd = workdir
        self.proc = None
        self.log_path = None


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server binaries (the newest installed), or a
    test failure saying how to install them."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql)")
    return found[-1].parent


class PostgresServer:
    """A PostgreSQL cluster of our own: ``initdb`` into a temp dir, ``pg_ctl start`` on a
    free loopback port, trust authentication on loopback, the socket in the data dir.

    The server refuses to run as root, so as root every command runs as the
    ``postgres`` user (``runuser``), in a dir it owns outside pytest's tmp_path (that
    one is private to root). :meth:`cleanup` removes the dir.
    """

    def __init__(self, port: int | None = None, settings: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="optin-pg-"))
        self.data = self.root / "data"
        self.settings = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": str(self.root),
            "port": str(self.port),
            "fsync": "on",
            "max_connections": "200",
            **(settings or {}),
        }
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({result.returncode}):\n{result.stderr}\n{self.log()}"
            )
        return result

    def start(self) -> PostgresServer:
        if not (self.data / "PG_VERSION").exists():
            self._run(
                self.bin / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
        options = " ".join(f"-c {key}={value}" for key, value in self.settings.items())
        self._run(
            self.bin / "pg_ctl", "start", "-D", self.data, "-l", self.root / "postgres.log",
            "-w", "-t", "30", "-o", options,
        )  # fmt: skip
        wait_for_port(self.port)
        return self

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        pidfile = self.data / "postmaster.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self) -> bool:
        return (
            self._run(self.bin / "pg_ctl", "status", "-D", self.data, check=False).returncode == 0
        )

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``: ``fast`` disconnects clients (they see admin shutdown)."""
        if self.running:
            self._run(self.bin / "pg_ctl", "stop", "-D", self.data, "-m", mode, "-w", "-t", "30")

    def kill(self) -> None:
        """SIGKILL the postmaster: no shutdown checkpoint (its backends exit on their own)."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)

    def cleanup(self) -> None:
        """Stop the server and remove its dir."""
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", **options: str) -> str:
        """A ``postgresql://`` URL for ``database`` on loopback, as the superuser."""
        query = "&".join(f"{key}={quote(value, safe='')}" for key, value in options.items())
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{database}" + (
            f"?{query}" if query else ""
        )

    def execute(self, *statements: str, database: str = "postgres") -> list[tuple]:
        """Run statements as the superuser (autocommit); the last one's rows."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            rows: list[tuple] = []
            for statement in statements:
                cursor = conn.execute(statement)
                rows = cursor.fetchall() if cursor.description else []
            return rows

    def reload(self) -> None:
        self.execute("SELECT pg_reload_conf()")

    def log(self, chars: int = 4000) -> str:
        path = self.root / "postgres.log"
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
