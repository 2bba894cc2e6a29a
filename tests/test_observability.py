"""Metrics, logs and shutdown: what an operator sees."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from optin_service import create_app, logs
from tests.servers import Gunicorn, ReadmeGunicorn, free_port, until_every_worker_answered
from tests.test_api import FailingStore, put

ROUTE = "/client/users/<correlation_id>/profile/optin"


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_are_counted_by_route_template_method_and_status(client):
    before_ok = sample("optin_http_requests_total", route=ROUTE, method="PUT", status="200")
    before_bad = sample("optin_http_requests_total", route=ROUTE, method="PUT", status="400")
    before_404 = sample("optin_http_requests_total", route="unmatched", method="GET", status="404")
    before_hist = sample("optin_http_request_duration_seconds_count", route=ROUTE, method="PUT")
    for i in range(3):
        put(client, {"LOYALTY_OPTIN": "accepted"}, url=f"/client/users/m{i}/profile/optin")
    put(client, {})
    client.get("/no/such/page")
    assert (
        sample("optin_http_requests_total", route=ROUTE, method="PUT", status="200")
        == before_ok + 3
    )
    assert (
        sample("optin_http_requests_total", route=ROUTE, method="PUT", status="400")
        == before_bad + 1
    )
    assert (
        sample("optin_http_requests_total", route="unmatched", method="GET", status="404")
        == before_404 + 1
    )
    assert (
        sample("optin_http_request_duration_seconds_count", route=ROUTE, method="PUT")
        == before_hist + 4
    )


def test_invented_methods_are_counted_as_other(client):
    """gunicorn accepts any method: each invented one would be new time series."""
    before = sample("optin_http_requests_total", route="unmatched", method="other", status="405")
    for method in ("XYZZY", "FOOBAR"):
        assert client.open("/healthz", method=method).status_code == 405
    after = sample("optin_http_requests_total", route="unmatched", method="other", status="405")
    assert after == before + 2
    assert sample("optin_http_requests_total", route="unmatched", method="XYZZY", status="405") == 0


@pytest.mark.parametrize(("raw", "on"), [("", True), (" ON ", True), ("0", False), ("no", False)])
def test_metrics_switch_words(monkeypatch, raw, on):
    monkeypatch.setenv("OPTIN_METRICS", raw)
    app = create_app({"OPTIN_STORAGE_URL": "memory://"})
    assert app.config["OPTIN_METRICS"] is on


def test_metrics_switch_refuses_a_word_it_does_not_know(monkeypatch):
    monkeypatch.setenv("OPTIN_METRICS", "enabled")  # was silently off (and on in gunicorn.conf.py)
    with pytest.raises(ValueError, match="OPTIN_METRICS must be one of"):
        create_app({"OPTIN_STORAGE_URL": "memory://"})


def test_storage_latency_errors_and_consent_changes(client, app):
    ops = "optin_storage_operation_duration_seconds_count"
    before_set = sample(ops, backend="memory", operation="set")
    declined = sample("optin_consent_changes_total", status="declined")
    headers = {"Idempotency-Key": "metrics-key"}
    put(client, {"LOYALTY_OPTIN": "declined"}, headers=headers)
    put(client, {"LOYALTY_OPTIN": "declined"}, headers=headers)  # a replay changes nothing
    assert sample(ops, backend="memory", operation="set") == before_set + 2
    assert sample("optin_consent_changes_total", status="declined") == declined + 1

    errors = "optin_storage_errors_total"
    from optin_service.storage import StorageUnavailable

    app.extensions["optin"].store = FailingStore(StorageUnavailable("down"))
    before = sample(errors, backend="memory", operation="get", kind="unavailable")
    assert client.get("/client/users/m1/profile/optin").status_code == 503
    assert sample(errors, backend="memory", operation="get", kind="unavailable") == before + 1


def test_metrics_endpoint_and_switch(monkeypatch):
    client = create_app({"OPTIN_STORAGE_URL": "memory://"}).test_client()
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert b"optin_http_requests_total" in response.data
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    monkeypatch.setenv("OPTIN_METRICS", "false")
    off = create_app({"OPTIN_STORAGE_URL": "memory://"}).test_client()
    assert off.get("/metrics").status_code == 404


def test_reading_a_setting_loads_nothing_of_the_app():
    """gunicorn.conf.py reads OPTIN_METRICS in the master before it sets prometheus-client's
    folder; prometheus-client picks one process or many when first imported."""
    code = (
        "import sys, optin_service.defaults; "
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'flask'))))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_once_per_lets_one_record_of_a_kind_through_per_interval_and_counts_the_rest():
    now = [100.0]
    once = logs.OncePer(60, clock=lambda: now[0])
    log = logging.getLogger("flask-limiter")

    def record(msg, level=logging.ERROR):
        return log.makeRecord(log.name, level, __file__, 1, msg, ("x",), None)

    assert once.filter(first := record("Failed to rate limit %s"))
    assert not hasattr(first, "suppressed")
    assert [once.filter(record("Failed to rate limit %s")) for _ in range(3)] == [False] * 3
    assert once.filter(record("Rate limit storage recovered"))  # another kind: its own window
    assert once.filter(record("Failed to rate limit %s", logging.WARNING))  # another level too
    now[0] += 59.9
    assert not once.filter(record("Failed to rate limit %s"))
    now[0] += 0.2
    assert once.filter(later := record("Failed to rate limit %s"))
    assert later.suppressed == 4


def test_the_standalone_service_shows_flask_limiters_records_at_most_once_a_minute():
    app = create_app({"OPTIN_STORAGE_URL": "memory://", "OPTIN_RATE_LIMIT": "5/minute"})
    assert app.extensions["optin"].limiter is not None
    limiter_log = logging.getLogger("flask-limiter")
    service = [h for h in limiter_log.handlers if h.get_name() == "optin_service"]
    assert len(service) == 1  # the service's own handler (stderr), set up by create_app
    stream, handler = capture()
    limiter_log.addHandler(handler)
    message = f"Failed to rate limit ({uuid.uuid4()}). Swallowing error"  # a kind of its own
    try:
        for _ in range(3):
            limiter_log.error(message)
    finally:
        limiter_log.removeHandler(handler)
        logging.getLogger("optin_service").removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["logger"] for line in lines] == ["flask-limiter"], lines


@pytest.mark.parametrize("name", ["psycopg.pool", "psycopg", "backends.postgres.store"])
def test_the_standalone_service_logs_the_storage_side_in_its_format(name):
    """psycopg's pool logs each failed connection attempt, on several lines: they went
    to Python's last-resort handler, as plain text among the JSON lines."""
    create_app({"OPTIN_STORAGE_URL": "memory://", "OPTIN_LOG_FORMAT": "json"})
    logger = logging.getLogger(name)
    text = f"error connecting in 'optin' ({uuid.uuid4()}):\nMultiple connection attempts failed"
    record = logger.makeRecord(name, logging.WARNING, __file__, 1, text, (), None)
    handlers = [h for h in _handlers_of(logger) if h.get_name() == "optin_service"]
    assert len(handlers) == 1
    line = handlers[0].format(record)
    assert "\n" not in line
    assert json.loads(line) | {"time": None} == {
        "level": "WARNING", "logger": name, "message": text, "time": None,
    }  # fmt: skip
    if name.startswith("psycopg"):  # a library: one line of a kind a minute
        assert logger.filter(record)
        assert not logger.filter(logger.makeRecord(name, 30, __file__, 1, text, (), None))
    assert logger.isEnabledFor(logging.WARNING)


def _handlers_of(logger):
    while logger is not None:
        yield from logger.handlers
        logger = logger.parent if logger.propagate else None


def capture(app_log_format="json"):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(app_log_format))
    logging.getLogger("optin_service").addHandler(handler)
    return stream, handler


def test_an_unexpected_store_error_is_a_bare_500_and_one_log_line_with_id_and_trace():
    app = create_app({"OPTIN_STORAGE_URL": "memory://"})
    app.extensions["optin"].store = FailingStore(RuntimeError("secret: db password is hunter2"))
    stream, handler = capture()
    try:
        response = put(app.test_client(), {"LOYALTY_OPTIN": "accepted"})
    finally:
        logging.getLogger("optin_service").removeHandler(handler)
    assert response.status_code == 500
    assert json.loads(response.data) == {
        "statusCode": 500,
        "errorCode": "INTERNAL_ERROR",
        "errorMessage": "Internal error",
    }
    assert b"hunter2" not in response.data and b"Traceback" not in response.data
    rid = response.headers["x-amzn-RequestId"]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    with_trace = [line for line in lines if "trace" in line]
    assert len(with_trace) == 1
    assert with_trace[0]["request_id"] == rid
    assert with_trace[0]["level"] == "ERROR"
    assert "Traceback" in with_trace[0]["trace"] and "hunter2" in with_trace[0]["trace"]
    access = [line for line in lines if line["logger"] == "optin_service.access"]
    assert len(access) == 1
    assert {k: access[0][k] for k in ("request_id", "method", "route", "status", "backend")} == {
        "request_id": rid,
        "method": "PUT",
        "route": ROUTE,
        "status": 500,
        "backend": "memory",
    }
    assert access[0]["pid"] == os.getpid()
    assert isinstance(access[0]["duration_ms"], float) and access[0]["time"]


def test_text_log_format_for_humans():
    app = create_app({"OPTIN_STORAGE_URL": "memory://", "OPTIN_LOG_FORMAT": "text"})
    stream, handler = capture("text")
    try:
        app.test_client().get("/healthz")
    finally:
        logging.getLogger("optin_service").removeHandler(handler)
    line = stream.getvalue().strip().splitlines()[-1]
    assert "GET /healthz 200" in line and "request_id=" in line and "backend=memory" in line
    with pytest.raises(ValueError, match="OPTIN_LOG_FORMAT"):
        create_app({"OPTIN_STORAGE_URL": "memory://", "OPTIN_LOG_FORMAT": "xml"})


# --- under gunicorn -----------------------------------------------------------------


def _metric_total(text: str, name: str, **labels) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def put_until_every_worker_answered(server: Gunicorn) -> int:
    """PUTs until both workers have answered; how many were sent."""

    def put(n: int) -> None:
        response = requests.put(
            f"{server.base}/client/users/w{n}/profile/optin",
            json={"LOYALTY_OPTIN": "accepted"},
            timeout=10,
        )
        assert response.status_code == 200, response.text

    sent = until_every_worker_answered(server, put)
    assert len(server.access_lines()) == sent
    return sent


@pytest.mark.slow
def test_metrics_are_summed_under_the_readmes_command_in_a_clean_environment(tmp_path):
    """``gunicorn wsgi:app`` as a user runs it: shipped config, no test-run environment."""
    gunicorn = ReadmeGunicorn(tmp_path).start(tmp_path / "gunicorn.log")
    try:
        sent = put_until_every_worker_answered(gunicorn)
        response = requests.get(f"{gunicorn.base}/metrics", timeout=10)
    finally:
        gunicorn.stop()
    log = gunicorn.log()
    store = re.search(r"opt-in storage: sqlite:///(\S+)", log)
    assert store and Path(store.group(1)).is_relative_to(tmp_path), log  # never the repo's
    assert response.status_code == 200
    assert _metric_total(response.text, "optin_http_requests_total") == sent, response.text
    put = {"route": ROUTE, "method": "PUT", "status": "200"}
    assert _metric_total(response.text, "optin_http_requests_total", **put) == sent


@pytest.mark.slow
def test_the_master_serves_the_summed_metrics_on_optin_metrics_port(tmp_path):
    port = free_port()
    gunicorn = ReadmeGunicorn(tmp_path, OPTIN_METRICS_PORT=str(port))
    gunicorn.start(tmp_path / "gunicorn.log")
    try:
        sent = put_until_every_worker_answered(gunicorn)
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        gunicorn.stop()
    log = gunicorn.log()
    master = re.search(r"\[(\d+)\] \[INFO\] metrics on http://127\.0\.0\.1:(\d+)/metrics", log)
    assert master and master.group(2) == str(port), log
    assert int(master.group(1)) not in gunicorn.answering_pids()  # the master, not a worker
    assert response.status_code == 200
    put = {"route": ROUTE, "method": "PUT", "status": "200"}
    assert _metric_total(response.text, "optin_http_requests_total", **put) == sent, response.text


@pytest.mark.slow
def test_the_metrics_folder_gunicorn_made_is_removed_on_exit_even_after_a_reload(tmp_path):
    env = {"OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/optin.db", "PROMETHEUS_MULTIPROC_DIR": ""}
    gunicorn = Gunicorn(env, workers=1)
    gunicorn.env.pop("PROMETHEUS_MULTIPROC_DIR")  # so the config makes its own folder
    gunicorn.start(tmp_path / "gunicorn.log")
    try:
        found = re.search(r"metrics of all workers collected in (\S+)", gunicorn.log())
        assert found, gunicorn.log()
        folder = Path(found.group(1))
        old_workers = set(gunicorn.worker_pids())
        gunicorn.proc.send_signal(signal.SIGHUP)  # reloads gunicorn.conf.py, new workers
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if (workers := set(gunicorn.worker_pids())) and not workers & old_workers:
                break
            time.sleep(0.1)
        assert not set(gunicorn.worker_pids()) & old_workers, gunicorn.log()
        assert folder.is_dir()
    finally:
        gunicorn.stop()
    assert not folder.exists(), gunicorn.log()


@pytest.mark.slow
def test_metrics_are_summed_over_two_gunicorn_workers(tmp_path: Path):
    metrics_dir = tmp_path / "metrics"
    env = {
        "OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/optin.db",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    gunicorn = Gunicorn(env, workers=2).start(tmp_path / "gunicorn.log")
    try:
        sent = 120

        def work(offset: int) -> None:
            with requests.Session() as session:
                for i in range(offset, sent, 4):
                    response = session.put(
                        f"{gunicorn.base}/client/users/w{i}/profile/optin",
                        json={"LOYALTY_OPTIN": "accepted"},
                        timeout=5,
                    )
                    assert response.status_code == 200

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        workers = set(gunicorn.worker_pids())
        assert len(workers) == 2 and gunicorn.answering_pids() == workers, gunicorn.log()
        text = requests.get(f"{gunicorn.base}/metrics", timeout=5).text
        labels = {"route": ROUTE, "method": "PUT", "status": "200"}
        assert _metric_total(text, "optin_http_requests_total", **labels) == sent
        assert _metric_total(text, "optin_consent_changes_total", status="accepted") == sent
        count = _metric_total(
            text,
            "optin_storage_operation_duration_seconds_count",
            backend="sqlite",
            operation="set",
        )
        assert count == sent
    finally:
        gunicorn.stop()


@pytest.mark.slow
def test_sigterm_lets_an_in_flight_request_finish_and_closes_stores(tmp_path: Path):
    env = {"OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/optin.db", "SLOW_SECONDS": "1.5"}
    gunicorn = Gunicorn(env, workers=1, app="tests.slow_app:app").start(tmp_path / "g.log")
    assert requests.get(f"{gunicorn.base}/healthz", timeout=10).status_code == 200  # booted
    result = {}

    def slow_put() -> None:
        response = requests.put(
            f"{gunicorn.base}/client/users/slow-1/profile/optin",
            json={"LOYALTY_OPTIN": "declined"},
            timeout=10,
        )
        result["status"] = response.status_code

    thread = threading.Thread(target=slow_put)
    thread.start()
    time.sleep(0.5)  # the PUT is inside the store now
    gunicorn.proc.send_signal(signal.SIGTERM)
    thread.join(15)
    code = gunicorn.stop()
    log = gunicorn.log()
    assert result.get("status") == 200, log
    assert code == 0, log
    assert "closed its store" in log
    from backends.sqlite import SQLiteStore

    store = SQLiteStore.from_url(f"sqlite:///{tmp_path}/optin.db")
    assert store.get("slow-1").status == "declined"
    store.close()


@pytest.mark.slow
def test_gunicorn_workers_write_one_json_access_line_per_request(tmp_path: Path):
    env = {"OPTIN_STORAGE_URL": f"sqlite:///{tmp_path}/optin.db"}
    gunicorn = Gunicorn(env, workers=2).start(tmp_path / "g.log")
    try:
        ids = []
        for n in range(6):
            response = requests.put(
                f"{gunicorn.base}/client/users/m-{n}/profile/optin",
                json={"LOYALTY_OPTIN": "declined"},
                timeout=10,
            )
            assert response.status_code == 200
            ids.append(response.headers["x-amzn-RequestId"])
    finally:
        gunicorn.stop()
    access = [
        json.loads(line)
        for line in gunicorn.log().splitlines()
        if line.startswith("{") and '"optin_service.access"' in line
    ]
    assert [line["request_id"] for line in access if line["method"] == "PUT"] == ids
    assert all(list(line)[-1] == "time" and line["status"] == 200 for line in access)
