"""``Client`` against a real daemon: the store interface over Unix and TCP, dedup, leases, stats, metrics."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from kvtier import (
    AuthError,
    ConfigError,
    InvalidInputError,
    KVLayout,
    LayoutMismatchError,
    ProtocolError,
    Store,
    StoreConfig,
    Tier,
)
from kvtier.config import DaemonConfig
from kvtier.daemon import Client, open_store, stats_cmd
from kvtier.daemon.client import Connection
from kvtier.transfer import CpuTransferEngine, Direction, DoneCallback, Transfer

if TYPE_CHECKING:
    from conftest import DaemonProc, Kit


def test_put_lookup_get_round_trip(daemon: DaemonProc, kit: Kit) -> None:
    keys = [kit.key_of(i, "round-trip") for i in range(10)]
    with daemon.client(namespace="llama-test") as client:
        assert daemon.stats()["daemon"]["namespaces"] == {"llama-test": 1}
        assert client.lookup(keys).num_blocks == 0
        result = client.put(keys, [kit.block_for(key) for key in keys]).wait(10)
        assert result.ok
        lookup = client.lookup([*keys, kit.key_of(99, "absent")])
        assert lookup.num_blocks == 10 and set(lookup.tiers) == {Tier.HOST}
        assert client.contains(keys[0]) is Tier.HOST
        out = [torch.empty(kit.layout.block_shape) for _ in keys]
        job = client.get(keys, out)
        assert job.wait(10).ok and job.done()
        assert all(torch.equal(got, kit.block_for(key)) for got, key in zip(out, keys, strict=True))


def test_a_get_fails_only_the_missing_indices(daemon: DaemonProc, kit: Kit) -> None:
    keys = [kit.key_of(i, "holes") for i in range(4)]
    with daemon.client() as client:
        client.put([keys[0], keys[2]], [kit.block_for(keys[0]), kit.block_for(keys[2])]).wait(10)
        out = [torch.zeros(kit.layout.block_shape) for _ in keys]
        assert client.get(keys, out).wait(10).failed == (1, 3)
        assert torch.equal(out[2], kit.block_for(keys[2]))


def test_the_same_key_put_by_two_clients_at_once_is_stored_once(daemon: DaemonProc, kit: Kit) -> None:
    keys = [kit.key_of(i, "race") for i in range(64)]
    blocks = [kit.block_for(key) for key in keys]
    before = daemon.stats()["stats"]
    clients = [daemon.client(), daemon.client()]
    barrier = threading.Barrier(2)

    def put(client: Client) -> None:
        barrier.wait()
        assert client.put(keys, blocks).wait(10).ok

    threads = [threading.Thread(target=put, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = daemon.stats()["stats"]
    assert after["put_blocks"] - before["put_blocks"] == 64
    assert after["put_deduplicated_blocks"] - before["put_deduplicated_blocks"] == 64
    assert after["tiers"]["host"]["used_blocks"] - before["tiers"]["host"]["used_blocks"] == 64
    for client in clients:
        client.close()


def test_the_zero_copy_path_and_its_ownership_rules(daemon: DaemonProc, kit: Kit) -> None:
    keys = [kit.key_of(i, "zero-copy") for i in range(3)]
    with daemon.client() as writer, daemon.client() as other:
        reservation = writer.reserve(keys)
        assert reservation.keys == tuple(keys) and not reservation.skipped
        for key, slot in zip(reservation.keys, reservation.slots, strict=True):
            writer.slot_view(slot).copy_(kit.block_for(key).reshape(-1))
        assert other.lookup(keys).num_blocks == 0  # being written: not readable
        with pytest.raises(InvalidInputError, match="not reserved"):
            other.commit(reservation)  # only the writer may commit its reservation
        writer.commit(reservation)
        assert other.reserve(keys).skipped == tuple(keys)
        lease = other.acquire(keys)
        assert lease.keys == tuple(keys)
        assert torch.equal(other.slot_view(lease.slots[1]), kit.block_for(keys[1]).reshape(-1))
        with pytest.raises(InvalidInputError, match="not leased"):
            writer.release(lease)
        other.release(lease)
    assert daemon.stats()["daemon"]["leased_blocks"] == 0


def test_bad_arguments_are_refused_before_sending(daemon: DaemonProc, kit: Kit) -> None:
    with daemon.client() as client:
        with pytest.raises(InvalidInputError):
            client.lookup([b"short"])
        with pytest.raises(InvalidInputError):
            client.put([kit.key_of(0)], [torch.zeros(3)])


def test_a_tcp_client_carries_payloads_in_frames(daemon: DaemonProc, kit: Kit) -> None:
    keys = [kit.key_of(i, "tcp") for i in range(20)]
    config = StoreConfig(daemon=DaemonConfig(max_frame_bytes=64 * 1024))  # forces several frames per call
    with Client(kit.layout, config, address=daemon.tcp_address, token=daemon.token) as remote:
        assert remote.put(keys, [kit.block_for(key) for key in keys]).wait(10).ok
        with daemon.client() as local:
            assert local.lookup(keys).num_blocks == 20
        out = [torch.empty(kit.layout.block_shape) for _ in range(21)]
        result = remote.get([*keys, kit.key_of(99, "tcp-absent")], out).wait(10)
        assert result.failed == (20,)
        assert all(torch.equal(out[i], kit.block_for(key)) for i, key in enumerate(keys))
        assert remote.stats().put_blocks >= 20


def test_tcp_without_the_right_token_is_refused_and_counted(daemon: DaemonProc, kit: Kit) -> None:
    before = daemon.stats()["daemon"]["auth_failures"]
    for token in ("wrong", ""):
        with pytest.raises(AuthError):
            Client(kit.layout, StoreConfig(), address=daemon.tcp_address, token=token)
    assert daemon.stats()["daemon"]["auth_failures"] == before + 2


def test_a_hello_with_another_layout_is_refused(daemon: DaemonProc) -> None:
    other = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)
    with pytest.raises(LayoutMismatchError):
        Client(other, StoreConfig(), address=daemon.address)


def test_open_store_picks_the_daemon_or_an_embedded_store(daemon: DaemonProc, kit: Kit) -> None:
    with open_store(kit.layout, StoreConfig(daemon=DaemonConfig(connect=daemon.address))) as store:
        assert isinstance(store, Client)
    with open_store(kit.layout, StoreConfig()) as store:
        assert isinstance(store, Store)


def test_the_metrics_endpoint_exports_the_counters(daemon: DaemonProc, kit: Kit) -> None:
    with daemon.client() as client:
        client.lookup([kit.key_of(0, "metrics")])
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
    for name in ("kvtier_hit_blocks_total{tier=\"host\"}", "kvtier_miss_blocks_total",
                 "kvtier_tier_bytes_written_total", "kvtier_evicted_blocks_total", "kvtier_admissions_rejected_total",
                 "kvtier_occupancy_ratio", "kvtier_op_latency_seconds_bucket{le=\"0.001\",op=\"lookup\"}",
                 "kvtier_clients_connected{transport=\"unix\"} 1.0", "kvtier_auth_failures_total"):
        assert name in text, name


def test_kvtier_stats_prints_a_table_and_json(daemon: DaemonProc, capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(address=None, socket=daemon.socket_path, token=None, json=False)
    assert stats_cmd.run(args, StoreConfig()) == 0
    table = capsys.readouterr().out
    assert "host pool" in table and "occupancy" in table and "lookup" in table
    args.json = True
    assert stats_cmd.run(args, StoreConfig()) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stats"]["tiers"]["host"]["capacity_blocks"] == 256
    args.socket = daemon.socket_path + ".absent"
    assert stats_cmd.run(args, StoreConfig()) == 1


def _stop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped: a thread inside a system call (a fresh daemon's disk
    preallocation) stops only when the call returns, and may answer a request meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline, "the daemon did not stop"
        time.sleep(0.01)


def test_a_stalled_daemon_is_a_protocol_error_within_the_configured_deadline(daemon: DaemonProc, kit: Kit) -> None:
    """No call waits forever on a daemon that stopped answering (SIGSTOP, as a starved process behaves):
    ``daemon.request_timeout_ms`` bounds each socket operation, and the next call after it resumes reconnects."""
    config = StoreConfig(daemon=DaemonConfig(request_timeout_ms=300))
    keys = [kit.key_of(i, "stalled") for i in range(2)]
    with Client(kit.layout, config, address=daemon.address) as client:
        assert client.timeout_s == 0.3
        _stop(daemon.proc.pid)
        try:
            started = time.monotonic()
            with pytest.raises(ProtocolError):
                client.lookup(keys)
            with pytest.raises(ProtocolError):  # a flush waits for its own timeout plus the connection's
                client.flush(timeout_s=0.2)
            assert time.monotonic() - started < 10
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert client.put(keys, [kit.block_for(key) for key in keys]).wait(10).ok
        client.flush()
        assert client.lookup(keys).num_blocks == 2


class _GatedStores(CpuTransferEngine):
    """Store copies wait for ``gate`` (a copy queued behind others on a stream); loads run at once."""

    def __init__(self) -> None:
        super().__init__(num_workers=1)
        self.gate = threading.Event()

    def submit_blocks(self, rows: torch.Tensor, slots: Sequence[int], blocks: Sequence[torch.Tensor],
                      direction: Direction, on_done: DoneCallback, *, after: object | None = None) -> Transfer:
        if direction is Direction.LOAD:
            return super().submit_blocks(rows, slots, blocks, direction, on_done, after=after)

        def copy_later() -> None:
            self.gate.wait(30)
            super(_GatedStores, self).submit_blocks(rows, slots, blocks, direction, on_done).wait()

        threading.Thread(target=copy_later, daemon=True).start()
        return _Pending()


class _Pending(Transfer):
    def done(self) -> bool:
        return False

    def wait(self, timeout: float | None = None) -> bool:
        return False


def test_a_put_still_copying_across_a_reconnect_never_lands_in_another_writers_block(
        daemon: DaemonProc, kit: Kit) -> None:
    """A put's copy outlives its connection (another call timed out; the next one reconnects). The old
    connection stays open until the copy is done, so the daemon never frees the slot under it: another
    client's put of another key, committed meanwhile, reads back its own bytes, and the first put fails."""
    config = StoreConfig(daemon=DaemonConfig(request_timeout_ms=300))
    engine = _GatedStores()
    first, second = kit.key_of(0, "stale-copy"), kit.key_of(1, "stale-copy")
    with (Client(kit.layout, config, address=daemon.address, transfer=engine) as slow,
          Client(kit.layout, address=daemon.address) as other):
        stale = slow.put([first], [torch.full(kit.layout.block_shape, 1.0, dtype=kit.layout.torch_dtype)])
        _stop(daemon.proc.pid)
        try:
            with pytest.raises(ProtocolError):
                slow.lookup([first])
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while slow.reconnects == 0 and time.monotonic() < deadline:
            with contextlib.suppress(ProtocolError):  # inside the reconnect backoff
                slow.lookup([first])
        assert slow.reconnects == 1 and slow.parked_connections == 1
        # The slot the stale copy will write is still reserved: another writer cannot be given it.
        expected = torch.full(kit.layout.block_shape, 2.0, dtype=kit.layout.torch_dtype)
        assert other.put([second], [expected]).wait(10).ok
        engine.gate.set()
        assert stale.wait(10).failed == (0,)
        assert slow.parked_connections == 0
        got = torch.empty_like(expected)
        assert other.get([second], [got]).wait(10).ok and torch.equal(got, expected)


def test_a_reconnect_that_cannot_map_the_new_arena_closes_its_connection(daemon: DaemonProc, kit: Kit,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failed attempt would otherwise leave a session in the daemon and a socket here."""
    with Client(kit.layout, address=daemon.address) as client:
        closed: list[str] = []
        real_close = Connection.close

        def close(conn: Connection) -> None:
            closed.append(conn.generation)
            real_close(conn)

        def cannot_map(hello: object) -> None:
            raise ConfigError("no room in /dev/shm")

        monkeypatch.setattr(Connection, "close", close)
        monkeypatch.setattr(client, "_map_arena", cannot_map)
        old = client._conn
        old._broken = "timed out"  # as Connection.call marks a timed-out request
        with pytest.raises(ConfigError):
            client.lookup([kit.key_of(0, "remap")])
        assert len(closed) == 1 and closed[0] != old.generation and client._conn is old


def test_a_reservation_outlives_an_ended_connection_until_the_client_lets_it_go(
        make_daemon: Callable[..., DaemonProc], kit: Kit) -> None:
    """An error reply that ends the connection (a second hello: ``ProtocolError``) finds a reservation whose
    copy may still be running in the client. The daemon keeps the slot until the client closes that
    connection, which it does once the handle is let go: another writer filling the pool meanwhile is never
    given the slot, so the late copy lands in no one's block."""
    daemon = make_daemon(pool="64KiB")
    with (Client(kit.layout, address=daemon.address) as client,
          Client(kit.layout, address=daemon.address) as other):
        reservation = client.reserve([kit.key_of(0, "ended")])
        rows = client.slot_rows(reservation)
        with pytest.raises(ProtocolError):
            client._conn.call("hello", layout=None)
        theirs = [kit.key_of(i, "ended-other") for i in range(client._conn.hello["num_slots"] - 1)]
        assert other.put(theirs, [kit.block_for(key) for key in theirs]).wait(10).ok
        lease = other.acquire(theirs)
        assert len(lease.slots) == len(theirs) and reservation.slots[0] not in lease.slots
        other.release(lease)
        rows[reservation.slots[0]].fill_(0xAB)  # the late copy
        out = [torch.empty(kit.layout.block_shape) for _ in theirs]
        assert other.get(theirs, out).wait(10).ok
        assert all(torch.equal(got, kit.block_for(key)) for got, key in zip(out, theirs, strict=True))
        assert client.lookup(theirs).num_blocks == len(theirs)  # the next call reconnects
        assert client.reconnects == 1 and client.parked_connections == 1
        assert daemon.stats()["daemon"]["held_after_error"] == 1
        client.abort(reservation)  # its copy done, the handle goes: so does the parked connection
        assert client.parked_connections == 0
        deadline = time.monotonic() + 10
        while (stats := daemon.stats()["daemon"])["held_after_error"] or stats["reserved_blocks"]:
            assert time.monotonic() < deadline, stats
            time.sleep(0.02)
