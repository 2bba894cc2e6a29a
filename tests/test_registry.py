"""The registry: URL scheme -> backend class, through entry points only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest

from optin_service import create_app, registry
from optin_service.storage import OptInStore

PLUGIN_DIR = Path(__file__).parent / "plugins" / "optin-dummy-backend"
BUILT_IN = ["memory", "postgres", "postgresql", "redis", "rediss", "sqlite", "unix"]


@pytest.mark.parametrize("scheme", BUILT_IN)
def test_every_built_in_scheme_is_an_entry_point_to_a_store(scheme):
    backend = registry.backend_for(scheme)
    assert issubclass(backend, OptInStore)
    assert scheme in registry.installed_schemes()


def test_unknown_scheme_names_it_and_lists_installed_ones():
    with pytest.raises(registry.BackendNotFound) as info:
        registry.store_from_url("dynamodb://db/optin")
    message = str(info.value)
    assert "'dynamodb'" in message
    assert registry.GROUP in message
    for scheme in BUILT_IN:
        assert scheme in message


def test_create_app_refuses_an_unknown_scheme():
    with pytest.raises(registry.BackendNotFound, match="nosuch"):
        create_app({"OPTIN_STORAGE_URL": "nosuch://anything"})


def test_url_without_scheme_is_refused():
    with pytest.raises(registry.BackendNotFound, match="no scheme"):
        registry.store_from_url("/var/lib/optin.db")


def test_register_is_a_process_local_escape_hatch():
    class Custom(registry.backend_for("memory")):
        pass

    registry.register("custom-test", Custom)
    try:
        assert type(registry.store_from_url("custom-test://")) is Custom
        assert "custom-test" in registry.installed_schemes()
    finally:
        registry.unregister("custom-test")
    with pytest.raises(registry.BackendNotFound):
        registry.store_from_url("custom-test://")


def test_store_from_url_passes_the_config_settings_the_backend_names():
    """Each setting a backend lists in config_options, and only those, reaches its
    from_url as the keyword it maps to; a backend listing none gets no keyword."""
    memory = registry.backend_for("memory")

    class Configured(memory):
        config_options: ClassVar = {"OPTIN_TEST_DEPTH": "depth", "OPTIN_TEST_ABSENT": "absent"}
        got: ClassVar[dict] = {}

        @classmethod
        def from_url(cls, url, **options):
            cls.got = options
            return cls()

    config = {"OPTIN_TEST_DEPTH": 3, "OPTIN_OTHER": "x", "OPTIN_STORAGE_URL": "configured://"}
    registry.register("configured", Configured)
    try:
        assert type(registry.store_from_url("configured://", config)) is Configured
        assert Configured.got == {"depth": 3}
        registry.store_from_url("configured://")
        assert Configured.got == {}
    finally:
        registry.unregister("configured")
    assert type(registry.store_from_url("memory://", config)) is memory


def test_a_backend_missing_a_method_fails_at_construction():
    class Incomplete(OptInStore):
        @classmethod
        def from_url(cls, url):
            return cls()

        def get(self, correlation_id):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Incomplete.from_url("x://")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:s3cret@host/0", "redis://user:***@host/0"),
        ("sqlite:////var/optin.db", "sqlite:////var/optin.db"),
        ("redis://host/0?password=s3cret&prefix=a:", "redis://host/0?password=***&prefix=a:"),
        (
            "redis+sentinel://h:26379/m?prefix=p:&sentinel_password=s3&SSL_PASSWORD=s4",
            "redis+sentinel://h:26379/m?prefix=p:&sentinel_password=***&SSL_PASSWORD=***",
        ),
        ("unix:///run/r.sock?db=0&password=s3cret", "unix:///run/r.sock?db=0&password=***"),
        # libpq's URLs: several hosts, IPv6, a socket folder, password options.
        (
            "postgresql://app:s3cret@db1:5432,db2:5432/optin?target_session_attrs=read-write",
            "postgresql://app:***@db1:5432,db2:5432/optin?target_session_attrs=read-write",
        ),
        ("postgres://app:s3cret@[::1]:5432/optin", "postgres://app:***@[::1]:5432/optin"),
        ("postgresql://app:s3cret@/optin?host=/tmp", "postgresql://app:***@/optin?host=/tmp"),
        (
            "postgresql://db/optin?sslpassword=k3y&password=s3cret&sslmode=require",
            "postgresql://db/optin?sslpassword=***&password=***&sslmode=require",
        ),
        # libpq reads a password up to the "@" whatever it holds ("#" and "?" included);
        # urllib would have ended the user part there and shown the whole password.
        ("postgresql://app:s#cret@db/optin", "postgresql://app:***@db/optin"),
        ("postgresql://app:s?cr#t@db1,db2/optin", "postgresql://app:***@db1,db2/optin"),
        ("redis://:s#cret@host:6379/0", "redis://:***@host:6379/0"),
        # Written without percent-encoding: hidden whole, to the last "@".
        ("postgresql://app:s3c/ret@h/db", "postgresql://app:***@h/db"),
        ("postgresql://app:s3c@ret@h/db", "postgresql://app:***@h/db"),
        ("postgresql://app:s3 cret@h/db", "postgresql://app:***@h/db"),
        # Typos and forms a driver's message may quote back.
        (" postgresql://app:s3cret@h/db", " postgresql://app:***@h/db"),
        ("postgresql:/app:s3cret@h/db", "postgresql:/app:***@h/db"),
        ("//app:s3cret@h/db", "//app:***@h/db"),
        ("app:s3cret@h/db", "app:***@h/db"),
        ("host=h password=s3cret dbname=db", "host=h password=*** dbname=db"),
        ("host=h password='s3 cret' dbname=db", "host=h password=*** dbname=db"),
        # Drivers decode an option's name: "pass%77ord" is a password.
        ("postgresql://u@h/db?pass%77ord=s3cret", "postgresql://u@h/db?pass%77ord=***"),
        ("redis://h/0?PASS%57ORD=s3cret&db=1", "redis://h/0?PASS%57ORD=***&db=1"),
        # An "@" in the query is not the end of a user part.
        (
            "postgresql://app:s3cret@h:5432/db?application_name=a:b@c",
            "postgresql://app:***@h:5432/db?application_name=a:b@c",
        ),
        ("redis://h:6379/0?client_name=foo:bar@baz", "redis://h:6379/0?client_name=foo:bar@baz"),
        # No password: nothing hidden.
        ("redis://user@host/0", "redis://user@host/0"),
        ("postgresql://h/db?application_name=a@b", "postgresql://h/db?application_name=a@b"),
    ],
)
def test_redact_hides_passwords(url, shown):
    assert registry.redact(url) == shown


def test_scrub_hides_a_password_a_message_quotes_whole_decoded_or_cut():
    url = "postgresql://app:s3c/r%41t@h/db?sslpassword=k3y%zz"
    message = 'bad "s3c/r%41t", "s3cr" "s3c/rAt", port "r%41t" and "k3y%zz" in ' + url
    scrubbed = registry.scrub(message, url)
    for secret in ("s3c", "r%41t", "rAt", "k3y"):
        assert secret not in scrubbed
    assert registry.redact(url) in scrubbed


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The tiny third-party distribution under tests/plugins, installed into a folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--no-index", "--target", str(target), str(PLUGIN_DIR),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return target


def _run_with_plugin(site: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    env.pop("OPTIN_STORAGE_URL", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_installed_third_party_backend_is_found_by_its_entry_point(plugin_site):
    # Nothing imports the plugin's module: only its installed entry point names it.
    result = _run_with_plugin(
        plugin_site,
        """
        import json, sys
        from optin_service import create_app
        app = create_app({"OPTIN_STORAGE_URL": "dummy://somewhere"})
        store = app.extensions["optin"].store
        client = app.test_client()
        put = client.put("/client/users/m1/profile/optin", json={"LOYALTY_OPTIN": "declined"})
        got = client.get("/client/users/m1/profile/optin").get_json()
        print(json.dumps({
            "class": type(store).__module__ + "." + type(store).__name__,
            "url": store.url,
            "put": put.status_code,
            "got": got["LOYALTY_OPTIN"],
            "held": store.records["m1"].status,
        }))
        """,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {
        "class": "optin_dummy_backend.DummyStore",
        "url": "dummy://somewhere",
        "put": 200,
        "got": "declined",
        "held": "declined",
    }


def test_a_broken_plugin_only_matters_when_asked_for(plugin_site):
    result = _run_with_plugin(
        plugin_site,
        """
        from optin_service import create_app, registry
        create_app({"OPTIN_STORAGE_URL": "memory://"})   # the broken entry is never loaded
        assert "broken" in registry.installed_schemes()
        try:
            create_app({"OPTIN_STORAGE_URL": "broken://"})
        except registry.BackendNotFound as exc:
            print(exc)
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "'broken'" in result.stdout
    assert "failed to load" in result.stdout
    assert "optin_dummy_backend_does_not_exist" in result.stdout
