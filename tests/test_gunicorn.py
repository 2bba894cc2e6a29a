"""The service under gunicorn, over real HTTP on loopback: durability, crashes, outages.

Every test starts its own gunicorn (and redis-server where needed) in ``tmp_path``
and stops them in a ``finally``, whatever happened. Every loop is bounded in
count and in time. Assertion messages carry the tail of the gunicorn log.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.servers import ROOT, Gunicorn, PostgresServer, RedisServer

pytestmark = pytest.mark.slow

TIMEOUT = 5.0  # seconds, for every HTTP request
STATUSES = ("accepted", "declined")
UPDATED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
UPDATED_BODY = b'{"message":"Opt-in updated."}'


# --- servers -----------------------------------------------------------------


class Servers:
    """Starts gunicorns, redis-servers and PostgreSQL servers for one test; :meth:`close`
    stops them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.gunicorns: list[Gunicorn] = []
        self.redises: list[RedisServer] = []
        self.postgreses: list[PostgresServer] = []
        self.stopped_redises: set[int] = set()  # pids we SIGSTOPped

    def gunicorn(self, env: dict[str, str], workers: int = 2, name: str = "gunicorn") -> Gunicorn:
        """A running gunicorn; ``env`` must name the store (never the repo's instance folder)."""
        assert env.get("OPTIN_STORAGE_URL"), "tests must always set OPTIN_STORAGE_URL"
        server = make_gunicorn(env, workers)
        self.gunicorns.append(server)
        server.start(self.tmp_path / f"{name}.log")
        return server

    def redis(self, name: str = "redis") -> RedisServer:
        server = RedisServer(self.tmp_path / name)
        self.redises.append(server)
        return server.start()

    def postgres(self) -> PostgresServer:
        server = PostgresServer()
        self.postgreses.append(server)
        return server.start()

    def sqlite_url(self, name: str = "optin.db") -> str:
        return "sqlite:///" + str(self.tmp_path / name)  # tmp_path is absolute: 4 slashes

    def sigstop(self, server: RedisServer) -> None:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        self.stopped_redises.add(server.proc.pid)

    def sigcont(self, server: RedisServer) -> None:
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGCONT)
        self.stopped_redises.discard(server.proc.pid)

    def close(self) -> None:
        # A stopped redis ignores SIGTERM and would hold workers up: wake it first.
        for pid in self.stopped_redises:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        self.stopped_redises.clear()
        for server in [*self.gunicorns, *self.redises]:
            try:
                server.stop()
            except Exception:  # keep stopping the others
                pass
        for server in self.postgreses:
            server.cleanup()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    try:
        yield started
    finally:
        started.close()


def make_gunicorn(env: dict[str, str], workers: int) -> Gunicorn:
    # An inherited GUNICORN_CMD_ARGS would override the shipped config under test.
    return Gunicorn({"GUNICORN_CMD_ARGS": "", **env}, workers)


def log_tail(server: Gunicorn, chars: int = 6000) -> str:
    text = server.log()
    if len(text) > chars:
        text = "[...]\n" + text[-chars:]
    return f"\n--- gunicorn log ({server.log_path}) ---\n{text}\n--- end of log ---"


def run_to_exit(server: Gunicorn, log_path: Path, timeout: float = 10.0) -> tuple[int, str, float]:
    """Run a gunicorn expected to refuse to start: (exit code, output, seconds taken).

    If it is still running after ``timeout`` it is stopped and the test fails.
    """
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(server.args, cwd=ROOT, env=server.env, stdout=log, stderr=log)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            output = log_path.read_text(errors="replace")
            pytest.fail(f"gunicorn still running after {timeout}s instead of refusing:\n{output}")
        elapsed = time.monotonic() - started
    return code, log_path.read_text(errors="replace"), elapsed


def wait_for_workers(
    server: Gunicorn, count: int, gone: set[int], timeout: float = 15.0
) -> list[int]:
    """Worker pids once there are ``count`` live workers and none of ``gone`` among them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if len(pids) == count and not gone & set(pids):
            return pids
        time.sleep(0.05)
    raise AssertionError(
        f"gunicorn did not get back to {count} workers within {timeout}s "
        f"(now {server.worker_pids()}, killed {sorted(gone)})" + log_tail(server)
    )


# --- HTTP --------------------------------------------------------------------


def optin_url(base: str, cid: str) -> str:
    return f"{base}/client/users/{cid}/profile/optin"


def put(http: requests.Session, base: str, cid: str, status: str) -> requests.Response:
    return http.put(optin_url(base, cid), json={"LOYALTY_OPTIN": status}, timeout=TIMEOUT)


def get(http: requests.Session, base: str, cid: str) -> requests.Response:
    return http.get(optin_url(base, cid), timeout=TIMEOUT)


def assert_put_ok(server: Gunicorn, http: requests.Session, cid: str, status: str) -> None:
    resp = put(http, server.base, cid, status)
    assert (resp.status_code, resp.content) == (200, UPDATED_BODY), (
        f"PUT {cid} {status}: {resp.status_code} {resp.text!r}" + log_tail(server)
    )


def read_state(server: Gunicorn, http: requests.Session, cid: str) -> dict:
    resp = get(http, server.base, cid)
    assert resp.status_code == 200, f"GET {cid}: {resp.status_code} {resp.text!r}" + log_tail(
        server
    )
    body = resp.json()
    assert body["LOYALTY_OPTIN"] in STATUSES and UPDATED_AT.fullmatch(body["updatedAt"]), body
    return body


def write_members(server: Gunicorn, prefix: str, count: int = 10) -> dict[str, dict]:
    """PUT ``count`` members (every third one twice, answer changed), return their GET bodies."""
    with requests.Session() as http:
        for i in range(count):
            cid = f"{prefix}-{i}"
            assert_put_ok(server, http, cid, STATUSES[i % 2])
            if i % 3 == 0:
                assert_put_ok(server, http, cid, STATUSES[(i + 1) % 2])
        states = {f"{prefix}-{i}": read_state(server, http, f"{prefix}-{i}") for i in range(count)}
    for i in range(count):
        expected = STATUSES[(i + 1) % 2] if i % 3 == 0 else STATUSES[i % 2]
        assert states[f"{prefix}-{i}"]["LOYALTY_OPTIN"] == expected, states
    return states


def assert_same_states(server: Gunicorn, before: dict[str, dict], label: str) -> None:
    with requests.Session() as http:
        after = {cid: read_state(server, http, cid) for cid in before}
    assert after == before, f"{label}: state changed\nbefore={before}\nafter={after}" + log_tail(
        server
    )


# --- 1, 2: restart durability --------------------------------------------------


def test_sqlite_state_survives_gunicorn_restart(servers: Servers) -> None:
    env = {"OPTIN_STORAGE_URL": servers.sqlite_url()}
    first = servers.gunicorn(env, workers=2, name="gunicorn-1")
    before = write_members(first, "restart-sqlite")
    code = first.stop()
    assert code == 0, f"gunicorn exited {code} on SIGTERM" + log_tail(first)

    second = servers.gunicorn(env, workers=2, name="gunicorn-2")
    assert_same_states(second, before, "after gunicorn restart on the same SQLite file")


@pytest.mark.redis_server
def test_redis_state_survives_gunicorn_and_redis_restart(servers: Servers) -> None:
    redis_server = servers.redis()
    env = {"OPTIN_STORAGE_URL": redis_server.url}
    first = servers.gunicorn(env, workers=2, name="gunicorn-1")
    before = write_members(first, "restart-redis")
    code = first.stop()
    assert code == 0, f"gunicorn exited {code} on SIGTERM" + log_tail(first)

    port = redis_server.port
    redis_server.stop()  # SIGTERM
    redis_server.start()  # same workdir (AOF) and port
    assert redis_server.port == port

    second = servers.gunicorn(env, workers=2, name="gunicorn-2")
    assert_same_states(second, before, "after restarting redis-server and gunicorn")


# --- 3: SIGKILL a worker under load --------------------------------------------


class WriteLog:
    """What the clients saw: the last acknowledged status per id, and what is uncertain."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # id -> last status answered 200
        self.unconfirmed: dict[str, set[str]] = {}  # id -> statuses sent, not acked, since
        self.requests = 0
        self.acks = 0
        self.connection_errors = 0
        self.http_errors: list[str] = []
        self.thread_errors: list[str] = []


def put_until_acked(
    http: requests.Session, base: str, cid: str, status: str, log: WriteLog, deadline: float
) -> bool:
    """PUT, retrying the same answer after a dropped connection, until a 200 (bounded)."""
    for _ in range(30):
        if time.monotonic() > deadline:
            return False
        with log.lock:
            log.unconfirmed.setdefault(cid, set()).add(status)
            log.requests += 1
        try:
            resp = put(http, base, cid, status)
        except requests.RequestException as exc:  # in flight on the killed worker
            with log.lock:
                log.connection_errors += 1
            # A worker killed between the status line and the body cuts the response:
            # requests says ChunkedEncodingError. Without the whole answer, nothing was
            # acknowledged, so it is retried like a refused connection.
            broken = (
                requests.ConnectionError
                | requests.Timeout
                | requests.exceptions.ChunkedEncodingError
            )
            if not isinstance(exc, broken):
                raise
            time.sleep(0.02)
            continue
        if resp.status_code == 200:
            with log.lock:
                log.acked[cid] = status
                log.acks += 1
                log.unconfirmed.pop(cid, None)
            return True
        with log.lock:
            log.http_errors.append(f"PUT {cid} {status}: {resp.status_code} {resp.text[:200]}")
        time.sleep(0.02)
    return False


def writer(base: str, tid: int, stop_at: float, log: WriteLog) -> None:
    """Unique ids, each written twice with the answer changed, until ``stop_at``."""
    try:
        with requests.Session() as http:
            for n in range(100_000):
                if time.monotonic() > stop_at:
                    return
                cid = f"kill-{tid}-{n}"
                first = STATUSES[(tid + n) % 2]
                second = STATUSES[(tid + n + 1) % 2]
                for status in (first, second):
                    if not put_until_acked(http, base, cid, status, log, stop_at + 10):
                        break
    except Exception as exc:  # reported by the test, not lost in a thread
        with log.lock:
            log.thread_errors.append(f"writer {tid}: {exc!r}")


def read_all(base: str, ids: list[str], threads: int = 4) -> dict[str, str | None]:
    """GET every id over a few connections: id -> status, or None for a 404."""
    found: dict[str, str | None] = {}
    problems: list[str] = []
    lock = threading.Lock()

    def reader(chunk: list[str]) -> None:
        with requests.Session() as http:
            for cid in chunk:
                for attempt in range(3):
                    try:
                        resp = get(http, base, cid)
                        break
                    except requests.RequestException as exc:
                        if attempt == 2:
                            with lock:
                                problems.append(f"GET {cid}: {exc!r}")
                            resp = None
                if resp is None:
                    continue
                with lock:
                    if resp.status_code == 200:
                        found[cid] = resp.json()["LOYALTY_OPTIN"]
                    elif resp.status_code == 404:
                        found[cid] = None
                    else:
                        problems.append(f"GET {cid}: {resp.status_code} {resp.text[:200]}")

    workers = [
        threading.Thread(target=reader, args=(ids[i::threads],), daemon=True)
        for i in range(threads)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers), "readers did not finish within 60 s"
    assert not problems, f"{len(problems)} reads failed: {problems[:10]}"
    return found


KILL_LOAD_SECONDS = 4.0
KILL_AT = (1.0, 2.5)  # seconds into the load


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis_server),
        pytest.param("postgres", marks=pytest.mark.postgres_server),
    ],
)
def test_sigkill_worker_under_load_loses_no_acknowledged_write(
    servers: Servers, backend: str
) -> None:
    urls = {
        "sqlite": servers.sqlite_url,
        "redis": lambda: servers.redis().url,
        "postgres": lambda: servers.postgres().url(),
    }
    url = urls[backend]()
    server = servers.gunicorn({"OPTIN_STORAGE_URL": url}, workers=2)
    wait_for_workers(server, 2, set())

    log = WriteLog()
    started = time.monotonic()
    stop_at = started + KILL_LOAD_SECONDS
    clients = [
        threading.Thread(target=writer, args=(server.base, tid, stop_at, log), daemon=True)
        for tid in range(4)
    ]
    killed: list[int] = []
    try:
        for t in clients:
            t.start()
        for when in KILL_AT:
            time.sleep(max(0.0, started + when - time.monotonic()))
            victim = random.choice(wait_for_workers(server, 2, set(killed)))
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
    finally:
        for t in clients:
            t.join(timeout=KILL_LOAD_SECONDS + 40)
    assert not any(t.is_alive() for t in clients), "client threads did not finish"
    wait_for_workers(server, 2, set(killed))  # the master replaced what we killed

    with log.lock:
        acked = dict(log.acked)
        unconfirmed = {cid: set(s) for cid, s in log.unconfirmed.items()}
    summary = (
        f"{backend}: {log.requests} PUTs sent, {log.acks} acknowledged on {len(acked)} ids, "
        f"{log.connection_errors} connection errors, {len(unconfirmed)} ids left unconfirmed, "
        f"killed workers {killed}"
    )
    assert not log.thread_errors, f"{summary}\n{log.thread_errors}" + log_tail(server)
    assert not log.http_errors, (
        f"{summary}\n{len(log.http_errors)} non-200 answers: {log.http_errors[:10]}"
        + log_tail(server)
    )
    assert len(killed) == len(KILL_AT)
    assert log.acks >= 50, f"too little load to mean anything: {summary}" + log_tail(server)

    found = read_all(server.base, sorted(set(acked) | set(unconfirmed)))
    lost = []
    for cid, status in acked.items():
        # A PUT that lost its connection may still have been applied.
        allowed = {status} | unconfirmed.get(cid, set())
        if found.get(cid) not in allowed:
            lost.append(
                f"{cid}: acked {status}, unconfirmed {unconfirmed.get(cid)}, read {found.get(cid)}"
            )
    for cid, statuses in unconfirmed.items():
        if cid not in acked and found.get(cid) not in statuses | {None}:
            lost.append(f"{cid}: never acked, sent {statuses}, read {found.get(cid)}")
    assert not lost, f"{summary}\n{len(lost)} wrong reads: {lost[:20]}" + log_tail(server)
    print(summary)  # shown with -s or -rP


# --- 4: Redis outage and recovery ------------------------------------------------


def timed(server: Gunicorn, what: str, request) -> tuple[requests.Response, float]:
    """``request()``'s response and how long it took; a client timeout fails with the log."""
    started = time.monotonic()
    try:
        resp = request()
    except requests.RequestException as exc:
        elapsed = time.monotonic() - started
        pytest.fail(f"{what}: no answer after {elapsed:.2f}s: {exc!r}" + log_tail(server))
    return resp, time.monotonic() - started


def assert_unavailable(
    server: Gunicorn, resp: requests.Response, elapsed: float, what: str
) -> None:
    context = f"{what}: {resp.status_code} {dict(resp.headers)} {resp.text!r} in {elapsed:.2f}s"
    context += log_tail(server)
    assert resp.status_code == 503, context
    body = resp.json()
    assert set(body) == {"statusCode", "errorCode", "errorMessage"}, context
    assert (body["statusCode"], body["errorCode"]) == (503, "SERVICE_UNAVAILABLE"), context
    assert resp.headers.get("Content-Type", "").startswith("application/json"), context
    assert resp.headers.get("Retry-After", "").isdigit(), context
    assert resp.headers.get("X-Content-Type-Options") == "nosniff", context
    assert resp.headers.get("X-Frame-Options"), context
    assert resp.headers.get("Strict-Transport-Security") == "max-age=31536000", context
    assert uuid.UUID(resp.headers["x-amzn-RequestId"]).version == 4, context
    assert elapsed < 2.0, f"503 took {elapsed:.2f}s, more than 2 s. {context}"


def poll_until_ok(server: Gunicorn, request, what: str, timeout: float = 8.0) -> float:
    """Seconds until ``request()`` answers 200 (bounded in time and count)."""
    started = time.monotonic()
    last = "nothing yet"
    for _ in range(200):
        if time.monotonic() - started > timeout:
            break
        try:
            resp = request()
        except requests.RequestException as exc:
            last = repr(exc)
        else:
            if resp.status_code == 200:
                return time.monotonic() - started
            last = f"{resp.status_code} {resp.text[:200]}"
        time.sleep(0.1)
    raise AssertionError(f"{what} did not recover within {timeout}s: {last}" + log_tail(server))


@pytest.mark.redis_server
@pytest.mark.parametrize("outage", ["sigterm", "sigstop"])
def test_redis_outage_gives_fast_503_and_recovers_without_restart(
    servers: Servers, outage: str
) -> None:
    redis_server = servers.redis()
    server = servers.gunicorn({"OPTIN_STORAGE_URL": redis_server.url}, workers=2)
    master, workers = server.proc.pid, wait_for_workers(server, 2, set())
    with requests.Session() as http:
        check_outage_and_recovery(servers, redis_server, server, http, outage, master, workers)


def check_outage_and_recovery(
    servers: Servers,
    storage_server: RedisServer | PostgresServer,
    server: Gunicorn,
    http: requests.Session,
    outage: str,
    master: int,
    workers: list[int],
) -> None:
    base = server.base

    assert_put_ok(server, http, "before-outage", "accepted")
    before = read_state(server, http, "before-outage")
    readyz = http.get(f"{base}/readyz", timeout=TIMEOUT)
    assert readyz.status_code == 200, readyz.text + log_tail(server)

    if outage == "sigterm":
        storage_server.stop()  # refuses connections
    else:
        servers.sigstop(storage_server)  # accepts connections, never answers

    latencies = {}
    requests_during_outage = {
        "PUT": lambda: put(http, base, "during-outage", "declined"),
        "GET": lambda: get(http, base, "before-outage"),
        "readyz": lambda: http.get(f"{base}/readyz", timeout=TIMEOUT),
    }
    for name, request in requests_during_outage.items():
        what = f"{name} during {outage} outage"
        resp, latencies[name] = timed(server, what, request)
        assert_unavailable(server, resp, latencies[name], what)
    healthz = http.get(f"{base}/healthz", timeout=TIMEOUT)
    assert healthz.status_code == 200, healthz.text + log_tail(server)

    if outage == "sigterm":
        storage_server.start()  # same workdir and port
    else:
        servers.sigcont(storage_server)

    recovery = {
        "readyz": poll_until_ok(
            server, lambda: http.get(f"{base}/readyz", timeout=TIMEOUT), "readyz"
        ),
        "PUT": poll_until_ok(server, lambda: put(http, base, "after-outage", "declined"), "PUT"),
        "GET": poll_until_ok(server, lambda: get(http, base, "after-outage"), "GET"),
    }
    measured = (
        f"{outage}: 503 after {_rounded(latencies)} s, 200 again after {_rounded(recovery)} s"
    )
    # Every worker is back: many requests in a row all succeed, and no worker restarted.
    for i in range(8):
        assert_put_ok(server, http, f"after-outage-{i}", STATUSES[i % 2])
        state = read_state(server, http, f"after-outage-{i}")
        assert state["LOYALTY_OPTIN"] == STATUSES[i % 2], f"{measured}: {state}" + log_tail(server)
        readyz = http.get(f"{base}/readyz", timeout=TIMEOUT)
        assert readyz.status_code == 200, f"{measured}: {readyz.text}" + log_tail(server)
    after = read_state(server, http, "before-outage")
    assert after == before, f"{measured}: written before the outage {before}, now {after}" + (
        log_tail(server)
    )
    # A PUT answered 503 may still have reached storage (a hung server reads it on SIGCONT):
    # 503 means "unknown", so either outcome is allowed, but only with the status sent.
    late = get(http, base, "during-outage")
    assert late.status_code == 404 or late.json()["LOYALTY_OPTIN"] == "declined", (
        f"{measured}: {late.status_code} {late.text}" + log_tail(server)
    )
    assert server.proc.pid == master and server.worker_pids() == workers, (
        f"{measured}: workers changed {workers} -> {server.worker_pids()}" + log_tail(server)
    )
    print(f"{measured}; the PUT answered 503 later reads {late.status_code} {late.text}")


@pytest.mark.postgres_server
def test_postgres_outage_gives_fast_503_and_recovers_without_restart(servers: Servers) -> None:
    """pg_ctl stop (fast: clients are disconnected), then start on the same port."""
    postgres = servers.postgres()
    server = servers.gunicorn({"OPTIN_STORAGE_URL": postgres.url()}, workers=2)
    master, workers = server.proc.pid, wait_for_workers(server, 2, set())
    with requests.Session() as http:
        check_outage_and_recovery(servers, postgres, server, http, "sigterm", master, workers)


@pytest.mark.postgres_server
def test_postgres_read_only_answers_writes_503_and_reads_200(servers: Servers) -> None:
    """A server turned read-only (as a standby is): PUT and /readyz answer 503 fast, GET
    still answers; writable again, it all answers 200 without a worker restart."""
    postgres = servers.postgres()
    server = servers.gunicorn({"OPTIN_STORAGE_URL": postgres.url()}, workers=2)
    master, workers = server.proc.pid, wait_for_workers(server, 2, set())
    base = server.base
    with requests.Session() as http:
        assert_put_ok(server, http, "member-ro", "accepted")
        before = read_state(server, http, "member-ro")
        postgres.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        postgres.reload()
        # The server's sessions apply the reload a moment later: until a write fails.
        for _ in range(100):
            if put(http, base, "probe", "accepted").status_code == 503:
                break
            time.sleep(0.05)
        for name, request in {
            "PUT": lambda: put(http, base, "member-ro", "declined"),
            "readyz": lambda: http.get(f"{base}/readyz", timeout=TIMEOUT),
        }.items():
            for _ in range(4):  # both workers, whichever answers
                resp, elapsed = timed(server, f"{name} on a read-only server", request)
                assert_unavailable(server, resp, elapsed, f"{name} on a read-only server")
        for _ in range(4):
            assert read_state(server, http, "member-ro") == before
        postgres.execute("ALTER SYSTEM RESET default_transaction_read_only")
        postgres.reload()
        poll_until_ok(server, lambda: put(http, base, "member-ro", "declined"), "PUT")
        for i in range(6):
            assert_put_ok(server, http, f"after-ro-{i}", STATUSES[i % 2])
            readyz = http.get(f"{base}/readyz", timeout=TIMEOUT)
            assert readyz.status_code == 200, readyz.text + log_tail(server)
        assert read_state(server, http, "member-ro")["LOYALTY_OPTIN"] == "declined"
    assert server.proc.pid == master and server.worker_pids() == workers, log_tail(server)


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in seconds.items()}


@pytest.mark.redis_server
def test_a_hung_rate_limit_redis_costs_little_is_logged_once_and_recovers(
    servers: Servers,
) -> None:
    counters = servers.redis("limits")
    env = {
        "OPTIN_STORAGE_URL": servers.sqlite_url(),
        "OPTIN_RATE_LIMIT": "5/minute",
        "OPTIN_RATE_LIMIT_STORAGE_URL": counters.url,
    }
    server = servers.gunicorn(env, workers=1)
    with requests.Session() as http:

        def put_one() -> requests.Response:
            return put(http, server.base, "limited", "accepted")

        first, _ = timed(server, "PUT counted in Redis", put_one)
        assert first.status_code == 200 and first.headers["X-RateLimit-Remaining"] == "4"
        servers.sigstop(counters)  # accepts connections, never answers
        answers = [timed(server, f"PUT {n} while Redis hangs", put_one) for n in range(7)]
        seen = [(r.status_code, round(seconds, 2)) for r, seconds in answers]
        # A few tenths of a second each (the store's own timeouts), not redis-py's 5 s.
        assert all(seconds < 2.5 for _, seconds in answers), seen
        # Meanwhile the worker counts in memory: the limit still holds, per worker.
        assert [status for status, _ in seen] == [200] * 5 + [429] * 2, seen
        said = [
            json.loads(line)
            for line in server.log().splitlines()
            if line.startswith("{") and '"flask-limiter"' in line
        ]
        failures = [line for line in said if line["level"] != "INFO"]
        assert len(failures) == 1 and "unreachable" in failures[0]["message"], said
        breaches = [line for line in said if "exceeded" in line["message"]]
        assert len(breaches) == 1, said  # two 429s, one line a minute

        servers.sigcont(counters)
        # Back to the shared count in Redis (1 of 5 used): 200s again.
        poll_until_ok(server, put_one, "PUT after Redis returned", timeout=45)
    assert "Rate limit storage recovered" in server.log(), log_tail(server)


# --- 5: four workers on one SQLite file --------------------------------------------


def test_four_workers_hammering_one_sqlite_file(servers: Servers) -> None:
    server = servers.gunicorn({"OPTIN_STORAGE_URL": servers.sqlite_url()}, workers=4)
    base = server.base
    shared = [f"shared-{i}" for i in range(50)]
    lock = threading.Lock()
    attempted: dict[str, set[str]] = {cid: set() for cid in shared}  # before sending
    unique_acked: dict[str, str] = {}
    shared_acked: set[str] = set()
    counts = {"requests": 0, "5xx": 0, "errors": 0}
    problems: list[str] = []
    deadline = time.monotonic() + 30

    def note(problem: str) -> None:
        with lock:
            problems.append(problem)

    def hammer(tid: int) -> None:
        rng = random.Random(tid)
        try:
            with requests.Session() as http:
                for n in range(150):
                    if time.monotonic() > deadline:
                        note(f"thread {tid} ran out of time after {n} operations")
                        return
                    roll = rng.random()
                    status = rng.choice(STATUSES)
                    if roll < 0.4:  # PUT a shared member
                        cid = rng.choice(shared)
                        with lock:
                            attempted[cid].add(status)
                        resp = put(http, base, cid, status)
                        expected = (200,)
                        if resp.status_code == 200:
                            with lock:
                                shared_acked.add(cid)
                    elif roll < 0.7:  # GET a shared member
                        cid = rng.choice(shared)
                        with lock:
                            was_acked = cid in shared_acked
                        resp = get(http, base, cid)
                        expected = (200, 404)
                        # Statuses are noted before their PUT is sent: read the set only
                        # now, after the answer, or a PUT racing this GET looks wrong.
                        with lock:
                            allowed = set(attempted[cid])
                        if resp.status_code == 200 and resp.json()["LOYALTY_OPTIN"] not in allowed:
                            note(f"GET {cid} read {resp.text} but only {allowed} were sent")
                        if resp.status_code == 404 and was_acked:
                            note(f"GET {cid} answered 404 after a PUT on it was acknowledged")
                    else:  # PUT a new member, then read it back (maybe from another worker)
                        cid = f"unique-{tid}-{n}"
                        resp = put(http, base, cid, status)
                        expected = (200,)
                        if resp.status_code == 200:
                            with lock:
                                unique_acked[cid] = status
                            back = get(http, base, cid)
                            with lock:
                                counts["requests"] += 1
                            if back.status_code != 200 or back.json()["LOYALTY_OPTIN"] != status:
                                got = f"{back.status_code} {back.text}"
                                note(f"read-after-write {cid} {status}: {got}")
                    with lock:
                        counts["requests"] += 1
                        if resp.status_code >= 500:
                            counts["5xx"] += 1
                    if resp.status_code not in expected:
                        note(f"{resp.request.method} {cid}: {resp.status_code} {resp.text[:200]}")
        except Exception as exc:
            with lock:
                counts["errors"] += 1
            note(f"thread {tid}: {exc!r}")

    clients = [threading.Thread(target=hammer, args=(tid,), daemon=True) for tid in range(8)]
    started = time.monotonic()
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=60)
    elapsed = time.monotonic() - started
    assert not any(t.is_alive() for t in clients), "client threads did not finish"
    summary = (
        f"{counts['requests']} requests in {elapsed:.1f}s by 8 threads on 4 workers, "
        f"{counts['5xx']} 5xx, {counts['errors']} client errors"
    )
    assert counts["5xx"] == 0 and not problems, f"{summary}\n{problems[:20]}" + log_tail(server)
    gunicorn_log = server.log()
    assert "database is locked" not in gunicorn_log, summary + log_tail(server)
    assert "Traceback" not in gunicorn_log, summary + log_tail(server)

    found = read_all(base, shared + sorted(unique_acked))
    wrong = [
        f"{cid}: read {found[cid]}, sent {attempted[cid]}"
        for cid in shared
        if (found[cid] is None) != (not attempted[cid])
        or (found[cid] is not None and found[cid] not in attempted[cid])
    ]
    wrong += [
        f"{cid}: read {found[cid]}, acked {status}"
        for cid, status in unique_acked.items()
        if found[cid] != status
    ]
    assert not wrong, f"{summary}\n{wrong[:20]}" + log_tail(server)
    print(summary)


# --- the change feed: a reader tailing it while workers write -------------------------


def feed_page(http: requests.Session, base: str, after: str | None, limit: int) -> dict:
    query: dict[str, str | int] = {"limit": limit}
    if after is not None:
        query["after"] = after
    resp = http.get(f"{base}/client/optin/changes", params=query, timeout=TIMEOUT)
    assert resp.status_code == 200, f"GET changes: {resp.status_code} {resp.text[:300]}"
    body = resp.json()
    assert isinstance(body["next"], str), body
    return body


@pytest.mark.parametrize(
    ("backend", "workers"),
    [
        pytest.param("memory", 1, id="memory-1-worker"),
        pytest.param("sqlite", 4, id="sqlite-4-workers"),
        pytest.param("redis", 4, id="redis-4-workers", marks=pytest.mark.redis_server),
        pytest.param("sentinel", 4, id="sentinel-4-workers", marks=pytest.mark.redis_server),
        pytest.param("cluster", 4, id="cluster-4-workers", marks=pytest.mark.redis_server),
        pytest.param("postgres", 4, id="postgres-4-workers", marks=pytest.mark.postgres_server),
    ],
)
def test_a_reader_tailing_the_feed_sees_every_change_once_in_commit_order(
    servers: Servers, request: pytest.FixtureRequest, backend: str, workers: int
) -> None:
    """Several clients PUT concurrently (across 4 workers but on memory) while a reader
    tails the feed in pages of 3: it sees exactly what a full read after the writes sees,
    in the same order (on a Redis Cluster: the same changes, each member's in the same
    order: across its groups, changes are ordered by the masters' clocks, not by commit);
    each member's versions run 1..k; its last change is GET's state. A feed numbered
    before commit would let the tail skip a slower writer's change."""
    if backend == "memory":
        url = "memory://"
    elif backend == "sqlite":
        url = servers.sqlite_url()
    elif backend == "redis":
        url = servers.redis().url
    elif backend == "postgres":  # the session's server, in a schema of this test's own
        url = request.getfixturevalue("postgres_url")
    else:  # the session's Sentinel or Cluster, under a prefix of this test's own
        topology = request.getfixturevalue(f"{backend}_topology")
        url = topology.url(prefix=f"t-{uuid.uuid4().hex[:12]}:")
    server = servers.gunicorn({"OPTIN_STORAGE_URL": url}, workers=workers)
    base = server.base
    members = [f"feed-{i}" for i in range(12)]
    lock = threading.Lock()
    acked: set[str] = set()  # request ids of the PUTs answered 200
    problems: list[str] = []
    writing = threading.Event()
    writing.set()
    tailed: list[dict] = []
    pages_while_writing = 0

    def writer(tid: int) -> None:
        rng = random.Random(tid)
        try:
            with requests.Session() as http:
                for _ in range(40):
                    cid = rng.choice(members)
                    resp = put(http, base, cid, rng.choice(STATUSES))
                    if resp.status_code != 200:
                        raise AssertionError(f"PUT {cid}: {resp.status_code} {resp.text[:200]}")
                    with lock:
                        acked.add(resp.headers["x-amzn-RequestId"])
        except Exception as exc:
            with lock:
                problems.append(f"writer {tid}: {exc!r}")

    def tail() -> None:
        nonlocal pages_while_writing
        after = None
        deadline = time.monotonic() + 90
        try:
            with requests.Session() as http:
                while time.monotonic() < deadline:
                    still_writing = writing.is_set()
                    body = feed_page(http, base, after, 3)
                    tailed.extend(body["items"])
                    after = body["next"]
                    if body["items"] and still_writing:
                        pages_while_writing += 1
                    if not body["items"]:
                        if not still_writing:  # read after the last write was answered
                            return
                        time.sleep(0.005)
                raise AssertionError("the tailing reader ran out of time")
        except Exception as exc:
            with lock:
                problems.append(f"reader: {exc!r}")

    reader = threading.Thread(target=tail, daemon=True)
    writers = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(6)]
    reader.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout=90)
    writing.clear()
    reader.join(timeout=90)
    assert not reader.is_alive() and not any(t.is_alive() for t in writers), "threads hung"
    assert not problems, f"{problems[:10]}" + log_tail(server)

    full: list[dict] = []
    after = None
    with requests.Session() as http:
        for _ in range(1000):
            body = feed_page(http, base, after, 1000)
            if not body["items"]:
                break
            full.extend(body["items"])
            after = body["next"]
        states = {cid: get(http, base, cid) for cid in members}

    summary = (
        f"{len(acked)} PUTs answered 200, {len(full)} changes, the reader got "
        f"{pages_while_writing} non-empty pages while the writes ran"
    )
    if backend == "cluster":
        assert sorted(map(json.dumps, tailed)) == sorted(map(json.dumps, full)), summary
        for cid in members:
            mine = [change for change in tailed if change["correlationId"] == cid]
            assert mine == [change for change in full if change["correlationId"] == cid]
    else:
        assert tailed == full, summary
    ids = [change["requestId"] for change in full]
    assert len(set(ids)) == len(ids), summary
    assert set(ids) <= acked, summary  # no change without an acknowledged PUT
    # A PUT that lost a race to a later-stamped one is no change; most PUTs are.
    assert len(full) > len(acked) // 2, summary
    assert pages_while_writing >= 3, summary  # it did tail while the writers ran
    for cid in members:
        own = [change for change in full if change["correlationId"] == cid]
        assert [c["version"] for c in own] == list(range(1, len(own) + 1)), (cid, own)
        assert [c["previous"] for c in own] == [None] + [c["LOYALTY_OPTIN"] for c in own[:-1]]
        assert [c["updatedAt"] for c in own] == sorted(c["updatedAt"] for c in own), own
        state = states[cid]
        assert state.status_code == 200, (cid, state.text)
        last = own[-1]
        assert state.json() == {
            "LOYALTY_OPTIN": last["LOYALTY_OPTIN"],
            "updatedAt": last["updatedAt"],
        }
    put_pids = {line["pid"] for line in server.access_lines() if line["method"] == "PUT"}
    assert len(put_pids) == workers, f"PUTs answered by {sorted(put_pids)}" + log_tail(server)
    print(summary)


# --- 6, 7: configurations gunicorn must refuse ---------------------------------------


def test_shipped_config_refuses_memory_store_with_several_workers(
    servers: Servers, tmp_path: Path
) -> None:
    refused = make_gunicorn({"OPTIN_STORAGE_URL": "memory://"}, workers=2)
    code, output, elapsed = run_to_exit(refused, tmp_path / "refused.log")
    assert code != 0, output
    assert elapsed < 10, f"took {elapsed:.1f}s to refuse:\n{output}"
    assert re.search(r"memory", output, re.I) and re.search(r"workers", output, re.I), output
    assert "Booting worker" not in output, output
    print(f"memory:// with 2 workers: exit {code} after {elapsed:.2f}s")

    single = servers.gunicorn({"OPTIN_STORAGE_URL": "memory://"}, workers=1)
    with requests.Session() as http:
        assert_put_ok(single, http, "memory-member", "accepted")
        assert read_state(single, http, "memory-member")["LOYALTY_OPTIN"] == "accepted"


def test_preload_without_a_metrics_folder_is_refused_not_served_with_empty_metrics(
    tmp_path: Path,
) -> None:
    """--preload imports prometheus-client in the master before the config can set its
    folder: every worker would count alone and /metrics would answer nothing."""
    refused = make_gunicorn({"OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/optin.db"}, workers=2)
    refused.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    refused.args.insert(-1, "--preload")
    code, output, _ = run_to_exit(refused, tmp_path / "refused.log")
    assert code != 0, output
    assert "PROMETHEUS_MULTIPROC_DIR" in output and "--preload" in output, output
    assert "Booting worker" not in output, output


def test_unknown_storage_scheme_stops_gunicorn_naming_the_choices(tmp_path: Path) -> None:
    refused = make_gunicorn({"OPTIN_STORAGE_URL": "nosuch://x"}, workers=2)
    code, output, elapsed = run_to_exit(refused, tmp_path / "refused.log")
    assert code != 0, output
    assert "nosuch" in output, output
    installed = re.search(r"installed: (.*)", output)
    assert installed, output
    assert "sqlite" in installed.group(1) and "redis" in installed.group(1), output
    assert elapsed < 15, f"took {elapsed:.1f}s to refuse:\n{output}"
    print(f"nosuch://: exit {code} after {elapsed:.2f}s")


# --- 8: the SQLite file: removed under the workers, a missing folder, lock waits -----


def test_sqlite_folder_that_does_not_exist_stops_gunicorn_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    refused = make_gunicorn({"OPTIN_STORAGE_URL": f"sqlite:///{missing}"}, workers=2)
    code, output, elapsed = run_to_exit(refused, tmp_path / "refused.log", timeout=15)
    assert code != 0, output
    assert re.search(rf"^.*{re.escape(str(missing))}.*does not exist.*$", output, re.M), output
    assert not (tmp_path / "nonexistent").exists(), output
    print(f"missing folder: exit {code} after {elapsed:.2f}s")


def open_files(pid: int) -> set[str]:
    """The paths ``pid`` holds open (the targets of ``/proc/<pid>/fd``)."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found.add(os.readlink(fd))
        except OSError:  # closed while we looked
            continue
    return found


def burst(server: Gunicorn, calls: int, request) -> list[tuple[requests.Response, float]]:
    """``request(session, n)`` ``calls`` times from 8 threads at once, so that every
    worker answers some (one client in a row would mostly meet the same worker)."""
    results: list[tuple[requests.Response, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    numbers = iter(range(calls))

    def client() -> None:
        with requests.Session() as http:
            while True:
                with lock:
                    n = next(numbers, None)
                if n is None:
                    return
                started = time.monotonic()
                try:
                    resp = request(http, n)
                except requests.RequestException as exc:
                    with lock:
                        failures.append(repr(exc))
                    return
                with lock:
                    results.append((resp, time.monotonic() - started))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and len(results) == calls, f"{failures[:5]}" + log_tail(server)
    return results


def test_sqlite_folder_removed_under_four_workers_answers_503_and_recreates_nothing(
    servers: Servers, tmp_path: Path
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "optin.db"
    server = servers.gunicorn({"OPTIN_STORAGE_URL": f"sqlite:///{db}"}, workers=4)
    workers = wait_for_workers(server, 4, set())
    # Until every worker holds a connection to the file (each wrote through it): the
    # workers whose write would land in the unlinked file are the ones under test.
    deadline = time.monotonic() + 30
    holding: set[int] = set()
    rounds = 0
    while holding != set(workers):
        assert time.monotonic() < deadline, f"only {holding} of {workers} opened {db}"
        for resp, _ in burst(
            server, 16, lambda http, n: put(http, server.base, f"m-{n}", "accepted")
        ):
            assert resp.status_code == 200, resp.text + log_tail(server)
        holding = {pid for pid in workers if str(db) in open_files(pid)}
        rounds += 1

    shutil.rmtree(folder)
    calls = {
        "PUT": lambda http, n: put(http, server.base, f"after-{n}", "declined"),
        "GET": lambda http, n: get(http, server.base, f"m-{n % 16}"),
        "readyz": lambda http, n: http.get(f"{server.base}/readyz", timeout=TIMEOUT),
    }
    for name, call in calls.items():
        for resp, elapsed in burst(server, 24, call):
            assert_unavailable(server, resp, elapsed, f"{name} once {folder} is gone")
    assert not folder.exists(), "a worker recreated the removed folder" + log_tail(server)
    assert server.worker_pids() == workers, "workers restarted" + log_tail(server)
    print(f"every worker held {db} after {rounds} bursts; then 3 x 24 answers, all 503")


def test_sqlite_lock_wait_beyond_the_worker_timeout_stops_gunicorn(
    servers: Servers, tmp_path: Path
) -> None:
    url = servers.sqlite_url() + "?timeout=40"
    refused = make_gunicorn({"OPTIN_STORAGE_URL": url}, workers=2)
    code, output, elapsed = run_to_exit(refused, tmp_path / "refused.log", timeout=15)
    assert code != 0, output
    # One line says what waits how long, and the worker timeout it exceeds.
    assert re.search(r"^.*\b40(\.0)? s\b.*\b30(\.0)? s\b.*$", output, re.M), output
    print(f"sqlite timeout=40 under a 30 s worker timeout: exit {code} after {elapsed:.2f}s")


def test_a_body_deadline_beyond_half_the_worker_timeout_stops_gunicorn(
    servers: Servers, tmp_path: Path
) -> None:
    """OPTIN_BODY_TIMEOUT_SECONDS=100 was accepted: a stalled body then met gunicorn's
    30 s worker timeout (a killed worker) before its own 408."""
    env = {"OPTIN_STORAGE_URL": servers.sqlite_url(), "OPTIN_BODY_TIMEOUT_SECONDS": "100"}
    refused = make_gunicorn(env, workers=2)
    code, output, elapsed = run_to_exit(refused, tmp_path / "refused.log", timeout=15)
    assert code != 0, output
    assert re.search(r"OPTIN_BODY_TIMEOUT_SECONDS is 100 s\b.*\b30 s\b", output), output
    print(f"OPTIN_BODY_TIMEOUT_SECONDS=100, 30 s worker timeout: exit {code} after {elapsed:.2f}s")
