"""A call that straddles a daemon restart (a real SIGKILL and a new ``kvtier serve`` on the same socket) fails
cleanly: a lease or reservation names its connection, so its slots never resolve in the new daemon's arena;
the old arena is unmapped once no handle or copy of it is left."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from daemon_workers import LAYOUT, block_for, key_of

from kvtier.config import StoreConfig, TransferConfig
from kvtier.daemon import Client
from kvtier.errors import KvtierError, ProtocolError, StaleHandleError
from kvtier.store import Lease, Reservation
from kvtier.transfer import Direction, TransferEngine, make_transfer_engine

LAYOUT_ARG = "num_layers=2,num_kv_heads=2,head_dim=8,dtype=float32,block_tokens=4"


@dataclass
class Restartable:
    socket_path: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon", "serve", "--socket", self.socket_path,
                                      "--pool", "1MiB", "--no-disk", "--metrics-port", "0", "--layout", LAYOUT_ARG],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                Client(LAYOUT, StoreConfig(), address=f"unix:{self.socket_path}").close()
                return
            except KvtierError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "the daemon did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def daemon() -> Iterator[Restartable]:
    workdir = tempfile.mkdtemp(prefix="kvr", dir="/tmp")
    daemon = Restartable(os.path.join(workdir, "d.sock"))
    daemon.start()
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.proc.terminate()
        daemon.proc.wait(30)
    shutil.rmtree(workdir, ignore_errors=True)


def reconnect(client: Client) -> None:
    """Calls until the client is connected to the restarted daemon (the first ones see the broken socket)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            client.lookup([key_of(0, "probe")])
            return
        except ProtocolError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def mapped(name: str) -> bool:
    gc.collect()  # views caught in reference cycles (a job's callbacks) keep a mapping until collected
    return name in Path("/proc/self/maps").read_text()


def test_a_lease_across_a_restart_never_reads_the_new_arena(daemon: Restartable) -> None:
    old_key, new_key = key_of(1, "old"), key_of(1, "new")
    with Client(LAYOUT, StoreConfig(), address=f"unix:{daemon.socket_path}") as client:
        assert client.put([old_key], [block_for(old_key)]).wait(30).ok
        leased = threading.Event()
        go = threading.Event()
        seen: list[object] = []

        def stalled_reader() -> None:
            lease = client.acquire([old_key])
            leased.set()
            go.wait(60)  # the daemon is killed and restarted here
            try:
                seen.append(client.slot_view(lease.slots[0], lease).clone())
            except KvtierError as exc:
                seen.append(exc)
            client.release(lease)  # the lease went with the old daemon: nothing to do, no error

        reader = threading.Thread(target=stalled_reader)
        reader.start()
        assert leased.wait(30)
        old_arena = client.arena.name if client.arena else ""
        daemon.restart()
        reconnect(client)
        # The new daemon hands out the same slot numbers for another key.
        assert client.put([new_key], [block_for(new_key)]).wait(30).ok
        go.set()
        reader.join(60)
        assert len(seen) == 1 and isinstance(seen[0], StaleHandleError)
        # Nothing holds the old arena any more: it is unmapped (not kept until close).
        assert not mapped(old_arena)
        out = torch.empty_like(block_for(new_key))
        assert client.get([new_key], [out]).wait(30).ok and torch.equal(out, block_for(new_key))


def test_a_reservation_across_a_restart_never_writes_or_commits_in_the_new_daemon(daemon: Restartable) -> None:
    stale_key, victim = key_of(2, "stale"), key_of(2, "victim")
    with Client(LAYOUT, StoreConfig(), address=f"unix:{daemon.socket_path}") as client:
        reservation = client.reserve([stale_key])
        daemon.restart()
        reconnect(client)
        assert client.put([victim], [block_for(victim)]).wait(30).ok
        # The same slot number, in the new arena, holds the victim; the stale handle resolves nowhere.
        with pytest.raises(StaleHandleError):
            client.slot_rows(reservation)
        with pytest.raises(StaleHandleError):
            client.slot_view(reservation.slots[0], reservation)
        with pytest.raises(StaleHandleError):
            client.commit(reservation)
        client.abort(reservation)  # gone with the old daemon: no error
        assert client.lookup([stale_key]).num_blocks == 0
        out = torch.empty_like(block_for(victim))
        assert client.get([victim], [out]).wait(30).ok and torch.equal(out, block_for(victim))
        # A fresh handle of the new connection works as before.
        fresh = client.reserve([stale_key])
        client.slot_view(fresh.slots[0], fresh).copy_(block_for(stale_key).reshape(-1))
        client.commit(fresh)
        lease = client.acquire([stale_key])
        assert torch.equal(client.slot_rows(lease)[lease.slots[0], : LAYOUT.block_bytes],
                           block_for(stale_key).reshape(-1).view(torch.uint8))
        client.release(lease)


class GatedTransfer:
    """The CPU engine, whose first ``gate_calls`` submissions wait for ``gate`` (a copy stalled mid-call)."""

    def __init__(self, gate_calls: int) -> None:
        self.inner: TransferEngine = make_transfer_engine(TransferConfig(backend="cpu"))
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.gate_calls = gate_calls

    def submit_blocks(self, rows: torch.Tensor, slots: list[int], blocks: list[torch.Tensor], direction: Direction,
                      on_done: object) -> None:
        if self.gate_calls > 0:
            self.gate_calls -= 1
            self.entered.set()
            assert self.gate.wait(60)
        self.inner.submit_blocks(rows, slots, blocks, direction, on_done)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("op", ["put", "get"])
def test_a_copy_stalled_across_a_restart_fails_its_blocks(daemon: Restartable, op: str) -> None:
    key, other = key_of(3, f"stalled-{op}"), key_of(3, f"other-{op}")
    transfer = GatedTransfer(gate_calls=1 if op == "put" else 0)
    with Client(LAYOUT, StoreConfig(), address=f"unix:{daemon.socket_path}",
                transfer=transfer) as client:  # type: ignore[arg-type]
        if op == "get":
            assert client.put([key], [block_for(key)]).wait(30).ok
            transfer.gate_calls = 1
        out = torch.zeros_like(block_for(key))
        jobs: list[object] = []
        caller = threading.Thread(target=lambda: jobs.append(
            client.put([key], [block_for(key)]) if op == "put" else client.get([key], [out])))
        caller.start()
        assert transfer.entered.wait(30)
        old_arena = client.arena.name if client.arena else ""
        daemon.restart()
        reconnect(client)
        assert client.put([other], [block_for(other)]).wait(30).ok
        transfer.gate.set()
        caller.join(60)
        result = jobs[0].wait(30)  # type: ignore[attr-defined]
        assert result.failed == (0,)
        assert client.lookup([key]).num_blocks == 0
        got = torch.empty_like(block_for(other))
        assert client.get([other], [got]).wait(30).ok and torch.equal(got, block_for(other))
        assert not mapped(old_arena)


def test_handles_name_their_generation_in_the_embedded_store_too(tmp_path: Path) -> None:
    from kvtier import HostConfig, Store

    config = StoreConfig(host=HostConfig(capacity_bytes=8 * 4096), transfer=TransferConfig(backend="cpu"))
    with Store(LAYOUT, config) as one, Store(LAYOUT, config) as two:
        reservation = one.reserve([key_of(4)])
        assert reservation.generation == one.arena.name
        assert one.slot_rows(reservation).shape[0] == 8
        with pytest.raises(StaleHandleError):
            two.slot_rows(reservation)
        with pytest.raises(StaleHandleError):
            two.slot_view(reservation.slots[0], Lease(reservation.keys, reservation.slots, one.arena.name))
        one.abort(reservation)
        assert isinstance(reservation, Reservation)
