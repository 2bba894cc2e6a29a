"""The ``optin`` command line as a user runs it.

Most tests go through Flask's CLI runner on an app per backend (memory, sqlite,
fakeredis through a test URL scheme, a real redis-server); a few run the
installed console script and ``python -m flask`` as real subprocesses.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import threading
import tracemalloc
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fakeredis
import pytest
from flask import Flask

from backends.redis import RedisStore
from optin_service import create_app
from optin_service.registry import redact, register, unregister
from optin_service.storage import OptInRecord, OptInStore
from tests.servers import ROOT, free_port

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
BIN = Path(sys.executable).parent
FAKE_SCHEME = "fakeredis-cli"
LINE_KEYS = ["correlationId", "LOYALTY_OPTIN", "updatedAt", "requestId", "source", "client"]
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
IMPORTED = re.compile(
    r"imported (\d+) events: (\d+) new, (\d+) already present; (\d+) lines failed"
)
COPIED = re.compile(
    r"copied (\d+) events \((\d+) new\) to (\S+) in [\d.]+ s \([\d,]+ events/s\); "
    r"target holds (\d+) events"
)
REDIS = (pytest.mark.redis_server, pytest.mark.slow)
POSTGRES = (pytest.mark.postgres_server, pytest.mark.slow)
SERVER_MARKS = {"redis": REDIS, "postgres": POSTGRES}
BAR = re.compile(r"\[[#-]+\]|\d+%|\r|\x1b\[")  # click's progress bar, or a redraw


# --- backends ----------------------------------------------------------------------

_FAKE_SERVERS: dict[str, fakeredis.FakeServer] = {}


class FakeRedisStore(RedisStore):
    """``fakeredis-cli://<name>``: the Redis backend on an in-process FakeServer per name."""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FakeRedisStore:
        server = _FAKE_SERVERS.setdefault(urlsplit(url).netloc, fakeredis.FakeServer())
        return cls(fakeredis.FakeRedis(server=server), owns_client=True, **options)


@dataclass
class Ran:
    """A command's outcome, once the line naming its store was checked and cut from stderr."""

    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


@dataclass
class Backend:
    """An app on one storage URL, its store, and its CLI."""

    kind: str
    url: str
    app: Flask = field(repr=False)

    @property
    def store(self) -> OptInStore:
        return self.app.extensions["optin"].store

    def optin(self, *args: str, input: str | bytes | None = None) -> Ran:
        """Run ``optin ARGS``; every command first names its store on stderr (no password)."""
        result = self.app.test_cli_runner().invoke(args=["optin", *args], input=input)
        store_line, _, rest = result.stderr.partition("\n")
        assert store_line == f"opt-in storage: {redact(self.url)}", result.stderr
        assert "opt-in storage" not in result.stdout
        return Ran(result.exit_code, result.stdout, rest, result.exception)


def kinds(*names: str) -> list:
    return [pytest.param(n, id=n, marks=SERVER_MARKS.get(n, ())) for n in names]


def pairs(*items: tuple[str, str]) -> list:
    return [
        pytest.param(
            s, t, id=f"{s}-to-{t}", marks=(*SERVER_MARKS.get(s, ()), *SERVER_MARKS.get(t, ()))
        )
        for s, t in items
    ]


ALL = ("memory", "sqlite", "fakeredis", "redis", "postgres")


@pytest.fixture
def make_backend(request, tmp_path) -> Iterable[Callable[[str], Backend]]:
    """Builds apps on fresh, empty stores; closes them and removes their Redis keys."""
    made: list[Backend] = []
    schemas: list[str] = []  # PostgreSQL: one per store

    def make(kind: str) -> Backend:
        name = f"{kind}{len(made)}"
        if kind == "memory":
            url = "memory://"
        elif kind == "sqlite":
            url = f"sqlite:///{tmp_path / name}.db"
        elif kind == "fakeredis":
            register(FAKE_SCHEME, FakeRedisStore)
            url = f"{FAKE_SCHEME}://{name}-{uuid.uuid4().hex}"
        elif kind == "redis":
            server = request.getfixturevalue("redis_server")
            url = f"{server.url}?prefix=cli-{uuid.uuid4().hex}:"
        elif kind == "postgres":
            server = request.getfixturevalue("postgres_server")
            schema = f"cli_{uuid.uuid4().hex[:12]}"
            server.execute(f"CREATE SCHEMA {schema}")
            schemas.append(schema)
            url = server.url(options=f"-c search_path={schema}")
        else:
            raise ValueError(kind)
        backend = Backend(kind, url, create_app({"TESTING": True, "OPTIN_STORAGE_URL": url}))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        store = backend.store
        if backend.kind == "redis":
            keys = list(store.client.scan_iter(match=f"{store.prefix}*"))
            if keys:
                store.client.delete(*keys)
        store.close()
    for schema in schemas:
        request.getfixturevalue("postgres_server").execute(f"DROP SCHEMA {schema} CASCADE")
    unregister(FAKE_SCHEME)
    _FAKE_SERVERS.clear()


# --- events and lines --------------------------------------------------------------


def event(
    cid: str, status: str, seconds: float, rid: str = "", source: str = "BULK", client: str = ""
) -> OptInRecord:
    moment = T0 + timedelta(seconds=seconds)
    return OptInRecord(cid, status, moment, rid or f"{cid}/{seconds}/{status}", source, client)


def line(record: OptInRecord) -> str:
    """An export line, written out by hand rather than by the code under test."""
    return json.dumps(
        {
            "correlationId": record.correlation_id,
            "LOYALTY_OPTIN": record.status,
            "updatedAt": record.updated_at.astimezone(timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            ),
            "requestId": record.request_id,
            "source": record.source,
            "client": record.client,
        },
        separators=(",", ":"),
    )


def jsonl(records: Iterable[OptInRecord]) -> str:
    return "".join(line(r) + "\n" for r in records)


def sample(bulk_members: int = 100) -> list[OptInRecord]:
    """Events with tricky ids and request ids, out of order, ties, and a bulk part.

    Events of one member at the same microsecond always differ in status here
    (declined wins such a tie), so the current state is a function of the events
    whatever order they are stored in.
    """
    events: list[OptInRecord] = []
    ids = ["member-1", "a:b", "@", "...", "x" * 128, "M.2@example.org:x_y-z", "-"]
    for n, cid in enumerate(ids):
        events += [
            event(cid, "accepted", n + 0.000001, f"req-{n}-a", "WEB", "crm: batch #7"),
            event(cid, "declined", 3600 + n, f"req:{n}:b", "CLI", "app-1"),
            event(cid, "accepted", -30 * 86400, f"{{req}}~{n}!", "legacy_import"),
        ]
    events += [event("tie", "declined", 0, "t-2", "A"), event("tie", "accepted", 0, "t-1", "B")]
    events += [event("tie2", "accepted", 0, "z", "A"), event("tie2", "declined", 0, "a", "B")]
    events += [
        event("prefix", status, 5, rid, "S")
        for status, rid in [("accepted", "r1"), ("declined", "r1x"), ("accepted", "r1!")]
    ]
    for i in range(bulk_members):
        events += [
            event(f"bulk-{i}", "accepted", i),
            event(f"bulk-{i}", "declined" if i % 3 else "accepted", i + 0.5),
        ]
    return events


def members(records: Iterable[OptInRecord]) -> set[str]:
    return {r.correlation_id for r in records}


def check(result, code: int = 0):
    """The runner's result, after asserting its exit code (showing everything if wrong)."""
    detail = (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.exit_code == code, detail
    if result.exception is not None:  # an exit code from sys.exit, never a crash
        assert isinstance(result.exception, SystemExit), detail
    return result


def summary(result, pattern: re.Pattern[str]) -> tuple[str, ...]:
    """The one summary line on stderr: nothing else there (no progress bar when piped)."""
    assert not BAR.search(result.stderr), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    match = pattern.fullmatch(lines[0])
    assert match, lines[0]
    return match.groups()


def same_members(source: OptInStore, target: OptInStore, cids: Iterable[str]) -> None:
    for cid in cids:
        assert target.history(cid, 100) == source.history(cid, 100), cid
        assert target.get(cid) == source.get(cid), cid


# --- set and get -------------------------------------------------------------------


def test_set_prints_the_current_state_and_get_prints_it_again(make_backend):
    backend = make_backend("sqlite")
    before = datetime.now(timezone.utc)
    out = check(backend.optin("set", "member-1", "accepted")).stdout
    assert out.endswith("\n") and out.count("\n") == 1
    data = json.loads(out)
    assert list(data) == LINE_KEYS
    assert data["correlationId"] == "member-1"
    assert data["LOYALTY_OPTIN"] == "accepted"
    assert data["source"] == "CLI"
    assert TIME.fullmatch(data["updatedAt"])
    moment = datetime.fromisoformat(data["updatedAt"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= moment <= datetime.now(timezone.utc)
    assert str(uuid.UUID(data["requestId"])) == data["requestId"]

    assert check(backend.optin("get", "member-1")).stdout == out

    out2 = check(backend.optin("set", "member-1", "declined", "--source", "call-centre_2")).stdout
    data2 = json.loads(out2)
    assert (data2["LOYALTY_OPTIN"], data2["source"]) == ("declined", "call-centre_2")
    assert data2["requestId"] != data["requestId"]
    assert check(backend.optin("get", "member-1")).stdout == out2
    history = backend.store.history("member-1", 10)
    assert [(e.status, e.source) for e in history] == [
        ("declined", "call-centre_2"),
        ("accepted", "CLI"),
    ]


def test_get_of_an_unknown_member_fails_with_a_clear_message(make_backend):
    result = check(make_backend("memory").optin("get", "nobody"), 1)
    assert result.stdout == ""
    assert "no opt-in recorded for nobody" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["get", "has space"], "not a valid correlation id"),
        (["get", "x" * 129], "not a valid correlation id"),
        (["get", "caf\u00e9"], "not a valid correlation id"),
        (["set", "a/b", "accepted"], "not a valid correlation id"),
        (["set", "..", "accepted"], "not a valid correlation id"),
        (["get", "."], "not a valid correlation id"),
        (["set", "m", "maybe"], "'maybe' is not one of 'accepted', 'declined'"),
        (["set", "m", "ACCEPTED"], "is not one of"),
        (["set", "m"], "Missing argument"),
        (["set", "m", "accepted", "--source", "two words"], "not a valid source"),
        (["set", "m", "accepted", "--source", "x" * 33], "not a valid source"),
        (["set", "m", "accepted", "--source", ""], "not a valid source"),
        (["export", "--since", "yesterday"], "not an ISO 8601 time"),
        (["export", "--since", "2026-13-01T00:00:00Z"], "not an ISO 8601 time"),
        (["export", "--since", "0001-01-01"], "must be between 1684-07-28"),
        (["export", "--since", "9999-01-01T00:00:00Z"], "must be between"),
        (["export", "--since", "2026-01-01T00:00:00.0000015Z"], "more than six fractional"),
        (["export", "-o", "/nonexistent-dir/out.jsonl"], "out.jsonl"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40],
)
def test_invalid_arguments_are_rejected_before_anything_is_stored(make_backend, args, message):
    backend = make_backend("memory")
    result = check(backend.optin(*args), 2)
    assert message in result.stderr
    assert result.stdout == ""
    assert backend.store.count_events() == 0


@pytest.mark.parametrize(
    "args", [["get", "m"], ["set", "m", "accepted"], ["export"], ["import", "-"]]
)
def test_storage_down_ends_a_command_with_one_error_line(args):
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": url})
    runner = app.test_cli_runner()
    result = check(runner.invoke(args=["optin", *args], input=line(sample()[0]) + "\n"), 1)
    # The store it tried (its password hidden), then the error.
    named, error = result.stderr.splitlines()
    assert named == f"opt-in storage: redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}", named
    assert error.startswith("Error: storage: redis: "), result.stderr
    # An import says what a failure halfway leaves, and how to complete it.
    assert ("run the command again to complete it" in error) == (args[0] == "import")
    assert "s3cret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


# --- db upgrade --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres_server
def test_db_upgrade_creates_the_schema_then_finds_it_up_to_date(make_backend):
    from backends.postgres.schema import VERSION

    backend = make_backend("postgres")
    result = check(backend.optin("db", "upgrade"))
    assert result.stderr == f"schema upgraded from version 0 to {VERSION}\n"
    result = check(backend.optin("db", "upgrade"))
    assert result.stderr == f"schema version {VERSION}: up to date\n"
    check(backend.optin("set", "member-1", "accepted"))


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_db_upgrade_on_a_store_without_a_schema_does_nothing(make_backend, kind):
    result = check(make_backend(kind).optin("db", "upgrade"))
    assert result.stderr.endswith("has no schema to upgrade\n"), result.stderr


@pytest.mark.slow  # a second's wait for a connection
def test_db_upgrade_with_storage_down_ends_with_one_error_line():
    url = f"postgresql://127.0.0.1:{free_port()}/optin"
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": url})
    result = check(app.test_cli_runner().invoke(args=["optin", "db", "upgrade"]), 1)
    named, error = result.stderr.splitlines()
    assert named == f"opt-in storage: {url}", named
    assert error.startswith("Error: storage: postgresql: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    app.extensions["optin"].store.close()


# --- export ------------------------------------------------------------------------


def test_export_that_fails_leaves_the_previous_file_as_it_was(tmp_path):
    out = tmp_path / "backup.jsonl"
    out.write_text("THE LAST GOOD EXPORT\n")
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": f"redis://127.0.0.1:{free_port()}/0"})
    check(app.test_cli_runner().invoke(args=["optin", "export", "-o", str(out)]), 1)
    assert out.read_text() == "THE LAST GOOD EXPORT\n"
    assert [p.name for p in tmp_path.iterdir()] == ["backup.jsonl"]  # no temporary file left


def test_export_with_no_events_leaves_an_empty_file(make_backend, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("STALE LINE FROM AN EARLIER EXPORT\n")
    result = check(make_backend("sqlite").optin("export", "-o", str(out)))
    assert result.stderr == "exported 0 events\n"
    assert out.read_text() == ""


def test_export_to_stdout_and_to_a_file(make_backend, tmp_path):
    backend = make_backend("sqlite")
    events = sample()
    backend.store.import_events(events)
    expected = {line(e) for e in events}

    result = check(backend.optin("export"))
    lines = result.stdout.splitlines()
    assert len(lines) == len(events) and set(lines) == expected
    assert result.stderr == f"exported {len(events)} events\n"

    out = tmp_path / "out.jsonl"
    result = check(backend.optin("export", "-o", str(out)))
    assert result.stdout == ""
    assert result.stderr == f"exported {len(events)} events\n"
    text = out.read_text()
    assert text.endswith("\n") and sorted(text.splitlines()) == sorted(lines)


def test_export_creates_a_new_file_readable_by_its_owner_only(make_backend, tmp_path):
    backend = make_backend("sqlite")
    backend.store.import_events(sample(0))
    out = tmp_path / "new.jsonl"
    previous = os.umask(0o022)  # a common umask, which would leave the copy world-readable
    try:
        check(backend.optin("export", "-o", str(out)))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    kept = tmp_path / "kept.jsonl"
    kept.write_text("OLD\n")
    kept.chmod(0o640)
    check(backend.optin("export", "-o", str(kept)))
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() != "OLD\n"


def _read_fifo_in_background(fifo: Path) -> Callable[[], str]:
    """Read ``fifo`` to its end in a thread (a FIFO opens for writing once a reader opens it)."""
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()), daemon=True)
    reader.start()

    def result() -> str:
        reader.join(10)
        if reader.is_alive():  # nobody wrote: a writer that opens and closes frees the reader
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            reader.join(10)
        assert read and read[0], "nothing written to the FIFO"
        return read[0]

    return result


@pytest.mark.parametrize("through_a_link", [False, True], ids=["fifo", "link-to-fifo"])
def test_export_writes_through_a_fifo(make_backend, tmp_path, through_a_link):
    backend = make_backend("sqlite")
    events = sample(0)
    backend.store.import_events(events)
    folder = tmp_path / "out"
    folder.mkdir()
    fifo = folder / "pipe"
    os.mkfifo(fifo, 0o600)
    target = fifo
    if through_a_link:
        target = folder / "link"
        target.symlink_to(fifo)
    result = _read_fifo_in_background(fifo)
    check(backend.optin("export", "-o", str(target)))
    assert sorted(result().splitlines()) == sorted(line(e) for e in events)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and stat.S_IMODE(fifo.stat().st_mode) == 0o600
    assert target.is_symlink() == through_a_link
    assert sorted(p.name for p in folder.iterdir()) == sorted({"pipe", target.name})


def test_export_to_dev_null_leaves_the_device_alone(make_backend):
    backend = make_backend("sqlite")
    backend.store.import_events(sample(0))
    before = os.stat("/dev/null")
    result = check(backend.optin("export", "-o", "/dev/null"))
    assert result.stderr == f"exported {len(sample(0))} events\n"
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_mode == before.st_mode
    assert after.st_rdev == before.st_rdev and after.st_ino == before.st_ino


@pytest.mark.parametrize("dangling", [False, True], ids=["link-to-file", "dangling-link"])
def test_export_refuses_a_symlink_to_a_regular_file_and_changes_nothing(
    make_backend, tmp_path, dangling
):
    backend = make_backend("sqlite")
    backend.store.import_events(sample(0))
    folder = tmp_path / "out"
    folder.mkdir()
    real = folder / "real.jsonl"
    if not dangling:
        real.write_text("THE LAST GOOD EXPORT\n")
    link = folder / "latest.jsonl"
    link.symlink_to(real)
    result = check(backend.optin("export", "-o", str(link)), 2)
    assert "symbolic link" in result.stderr and "latest.jsonl" in result.stderr, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.exists() != dangling
    if not dangling:
        assert real.read_text() == "THE LAST GOOD EXPORT\n"
    left = sorted(p.name for p in folder.iterdir())
    assert left == (["latest.jsonl"] if dangling else ["latest.jsonl", "real.jsonl"])


@pytest.mark.parametrize("kind", kinds(*ALL))
def test_export_since_keeps_events_at_or_after_the_time(make_backend, kind):
    backend = make_backend(kind)
    at_2pm = 2 * 3600
    events = [
        event("a", "accepted", at_2pm - 0.000001),  # one microsecond before
        event("a", "declined", at_2pm),  # exactly at --since: kept
        event("b", "accepted", at_2pm + 0.000001),
        event("b", "declined", 86400),
        event("c", "accepted", -86400),
    ]
    backend.store.import_events(events)
    wanted = {line(e) for e in events[1:4]}
    for since in (
        "2026-03-01T14:00:00Z",
        "2026-03-01T14:00:00.000000Z",
        "2026-03-01T15:00:00+01:00",
        "2026-03-01T14:00:00",  # no zone: UTC
    ):
        result = check(backend.optin("export", "--since", since))
        assert set(result.stdout.splitlines()) == wanted, since
        assert result.stderr == "exported 3 events\n"
    result = check(backend.optin("export", "--since", "2030-01-01T00:00:00Z"))
    assert (result.stdout, result.stderr) == ("", "exported 0 events\n")


def test_export_of_20000_events_is_streamed(make_backend, tmp_path):
    backend = make_backend("sqlite")
    store = backend.store
    total = 20_000
    for start in range(0, total, 5000):
        store.import_events(event(f"m{i}", "accepted", i) for i in range(start, start + 5000))

    result = check(backend.optin("export"))
    assert result.stdout.count("\n") == total
    assert result.stderr == f"exported {total} events\n"

    def peak(*args: str) -> int:
        out = tmp_path / "out.jsonl"
        tracemalloc.start()
        try:
            check(backend.optin("export", "-o", str(out), *args))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert out.read_text().count("\n") == (total if not args else 2000)

    small = peak("--since", (T0 + timedelta(seconds=total - 2000)).isoformat())
    large = peak()
    # 18,000 more lines held in memory would be several MB; streaming stays flat.
    assert large < small + 512 * 1024, (small, large)


# --- import ------------------------------------------------------------------------


def test_import_a_file_and_from_stdin(make_backend, tmp_path):
    backend = make_backend("sqlite")
    first, second = sample(10), [event("stdin-1", "accepted", 1), event("stdin-2", "declined", 2)]
    path = tmp_path / "events.jsonl"
    path.write_text(jsonl(first))

    result = check(backend.optin("import", str(path)))
    assert summary(result, IMPORTED) == (str(len(first)), str(len(first)), "0", "0")
    assert result.stdout == ""

    result = check(backend.optin("import", "-", input=jsonl(second)))
    assert summary(result, IMPORTED) == ("2", "2", "0", "0")
    assert set(backend.store.events()) == set(first) | set(second)
    assert backend.store.get("stdin-2") == second[1]


def test_import_reports_an_over_long_line_without_holding_it(make_backend, tmp_path):
    """A line over MAX_LINE_BYTES is reported and skipped, read past in pieces: a 50 MB
    line was held whole, and /dev/zero (one endless line) grew the process by 1 GB/s."""
    from optin_service.cli.transfer import MAX_LINE_BYTES

    backend = make_backend("memory")
    before, after = event("before", "accepted", 1), event("after", "declined", 2)
    path = tmp_path / "events.jsonl"
    with open(path, "w") as out:
        out.write(jsonl([before]))
        out.write('{"correlationId":"huge","x":"' + "x" * (3 * MAX_LINE_BYTES) + '"}\n')
        out.write(jsonl([after]))
        out.write("y" * (MAX_LINE_BYTES + 1))  # the last line, without its newline
    result = check(backend.optin("import", str(path)), 1)
    assert result.stderr.splitlines() == [
        f"line 2: longer than {MAX_LINE_BYTES} bytes",
        f"line 4: longer than {MAX_LINE_BYTES} bytes",
        "imported 2 events: 2 new, 0 already present; 2 lines failed",
    ]
    assert set(backend.store.events()) == {before, after}


def test_an_export_the_disk_cannot_take_is_one_error_line(make_backend):
    backend = make_backend("memory")
    check(backend.optin("set", "m", "accepted"))
    result = check(backend.optin("export", "-o", "/dev/full"), 1)
    assert (
        result.stderr.splitlines()[-1] == "Error: cannot write /dev/full: No space left on device"
    )
    assert "Traceback" not in result.stderr


def test_import_applies_zones_and_defaults_the_source(make_backend):
    backend = make_backend("memory")
    text = (
        '{"correlationId":"z","LOYALTY_OPTIN":"accepted",'
        '"updatedAt":"2026-03-01T14:00:00.5+02:00","requestId":"r-1"}\n'
    )
    check(backend.optin("import", "-", input=text))
    record = backend.store.get("z")
    assert record == OptInRecord("z", "accepted", T0 + timedelta(seconds=0.5), "r-1", "API")
    out = check(backend.optin("export")).stdout
    assert json.loads(out)["updatedAt"] == "2026-03-01T12:00:00.500000Z"


@pytest.mark.parametrize("kind", kinds(*ALL))
def test_importing_the_same_file_twice_adds_nothing_the_second_time(make_backend, kind, tmp_path):
    backend = make_backend(kind)
    events = sample(50)
    path = tmp_path / "events.jsonl"
    path.write_text(jsonl(events))
    n = str(len(events))

    assert summary(check(backend.optin("import", str(path))), IMPORTED) == (n, n, "0", "0")
    stored = set(backend.store.events())
    assert stored == set(events)
    states = {cid: backend.store.get(cid) for cid in members(events)}

    assert summary(check(backend.optin("import", str(path))), IMPORTED) == (n, "0", n, "0")
    assert set(backend.store.events()) == stored
    assert backend.store.count_events() == len(events)
    assert {cid: backend.store.get(cid) for cid in members(events)} == states


@pytest.mark.parametrize("kind", kinds(*ALL))
def test_an_older_event_imported_later_goes_into_history_only(make_backend, kind):
    backend = make_backend(kind)
    newer = event("m", "declined", 60, "newer", "WEB")
    older = event("m", "accepted", 0, "older", "LEGACY")
    # Newer first in one file, then older; and across two imports.
    check(backend.optin("import", "-", input=jsonl([newer, older])))
    assert backend.store.get("m") == newer
    assert backend.store.history("m", 10) == [newer, older]

    newer2 = event("n", "accepted", 60, "newer", "WEB")
    older2 = event("n", "declined", 0, "older", "LEGACY")
    check(backend.optin("import", "-", input=jsonl([newer2])))
    result = check(backend.optin("import", "-", input=jsonl([older2])))
    assert summary(result, IMPORTED) == ("1", "1", "0", "0")
    assert backend.store.get("n") == newer2
    assert backend.store.history("n", 10) == [newer2, older2]

    # At exactly the same time declined wins, whichever comes first.
    for cid, order in (("t1", ("accepted", "declined")), ("t2", ("declined", "accepted"))):
        check(backend.optin("import", "-", input=jsonl(event(cid, s, 30) for s in order)))
        assert backend.store.get(cid).status == "declined", cid
    assert json.loads(check(backend.optin("get", "m")).stdout)["requestId"] == "newer"


def test_a_malformed_file_reports_each_bad_line_and_stores_the_good_ones(make_backend, tmp_path):
    backend = make_backend("sqlite")
    good = [event("good-1", "accepted", 1), event("good-9", "declined", 9)]
    good13 = event("good-13", "accepted", 13, "r13", "X")

    def bad(cid: str, **change: object) -> str:
        data = json.loads(line(event(cid, "accepted", 0)))
        data.update(change)
        return json.dumps({k: v for k, v in data.items() if v is not None})

    lines = {
        1: line(good[0]),
        2: '{"correlationId": "bad-2", "LOYALTY_OPTIN": ',
        3: bad("bad-3", LOYALTY_OPTIN="maybe"),
        4: bad("bad-4", updatedAt="2026-03-01T12:00:00"),
        5: bad("bad 5"),
        6: bad("bad-6", extra="field"),
        7: bad("bad-7", requestId=None),
        8: "",
        9: line(good[1]),
        10: line(event("bad-10", "accepted", 0))[:-1] + ',"LOYALTY_OPTIN":"declined"}',
        11: bad("bad-11").replace('"BULK"', "NaN"),
        12: "[]",
        13: line(good13).replace("12:00:13.000000Z", "14:00:13+02:00"),
        14: bad("bad-14", source="not valid"),
        15: bad("bad-15", updatedAt="tomorrow"),
    }
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines[n] for n in sorted(lines)) + "\n")

    result = check(backend.optin("import", str(path)), 1)
    *reports, last = result.stderr.splitlines()
    bad_lines = [2, 3, 4, 5, 6, 7, 10, 11, 12, 14, 15]
    assert IMPORTED.fullmatch(last).groups() == ("3", "3", "0", str(len(bad_lines))), last
    assert [int(re.match(r"line (\d+): ", r).group(1)) for r in reports] == bad_lines, reports
    said = dict(zip(bad_lines, reports, strict=True))
    assert "not valid JSON" in said[2]
    assert "LOYALTY_OPTIN" in said[3]
    assert "updatedAt" in said[4] and "time zone" in said[4]
    assert "correlationId" in said[5]
    assert "extra" in said[6]
    assert "requestId" in said[7]
    assert "Duplicate key" in said[10] and "LOYALTY_OPTIN" in said[10]
    assert "NaN" in said[11]
    assert "object" in said[12]
    assert "source" in said[14]
    assert "updatedAt" in said[15]

    assert set(backend.store.events()) == {*good, good13}
    assert backend.store.count_events() == 3
    for n in bad_lines:
        assert backend.store.get(f"bad-{n}") is None


def test_import_errors_quote_a_huge_value_or_key_cut_short(make_backend, tmp_path):
    """A bad line's messages name the field and quote the value, never megabytes of it."""
    backend = make_backend("sqlite")
    huge = "x" * 30_000  # lines stay under MAX_LINE_BYTES: a longer one is not parsed

    def bad(**change: object) -> str:
        data = json.loads(line(event("bad", "accepted", 0)))
        data.update(change)
        return json.dumps(data)

    lines = [
        bad(correlationId=huge),  # the value
        bad(source=huge),
        bad(requestId=huge),
        bad(client=huge),
        bad(**{huge: 1}),  # an unknown key: the field's name is the huge part
        line(event("bad", "accepted", 0))[:-1] + f',"{huge}":1,"{huge}":2}}',  # duplicate
    ]
    path = tmp_path / "huge.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = check(backend.optin("import", str(path)), 1)
    *reports, last = result.stderr.splitlines()
    assert IMPORTED.fullmatch(last).groups() == ("0", "0", "0", str(len(lines))), last
    for report, name in zip(
        reports,
        ["correlationId", "source", "requestId", "client", "xxxxxxxx", "Duplicate key"],
        strict=True,
    ):
        assert len(report) < 300 and name in report, report[:300]
        assert "(30000 characters)" in report, report
    assert backend.store.count_events() == 0


def test_a_line_that_is_not_utf8_is_reported_like_any_bad_line(make_backend, tmp_path):
    backend = make_backend("sqlite")
    good = [event("good-1", "accepted", 1), event("good-3", "declined", 3)]
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        line(good[0]).encode() + b"\n"
        b'{"correlationId":"caf\xe9","LOYALTY_OPTIN":"accepted"}\n' + line(good[1]).encode() + b"\n"
    )
    result = check(backend.optin("import", str(path)), 1)
    assert re.search(r"^line 2: ", result.stderr, re.M), result.stderr
    assert IMPORTED.search(result.stderr).groups() == ("2", "2", "0", "1")
    assert set(backend.store.events()) == set(good)


@pytest.mark.parametrize("kind", kinds(*ALL))
def test_an_event_already_stored_is_skipped_even_if_its_other_fields_differ(make_backend, kind):
    """The same event is the same member, time and request id (OptInStore.import_events)."""
    backend = make_backend(kind)
    original = event("m", "accepted", 0, "r1", "WEB")
    check(backend.optin("import", "-", input=jsonl([original])))

    same_event = event("m", "declined", 0, "r1", "OTHER")
    result = check(backend.optin("import", "-", input=jsonl([same_event])))
    assert summary(result, IMPORTED) == ("1", "0", "1", "0")
    assert backend.store.history("m", 10) == [original]
    assert backend.store.get("m") == original

    later = event("m", "accepted", 10, "r1", "WEB")  # a request id reused at another time
    result = check(backend.optin("import", "-", input=jsonl([later])))
    assert summary(result, IMPORTED) == ("1", "1", "0", "0")
    assert backend.store.history("m", 10) == [later, original]


@pytest.mark.parametrize("kind", kinds(*ALL))
def test_events_before_1970_import_and_order_like_any_other(make_backend, kind):
    backend = make_backend(kind)
    moon = datetime(1969, 7, 20, 20, 17, tzinfo=timezone.utc)
    first = OptInRecord("old", "declined", moon, "r1", "PAPER")
    second = OptInRecord("old", "accepted", moon + timedelta(days=1), "r2", "PAPER")
    check(backend.optin("import", "-", input=jsonl([first, second])))
    assert backend.store.get("old") == second
    assert backend.store.history("old", 10) == [second, first]


# --- migrate -----------------------------------------------------------------------


MIGRATIONS = pairs(
    ("memory", "sqlite"),
    ("sqlite", "sqlite"),
    ("sqlite", "fakeredis"),
    ("fakeredis", "sqlite"),
    ("sqlite", "redis"),
    ("redis", "sqlite"),
    ("sqlite", "postgres"),
    ("postgres", "sqlite"),
    ("postgres", "redis"),
    ("redis", "postgres"),
    ("postgres", "postgres"),
)


@pytest.mark.parametrize("source_kind, target_kind", MIGRATIONS)
def test_migrate_copies_every_event_and_current_state(make_backend, source_kind, target_kind):
    source, target = make_backend(source_kind), make_backend(target_kind)
    # Over the CLI's 5,000-event batch; fakeredis runs Lua slowly, so less there.
    fake = "fakeredis" in (source_kind, target_kind)
    events = sample(300 if fake else 2600)
    source.store.import_events(events)
    n = len(events)
    assert fake or n > 5000

    result = check(source.optin("migrate", "--to", target.url))
    copied, added, shown, holds = summary(result, COPIED)
    assert (copied, added, holds) == (str(n), str(n), str(n))
    assert shown == target.url
    assert result.stdout == ""

    assert set(target.store.events()) == set(source.store.events()) == set(events)
    assert target.store.count_events() == n
    for cid in members(events):
        assert target.store.get(cid) == source.store.get(cid), cid
    same_members(source.store, target.store, ["member-1", "x" * 128, "tie", "prefix"])

    result = check(source.optin("migrate", "--to", target.url))
    copied, added, _, holds = summary(result, COPIED)
    assert (copied, added, holds) == (str(n), "0", str(n))
    assert set(target.store.events()) == set(events)


def test_migrate_into_a_store_that_has_some_of_the_events(make_backend):
    source, target = make_backend("sqlite"), make_backend("sqlite")
    events = sample(20)
    source.store.import_events(events)
    extra = event("only-in-target", "accepted", 0)
    target.store.import_events([*events[:10], extra])

    result = check(source.optin("migrate", "--to", target.url))
    copied, added, _, holds = summary(result, COPIED)
    assert (int(copied), int(added), int(holds)) == (len(events), len(events) - 10, len(events) + 1)
    assert set(target.store.events()) == {*events, extra}


def test_migrate_keeps_the_current_state_when_events_tie_in_time_and_status(make_backend):
    """Two answers in the same microsecond with the same status: the copy keeps the same one."""
    source, target = make_backend("sqlite"), make_backend("sqlite")
    first = event("m", "accepted", 0, "zz-first", "WEB")
    second = event("m", "accepted", 0, "aa-second", "SMS")
    source.store.import_events([first])
    source.store.import_events([second])
    assert source.store.get("m") == first
    check(source.optin("migrate", "--to", target.url))
    assert target.store.get("m") == source.store.get("m")


def test_migrate_reading_an_event_twice_is_no_mismatch(make_backend, monkeypatch):
    """A Redis SCAN may return a key twice: the repeat is skipped, the copy is whole."""
    source, target = make_backend("sqlite"), make_backend("sqlite")
    events = sample(20)
    source.store.import_events(events)
    rows = list(source.store.rows())
    monkeypatch.setattr(source.store, "rows", lambda since=None: iter([*rows, rows[3]]))
    result = check(source.optin("migrate", "--to", target.url))
    copied, added, _, holds = summary(result, COPIED)
    assert (int(copied), int(added), int(holds)) == (len(events) + 1, len(events), len(events))
    assert set(target.store.events()) == set(events)


def test_migrate_reading_fewer_events_than_the_source_holds_fails(make_backend, monkeypatch):
    source, target = make_backend("sqlite"), make_backend("sqlite")
    source.store.import_events(sample(20))
    rows = list(source.store.rows())
    monkeypatch.setattr(source.store, "rows", lambda since=None: iter(rows[1:]))
    result = source.optin("migrate", "--to", target.url)
    assert result.exit_code == 1
    assert f"count mismatch: source had {len(rows)} events, {len(rows) - 1} copied" in result.stderr


def test_migrate_to_an_unknown_scheme_fails_with_a_clear_message(make_backend):
    source = make_backend("memory")
    source.store.import_events(sample(1))
    result = source.optin("migrate", "--to", "nosuch://host/db")
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "nosuch" in result.stderr


@pytest.mark.redis_server
@pytest.mark.slow
def test_migrate_into_redis_waits_for_the_replicas_the_app_config_asks(redis_server):
    """OPTIN_REDIS_MIN_REPLICAS_ACKED reaches the target store too: a server without
    replicas cannot confirm the copy (exit 1, a retry is safe), unless the target
    URL's own min_replicas_acked says otherwise."""
    config = {"TESTING": True, "OPTIN_STORAGE_URL": "memory://"}
    app = create_app({**config, "OPTIN_REDIS_MIN_REPLICAS_ACKED": 1})
    app.extensions["optin"].store.import_events(sample(3))
    prefix = f"cli-{uuid.uuid4().hex}:"
    target = f"{redis_server.url}?prefix={prefix}&wait_timeout_ms=50"
    runner = app.test_cli_runner()
    try:
        result = runner.invoke(args=["optin", "migrate", "--to", target])
        assert result.exit_code == 1
        assert "reached 0 of the 1 replicas" in result.stderr
        result = runner.invoke(args=["optin", "migrate", "--to", f"{target}&min_replicas_acked=0"])
        assert result.exit_code == 0, result.stderr
    finally:
        with RedisStore.from_url(redis_server.url).client as client:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)


# --- export, then import into another backend --------------------------------------


@pytest.mark.parametrize("source_kind, target_kind", pairs(*((s, t) for s in ALL for t in ALL)))
def test_export_then_import_elsewhere_gives_the_same_history(
    make_backend, tmp_path, source_kind, target_kind
):
    source, target = make_backend(source_kind), make_backend(target_kind)
    events = sample(30)
    source.store.import_events(events)
    path = tmp_path / "export.jsonl"
    summary_line = check(source.optin("export", "-o", str(path))).stderr
    assert summary_line == f"exported {len(events)} events\n"

    result = check(target.optin("import", str(path)))
    n = str(len(events))
    assert summary(result, IMPORTED) == (n, n, "0", "0")
    same_members(source.store, target.store, members(events))
    assert set(target.store.events()) == set(events)


# --- changes -----------------------------------------------------------------------

CHANGE_KEYS = [*LINE_KEYS[:2], "previous", *LINE_KEYS[2:], "version"]


def listed(backend: Backend, *args: str) -> tuple[list[dict], str]:
    """``optin changes list ARGS``: the changes printed, and the cursor stderr ends with."""
    ran = backend.optin("changes", "list", *args)
    assert ran.exit_code == 0, (ran.stderr, ran.exception)
    *rest, cursor = ran.stderr.splitlines()
    assert not rest and cursor, ran.stderr
    return [json.loads(text) for text in ran.stdout.splitlines()], cursor


@pytest.mark.parametrize("kind", kinds("memory", "sqlite"))
def test_changes_list_prints_a_page_and_the_cursor_to_read_on_from(make_backend, kind):
    backend = make_backend(kind)
    for cid, status in [("m1", "accepted"), ("m2", "declined"), ("m1", "declined")]:
        assert backend.optin("set", cid, status).exit_code == 0
    everything, end = listed(backend)
    assert [list(change) for change in everything] == [CHANGE_KEYS] * 3
    assert [(c["correlationId"], c["previous"], c["version"]) for c in everything] == [
        ("m1", None, 1),
        ("m2", None, 1),
        ("m1", "accepted", 2),
    ]
    assert all(c["source"] == "CLI" and TIME.fullmatch(c["updatedAt"]) for c in everything)
    first, after = listed(backend, "--limit", "2")
    rest, again = listed(backend, "--after", after)
    assert first + rest == everything and again == end
    # Nothing new: no line, and the same cursor to poll again from.
    assert listed(backend, "--after", end) == ([], end)
    assert backend.optin("set", "m3", "accepted").exit_code == 0
    new, _ = listed(backend, "--after", end)
    assert [c["correlationId"] for c in new] == ["m3"]


@pytest.mark.parametrize("kind", kinds("memory", "sqlite"))
def test_changes_list_refuses_a_foreign_cursor_and_explains_an_expired_one(make_backend, kind):
    backend = make_backend(kind)
    assert backend.optin("set", "m1", "accepted").exit_code == 0
    foreign = backend.optin("changes", "list", "--after", "bm90LWEtY3Vyc29y")
    assert foreign.exit_code == 2 and "not a cursor this store gave out" in foreign.stderr
    assert foreign.stdout == ""
    _, cursor = listed(backend)
    assert backend.optin("changes", "rebuild").exit_code == 0
    expired = backend.optin("changes", "list", "--after", cursor)
    assert expired.exit_code == 1 and expired.stdout == ""
    assert "Error: the changes after this cursor are no longer kept" in expired.stderr
    assert backend.optin("changes", "list", "--limit", "0").exit_code == 2


@pytest.mark.parametrize("kind", kinds("memory", "sqlite"))
def test_changes_rebuild_replays_every_event_oldest_first(make_backend, kind):
    backend = make_backend(kind)
    # An imported old event is history, not a change; a rebuild makes every event one.
    backend.store.import_events(
        [
            event("m1", "declined", 60, "r-new"),
            event("m1", "accepted", 0, "r-old"),
            event("m2", "accepted", 30, "r-m2"),
        ]
    )
    backend.store.import_events([event("m1", "accepted", -60, "r-older")])
    before, _ = listed(backend)
    assert [c["requestId"] for c in before] == ["r-old", "r-new", "r-m2"]
    ran = backend.optin("changes", "rebuild")
    assert ran.exit_code == 0
    assert ran.stdout == "rebuilt the change feed: 4 changes; every earlier cursor has expired\n"
    after, _ = listed(backend)
    assert [(c["correlationId"], c["requestId"], c["previous"], c["version"]) for c in after] == [
        ("m1", "r-older", None, 1),
        ("m1", "r-old", "accepted", 2),
        ("m1", "r-new", "accepted", 3),
        ("m2", "r-m2", None, 1),
    ]
    # New changes count on from the rebuilt versions.
    assert backend.optin("set", "m1", "accepted").exit_code == 0
    last, _ = listed(backend, "--after", _position_after(backend, 4))
    assert [(c["correlationId"], c["previous"], c["version"]) for c in last] == [
        ("m1", "declined", 4)
    ]


def _position_after(backend: Backend, count: int) -> str:
    """The cursor after the first ``count`` changes."""
    _, cursor = listed(backend, "--limit", str(count))
    return cursor


@pytest.mark.parametrize("kind", kinds("memory"))
def test_changes_prune_removes_changes_older_than_the_days_given(make_backend, kind, monkeypatch):
    import backends.memory

    now = [T0]
    monkeypatch.setattr(backends.memory, "_now", lambda: now[0])
    monkeypatch.setattr("optin_service.retention._now", lambda: now[0])
    backend = make_backend(kind)
    assert backend.optin("set", "old", "accepted").exit_code == 0
    now[0] += timedelta(days=10)
    assert backend.optin("set", "new", "accepted").exit_code == 0
    now[0] += timedelta(days=1)
    ran = backend.optin("changes", "prune", "--days", "5")
    assert ran.exit_code == 0
    assert ran.stdout == "removed 1 changes appended before 2026-03-07T12:00:00.000000Z\n"
    remaining, _ = listed(backend)
    assert [c["correlationId"] for c in remaining] == ["new"]
    assert backend.store.get("old") is not None  # the event stays
    assert backend.optin("changes", "prune", "--days", "5").stdout.startswith("removed 0 ")
    missing = backend.optin("changes", "prune")
    assert missing.exit_code == 2 and "--days" in missing.stderr
    assert backend.optin("changes", "prune", "--days", "-1").exit_code == 2
    # 0 would empty the feed, where OPTIN_CHANGES_RETENTION=0 keeps every change.
    assert backend.optin("changes", "prune", "--days", "0").exit_code == 2
    assert [c["correlationId"] for c in listed(backend)[0]] == ["new"]


# --- progress ----------------------------------------------------------------------


def test_no_progress_bar_when_stderr_is_not_a_terminal(make_backend, tmp_path):
    source, target = make_backend("sqlite"), make_backend("sqlite")
    events = sample(3000)
    path = tmp_path / "events.jsonl"
    path.write_text(jsonl(events))
    summary(check(source.optin("import", str(path))), IMPORTED)
    summary(check(source.optin("migrate", "--to", target.url)), COPIED)
    result = check(source.optin("export", "-o", str(tmp_path / "out.jsonl")))
    summary(result, re.compile(rf"exported {len(events)} events"))


# --- real processes ----------------------------------------------------------------


def run(args: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None):
    return subprocess.run(
        args, input=stdin, env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "OPTIN_"))}
    env["OPTIN_STORAGE_URL"] = f"sqlite:///{tmp_path / 'cli.db'}"
    return env


@pytest.mark.slow
def test_the_console_script(cli_env, tmp_path):
    optin = str(BIN / "optin")
    assert os.access(optin, os.X_OK), optin

    setting = run([optin, "set", "m-1", "declined", "--source", "shell"], cli_env, tmp_path)
    assert setting.returncode == 0, setting.stderr
    data = json.loads(setting.stdout)
    assert (data["LOYALTY_OPTIN"], data["source"]) == ("declined", "shell")

    getting = run([optin, "get", "m-1"], cli_env, tmp_path)
    assert (getting.returncode, getting.stdout) == (0, setting.stdout)
    store_line = f"opt-in storage: {cli_env['OPTIN_STORAGE_URL']}\n"
    assert setting.stderr == getting.stderr == store_line

    missing = run([optin, "get", "nobody"], cli_env, tmp_path)
    assert missing.returncode == 1 and missing.stdout == ""
    assert "Error: no opt-in recorded for nobody" in missing.stderr
    assert "Traceback" not in missing.stderr

    events = sample(20)
    imported = run([optin, "import", "-"], cli_env, tmp_path, stdin=jsonl(events))
    assert imported.returncode == 0, imported.stderr
    n = len(events)
    assert f"imported {n} events: {n} new, 0 already present; 0 lines failed" in imported.stderr

    exported = run([optin, "export"], cli_env, tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert set(exported.stdout.splitlines()) == {line(e) for e in events} | {setting.stdout[:-1]}
    # Piped: the summary line, no progress bar.
    assert f"exported {n + 1} events" in exported.stderr
    assert not BAR.search(exported.stderr), exported.stderr

    rejected = run([optin, "set", "m-1", "maybe"], cli_env, tmp_path)
    assert rejected.returncode == 2 and "is not one of" in rejected.stderr


@pytest.mark.slow
def test_the_console_script_refuses_a_folder_that_does_not_exist(cli_env, tmp_path):
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    env = {**cli_env, "OPTIN_STORAGE_URL": f"sqlite:///{missing}"}
    for args in (["get", "m-1"], ["set", "m-1", "accepted"], ["export"]):
        result = run([str(BIN / "optin"), *args], env, tmp_path)
        assert (result.returncode, result.stdout) == (1, ""), result.stderr
        assert re.fullmatch(
            rf"Error: .*{re.escape(str(missing))}.*does not exist.*\n", result.stderr
        ), result.stderr
    assert not (tmp_path / "nonexistent").exists()


#: The service as gunicorn loads it from a clone's folder (the folder first on sys.path,
#: so the source tree, not the installed copy), asked for member-42.
SERVICE_GET = """
import json, optin_service
from wsgi import app
response = app.test_client().get("/client/users/member-42/profile/optin")
print(json.dumps([optin_service.__file__, response.status_code, response.get_json()]))
"""


@pytest.mark.slow
def test_a_clone_installed_with_pip_has_one_default_store_for_service_and_clis(tmp_path):
    """The README's set-up on a fresh clone: ``pip install .`` (not editable) into a venv.
    Then the service (imported from the clone's folder), ``.venv/bin/optin`` (the
    installed copy) and ``flask optin`` must all use ./instance/optin.db."""
    clone = tmp_path / "clone"
    for name in ("optin_service", "backends"):
        shutil.copytree(ROOT / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md", "wsgi.py", "gunicorn.conf.py"):
        shutil.copy(ROOT / name, clone / name)
    venv = clone / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "OPTIN_"))}
    site = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env, clone
    )
    site_dir = Path(site.stdout.strip())
    # This interpreter's packages (flask, pip, setuptools...), offline: a path in a .pth
    # file joins sys.path without running that folder's own .pth files, so the editable
    # optin-service of this checkout stays out.
    (site_dir / "test-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    installed = run([*pip, "--no-index", "."], env, clone)
    assert installed.returncode == 0, installed.stderr
    assert (site_dir / "optin_service" / "__init__.py").is_file()  # a copy, not a link

    written = run([str(venv / "bin" / "optin"), "set", "member-42", "declined"], env, clone)
    assert written.returncode == 0, written.stderr
    served = run([python, "-c", SERVICE_GET], env, clone)
    assert served.returncode == 0, served.stderr
    module, status, body = json.loads(served.stdout)
    assert module == str(clone / "optin_service" / "__init__.py")
    assert (status, body.get("LOYALTY_OPTIN")) == (200, "declined"), (status, body, written.stderr)
    flask = [python, "-m", "flask", "--app", "optin_service", "optin", "get", "member-42"]
    read = run(flask, env, clone)
    assert (read.returncode, read.stdout) == (0, written.stdout), read.stderr

    db = clone / "instance" / "optin.db"
    store_line = f"opt-in storage: sqlite:///{db} (default: OPTIN_STORAGE_URL is not set)\n"
    assert written.stderr == store_line
    assert store_line in read.stderr.splitlines(keepends=True)  # after flask's start-up log
    assert str(db) in served.stderr  # the service's start-up log names it too
    assert [p.name for p in clone.rglob("optin.db")] == ["optin.db"]


@pytest.mark.slow
def test_flask_cli_reads_the_same_store(cli_env, tmp_path):
    app = create_app({"OPTIN_STORAGE_URL": cli_env["OPTIN_STORAGE_URL"]})
    record = event("via-flask", "accepted", 0, "r-1", "WEB")
    app.extensions["optin"].store.import_events([record])
    app.extensions["optin"].store.close()

    args = [sys.executable, "-m", "flask", "--app", "optin_service", "optin", "get", "via-flask"]
    result = run(args, cli_env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == line(record) + "\n"

    result = run([*args[:-1], "nobody"], cli_env, tmp_path)
    assert result.returncode == 1 and "no opt-in recorded for nobody" in result.stderr


@pytest.mark.slow
def test_a_progress_bar_shows_on_a_terminal(cli_env, tmp_path):
    app = create_app({"OPTIN_STORAGE_URL": cli_env["OPTIN_STORAGE_URL"]})
    events = sample(1500)
    app.extensions["optin"].store.import_events(events)
    app.extensions["optin"].store.close()

    master, slave = pty.openpty()
    chunks = []
    with subprocess.Popen(
        [str(BIN / "optin"), "export", "-o", str(tmp_path / "out.jsonl")],
        env=cli_env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    ) as proc:
        os.close(slave)
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(60) == 0
    os.close(master)
    seen = b"".join(chunks).decode(errors="replace")
    assert "exporting" in seen and "[#" in seen, seen
    # A complete export ends at 100%, not at the last whole thousand.
    assert "100%" in seen, seen
    assert f"exported {len(events)} events" in seen


def test_version_is_the_one_the_package_declares(cli_env):
    from importlib.metadata import version

    from click.testing import CliRunner

    from optin_service import __version__
    from optin_service.cli import optin

    result = CliRunner().invoke(optin, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"optin-service, version {__version__}"
    assert version("optin-service") == __version__  # setup.cfg reads the same number


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_need_no_working_storage(flag):
    """They answer before any command runs: a storage URL the service would refuse
    (here an unknown scheme) made `optin --version` fail."""
    env = {**os.environ, "OPTIN_STORAGE_URL": "bogus://"}
    done = subprocess.run(
        [sys.executable, "-m", "optin_service", flag], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert ("optin-service, version" if flag == "--version" else "Usage: optin") in done.stdout
