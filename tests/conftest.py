"""Shared fixtures: apps on each backend, and real servers on loopback."""

from __future__ import annotations

import pytest

from optin_service import create_app
from tests.servers import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    """One real redis-server for the session, on a free loopback port."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def app():
    """The standalone app on the memory backend."""
    app = create_app({"TESTING": True, "OPTIN_STORAGE_URL": "memory://"})
    yield app
    app.extensions["optin"].store.close()


@pytest.fixture
def client(app):
    return app.test_client()
