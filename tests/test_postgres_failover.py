"""PostgreSQL failover through gunicorn: a primary and a streaming standby on loopback,
the service (2 workers) on a multi-host URL with ``target_session_attrs=read-write``.

Writers PUT without pause, each write retried with its Idempotency-Key after a 503
or a lost connection; the primary is killed (SIGKILL to all its processes) and the
standby promoted (``pg_ctl promote``). With ``synchronous_standby_names`` naming the
standby, no acknowledged write may be missing on the promoted server, even when the
replication stalled for a few seconds before the crash; without it, the acknowledged
writes lost are counted and printed (that is the figure docs/postgres.md quotes),
not asserted. Each test starts its own servers and stops them in a ``finally``.
"""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
import requests

from tests.failover import WriteLoad, gunicorn_log_tail, wait_ready
from tests.servers import Gunicorn, PostgresServer
from tests.topologies import PostgresReplication, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres_server]

#: The service's deadline for a statement (a COMMIT's wait for the standby included):
#: a write stuck waiting for the standby is answered 503 after about 2.5 s.
STATEMENT_TIMEOUT_MS = 2000
#: The longest the service may take to answer (StoreContract.max_wait is about 4.7 s
#: here), and so the client's timeout: a slow 503 is seen as a 503.
REQUEST_TIMEOUT = 10.0
STALL = 3.0  # seconds replication is stalled before the primary dies
MAX_RESUME = 10.0  # seconds from the promotion to the first acknowledged write, at most
FAULTS = {
    "crash": "primary killed",
    "stall-then-crash": f"replication stalled {STALL:.0f} s, then the primary killed",
    "freeze": "primary hung",
}


def _stored(server: PostgresServer) -> dict[str, str]:
    """Every member's status on ``server``, read directly (not through the service)."""
    with psycopg.connect(server.url(), autocommit=True, connect_timeout=5) as conn:
        return dict(conn.execute("SELECT correlation_id, status FROM optin").fetchall())


def _url(pair: PostgresReplication) -> str:
    return pair.url(statement_timeout_ms=str(STATEMENT_TIMEOUT_MS))


@pytest.mark.parametrize(
    ("synchronous", "fault"),
    [
        pytest.param("primary", "crash", id="sync-crash"),
        pytest.param("primary", "stall-then-crash", id="sync-stalled-replication-then-crash"),
        pytest.param("primary", "freeze", id="sync-hung-primary"),
        pytest.param("off", "crash", id="async-crash"),
        pytest.param("off", "stall-then-crash", id="async-stalled-replication-then-crash"),
    ],
)
def test_writes_through_gunicorn_survive_a_failover_to_the_standby(
    tmp_path, record_property, synchronous, fault
):
    """``crash``: SIGKILL to every process of the primary. ``stall-then-crash``: the
    replication stalled (:meth:`~tests.topologies.PostgresReplication.stall`) for
    ``STALL`` s first. ``freeze``: the primary hangs instead of dying (its sockets stay
    open: the service's connections to it answer nothing until cut at their deadline)."""
    stall = fault == "stall-then-crash"
    pair = PostgresReplication(synchronous)
    server: Gunicorn | None = None
    load: WriteLoad | None = None
    try:
        pair.start()
        env = {"OPTIN_STORAGE_URL": _url(pair), "GUNICORN_CMD_ARGS": ""}
        server = Gunicorn(env, workers=2).start(tmp_path / "gunicorn.log")
        wait_ready(server)

        load = WriteLoad(server.base, timeout=REQUEST_TIMEOUT).start()
        started = time.monotonic()
        wait_until("writes flowing", lambda: load.acks_after(started) >= 20, timeout=10)
        time.sleep(1.0)

        stalled_at = None
        if stall:
            pair.stall()  # the standby receives and acknowledges nothing from here
            stalled_at = time.monotonic()
            time.sleep(STALL)
        fault_at = time.monotonic()
        if fault == "freeze":
            pair.freeze_primary()
        else:
            pair.crash()
            pair.resume()
        pair.standby.promote()
        promoted_at = time.monotonic()
        wait_until(
            "writes acknowledged after the promotion",
            lambda: load.acks_after(promoted_at) >= 20,
            timeout=MAX_RESUME + 5,
            every=0.05,
        )
        time.sleep(1.0)
        load.stop()
        ended = time.monotonic()

        resumed = min(t for t in load.ack_times if t > promoted_at) - promoted_at
        gap, gap_start = load.longest_gap(started, ended)
        stored = _stored(pair.standby)
        lost = sorted(cid for cid, status in load.acked.items() if stored.get(cid) != status)
        # Acknowledged while replication was stalled (from a moment after it stalled:
        # answers to writes the standby acknowledged just before may be on their way).
        during_stall = (
            sorted(cid for cid, t in load.acked_at.items() if stalled_at + 0.5 < t < fault_at)
            if stalled_at is not None
            else []
        )
        applied_503 = sum(1 for cid, status in load.given_up.items() if stored.get(cid) == status)

        summary = (
            f"{'synchronous' if synchronous != 'off' else 'asynchronous'}, "
            f"{FAULTS[fault]}: "
            f"{len(load.acked)} writes acknowledged, {len(lost)} lost, "
            f"{len(during_stall)} acknowledged while replication was stalled; "
            f"longest gap without an ack {gap:.2f}s (from {gap_start - fault_at:+.2f}s "
            f"after the fault); writes resumed {resumed:.2f}s after the promotion "
            f"(promoted {promoted_at - fault_at:.2f}s after the fault); "
            f"answers {dict(load.answers)}; {len(load.given_up)} given up ({applied_503} applied)"
        )
        print(summary)
        record_property("failover", summary)
        record_property("lost_acknowledged_writes", len(lost))
        context = f"{summary}{gunicorn_log_tail(server)}\n{pair.logs()}"

        assert not load.unexpected, f"{load.unexpected[:10]}\n{context}"
        assert len(load.acked) >= 100, f"too little load to mean anything: {context}"
        assert resumed < MAX_RESUME, context
        assert not load.given_up, context
        if synchronous != "off":
            assert not during_stall, (
                f"answered 200 without the standby: {during_stall[:20]}\n{context}"
            )
            assert not lost, f"acknowledged, then lost in the failover: {lost[:20]}\n{context}"
    finally:
        if load is not None:
            load.stopping.set()
        if server is not None:
            server.stop()
        pair.cleanup()


def test_a_promoted_standby_still_naming_a_synchronous_standby_answers_503_in_time(tmp_path):
    """The standby inherited ``synchronous_standby_names`` (set on the primary before it
    was copied): promoted, every commit waits for a standby that does not exist. Each
    PUT is answered 503 at the service's deadline, not held until gunicorn's 30 s worker
    timeout, and /readyz says 503; once the operator resets the setting, the client's
    retry with its Idempotency-Key is answered 200 and the write is stored once."""
    pair = PostgresReplication("both")
    server: Gunicorn | None = None
    try:
        pair.start()
        env = {"OPTIN_STORAGE_URL": _url(pair), "GUNICORN_CMD_ARGS": ""}
        server = Gunicorn(env, workers=2).start(tmp_path / "gunicorn.log")
        wait_ready(server)
        base = server.base
        with requests.Session() as http:

            def put(cid: str, key: str) -> tuple[requests.Response, float]:
                started = time.monotonic()
                resp = http.put(
                    f"{base}/client/users/{cid}/profile/optin",
                    json={"LOYALTY_OPTIN": "accepted"},
                    headers={"Idempotency-Key": key},
                    timeout=REQUEST_TIMEOUT,
                )
                return resp, time.monotonic() - started

            assert put("before", uuid.uuid4().hex)[0].status_code == 200, gunicorn_log_tail(server)
            pair.crash()
            pair.standby.promote()

            keys = {f"after-{i}": uuid.uuid4().hex for i in range(4)}
            answers = [(cid, *put(cid, key)) for cid, key in keys.items()]
            readyz = http.get(f"{base}/readyz", timeout=REQUEST_TIMEOUT)
            timings = [(cid, r.status_code, round(t, 2)) for cid, r, t in answers]
            context = f"{timings}{gunicorn_log_tail(server)}\n{pair.logs()}"
            for _cid, resp, elapsed in answers:
                assert resp.status_code == 503, context
                body = resp.json()
                assert (body["statusCode"], body["errorCode"]) == (503, "SERVICE_UNAVAILABLE")
                assert resp.headers.get("Retry-After", "").isdigit(), context
                assert elapsed < STATEMENT_TIMEOUT_MS / 1000 + 2.5, context
            # The first request of each worker may meet its connection to the dead
            # primary (a fast 503); the others reached the promoted server and waited.
            waited = [t for _cid, _r, t in answers if t >= STATEMENT_TIMEOUT_MS / 1000]
            assert waited, context
            assert "may not have reached a synchronous standby" in server.log(), context
            assert readyz.status_code == 503, f"/readyz: {readyz.status_code}\n{context}"
            print(f"PUTs to a promoted server still naming a standby: {timings}")

            pair.standby.execute("ALTER SYSTEM RESET synchronous_standby_names")
            pair.standby.reload()
            for cid, key in keys.items():
                resp, _ = wait_until(
                    f"PUT {cid} answered 200 after the reset",
                    lambda cid=cid, key=key: (r := put(cid, key))[0].status_code == 200 and r,
                    timeout=10,
                    every=0.1,
                )
                assert resp.json() == {"message": "Opt-in updated."}, context
            assert http.get(f"{base}/readyz", timeout=REQUEST_TIMEOUT).status_code == 200
        stored = _stored(pair.standby)
        assert {cid: stored.get(cid) for cid in keys} == dict.fromkeys(keys, "accepted")
        with psycopg.connect(pair.standby.url(), autocommit=True) as conn:
            events = conn.execute(
                "SELECT correlation_id, count(*) FROM optin_event "
                "WHERE correlation_id LIKE 'after-%' GROUP BY 1"
            ).fetchall()
        assert dict(events) == dict.fromkeys(keys, 1), context
    finally:
        if server is not None:
            server.stop()
        pair.cleanup()
