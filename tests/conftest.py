"""Shared fixtures: apps on each backend, and real servers on loopback."""

from __future__ import annotations

import uuid

import pytest

from optin_service import create_app
from tests.servers import PostgresServer, RedisServer

#: Fixtures that start real servers (redis-server, Sentinels, a Cluster, PostgreSQL).
SERVER_FIXTURES = frozenset(
    {"redis_server", "sentinel_topology", "cluster_topology", "postgres_server", "postgres_url"}
)


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs a real server is slow, whether it says so or not: marked
    ``redis_server``, or using a fixture that starts one. A fixture a test fetches with
    ``request.getfixturevalue`` is invisible here: such a test carries the marker."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("redis_server") or fixtures & SERVER_FIXTURES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """One real redis-server for the session, on a free loopback port."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL for the session, on a free loopback port; each test that
    uses it works in a schema of its own (``postgres_url``)."""
    server = PostgresServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def postgres_url(postgres_server):
    """A ``postgresql://`` URL whose tables live in a fresh schema, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.execute(f"CREATE SCHEMA {name}")
    yield postgres_server.url(options=f"-c search_path={name}")
    postgres_server.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
def app():
    """The standalone app on the memory backend."""
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": "memory://"})
    yield app
    app.extensions["optin"].store.close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory):
    """A master, a replica and three Sentinels for the session (started on first use)."""
    from tests.topologies import SentinelTopology

    topology = SentinelTopology(tmp_path_factory.mktemp("sentinel")).start()
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def cluster_topology(tmp_path_factory: pytest.TempPathFactory):
    """A three-master Redis Cluster for the session (started on first use)."""
    from tests.topologies import ClusterTopology

    topology = ClusterTopology(tmp_path_factory.mktemp("cluster")).start()
    yield topology
    topology.stop()
