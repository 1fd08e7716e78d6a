"""The client after its daemon went away: calls fail fast with backoff, then reconnect to a restarted daemon
at the same address and map its new arena (the old mapping stays valid until the client closes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import pytest
import torch
from daemon_workers import LAYOUT, block_for, key_of

from kvtier.config import StoreConfig
from kvtier.daemon import Client
from kvtier.errors import KvtierError, ProtocolError

if TYPE_CHECKING:
    from conftest import DaemonProc

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


def test_a_call_on_a_connection_replaced_under_it_is_a_broken_connection(daemon: DaemonProc) -> None:
    """A thread takes the live connection just as another thread's call on it times out and the next call
    reconnects, closing the replaced connection: the first thread's call is a broken connection
    (``ProtocolError``, a miss for the connectors), never ``ClosedError``, which says the client itself was
    closed and which SGLang's prefetch and backup threads do not catch (one that raised would end)."""
    with daemon.client() as client:
        keys = [key_of(1, "replaced")]
        taken = client._live()
        taken._broken = "timed out"  # as another thread's timed-out call leaves it
        client.lookup(keys)  # reconnects; nothing of the old connection is held, so it is closed
        assert client.reconnects == 1
        with pytest.raises(ProtocolError, match="broken"):
            taken.call("lookup", keys=keys, prefetch=False)
