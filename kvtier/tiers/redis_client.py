"""Clients for the remote tier: a ``redis.Redis`` (one server) or ``redis.cluster.RedisCluster``, built
from ``RemoteConfig``, whose connections count the requests they send.

Promises:
- Every setting of ``[remote]`` reaches the client: URLs (``valkey://`` is read as ``redis://``), ACL user
  and password (the config's override the URL's), TLS (a ``rediss://`` URL or ``tls = true``; CA bundle,
  client certificate, verification), connect and reply timeouts.
- The client never retries on its own: one failed attempt is reported at once, and the tier decides when
  to try again (so no call waits longer than its timeout).
- A ``SplitValue`` argument (header + borrowed payload) is sent as one value without joining its pieces.
- ``RequestCounter.sent`` counts the pipelines and commands written to any server (one per node a pipeline
  touches): the tier's round trips.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from kvtier.config import RemoteConfig
from kvtier.tiers.values import SplitValue

Client = redis.Redis | RedisCluster


class RequestCounter:
    """How many requests (single commands or whole pipelines to one node) were written to the servers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0

    def add(self) -> None:
        with self._lock:
            self.sent += 1


def _pack_split(connection: Any, args: Sequence[Any]) -> list[Any]:
    """RESP chunks of one command with ``SplitValue`` arguments: each is framed as one bulk string whose
    header and payload go to the socket as they are (the payload never copied in user space)."""
    chunks: list[Any] = []
    pending = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, SplitValue):
            pending.append(b"$%d\r\n" % len(arg))
            pending.append(arg.header)
            chunks.append(b"".join(pending))
            chunks.append(arg.payload)
            pending = [b"\r\n"]
        else:
            encoded = connection.encoder.encode(arg)
            pending.append(b"$%d\r\n" % len(encoded))
            pending.append(bytes(encoded))
            pending.append(b"\r\n")
    chunks.append(b"".join(pending))
    return chunks


def _counting(base: type[Any], counter: RequestCounter) -> type[Any]:
    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        counter.add()
        base.send_packed_command(self, command, check_health)

    def pack_commands(self: Any, commands: Sequence[Sequence[Any]]) -> list[Any]:
        output: list[Any] = []
        for args in commands:
            if any(isinstance(arg, SplitValue) for arg in args):
                output.extend(_pack_split(self, args))
            else:
                output.extend(base.pack_commands(self, [args]))
        return output

    return type(f"Counting{base.__name__}", (base,), {"send_packed_command": send_packed_command,
                                                      "pack_commands": pack_commands})


def _normalized(url: str, tls: bool) -> str:
    for prefix, replacement in (("valkeys://", "rediss://"), ("valkey://", "redis://")):
        if url.startswith(prefix):
            url = replacement + url[len(prefix):]
    if tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://"):]
    return url


def _options(config: RemoteConfig, tls: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": config.timeout_ms / 1000, "socket_connect_timeout": config.connect_timeout_ms / 1000,
        "retry": Retry(NoBackoff(), 0), "health_check_interval": 0,
    }
    if config.username:
        options["username"] = config.username
    if config.password:
        options["password"] = config.password
    if tls:
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if config.tls_verify else ssl.CERT_NONE
        options["ssl_check_hostname"] = config.tls_verify
        for option, value in (("ssl_ca_certs", config.tls_ca_file), ("ssl_certfile", config.tls_cert_file),
                              ("ssl_keyfile", config.tls_key_file)):
            if value:
                options[option] = value
    return options


def make_client(config: RemoteConfig, counter: RequestCounter) -> Client:
    """A client for ``config`` (it connects lazily: ``ping`` it to find out whether the servers answer)."""
    urls = [_normalized(url, config.tls) for url in config.urls]
    tls = urls[0].startswith("rediss://")
    options = _options(config, tls)
    if config.mode == "single":
        base = (redis.UnixDomainSocketConnection if urls[0].startswith("unix://")
                else redis.SSLConnection if tls else redis.Connection)
        pool = redis.ConnectionPool.from_url(urls[0], connection_class=_counting(base, counter), **options)
        return redis.Redis(connection_pool=pool)
    seeds = []
    for url in urls:
        parts = urlsplit(url)
        seeds.append(ClusterNode(parts.hostname or "127.0.0.1", parts.port or 6379))  # type: ignore[no-untyped-call]
        if parts.username and "username" not in options:
            options["username"] = parts.username
        if parts.password and "password" not in options:
            options["password"] = parts.password
    # Through ``url`` the client builds its nodes' pools from our options, connection class included; the URL
    # is bare (no scheme of TLS, no credentials) so that it overrides none of them.
    first = seeds[0]
    base = redis.SSLConnection if tls else redis.Connection
    return RedisCluster(url=f"redis://{first.host}:{first.port}", startup_nodes=seeds[1:],
                        connection_class=_counting(base, counter), require_full_coverage=False, **options)
