"""The client after its daemon went away: calls fail fast with backoff, then reconnect to a restarted daemon
at the same address and map its new arena (the old mapping stays valid until the client closes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from daemon_workers import LAYOUT, block_for, key_of

from kvtier.config import StoreConfig
from kvtier.daemon import Client
from kvtier.errors import KvtierError, ProtocolError

LAYOUT_ARG = "num_layers=2,num_kv_heads=2,head_dim=8,dtype=float32,block_tokens=4"


def serve(socket_path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon", "serve", "--socket", socket_path, "--pool",
                             "1MiB", "--no-disk", "--metrics-port", "0", "--layout", LAYOUT_ARG],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            Client(LAYOUT, StoreConfig(), address=f"unix:{socket_path}").close()
            return proc
        except KvtierError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def test_a_client_reconnects_to_a_restarted_daemon() -> None:
    workdir = tempfile.mkdtemp(prefix="kvr", dir="/tmp")
    socket_path = os.path.join(workdir, "d.sock")
    proc = serve(socket_path)
    client = Client(LAYOUT, StoreConfig(), address=f"unix:{socket_path}")
    try:
        key = key_of(1, "reconnect")
        assert client.put([key], [block_for(key)]).wait(30).ok
        old_rows = client.slot_rows()
        proc.kill()
        proc.wait()
        with pytest.raises(ProtocolError, match=r"broke|closed"):
            client.lookup([key])
        with pytest.raises(ProtocolError, match="cannot connect"):
            client.lookup([key])
        # Inside the backoff a call fails at once, without a connection attempt.
        with pytest.raises(ProtocolError, match="next attempt"):
            client.lookup([key])
        proc = serve(socket_path)
        deadline = time.monotonic() + 10
        while True:
            try:
                found = client.lookup([key])
                break
            except ProtocolError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert found.num_blocks == 0  # the new daemon starts empty
        assert client.reconnects == 1
        assert client.put([key], [block_for(key)]).wait(30).ok
        out = torch.empty_like(block_for(key))
        assert client.get([key], [out]).wait(30).ok and torch.equal(out, block_for(key))
        assert client.slot_rows().data_ptr() != old_rows.data_ptr()
        assert int(old_rows[0, 0]) >= 0  # still mapped
    finally:
        client.close()
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(workdir, ignore_errors=True)
