"""The embedded store of a vLLM engine whose workers are processes of their own (engine_store.py), with real
processes and a real private daemon; no vLLM needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier.daemon import Client
from kvtier.errors import ConfigError, KvtierError
from kvtier.layout import KVLayout
from kvtier_connectors.vllm.engine_store import _started, engine_socket_path, open_engine_store, stop_engine_store
from kvtier_connectors.vllm.settings import ConnectorSettings, open_store, release_store, store_name

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
ROOT = Path(__file__).parent.parent.parent
DEADLINE_S = 60.0


def source(tmp_path: Path) -> dict[str, object]:
    return {"config_path": "", "config": {"host": {"capacity_bytes": "1MiB"}, "transfer": {"backend": "cpu"},
                                          "disk": {"paths": [str(tmp_path / "disk")], "write_mode": "through",
                                                   "capacity_bytes": "16MiB", "region_bytes": "1MiB",
                                                   "writeback_buffer_bytes": "1MiB"}}}


def block(seed: int) -> torch.Tensor:
    return torch.randn(LAYOUT.block_shape, generator=torch.Generator().manual_seed(seed))


def child(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "connectors")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


CHILD_PUTS = """
    import json, sys, torch
    from kvtier.layout import KVLayout
    from kvtier_connectors.vllm.engine_store import open_engine_store, _started
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
    client = open_engine_store(json.loads(sys.argv[1]), layout, sys.argv[2], "default")
    data = torch.randn(layout.block_shape, generator=torch.Generator().manual_seed(7))
    client.put([b"k" * 16], [data]).wait(30)
    print("STARTED" if _started else "CONNECTED", flush=True)
    client.close()
"""


def test_processes_of_one_engine_share_one_private_daemon(tmp_path: Path) -> None:
    """The first process starts the engine's daemon; another process of the engine connects to it (and does
    not start a second); what one saves the other reads; stopping it keeps the disk tier for the next start."""
    import json

    engine = f"unit-{os.getpid()}-{time.monotonic_ns()}"
    path = engine_socket_path(engine, "default")
    assert path != engine_socket_path(engine, "other") and path != engine_socket_path(engine + "x", "default")
    client = open_engine_store(source(tmp_path), LAYOUT, engine, "default")
    try:
        proc = child(CHILD_PUTS, json.dumps(source(tmp_path)), engine)
        out, err = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, err
        assert out.strip() == "CONNECTED"
        got = torch.empty(LAYOUT.block_shape)
        client.get([b"k" * 16], [got]).wait(30)
        assert torch.equal(got, block(7))
    finally:
        client.close()
        stop_engine_store(path)
    assert not os.path.exists(path)
    again = open_engine_store(source(tmp_path), LAYOUT, engine, "default")
    try:
        got = torch.empty(LAYOUT.block_shape)
        again.get([b"k" * 16], [got]).wait(30)
        assert torch.equal(got, block(7)), "the restarted engine store lost what its disk tier held"
    finally:
        again.close()
        stop_engine_store(path)


CHILD_HOLDS = """
    import json, sys, time
    from kvtier.layout import KVLayout
    from kvtier_connectors.vllm.engine_store import open_engine_store
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
    open_engine_store(json.loads(sys.argv[1]), layout, sys.argv[2], "default")
    print("READY", flush=True)
    time.sleep(600)
"""


def test_the_private_daemon_exits_with_the_process_that_started_it(tmp_path: Path) -> None:
    import json

    engine = f"unit-kill-{os.getpid()}-{time.monotonic_ns()}"
    path = engine_socket_path(engine, "default")
    proc = child(CHILD_HOLDS, json.dumps(source(tmp_path)), engine)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        assert os.path.exists(path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(DEADLINE_S)
    deadline = time.monotonic() + DEADLINE_S
    while os.path.exists(path):
        assert time.monotonic() < deadline, "the private daemon outlived the engine process that started it"
        time.sleep(0.1)


def test_a_daemon_that_cannot_start_is_a_config_error(tmp_path: Path) -> None:
    bad = {"config_path": "", "config": {"host": {"capacity_bytes": "1MiB"}, "transfer": {"backend": "no-such"}}}
    with pytest.raises(ConfigError):
        open_engine_store(bad, LAYOUT, f"unit-bad-{os.getpid()}", "default")


def test_clients_name_the_engine_socket(tmp_path: Path) -> None:
    engine = f"unit-name-{os.getpid()}-{time.monotonic_ns()}"
    client = open_engine_store(source(tmp_path), LAYOUT, engine, "default")
    try:
        assert isinstance(client, Client)
        assert client.config.daemon.connect == f"unix:{engine_socket_path(engine, 'default')}"
    finally:
        client.close()
        stop_engine_store(engine_socket_path(engine, "default"))


CHILD_EXITS_WITHOUT_CLOSING = """
    import json, sys, torch
    from kvtier.layout import KVLayout
    from kvtier_connectors.vllm.settings import ConnectorSettings, open_store
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
    settings = ConnectorSettings(model_id="m", instance="exit", config=json.loads(sys.argv[1])["config"])
    store = open_store(settings, layout)
    data = torch.randn(layout.block_shape, generator=torch.Generator().manual_seed(7))
    store.put([b"k" * 16], [data]).wait(30)
    print(sys.getswitchinterval(), flush=True)
"""


def test_an_in_process_store_left_open_at_exit_keeps_its_disk_tier(tmp_path: Path) -> None:
    """vLLM's in-process engine never shuts its connectors down: the store is closed at interpreter exit, so
    what it wrote through to disk is there for the next start. The engine process's switch interval is low."""
    import json

    from kvtier.config import config_from_mapping
    from kvtier.store import Store

    proc = child(CHILD_EXITS_WITHOUT_CLOSING, json.dumps(source(tmp_path)))
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, err
    assert float(out.strip()) <= 0.0005
    config = source(tmp_path)["config"]
    assert isinstance(config, dict)
    store = Store(LAYOUT, config_from_mapping(config))
    try:
        got = torch.empty(LAYOUT.block_shape)
        store.get([b"k" * 16], [got]).wait(30)
        assert torch.equal(got, block(7))
    finally:
        store.close()


def test_a_paused_private_daemon_holds_no_worker_past_its_deadline(tmp_path: Path) -> None:
    """Issue 25: with the engine's private daemon paused (SIGSTOP, as a starved process behaves), a worker's
    call to it ends with a typed error once ``worker_timeout_s`` passes, never waits for the daemon."""
    engine = f"unit-paused-{os.getpid()}-{time.monotonic_ns()}"
    settings = ConnectorSettings.from_extra_config(
        {"config": source(tmp_path)["config"], "instance": "paused", "worker_timeout_s": 0.5}, "m")
    client = open_store(settings, LAYOUT, "worker", engine)
    daemon, _ = _started[engine_socket_path(engine, "paused")]
    outcome: list[BaseException | None] = []

    def acquire() -> None:
        try:
            client.acquire([b"k" * 16])
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    daemon.send_signal(signal.SIGSTOP)
    try:
        thread = threading.Thread(target=acquire, daemon=True)
        thread.start()
        thread.join(DEADLINE_S / 2)
        waited = thread.is_alive()
    finally:
        daemon.send_signal(signal.SIGCONT)
        thread.join(DEADLINE_S)
        release_store(store_name(settings, "worker", engine))
    assert not waited, "the worker's call waited on the paused daemon"
    assert isinstance(outcome[0], KvtierError)
