"""The webhook deliverer against a real HTTP receiver on loopback that verifies
every signature with the ``standardwebhooks`` library.

These run deliverers in threads of this process on the memory store (a
deliverer's lease, position and retries all go through the store, so several
deliverers in threads share them exactly as processes share a file or a server);
``test_webhooks_processes.py`` runs ``optin webhooks run`` as real processes.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from backends.memory import MemoryStore
from optin_service.feed import Change
from optin_service.storage import OptInRecord, OptInStore, StorageUnavailable
from optin_service.webhooks import Deliverer, WebhookSettings, change_data, state, webhook_id
from optin_service.webhooks.config import parse_schedule, parse_secret, parse_timeout
from optin_service.webhooks.message import Sender
from tests.receiver import SECRET, Receiver, Request
from tests.servers import LOOPBACK, ROOT, free_port

#: Tiny waits before each retry: four attempts in a fraction of a second.
SCHEDULE = (0.05, 0.05, 0.05)
DATA_KEYS = [
    "correlationId",
    "LOYALTY_OPTIN",
    "previous",
    "updatedAt",
    "requestId",
    "source",
    "client",
    "version",
]


# --- helpers ---------------------------------------------------------------------------


def settings(url: str, schedule: tuple[float, ...] = SCHEDULE, timeout: float = 2.0):
    return WebhookSettings(url, parse_secret(SECRET), timeout, schedule)


def deliverer(store: OptInStore, url: str, **options: Any) -> Deliverer:
    schedule = options.pop("schedule", SCHEDULE)
    timeout = options.pop("timeout", 2.0)
    options.setdefault("lease_seconds", 2.0)
    options.setdefault("poll_seconds", 0.05)
    return Deliverer(store, settings(url, schedule, timeout), **options)


@contextlib.contextmanager
def running(*deliverers: Deliverer) -> Iterator[list[threading.Thread]]:
    """Run each deliverer in a thread; stop and join them all at the end."""
    threads = [threading.Thread(target=d.run, daemon=True) for d in deliverers]
    for thread in threads:
        thread.start()
    try:
        yield threads
    finally:
        for d in deliverers:
            d.stop()
        for thread in threads:
            thread.join(15)
            assert not thread.is_alive(), "a deliverer did not stop"


def write(store: OptInStore, count: int, members: int = 3, prefix: str = "m") -> None:
    """``count`` answers from ``members`` members, alternating (repeats included)."""
    for i in range(count):
        status = "accepted" if (i // members) % 2 == 0 else "declined"
        store.set(OptInRecord.now(f"{prefix}{i % members}", status, f"req-{prefix}-{i}"))


def feed(store: OptInStore) -> list[Change]:
    changes: list[Change] = []
    after = None
    while (page := store.changes(after, 1000)).changes:
        changes.extend(page.changes)
        after = page.next
    return changes


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def ids(requests: list[Request]) -> list[str]:
    return [r.msg_id for r in requests]


def quiet_for(receiver: Receiver, seconds: float) -> int:
    """How many requests arrive in ``seconds`` from now (the deliverer should be idle)."""
    before = len(receiver.requests)
    time.sleep(seconds)
    return len(receiver.requests) - before


def delivered(d: Deliverer, outcome: str = "delivered") -> float:
    return sample(d, "optin_webhook_deliveries_total", outcome=outcome)


def sample(d: Deliverer, name: str, **labels: str) -> float | None:
    return d.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def webhook_app(app):
    """The app (memory store) configured for webhooks; its CLI drives the deliverer."""
    app.config.update(OPTIN_WEBHOOK_SECRET=SECRET, OPTIN_WEBHOOK_RETRY_SCHEDULE="0.05")
    return app


def cli(app, *args: str, code: int = 0) -> str:
    result = app.test_cli_runner().invoke(args=["optin", "webhooks", *args])
    assert result.exit_code == code, result.output
    return result.output


def status(app) -> dict[str, Any]:
    output = cli(app, "status", "--json")
    return json.loads(output[output.index("{") :])


# --- delivery ----------------------------------------------------------------------------


def test_every_change_delivered_in_order_signed_with_stable_ids(store):
    write(store, 30)
    with Receiver() as receiver, running(deliverer(store, receiver.url)):
        receiver.wait_accepted(30)
        store.set(OptInRecord.now("late", "accepted", "req-late"))  # while it runs
        got = receiver.wait_accepted(31)
    changes = feed(store)
    assert len(changes) == 31
    assert ids(got) == [webhook_id(c) for c in changes]
    assert len(set(ids(got))) == 31
    assert all(r.verified for r in got)
    assert {r.content_type for r in got} == {"application/json"}
    now = time.time()
    assert all(abs(r.timestamp - now) < 60 for r in got)
    for request, change in zip(got, changes, strict=True):
        data = change_data(change)
        assert request.body == {
            "type": "optin.changed",
            "timestamp": data["updatedAt"],
            "data": data,
        }
        assert list(request.body["data"]) == DATA_KEYS
    # A member's repeats carry its count and what they replaced.
    m0 = [r.body["data"] for r in got if r.body["data"]["correlationId"] == "m0"]
    assert [d["version"] for d in m0] == list(range(1, len(m0) + 1))
    assert m0[0]["previous"] is None and m0[1]["previous"] == m0[0]["LOYALTY_OPTIN"]
    assert store.load_state(state.POSITION) == changes[-1].cursor


def test_refused_attempts_are_retried_in_order_with_the_same_id(store):
    write(store, 5)
    with Receiver(lambda r: 500 if r.attempt <= 2 else 204) as receiver:
        d = deliverer(store, receiver.url)
        with running(d):
            receiver.wait_accepted(5)
    expected = [webhook_id(c) for c in feed(store)]
    # Three attempts of each change, one change after another: never interleaved.
    assert ids(receiver.requests) == [i for i in expected for _ in range(3)]
    assert [r.status for r in receiver.requests] == [500, 500, 204] * 5
    assert all(r.verified for r in receiver.requests)
    assert (delivered(d), delivered(d, "retried"), delivered(d, "failed")) == (5, 10, 0)
    assert store.load_state(state.RETRY) is None


def test_a_change_whose_retries_run_out_is_marked_failed_and_delivery_moves_on(webhook_app):
    store = webhook_app.extensions["optin"].store
    for member in ("a", "bad", "c"):
        store.set(OptInRecord.now(member, "accepted", f"req-{member}"))
    refuse = lambda r: 503 if r.body["data"]["correlationId"] == "bad" else 200  # noqa: E731
    with Receiver(refuse) as receiver:
        d = deliverer(store, receiver.url, schedule=(0.02, 0.02))
        with running(d):
            receiver.wait_accepted(2)
    first, bad = feed(store)[:2]
    assert [(r.body["data"]["correlationId"], r.status) for r in receiver.requests] == [
        ("a", 200),
        ("bad", 503),
        ("bad", 503),
        ("bad", 503),
        ("c", 200),
    ]
    report = status(webhook_app)
    assert [
        (f["webhookId"], f["cursor"], f["position"], f["attempts"], f["lastError"])
        for f in report["failed"]
    ] == [(webhook_id(bad), bad.cursor, first.cursor, 3, "HTTP 503")]
    assert report["waiting"] == 0 and report["retrying"] is None
    assert delivered(d, "failed") == 1 and delivered(d, "retried") == 2
    text = cli(webhook_app, "status")
    assert "failed: 1" in text and f"replay --after {first.cursor}" in text


def test_a_timeout_is_retried_and_the_change_arrives(store):
    store.set(OptInRecord.now("slow", "accepted", "req-slow"))
    # The first attempt is answered after the deliverer gave up: it is sent again.
    with Receiver(delay=lambda r: 1.0 if r.attempt == 1 else 0.0) as receiver:
        d = deliverer(store, receiver.url, timeout=0.3)
        with running(d):
            receiver.wait(lambda requests: len(requests) >= 2)
    assert ids(receiver.requests) == [webhook_id(feed(store)[0])] * 2
    assert delivered(d, "retried") == 1 and delivered(d) == 1


def test_sender_failures_timeout_refused_and_redirects_not_followed():
    body, msg_id = b'{"type":"optin.changed"}', "msg_x"
    refused = Sender(settings(f"http://{LOOPBACK}:{free_port()}/hook")).send(msg_id, body)
    assert (refused.status, refused.error, refused.delivered) == (None, "connection refused", False)
    with Receiver(lambda r: 302) as receiver:
        moved = Sender(settings(receiver.url)).send(msg_id, body)
        time.sleep(0.2)
    assert (moved.status, moved.delivered, moved.gone) == (302, False, False)
    assert "redirects are not followed" in moved.error
    assert [r.path for r in receiver.requests] == ["/hook"]  # nothing sent to /elsewhere
    with Receiver(delay=lambda r: 1.0) as receiver:
        slow = Sender(settings(receiver.url, timeout=0.2)).send(msg_id, body)
    assert (slow.status, slow.error) == (None, "timed out")


# --- 410, replay, start ------------------------------------------------------------------


def test_410_disables_durably_and_enable_resumes_from_that_change(webhook_app):
    store = webhook_app.extensions["optin"].store
    write(store, 4, members=4)
    changes = feed(store)
    gone = {"on": True}
    answer = lambda r: 410 if gone["on"] and r.msg_id == webhook_id(changes[1]) else 204  # noqa: E731
    with Receiver(answer) as receiver:
        first = deliverer(store, receiver.url)
        with running(first) as threads:
            receiver.wait(lambda requests: len(requests) >= 2)
            assert quiet_for(receiver, 0.5) == 0  # nothing more is sent
            assert threads[0].is_alive()  # and the deliverer stays up
            assert sample(first, "optin_webhook_disabled") == 1
            assert delivered(first, "disabled") == 1
        report = status(webhook_app)
        assert report["disabled"]["webhookId"] == webhook_id(changes[1])
        assert report["waiting"] == 3 and report["position"] == changes[0].cursor
        assert "DISABLED" in cli(webhook_app, "status")
        # Durable: a deliverer started later sends nothing either.
        with running(deliverer(store, receiver.url)):
            assert quiet_for(receiver, 0.5) == 0
            gone["on"] = False
            assert "resumes with " + webhook_id(changes[1]) in cli(webhook_app, "enable")
            receiver.wait_accepted(4)
    assert ids(receiver.requests) == [
        webhook_id(c) for c in (changes[0], *changes[1:2] * 2, *changes[2:])
    ]
    assert [r.status for r in receiver.requests] == [204, 410, 204, 204, 204]
    assert status(webhook_app)["disabled"] is None
    assert "not disabled" in cli(webhook_app, "enable")


def test_replay_after_sends_again_with_the_same_ids(webhook_app):
    store = webhook_app.extensions["optin"].store
    write(store, 5)
    changes = feed(store)
    expected = [webhook_id(c) for c in changes]
    with Receiver() as receiver, running(deliverer(store, receiver.url)):
        receiver.wait_accepted(5)
        assert "replays from after" in cli(webhook_app, "replay", "--after", changes[1].cursor)
        receiver.wait_accepted(8)
        cli(webhook_app, "replay", "--from-start")
        got = receiver.wait_accepted(13)
    assert ids(got) == expected + expected[2:] + expected
    assert [r.body for r in got[5:8]] == [r.body for r in got[2:5]]  # the same bytes' content
    assert store.load_state(state.POSITION) == changes[-1].cursor


def test_replay_refuses_a_cursor_it_cannot_use_and_changes_nothing(webhook_app):
    store = webhook_app.extensions["optin"].store
    write(store, 2)
    store.save_state(state.POSITION, "kept")
    assert "not one this service gave out" in cli(webhook_app, "replay", "--after", "%%%", code=2)
    assert "exactly one of" in cli(webhook_app, "replay", code=2)
    assert store.load_state(state.POSITION) == "kept"


def test_a_replay_during_a_delivery_is_followed_not_overwritten(store):
    write(store, 5, members=5)
    changes = feed(store)
    replayed = threading.Event()

    def delay(request: Request) -> float:
        # While the third change is in flight, an operator replays from the first.
        if request.msg_id == webhook_id(changes[2]) and not replayed.is_set():
            replayed.set()
            state.move_position(store, changes[0].cursor)
        return 0.0

    with Receiver(delay=delay) as receiver, running(deliverer(store, receiver.url)):
        receiver.wait_accepted(7)
        assert quiet_for(receiver, 0.3) == 0
    expected = [webhook_id(c) for c in changes]
    assert ids(receiver.requests) == expected[:3] + expected[1:]
    assert store.load_state(state.POSITION) == changes[-1].cursor


def test_start_now_skips_what_is_already_there(store):
    write(store, 3)
    with Receiver() as receiver, running(deliverer(store, receiver.url, start="now")):
        time.sleep(0.3)
        store.set(OptInRecord.now("new", "declined", "req-new"))
        got = receiver.wait_accepted(1)
        assert quiet_for(receiver, 0.3) == 0
    assert ids(got) == [webhook_id(feed(store)[-1])]


def test_a_position_expired_by_a_rebuild_stops_delivery_until_replay(webhook_app):
    store = webhook_app.extensions["optin"].store
    write(store, 3)
    with Receiver() as receiver:
        d = deliverer(store, receiver.url)
        with running(d):
            receiver.wait_accepted(3)
            store.rebuild_changes()  # every cursor expires; nothing is skipped silently
            store.set(OptInRecord.now("after", "accepted", "req-after"))
            assert quiet_for(receiver, 0.4) == 0
            assert sample(d, "optin_webhook_position_expired") == 1
            assert "position unusable" in cli(webhook_app, "status")
            cli(webhook_app, "replay", "--from-start")
            receiver.wait_accepted(3 + len(feed(store)))
        assert sample(d, "optin_webhook_position_expired") == 0


# --- leases, crashes ------------------------------------------------------------------------


def test_two_deliverers_one_delivers_the_other_takes_over(store):
    with Receiver() as receiver:
        a = deliverer(store, receiver.url, holder="a", lease_seconds=1.0)
        b = deliverer(store, receiver.url, holder="b", lease_seconds=1.0)
        threads = {d: threading.Thread(target=d.run, daemon=True) for d in (a, b)}
        for thread in threads.values():
            thread.start()
        write(store, 10)
        receiver.wait_accepted(10)
        holder, standby = (a, b) if a.lease.held else (b, a)
        until(lambda: delivered(holder) == 10)  # counted once the answer is read
        assert delivered(standby) == 0
        assert not standby.lease.held
        # The holder dies without giving its lease up (as kill -9 would).
        holder.lease.release = lambda: None  # type: ignore[method-assign]
        holder.stop()
        threads[holder].join(10)
        died = time.monotonic()
        write(store, 10, prefix="n")
        got = receiver.wait_accepted(20, timeout=10)
        took = time.monotonic() - died
        standby.stop()
        threads[standby].join(10)
    assert ids(got) == [webhook_id(c) for c in feed(store)]
    assert delivered(standby) == 10
    assert took < 1.25 * 1.0 + 2.0  # the lease's TTL, a quarter of it, and slack


def test_a_crash_between_the_2xx_and_the_saved_position_loses_nothing(store):
    write(store, 6)
    saves = {"n": 0}
    real_save = store.save_state

    class Crash(BaseException):
        pass

    def dying_save(key: str, value: str | None, **kwargs: Any) -> bool:
        if key == state.POSITION and value != state.FROM_START:
            saves["n"] += 1
            if saves["n"] == 3:  # the third change was delivered; the process dies now
                raise Crash
        return real_save(key, value, **kwargs)

    def run_until_crash(d: Deliverer) -> None:
        with contextlib.suppress(Crash):
            d.run()

    with Receiver() as receiver:
        first = deliverer(store, receiver.url)
        store.save_state = dying_save  # type: ignore[method-assign]
        thread = threading.Thread(target=run_until_crash, args=(first,), daemon=True)
        thread.start()
        thread.join(10)
        store.save_state = real_save  # type: ignore[method-assign]
        assert len(receiver.requests) == 3
        with running(deliverer(store, receiver.url)):
            got = receiver.wait_accepted(7)
    expected = [webhook_id(c) for c in feed(store)]
    assert ids(got) == expected[:3] + expected[2:]  # only the change in flight, twice


def test_a_retry_schedule_outlives_its_deliverer(webhook_app):
    store = webhook_app.extensions["optin"].store
    store.set(OptInRecord.now("x", "accepted", "req-x"))
    with Receiver(lambda r: 500) as receiver:
        with running(deliverer(store, receiver.url, schedule=(0.05, 3600))):
            receiver.wait(lambda requests: len(requests) >= 2)
            time.sleep(0.1)
        with running(deliverer(store, receiver.url, schedule=(0.05, 3600))):
            assert quiet_for(receiver, 0.5) == 0  # its next attempt is an hour away
        retry = status(webhook_app)["retrying"]
    assert retry["attempts"] == 2 and retry["lastError"] == "HTTP 500"
    assert 3500 < retry["nextAttempt"] - time.time() <= 3600
    assert "retrying: " + webhook_id(feed(store)[0]) in cli(webhook_app, "status")


# --- metrics, settings ----------------------------------------------------------------------


def test_metrics_show_the_backlog_and_outcomes(store):
    write(store, 4, members=4)
    port = free_port()
    changes = feed(store)
    answer = lambda r: 410 if r.msg_id == webhook_id(changes[1]) else 204  # noqa: E731
    with Receiver(answer) as receiver:
        d = deliverer(store, receiver.url)
        d.metrics.serve(port, LOOPBACK)
        with running(d):
            receiver.wait(lambda requests: len(requests) >= 2)
            time.sleep(0.3)
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("optin_webhook")
    }
    assert samples["optin_webhook_changes_waiting"] == 3
    assert samples["optin_webhook_oldest_undelivered_age_seconds"] > 0
    assert samples['optin_webhook_deliveries_total{outcome="delivered"}'] == 1
    assert samples['optin_webhook_deliveries_total{outcome="disabled"}'] == 1
    assert samples['optin_webhook_deliveries_total{outcome="failed"}'] == 0
    assert samples["optin_webhook_disabled"] == 1
    assert samples["optin_webhook_lease_held"] == 1


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [
        ("", "is not set"),
        ("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=", "must start with whsec_"),
        ("whsec_MDEyMzQ1Njc4OWFi$2RlZjAxMjM0NTY3ODlhYmNkZWY=", "standard base64"),
        ("whsec_MDEyMzQ1Njc4OWFi-2RlZjAxMjM0NTY3ODlhYmNkZWY=", "standard base64"),
        ("whsec_c2hvcnQ=", "decodes to 5 bytes"),
    ],
)
def test_a_malformed_secret_is_refused_at_start_without_showing_it(webhook_app, secret, complaint):
    webhook_app.config.update(
        OPTIN_WEBHOOK_URL="http://127.0.0.1:9/hook", OPTIN_WEBHOOK_SECRET=secret
    )
    output = cli(webhook_app, "run", code=1)
    assert complaint in output
    if secret:
        assert secret not in output and secret[6:] not in output


def test_settings_are_checked():
    assert parse_secret(SECRET) == b"0123456789abcdef0123456789abcdef"
    assert parse_secret(SECRET.rstrip("=")) == parse_secret(SECRET)  # unpadded is fine
    shown = repr(settings("http://x/"))
    assert SECRET[6:16] not in shown and "0123456789" not in shown
    assert parse_schedule("5, 300,1800") == (5.0, 300.0, 1800.0)
    assert parse_schedule("") == ()
    for bad in ("5,soon", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="OPTIN_WEBHOOK_RETRY_SCHEDULE"):
            parse_schedule(bad)
    for bad in ("0", "-3", "x"):
        with pytest.raises(ValueError, match="OPTIN_WEBHOOK_TIMEOUT_SECONDS"):
            parse_timeout(bad)
    with pytest.raises(ValueError, match="OPTIN_WEBHOOK_URL must be"):
        WebhookSettings.from_config(
            {"OPTIN_WEBHOOK_URL": "ftp://x/", "OPTIN_WEBHOOK_SECRET": SECRET}
        )


def test_the_default_schedule_is_the_standard_webhooks_one():
    from optin_service import defaults

    assert parse_schedule(defaults.OPTIN_WEBHOOK_RETRY_SCHEDULE) == (
        5, 300, 1800, 7200, 18000, 36000, 36000,
    )  # fmt: skip
    assert defaults.OPTIN_WEBHOOK_TIMEOUT_SECONDS == 15


def test_the_documented_receiver_verifies_and_takes_the_deliveries(store):
    """docs/webhooks.md's receiver, as written, behind a real server on loopback."""
    from werkzeug.serving import make_server

    doc = (ROOT / "docs" / "webhooks.md").read_text()
    section = doc[doc.index("A receiver in Flask:") :]
    code = section[section.index("```python\n") + 10 :]
    code = code[: code.index("```")].replace('"whsec_..."', repr(SECRET))
    saved: list[tuple[str, dict]] = []
    namespace: dict[str, Any] = {
        "__name__": "readme_receiver",
        "save_once": lambda msg_id, data: saved.append((msg_id, data)),
    }
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)
    server = make_server(LOOPBACK, 0, namespace["app"], threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        write(store, 3)
        url = f"http://{LOOPBACK}:{server.server_port}/optin-hook"
        with running(deliverer(store, url)):
            until(lambda: len(saved) == 3)
        forged = Sender(settings(url)).headers("msg_forged", b"{}")
        request = urllib.request.Request(url, b'{"x":1}', forged, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
    finally:
        server.shutdown()
    assert saved == [(webhook_id(c), change_data(c)) for c in feed(store)]
    assert refused.value.code == 400  # a body that is not what was signed


def test_a_large_backlog_is_counted_over_several_rounds(store, monkeypatch):
    from optin_service.webhooks import deliverer as module

    monkeypatch.setattr(module, "LAG_READ", 2000)
    monkeypatch.setattr(module, "LAG_SECONDS", 0.0)
    write(store, 4500, members=50)
    changes = feed(store)
    lag = module._Lag()
    counts = []
    for _ in range(4):
        lag.refresh(store, state.FROM_START)
        counts.append(lag.ahead)
    assert counts == [2000, 4000, 4500, 4500]
    assert lag.head == changes[0].event.updated_at.timestamp()
    lag.advanced(changes[0].cursor)  # the deliverer's own step: no recount
    lag.refresh(store, changes[0].cursor)
    assert lag.ahead == 4499 and lag.head is not None
    lag.refresh(store, changes[9].cursor)  # moved by someone else (replay): counted again
    assert lag.ahead == 2000


def test_a_store_outage_is_waited_out_and_logged_once(store, caplog):
    write(store, 3)
    real, down = store.changes, {"on": True}

    def changes(after: str | None, limit: int):
        if down["on"]:
            raise StorageUnavailable("the store is down")
        return real(after, limit)

    store.changes = changes  # type: ignore[method-assign]
    with Receiver() as receiver, running(deliverer(store, receiver.url)):
        assert quiet_for(receiver, 0.5) == 0  # about ten polls, each failing
        down["on"] = False
        receiver.wait_accepted(3)
    failures = [r for r in caplog.records if "storage failed" in r.getMessage()]
    assert len(failures) == 1 and "the store is down" in failures[0].getMessage()
