"""Fixtures of the daemon tests: a real ``kvtier serve`` subprocess on a short Unix socket path.

``start_daemon(...)`` starts one and waits until it answers; ``daemon`` is a module-wide one with TCP and
metrics on; every daemon is stopped with SIGTERM at teardown and must exit 0 and remove its arena.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import daemon_workers as workers
import pytest
import torch

from kvtier import KVLayout, StoreConfig
from kvtier.daemon import Client
from kvtier.daemon.client import Connection

# The client processes and the tests share one rule for keys and blocks, so either can check the other's.
LAYOUT, block_for = workers.LAYOUT, workers.block_for

LAYOUT_ARG = "num_layers=2,num_kv_heads=2,head_dim=8,dtype=float32,block_tokens=4"
TOKEN = "s3cret-token"


def key_of(index: int, space: str = "test") -> bytes:
    return workers.key_of(index, space)


@dataclass(frozen=True)
class Kit:
    layout: KVLayout
    key_of: Callable[..., bytes]
    block_for: Callable[[bytes], torch.Tensor]


@pytest.fixture
def kit() -> Kit:
    """The layout and the deterministic keys and blocks of the daemon tests."""
    return Kit(LAYOUT, key_of, block_for)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class DaemonProc:
    proc: subprocess.Popen[bytes]
    socket_path: str
    log_path: Path
    tcp_port: int = 0
    metrics_port: int = 0
    workdir: str = ""
    token: str = TOKEN

    @property
    def address(self) -> str:
        return f"unix:{self.socket_path}"

    @property
    def tcp_address(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    def client(self, **options: Any) -> Client:
        return Client(LAYOUT, StoreConfig(), address=options.pop("address", self.address), **options)

    def stats(self) -> dict[str, Any]:
        conn = Connection(self.address, StoreConfig(), timeout=10)
        try:
            return conn.call("stats")
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout)


def start_daemon(*args: str, settings: Sequence[str] = (), pool: str = "1MiB", tcp: bool = False,
                 metrics: bool = False, layout: bool = True) -> DaemonProc:
    """A daemon started with the flags ``args`` and the ``SECTION.FIELD=VALUE`` overrides ``settings``."""
    workdir = tempfile.mkdtemp(prefix="kvd", dir="/tmp")  # short: a Unix socket path has at most 107 bytes
    socket_path = os.path.join(workdir, "d.sock")
    log_path = Path(workdir) / "daemon.log"
    tcp_port = free_port() if tcp else 0
    metrics_port = free_port() if metrics else 0
    if "--disk" in args and not any(setting.startswith("disk.capacity_bytes=") for setting in settings):
        # The default disk tier (16 GiB, preallocated) would fill a CI machine's disk: one small region.
        settings = (*settings, "disk.capacity_bytes=4MiB", "disk.region_bytes=1MiB")
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    command = [sys.executable, "-m", "kvtier.daemon", "--log-level", "DEBUG", *overrides, "serve", "--socket",
               socket_path, "--pool", pool, "--metrics-port", str(metrics_port), *args]
    if "--disk" not in args:
        command.append("--no-disk")
    if layout:
        command += ["--layout", LAYOUT_ARG]
    if tcp:
        command += ["--tcp-port", str(tcp_port), "--tcp-token", TOKEN]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    daemon = DaemonProc(proc, socket_path, log_path, tcp_port, metrics_port, workdir)
    deadline = time.monotonic() + 60
    while "daemon ready" not in daemon.log():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the daemon did not start:\n{daemon.log()}")
        time.sleep(0.05)
    return daemon


def finish(daemon: DaemonProc) -> None:
    """Stop ``daemon`` with SIGTERM and check it shut down cleanly."""
    rc = daemon.stop()
    log = daemon.log()
    shutil.rmtree(daemon.workdir, ignore_errors=True)
    assert rc == 0, log
    assert "daemon stopped" in log
    assert not list(Path("/dev/shm").glob(f"kvtier-daemon-{daemon.proc.pid}-*"))


@pytest.fixture
def make_daemon() -> Iterator[Callable[..., DaemonProc]]:
    daemons: list[DaemonProc] = []

    def make(*args: str, **options: Any) -> DaemonProc:
        daemon = start_daemon(*args, **options)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        if daemon.proc.poll() is None:
            finish(daemon)


@pytest.fixture(scope="session")
def daemon() -> Iterator[DaemonProc]:
    """A daemon shared by the tests that use distinct keys: 1 MiB pool (256 slots), TCP with ``TOKEN``, metrics."""
    proc = start_daemon(tcp=True, metrics=True)
    yield proc
    finish(proc)
