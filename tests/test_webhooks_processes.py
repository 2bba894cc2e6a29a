"""``optin webhooks run`` as real processes on one SQLite file, against a loopback
receiver that verifies every signature: kill -9 mid-stream, failover between two
deliverers, a 410 seen from the outside, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from optin_service.registry import store_from_url
from optin_service.storage import OptInRecord, OptInStore
from optin_service.webhooks import webhook_id
from tests.receiver import SECRET, Receiver, Request
from tests.servers import LOOPBACK, free_port, wait_for_port

pytestmark = pytest.mark.slow

OPTIN = str(Path(sys.executable).parent / "optin")


class Deliverer:
    """One ``optin webhooks run`` process, its log in a file, its metrics on a port."""

    def __init__(self, workdir: Path, env: dict[str, str], *extra: str) -> None:
        self.workdir = workdir
        self.env = env
        self.port = free_port()
        self.args = [OPTIN, "webhooks", "run", "--metrics-port", str(self.port), *extra]
        self.log_path = workdir / f"deliverer-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Deliverer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=self.workdir, env=self.env, stdout=log, stderr=log
            )
        wait_for_port(self.port, proc=self.proc)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no clean-up, the lease stays in the store until it expires."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        pairs = ",".join(f'{k}="{v}"' for k, v in labels.items())
        wanted = f"{name}{{{pairs}}}" if labels else name
        for line in text.splitlines():
            if line.rsplit(" ", 1)[0] == wanted:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{wanted} not in the metrics:\n{text}")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optin.db'}"


@pytest.fixture
def store(db: str):
    store = store_from_url(db)
    yield store
    store.close()


def environment(db: str, receiver: Receiver, schedule: str = "0.05,0.05") -> dict[str, str]:
    return {
        **os.environ,
        "OPTIN_STORAGE_URL": db,
        "OPTIN_WEBHOOK_URL": receiver.url,
        "OPTIN_WEBHOOK_SECRET": SECRET,
        "OPTIN_WEBHOOK_RETRY_SCHEDULE": schedule,
        "OPTIN_WEBHOOK_TIMEOUT_SECONDS": "5",
    }


def optin(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [OPTIN, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def write(store: OptInStore, count: int, prefix: str = "m") -> None:
    for i in range(count):
        status = "accepted" if i % 2 == 0 else "declined"
        store.set(OptInRecord.now(f"{prefix}{i % 7}", status, f"req-{prefix}-{i}"))


def expected_ids(store: OptInStore) -> list[str]:
    found, after = [], None
    while (page := store.changes(after, 1000)).changes:
        found.extend(webhook_id(c) for c in page.changes)
        after = page.next
    return found


def ids(requests: list[Request]) -> list[str]:
    return [r.msg_id for r in requests]


def test_kill_9_mid_stream_then_restart_loses_nothing(tmp_path, db, store):
    """The process is killed while the receiver holds change 50: that change, and
    only that one, arrives twice (same id); every other change once, in order."""
    write(store, 120)
    victim: dict[str, Deliverer] = {}

    def delay(request: Request) -> float:
        if len(receiver.requests) == 49 and request.attempt == 1 and "first" in victim:
            victim.pop("first").kill()  # mid-request: it never sees the answer
        return 0.0

    with Receiver(delay=delay) as receiver:
        env = environment(db, receiver)
        victim["first"] = first = Deliverer(tmp_path, env, "--lease-seconds", "2").start()
        receiver.wait(lambda requests: len(requests) >= 50)
        assert first.proc is not None and first.proc.poll() == -signal.SIGKILL
        second = Deliverer(tmp_path, env, "--lease-seconds", "2").start()
        try:
            receiver.wait(lambda requests: len(requests) >= 121, timeout=30)
            time.sleep(0.5)
        finally:
            assert second.stop() == 0
    expected = expected_ids(store)
    assert ids(receiver.requests) == expected[:50] + expected[49:]
    assert all(r.verified for r in receiver.requests)


def test_two_deliverers_only_one_delivers_and_the_other_takes_over_within_30_s(tmp_path, db, store):
    with Receiver() as receiver:
        env = environment(db, receiver)
        a = Deliverer(tmp_path, env).start()
        b = Deliverer(tmp_path, env).start()
        try:
            write(store, 20)
            receiver.wait(lambda requests: len(requests) >= 20)
            holder_id = json.loads(optin(env, tmp_path, "webhooks", "status", "--json"))["lease"]
            holder, standby = (a, b) if f":{a.pid}:" in holder_id["holder"] else (b, a)
            time.sleep(0.3)
            assert holder.metric("optin_webhook_deliveries_total", outcome="delivered") == 20
            assert standby.metric("optin_webhook_deliveries_total", outcome="delivered") == 0
            assert standby.metric("optin_webhook_lease_held") == 0
            holder.kill()
            killed = time.monotonic()
            write(store, 5, prefix="n")
            receiver.wait(lambda requests: len(requests) >= 25, timeout=40)
            took = time.monotonic() - killed
            time.sleep(0.3)
            assert standby.metric("optin_webhook_deliveries_total", outcome="delivered") == 5
        finally:
            for d in (a, b):
                d.stop()
    assert took < 30
    assert ids(receiver.requests) == expected_ids(store)  # no duplicate: it died idle
    assert "holds the lease" in standby.log()


def test_410_disables_across_processes_and_enable_resumes(tmp_path, db, store):
    write(store, 3)
    gone = {"on": True}
    third: list[str] = []

    def answer(request: Request) -> int:
        return 410 if gone["on"] and request.msg_id == third[0] else 204

    with Receiver(answer) as receiver:
        third.append(expected_ids(store)[2])
        env = environment(db, receiver)
        d = Deliverer(tmp_path, env).start()
        try:
            receiver.wait(lambda requests: len(requests) >= 3)
            time.sleep(1.0)
            assert len(receiver.requests) == 3 and d.proc.poll() is None  # up, silent
            assert d.metric("optin_webhook_disabled") == 1
            assert "disabled" in d.log() and "410" in d.log()
            report = json.loads(optin(env, tmp_path, "webhooks", "status", "--json"))
            assert report["disabled"]["webhookId"] == third[0] and report["waiting"] == 1
            gone["on"] = False
            optin(env, tmp_path, "webhooks", "enable")
            write(store, 1, prefix="n")
            receiver.wait(lambda requests: len(requests) >= 5)
        finally:
            assert d.stop() == 0
    assert ids(receiver.requests) == [*expected_ids(store)[:3], *expected_ids(store)[2:]]


def test_sigterm_stops_cleanly_and_gives_the_lease_up(tmp_path, db, store):
    with Receiver() as receiver:
        env = environment(db, receiver)
        d = Deliverer(tmp_path, env).start()
        write(store, 2)
        receiver.wait(lambda requests: len(requests) >= 2)
        started = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - started < 10
    report = json.loads(optin(env, tmp_path, "webhooks", "status", "--json"))
    assert report["lease"] is None and report["waiting"] == 0
    assert "stopped" in d.log()
