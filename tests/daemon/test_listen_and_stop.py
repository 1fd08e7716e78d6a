"""The daemon in-process: its TCP listener binds ``tcp_host`` (loopback by default), and ``stop`` with a
request in flight waits for that request before it closes the store."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_workers import LAYOUT

from kvtier import KvtierError, Store, StoreConfig
from kvtier.config import DaemonConfig, HostConfig
from kvtier.daemon import Client
from kvtier.daemon.server import Daemon


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kvt-"))  # short: Unix socket paths are limited to 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(socket_dir: Path, **daemon: Any) -> StoreConfig:
    return StoreConfig(host=HostConfig(capacity_bytes=64 * LAYOUT.block_bytes),
                       daemon=DaemonConfig(socket_path=str(socket_dir / "d.sock"), metrics_port=0, layout=LAYOUT,
                                           default_disk=False, pool_bytes=64 * 4096, **daemon))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def other_local_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            address: str = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_tcp_listener_binds_loopback_by_default(socket_dir: Path) -> None:
    port = free_port()
    daemon = Daemon(config(socket_dir, tcp_port=port, tcp_token="t0ken"))
    daemon.start()
    try:
        assert daemon.tcp_address == ("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        other = other_local_address()
        if other is not None:  # binding every interface would accept this connection
            with pytest.raises(OSError), socket.create_connection((other, port), timeout=5):
                pass
    finally:
        daemon.stop()


def test_stop_waits_for_a_request_in_flight_before_closing_the_store(socket_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    entered, store_errors = threading.Event(), []
    original = Store.lookup

    def slow_lookup(self: Store, keys: Any, *, prefetch: bool = True, scope: str | None = None) -> Any:
        entered.set()
        time.sleep(1.0)
        try:
            return original(self, keys, prefetch=prefetch, scope=scope)
        except KvtierError as exc:  # the store was closed under the request
            store_errors.append(exc)
            raise

    daemon = Daemon(config(socket_dir))
    daemon.start()
    client = Client(LAYOUT, daemon.config, address=f"unix:{daemon.socket_path}", timeout=30)
    monkeypatch.setattr(Store, "lookup", slow_lookup)
    outcome: list[object] = []

    def request() -> None:
        try:
            outcome.append(client.lookup([bytes(16)]))
        except (KvtierError, OSError) as exc:  # the connection ended: a clean error, never a hang
            outcome.append(exc)

    thread = threading.Thread(target=request)
    thread.start()
    try:
        assert entered.wait(20)
        started = time.monotonic()
        daemon.stop()
        assert time.monotonic() - started < 15
        thread.join(20)
        assert not thread.is_alive() and len(outcome) == 1
        assert store_errors == []  # the request finished on an open store
    finally:
        daemon.stop()
        client.close()
