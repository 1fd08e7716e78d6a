"""The vLLM connector's store='daemon': every process of a host shares one ``kvtier serve``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
import torch

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from kvtier import Client, KVLayout, KvtierError  # noqa: E402
from kvtier.config import config_from_mapping  # noqa: E402
from kvtier_connectors.vllm.settings import ConnectorSettings, open_store, release_store  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)


@pytest.fixture
def daemon_address() -> Iterator[str]:
    workdir = tempfile.mkdtemp(prefix="kvv", dir="/tmp")  # a Unix socket path has at most 107 bytes
    socket_path = os.path.join(workdir, "d.sock")
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon", "serve", "--socket", socket_path, "--pool",
                             "1MiB", "--no-disk", "--metrics-port", "0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    address = f"unix:{socket_path}"
    deadline = time.monotonic() + 60
    while True:
        try:
            Client(LAYOUT, config_from_mapping({"daemon": {"connect": address}})).close()
            break
        except (KvtierError, OSError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)
    yield address
    proc.terminate()
    assert proc.wait(30) == 0


def test_store_daemon_opens_a_shared_client(daemon_address: str) -> None:
    settings = ConnectorSettings(store="daemon", instance="on-daemon", model_id="m",
                                 config={"daemon": {"connect": daemon_address}})
    writer = open_store(settings, LAYOUT)
    assert isinstance(writer, Client)
    key = bytes(range(16))
    block = torch.randn(LAYOUT.block_shape)
    try:
        assert writer.put([key], [block]).wait(30).ok
        # Another process's connector would open its own client: one more stands in for it.
        with Client(LAYOUT, config_from_mapping({"daemon": {"connect": daemon_address}})) as reader:
            out = [torch.empty(LAYOUT.block_shape)]
            assert reader.get([key], out).wait(30).ok and torch.equal(out[0], block)
    finally:
        release_store("on-daemon")
