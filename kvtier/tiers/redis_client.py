"""Clients of single servers for the remote tier, built from ``RemoteConfig``, whose connections count the
requests they send; URL parsing and redaction.

Promises:
- Every setting of ``[remote]`` reaches the client: URLs (``valkey://`` is read as ``redis://``), ACL user
  and password (the config's override the URL's, in every mode), TLS (a ``rediss://`` URL or ``tls = true``;
  CA bundle, client certificate, verification), connect and reply timeouts.
- A setting that cannot work is a ``ConfigError`` before anything is dialed: a CA bundle, certificate or key
  file that cannot be read or loaded, TLS over a ``unix://`` socket.
- The client never retries on its own: one failed attempt is reported at once, and the tier decides when
  to try again (so no call waits longer than its timeout).
- ``redact`` hides a URL's password: only redacted URLs are logged.
- A ``SplitValue`` argument (header, borrowed payload, trailer) is sent as one value without joining its pieces.
- ``RequestCounter.sent`` counts the pipelines and commands written to any server (one per node a pipeline
  touches): the tier's round trips.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.retry import Retry

from kvtier.config import RemoteConfig
from kvtier.errors import ConfigError
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
            pending = [arg.trailer, b"\r\n"]
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


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: what logs and errors may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _normalized(url: str, tls: bool) -> str:
    """``url`` with ``valkey(s)://`` read as ``redis(s)://`` and ``redis://`` as ``rediss://`` under ``tls``."""
    for prefix, replacement in (("valkeys://", "rediss://"), ("valkey://", "redis://")):
        if url.startswith(prefix):
            url = replacement + url[len(prefix):]
    if tls and url.startswith("redis://"):
        url = "rediss://" + url[len("redis://"):]
    return url


def _check_tls_files(config: RemoteConfig) -> None:
    """Load the TLS files once, here, so that a missing or bad one is a configuration error, not a connection
    error retried forever."""
    try:
        context = ssl.create_default_context(cafile=config.tls_ca_file or None)
        if config.tls_cert_file:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"remote TLS files (tls_ca_file={config.tls_ca_file!r}, tls_cert_file="
                          f"{config.tls_cert_file!r}, tls_key_file={config.tls_key_file!r}) cannot be loaded: "
                          f"{exc}") from exc


def _options(config: RemoteConfig, tls: bool) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": config.timeout_ms / 1000, "socket_connect_timeout": config.connect_timeout_ms / 1000,
        "retry": Retry(NoBackoff(), 0), "health_check_interval": 0,
    }
    if tls:
        _check_tls_files(config)
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if config.tls_verify else ssl.CERT_NONE
        options["ssl_check_hostname"] = config.tls_verify
        for option, value in (("ssl_ca_certs", config.tls_ca_file), ("ssl_certfile", config.tls_cert_file),
                              ("ssl_keyfile", config.tls_key_file)):
            if value:
                options[option] = value
    return options


def server_options(config: RemoteConfig, url: str) -> dict[str, Any]:
    """The connection settings of the server at ``url``: address from the URL, then credentials (the
    config's over the URL's), timeouts and TLS from ``config``. ``connection_class`` is the socket kind."""
    url = _normalized(url, config.tls)
    tls = url.startswith("rediss://")
    if url.startswith("unix://") and config.tls:
        raise ConfigError("remote.tls is set but a unix:// socket cannot carry TLS")
    try:
        options: dict[str, Any] = dict(parse_url(url))  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"remote.urls: {redact(url)} cannot be parsed: {exc}") from exc
    options.setdefault("connection_class", redis.SSLConnection if tls else redis.Connection)
    options.update(_options(config, tls))
    if config.username:
        options["username"] = config.username
    if config.password:
        options["password"] = config.password
    return options


def server_client(options: dict[str, Any], counter: RequestCounter | None, **address: Any) -> redis.Redis:
    """A client of one server from ``server_options`` (``address``: host and port overriding the URL's) whose
    requests ``counter`` counts (if given)."""
    options = {**options, **address}
    base = options.pop("connection_class")
    pool = redis.ConnectionPool(connection_class=base if counter is None else _counting(base, counter), **options)
    return redis.Redis(connection_pool=pool)


def make_client(config: RemoteConfig, counter: RequestCounter) -> Client:
    """A client for ``config`` as redis-py offers it (one server, or a ``RedisCluster``): the raw baseline of
    ``kvtier bench remote``. It connects lazily: ``ping`` it to find out whether the servers answer."""
    first = server_options(config, config.urls[0])
    if config.mode == "single":
        return server_client(first, counter)
    addresses = [server_options(config, url) for url in config.urls]
    seeds = [ClusterNode(options["host"], options.get("port", 6379)) for options in addresses]  # type: ignore[no-untyped-call]
    base = first.pop("connection_class")
    first.pop("host", None)
    first.pop("port", None)
    first.pop("db", None)
    return RedisCluster(startup_nodes=seeds, connection_class=_counting(base, counter), require_full_coverage=False,
                        **first)
