"""Fixtures of the remote-tier tests: real Redis-protocol servers on loopback, started by kvtier's own
helper (``kvtier.tiers.servers``) from the binary ``make test`` installs.

``redis_single`` and ``redis_cluster`` (3 masters) live for the session; tests sharing them keep apart by a
unique ``key_prefix`` (``config_for``). ``fresh_single`` / ``fresh_cluster`` are a test's own, for fault
tests that kill or freeze servers. Without a server binary these tests skip, saying why.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kvtier.config import RemoteConfig
from kvtier.tiers.servers import LocalServers, server_binary, start_cluster, start_single

NO_BINARY = ("no Redis-protocol server binary (redis-server or valkey-server): `make test` installs Debian's "
             "redis-server with apt-get; or set KVTIER_REDIS_SERVER")


def _require_binary() -> None:
    if server_binary() is None:
        pytest.skip(NO_BINARY)


@pytest.fixture(scope="session")
def redis_single() -> Iterator[LocalServers]:
    _require_binary()
    with start_single() as servers:
        yield servers


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalServers]:
    _require_binary()
    with start_cluster(3) as servers:
        yield servers


@pytest.fixture(params=["single", "cluster"])
def servers(request: pytest.FixtureRequest) -> LocalServers:
    """Each test using it runs against the single server and against the cluster."""
    fixture: LocalServers = request.getfixturevalue(f"redis_{request.param}")
    return fixture


@pytest.fixture
def fresh_single() -> Iterator[Callable[..., LocalServers]]:
    _require_binary()
    started: list[LocalServers] = []

    def make(**options: Any) -> LocalServers:
        servers = start_single(**options)
        started.append(servers)
        return servers

    yield make
    for servers in started:
        servers.stop()


@pytest.fixture
def fresh_cluster() -> Iterator[LocalServers]:
    _require_binary()
    with start_cluster(3) as servers:
        yield servers


RemoteConfigFor = Callable[..., RemoteConfig]


def _remote_config(servers: LocalServers, **overrides: Any) -> RemoteConfig:
    options: dict[str, Any] = {"urls": servers.urls, "mode": servers.mode, "key_prefix": f"t{uuid.uuid4().hex[:12]}",
                               "timeout_ms": 500, "connect_timeout_ms": 300, "reconnect_min_ms": 50,
                               "reconnect_max_ms": 200}
    options.update(overrides)
    return RemoteConfig(**options)


@pytest.fixture
def config_for() -> RemoteConfigFor:
    """``config_for(servers, **overrides)``: settings for ``servers`` with a key prefix of the call's own (so
    tests sharing servers never see each other's blocks) and short timeouts."""
    return _remote_config
