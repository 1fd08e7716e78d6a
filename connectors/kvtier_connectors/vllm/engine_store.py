"""The embedded store of a vLLM engine whose workers run in processes of their own.

vLLM's default engine runs its scheduler in the engine-core process and, with the ``mp`` executor (the CPU
platform's only choice, and any tensor-parallel deployment), each worker in a process of its own. One
embedded ``Store`` cannot be shared by those processes, so the engine's connectors share a private kvtier
daemon instead: the embedded store's configuration, served on a socket that only this engine names.

Promises:
- ``engine_socket_path(engine_id, instance)`` is the same in every process of one engine (vLLM's
  ``instance_id``, which its workers receive with the config) and differs between engines.
- ``open_engine_store`` returns a ``Client`` of the engine's private daemon; the first process of the engine to
  get there starts it (an exclusive file lock next to the socket makes it exactly one), the others connect.
  The daemon is the embedded store's configuration (host pool, disk tier, transfer) with no TCP listener and
  no metrics port, on a socket of mode 0600.
- The daemon stops when the process that started it exits or calls ``stop_engine_store`` (its stdin closes):
  it ends its sessions and closes the store, which flushes the disk tier. ``stop_engine_store`` waits for
  that, so an engine that shuts down cleanly leaves its disk tier complete for the next start, and removes
  the daemon's log file (kept when it failed).
- Every wait has a deadline (``START_TIMEOUT_S``): a daemon that does not come up, or does not answer, is a
  ``ConfigError`` with its log's last lines, never a hang. The client returned waits at most ``timeout`` per
  socket operation (the connector always gives one).
- Running the I/O in its own process also keeps kvtier's copy and disk threads off the engine process's GIL.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvtier.config import StoreConfig, config_from_mapping, load_config
from kvtier.daemon import Client
from kvtier.daemon.protocol import default_socket_path
from kvtier.errors import ConfigError, KvtierError
from kvtier.layout import KVLayout

START_TIMEOUT_S = 120.0
_POLL_S = 0.05
# The daemons this process started, by socket path, with their log files.
_started: dict[str, tuple[subprocess.Popen[bytes], str]] = {}


def engine_socket_path(engine_id: str, instance: str) -> str:
    """The private daemon's socket of engine ``engine_id`` and store ``instance`` (short: sockets have 108 bytes)."""
    digest = hashlib.sha256(f"{engine_id}\0{instance}".encode()).hexdigest()[:16]
    return os.path.join(os.path.dirname(default_socket_path()), f"vllm-{digest}.sock")


def _engine_config(config: StoreConfig, socket_path: str, layout: KVLayout) -> StoreConfig:
    daemon = replace(config.daemon, socket_path=socket_path, socket_group="", tcp_port=0, metrics_port=0,
                     layout=layout, connect=f"unix:{socket_path}")
    return replace(config, daemon=daemon)


def open_engine_store(source: dict[str, Any], layout: KVLayout, engine_id: str, instance: str,
                      timeout: float | None = None) -> Client:
    """A client of engine ``engine_id``'s private daemon for store ``instance``, started on first use;
    ``timeout`` is the client's deadline per socket operation (``Client``'s).

    ``source`` is where the embedded store's configuration comes from: ``{"config_path": ..., "config": ...}``
    of the connector's settings (the daemon process reads it again).
    """
    path = engine_socket_path(engine_id, instance)
    config = _engine_config(_load(source), path, layout)
    Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    with open(f"{path}.lock", "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(f"timed out waiting for the engine store's lock {path}.lock") from None
                time.sleep(_POLL_S)
        try:
            with contextlib.suppress(KvtierError, OSError):
                return Client(layout, config, timeout=timeout)
            _start({**source, "socket": path, "layout": layout.to_dict()}, config, path, deadline)
            return Client(layout, config, timeout=timeout)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _load(source: dict[str, Any]) -> StoreConfig:
    path = source.get("config_path") or ""
    return load_config(path) if path else config_from_mapping(source.get("config") or {})


def _start(spec: dict[str, Any], config: StoreConfig, path: str, deadline: float) -> None:
    log = tempfile.NamedTemporaryFile(prefix="kvtier-engine-store-", suffix=".log", delete=False)  # noqa: SIM115
    # stdin stays open as long as this process lives: its end tells the daemon to stop.
    process = subprocess.Popen([sys.executable, "-m", "kvtier_connectors.vllm.engine_store", json.dumps(spec)],
                               stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    _started[path] = (process, log.name)
    while True:
        if process.poll() is not None:
            _started.pop(path, None)
            raise ConfigError(f"the engine's kvtier store exited with status {process.returncode}: "
                              f"{_tail(log.name)}")
        with contextlib.suppress(KvtierError, OSError):
            # A daemon that accepts but does not answer (stopped, starved) must not outlast the deadline.
            Client(layout_of(config), config, timeout=max(_POLL_S, deadline - time.monotonic())).close()
            return
        if time.monotonic() > deadline:
            stop_engine_store(path)
            raise ConfigError(f"the engine's kvtier store did not start in {START_TIMEOUT_S:.0f} s: {_tail(log.name)}")
        time.sleep(_POLL_S)


def layout_of(config: StoreConfig) -> KVLayout:
    if config.daemon.layout is None:
        raise ConfigError("the engine store's configuration has no layout")
    return config.daemon.layout


def _tail(path: str, lines: int = 5) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_engine_store(path: str, timeout: float = START_TIMEOUT_S) -> None:
    """Stop the private daemon this process started on ``path`` (if any) and wait for it to close its store."""
    started = _started.pop(path, None)
    if started is None:
        return
    process, log = started
    if process.stdin is not None:
        process.stdin.close()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
    if process.returncode == 0:
        Path(log).unlink(missing_ok=True)


def _serve(spec: dict[str, Any]) -> int:
    from kvtier.daemon.server import Daemon

    config = _engine_config(_load(spec), spec["socket"], KVLayout.from_dict(spec["layout"]))
    daemon = Daemon(config)
    # Request threads hold the GIL briefly; a short switch interval keeps a lookup from waiting behind a copy.
    sys.setswitchinterval(0.0005)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    daemon.start()

    def watch_parent() -> None:
        sys.stdin.buffer.read()
        stop.set()

    threading.Thread(target=watch_parent, daemon=True, name="kvtier-engine-parent").start()
    while not stop.wait(0.5):
        pass
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
