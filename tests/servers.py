"""Real servers for tests: redis-server and gunicorn on free loopback ports.

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
import time
from collections.abc import Callable
from pathlib import Path

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
